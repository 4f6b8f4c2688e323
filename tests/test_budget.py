"""The time budget: a plan of epochs laid over minutes, and a budgeted run that stops on time at the end of its
learning-rate schedule."""

import csv
from pathlib import Path

import pytest

from cnnlab import config
from cnnlab.budget import BudgetPlan, downsized, epochs_held, pick_size, plan_for
from cnnlab.modeling import model_input_size
from cnnlab.runs import RunDir
from cnnlab.errors import UserError
from cnnlab.training import check_network_sizes, lr_schedule, train, training_phases
from tests.conftest import REPO

SMOKE = str(REPO / "configs" / "smoke.yaml")


def test_a_plan_spends_time_on_each_stage_in_proportion_to_its_epochs_times_its_pixels():
    cfg = config.resolve([str(REPO / "configs/small_data/standard.yaml")])
    phases = training_phases(cfg)
    full = model_input_size(cfg)
    plan = plan_for(phases, full, lambda p: config.as_size(p["size"]) if p["size"] is not None else full)
    # 6 epochs each at 96, 112 and 128 pixels, then 20 at 144: costs 6*(96/144)^2, 6*(112/144)^2, ...
    costs = [6 * (96 / 144) ** 2, 6 * (112 / 144) ** 2, 6 * (128 / 144) ** 2, 20.0]
    total = sum(costs)
    assert plan.total_cost == pytest.approx(total)
    assert plan.position(costs[0] / total) == pytest.approx(6)
    assert plan.position(sum(costs[:3]) / total) == pytest.approx(18)
    assert plan.position((sum(costs[:3]) + 10) / total) == pytest.approx(28)  # half-way through the last stage
    assert plan.position(0.0) == 0 and plan.position(1.0) == 38 and plan.position(1.7) == 38


def test_positions_grow_with_time_and_halve_the_time_of_a_stage_at_half_the_pixels():
    plan = BudgetPlan([(4, 0.5), (8, 1.0)])  # 4 epochs at half the pixels cost 2 units, then 4 units
    assert plan.position(1 / 6) == pytest.approx(2)  # 1 unit of 6: half of the cheap stage
    assert plan.position(2 / 6) == pytest.approx(4)
    assert plan.position(4 / 6) == pytest.approx(6)
    fractions = [i / 20 for i in range(21)]
    positions = [plan.position(f) for f in fractions]
    assert positions == sorted(positions)


def test_a_budgeted_run_stops_on_time_with_its_schedule_at_its_end_and_resizes_along_the_plan(tmp_path, capsys):
    budget_min = 0.25
    cfg = config.resolve([SMOKE], [f"run.dir={tmp_path}", "run.name=b", f"training.time_budget={budget_min}",
                                   "training.epochs=6", "training.warmup_epochs=1",
                                   "training.progressive.sizes=[16, 24]", "training.progressive.epochs=[2, 2]",
                                   "runtime.log_histograms=false"])
    train(cfg, [SMOKE])
    out = capsys.readouterr().out
    with open(Path(tmp_path) / "b" / "history.csv") as f:
        rows = list(csv.DictReader(f))
    elapsed = [float(r["elapsed_seconds"]) for r in rows]
    lrs = [float(r["learning_rate"]) for r in rows]
    peak = cfg["training"]["learning_rate"]
    # Stops when the budget is spent: after the batch that spends it, or at the end of an epoch that ended just
    # inside it (saving it spent the rest). Either way the last epoch ends within one epoch of the budget.
    last_epoch = float(rows[-1]["epoch_seconds"])
    assert budget_min * 60 - last_epoch <= elapsed[-1] <= budget_min * 60 + last_epoch
    assert elapsed[-2] < budget_min * 60
    assert len(rows) >= 4
    assert lrs[-1] < 0.02 * peak  # the cosine schedule reached its end with the budget
    assert max(lrs) > 0.5 * peak  # and had been near its peak on the way
    # The stages came in order, each announced with its network input size.
    assert out.index("network input 16x16") < out.index("network input 24x24") < out.index("network input 32x32")
    assert "Time budget: 0.25 min" in out and f"of {budget_min:g} min" in out


def test_the_budgeted_learning_rate_is_the_epoch_schedule_at_the_plan_position():
    cfg = config.resolve([SMOKE], ["training.warmup_epochs=1", "training.time_budget=1"])
    schedule = lr_schedule(cfg["training"], steps_per_epoch=10)
    from cnnlab.budget import TimeBudget

    plan = BudgetPlan([(6, 1.0)])
    seconds = [0.0]
    timer = TimeBudget(plan, 60.0, lambda: seconds[0], schedule, 0, 10, 6)
    seconds[0] = 5.0  # 1/12 of the budget: half-way through the one warmup epoch of six
    timer.on_train_begin()
    assert timer.learning_rate() == pytest.approx(float(schedule(5)))
    assert timer.learning_rate() == pytest.approx(cfg["training"]["learning_rate"] / 2, rel=1e-5)
    seconds[0] = 60.0
    # The rate follows the clock's readings (after each batch, so that workers can agree on them), not the clock.
    assert timer.learning_rate() == pytest.approx(float(schedule(5)))
    timer.on_train_begin()
    assert timer.learning_rate() == pytest.approx(0.0, abs=1e-9)


def test_the_epochs_a_budget_holds_shrink_with_the_pixels_of_an_epoch():
    plan = BudgetPlan([(6, 0.5), (10, 1.0)])  # 6 epochs at half the pixels, then 4 at full size: 7 units of cost
    assert epochs_held(plan, budget_s=70.0, epoch_s=10.0) == pytest.approx(10)  # exactly the plan
    assert epochs_held(plan, budget_s=35.0, epoch_s=10.0) == pytest.approx(5)
    # At 3/4 of the size along each side an epoch costs 9/16 of the pixels, so the budget holds 16/9 as many.
    assert epochs_held(plan, budget_s=35.0, epoch_s=10.0, scale=0.75) == pytest.approx(5 * 16 / 9)


def test_the_size_picked_is_the_largest_that_holds_the_fewest_epochs_worth_training():
    def held(at_full):  # a budget that holds `at_full` epochs at 144 pixels, more at smaller sizes
        return lambda scale: at_full / scale ** 2

    sizes = [96, 112, 128]
    assert pick_size(144, sizes, 24, held(30)) == 144         # the config's own size holds enough
    assert pick_size(144, sizes, 24, held(20)) == 128         # 25.3 epochs at 128
    assert pick_size(144, sizes, 24, held(16)) == 112         # 20.3 at 128, 26.4 at 112
    assert pick_size(144, sizes, 24, held(5)) == 96           # none holds 24: the smallest
    assert pick_size(144, [128, 96], 24, held(11)) == 96      # the list's order does not matter (24.75 at 96)


def test_downsizing_shrinks_the_images_the_crops_and_the_stages_by_one_factor():
    cfg = config.resolve([str(REPO / "configs/small_data/standard.yaml")],
                         ["training.downsize.sizes=[96, 112]", "training.downsize.min_epochs=20"])
    small = downsized(cfg, 112)
    factor = 112 / 144
    assert small["augment"]["crop"] == [112, 112]
    assert small["data"]["image_size"] == [round(160 * factor)] * 2  # 124: a crop shows the same share of the image
    assert small["training"]["progressive"]["sizes"] == [[round(s * factor)] * 2 for s in (96, 112, 128)]
    assert small["training"]["downsize"]["sizes"] == []  # spent: a resumed run keeps this size
    assert cfg["augment"]["crop"] == [144, 144]  # the config it came from is untouched
    config.resolve([], [], base=small)  # and the result is a valid config


def test_a_budget_too_short_for_the_plan_trains_and_saves_the_run_at_a_smaller_size(tmp_path, capsys):
    # min_epochs far above what 6 seconds hold at any size: the run falls back to its smallest size, 16 pixels.
    cfg = config.resolve([SMOKE], [f"run.dir={tmp_path}", "run.name=d", "training.time_budget=0.1",
                                   "training.downsize.sizes=[16, 24]", "training.downsize.min_epochs=1000",
                                   "data.synthetic_size=256", "runtime.log_histograms=false"])
    train(cfg, [SMOKE])
    out = capsys.readouterr().out
    assert "training at 16." in out
    run = RunDir(tmp_path / "d")
    saved = run.config()
    assert saved["data"]["image_size"] == [16, 16] and saved["training"]["downsize"]["sizes"] == []
    model = run.load("last", what="test")
    assert tuple(model.input_shape[1:3]) == (16, 16)
    # The timing steps count towards the budget: the first epoch's clock starts after them.
    history = run.history()
    assert history[0]["elapsed_seconds"] > history[0]["epoch_seconds"]

    # Resumed from its config files, the run keeps the size it chose rather than timing steps again.
    train(cfg, [SMOKE], resume=True)
    assert "a training step at" not in capsys.readouterr().out
    assert run.config()["data"]["image_size"] == [16, 16]

    # A budget that holds the plan at the config's own size keeps it (min_epochs 1).
    cfg = config.resolve([SMOKE], [f"run.dir={tmp_path}", "run.name=own", "training.time_budget=0.1",
                                   "training.downsize.sizes=[16, 24]", "data.synthetic_size=256",
                                   "runtime.log_histograms=false"])
    train(cfg, [SMOKE])
    assert "training at 32." in capsys.readouterr().out
    assert RunDir(tmp_path / "own").config()["data"]["image_size"] == [32, 32]

    # Without a budget there is nothing to fit: no timed steps, the config's own size.
    cfg = config.resolve([SMOKE], [f"run.dir={tmp_path}", "run.name=none", "training.epochs=1",
                                   "training.downsize.sizes=[16, 24]", "training.downsize.min_epochs=1000",
                                   "data.synthetic_size=64", "runtime.log_histograms=false"])
    train(cfg, [SMOKE])
    assert "a training step at" not in capsys.readouterr().out
    assert RunDir(tmp_path / "none").config()["data"]["image_size"] == [32, 32]


@pytest.mark.parametrize(
    "sets, fragments",
    [
        # Four 2x2 poolings need 16 pixels: a 12-pixel progressive stage would leave nothing to pool.
        (["training.progressive.sizes=[12]", "training.progressive.epochs=2"],
         ["training.progressive.sizes: 12x12 is smaller than model.standard takes",
          "need at least 16x16", "Received: [12]"]),
        # Downsizing to 20 pixels shrinks the 24-pixel stage to 15: too small. 28 alone would be fine (21).
        (["training.progressive.sizes=[24]", "training.progressive.epochs=2", "training.time_budget=0.1",
          "training.downsize.sizes=[20, 28]"],
         ["training.downsize.sizes: training at 20 pixels makes a progressive stage 15x15",
          "need at least 16x16", "or make training.progressive.sizes larger", "Received: [20, 28]"]),
        (["training.time_budget=0.1", "training.downsize.sizes=[8]"],
         ["training.downsize.sizes: training at 8 pixels, smaller than model.standard takes", "at least 16x16",
          "drop the size. Received: [8]"]),
    ],
)
def test_a_size_the_network_cannot_take_is_refused_in_one_line_before_the_run_is_written(tmp_path, sets, fragments):
    cfg = config.resolve([SMOKE], [f"run.dir={tmp_path}", "run.name=small", "model.standard.filters=[8, 8, 8, 8]",
                                   "model.standard.kernel_size=3", "model.standard.kernel_initializer=he_normal",
                                   *sets])
    with pytest.raises(UserError) as info:
        train(cfg, [SMOKE])
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    assert not (tmp_path / "small").exists()


def test_the_smallest_size_the_network_takes_passes_the_check():
    # 16 pixels: exactly what four poolings need (16 -> 8 -> 4 -> 2 -> 1).
    cfg = config.resolve([SMOKE], ["model.standard.filters=[8, 8, 8, 8]", "model.standard.kernel_size=3",
                                   "model.standard.kernel_initializer=he_normal", "training.progressive.sizes=[16]",
                                   "training.progressive.epochs=2"])
    check_network_sizes(cfg)
