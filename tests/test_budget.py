"""The time budget: a plan of epochs laid over minutes, and a budgeted run that stops on time at the end of its
learning-rate schedule."""

import csv
from pathlib import Path

import pytest

from cnnlab import config
from cnnlab.budget import BudgetPlan, plan_for
from cnnlab.modeling import model_input_size
from cnnlab.training import lr_schedule, train, training_phases
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
    assert timer.learning_rate() == pytest.approx(float(schedule(5)))
    assert timer.learning_rate() == pytest.approx(cfg["training"]["learning_rate"] / 2, rel=1e-5)
    seconds[0] = 60.0
    assert timer.learning_rate() == pytest.approx(0.0, abs=1e-9)
