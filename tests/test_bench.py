"""The time-to-accuracy bench: its split of the val photos (two disjoint, class-balanced halves that take turns), and
its held-out gap scored both ways round from every epoch's checkpoint."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest

from cnnlab import config
from cnnlab.evaluation import evaluate
from cnnlab.training import train
from tests.conftest import REPO, make_image_folder

def load_bench(name: str):
    """A script of bench/ (a folder of scripts, not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


time_to_accuracy = load_bench("time_to_accuracy")


def names(folder):
    return {p.name for p in folder.rglob("*.jpg")}


def test_val_halves_are_disjoint_balanced_and_swap_between_folds(tmp_path):
    data = tmp_path / "photos"
    for split, count in (("train", 3), ("validation", 6)):
        for cls in ("cats", "dogs"):
            (data / split / cls).mkdir(parents=True)
            for i in range(count):
                (data / split / cls / f"{cls}.{i}.jpg").write_bytes(b"")
    (data / "validation" / "cats" / "notes.txt").write_text("not a photo")

    folds = time_to_accuracy.split_folder(data, tmp_path / "work")
    pick_a, pick_b = folds["A"], folds["B"]

    val_a, test_a = names(pick_a / "val"), names(pick_a / "test")
    assert val_a.isdisjoint(test_a)
    assert val_a | test_a == names(data / "validation")
    for cls in ("cats", "dogs"):
        assert len(list((pick_a / "val" / cls).iterdir())) == len(list((pick_a / "test" / cls).iterdir())) == 3
    # The second fold picks on the first fold's held-out half and is scored on its picking half.
    assert names(pick_b / "val") == test_a and names(pick_b / "test") == val_a
    assert names(pick_a / "train") == names(pick_b / "train") == names(data / "train")
    # A second call (a later invocation in the same --work) reuses the folders rather than failing on them.
    assert time_to_accuracy.split_folder(data, tmp_path / "work") == folds
    assert [time_to_accuracy.picking_half(seed) for seed in range(4)] == ["A", "B", "A", "B"]


def epochs(val, held_out):
    return [{"epoch": i + 1, "val_accuracy": v, "held_out_accuracy": h} for i, (v, h) in enumerate(zip(val, held_out))]


def test_both_ways_gap_averages_picking_on_each_half_and_scoring_on_the_other():
    # Picking on val chooses epoch 2 (0.90 against 0.84 held out: +6 points); picking on the held-out half chooses
    # epoch 3 (0.88 against 0.85 on val: +3 points). The seed's gap is their mean.
    assert time_to_accuracy.both_ways_gap(epochs([0.80, 0.90, 0.85], [0.82, 0.84, 0.88])) == pytest.approx(4.5)
    # A half that is easier on every epoch shows up in one direction and cancels in the other.
    assert time_to_accuracy.both_ways_gap(epochs([0.90, 0.92], [0.86, 0.88])) == pytest.approx(0.0)
    # Ties go to the earliest epoch, as train.py's best.keras: val picks epoch 1 (0.9 - 0.7 = +20 points) and
    # the held-out half epoch 2 (0.8 - 0.9 = -10); with the tie broken the other way, val's pick would give +10.
    assert time_to_accuracy.both_ways_gap(epochs([0.9, 0.9], [0.7, 0.8])) == pytest.approx((20 - 10) / 2)
    assert time_to_accuracy.both_ways_gap([{"epoch": 1, "val_accuracy": 0.9}]) is None


def test_held_out_both_ways_averages_each_halfs_pick_scored_on_the_other_half():
    # The picking half chooses epoch 2 (0.84 on the held-out half); the held-out half would choose epoch 3 (0.85 on
    # the picking half): 0.845. The best val (0.90) and the best held-out (0.88) are both flattered by their pick.
    assert time_to_accuracy.both_ways_held_out(epochs([0.80, 0.90, 0.85], [0.82, 0.84, 0.88])) == pytest.approx(0.845)
    assert time_to_accuracy.both_ways_held_out([{"epoch": 1, "val_accuracy": 0.9}]) is None


def test_one_baseline_run_is_seen_by_each_budget_up_to_that_budget():
    history = [{"epoch": e, "elapsed": t, "epoch_seconds": 60.0, "val_accuracy": a}
               for e, (t, a) in enumerate([(55.0, 0.6), (118.0, 0.7), (181.0, 0.65), (299.0, 0.75)], 1)]
    result = {"history": history, "held_out": {"2": 0.68, "5": 0.73}, "params": 10, "macs": 20}
    views = time_to_accuracy.baseline_views(result, seed=1, budgets_min=[2, 5, 0.5])
    assert [h["epoch"] for h in views[2]["history"]] == [1, 2]
    assert [h["epoch"] for h in views[5]["history"]] == [1, 2, 3, 4]
    assert views[0.5]["history"] == [] and views[0.5]["held_out"] is None
    assert (views[2]["held_out"], views[5]["held_out"]) == (0.68, 0.73)
    assert views[2]["run_on"] == history and views[2]["picks_on"] == "B"


def test_the_table_and_the_anytime_figure_have_a_row_and_a_line_per_config_and_budget(tmp_path, capsys):
    import matplotlib.image

    data = tmp_path / "photos"
    for split in ("train", "val"):
        for cls in ("cats", "dogs"):
            (data / split / cls).mkdir(parents=True)
            (data / split / cls / f"{cls}.0.jpg").write_bytes(b"")
    work = tmp_path / "work"
    work.mkdir()

    def row(config_name, budget, val, held_out):
        history = [dict(h, elapsed=60.0 * budget * (i + 1) / len(val), epoch_seconds=60.0 * budget / len(val))
                   for i, h in enumerate(epochs(val, held_out))]
        return {"config": config_name, "budget": budget, "macs": 5e6, "params": 2e3,
                "runs": [{"seed": 0, "picks_on": "A", "history": history, "held_out": held_out[val.index(max(val))]}]}

    # Stored by an earlier invocation (as --first-seed adds seeds): the table is made from results.json.
    rows = {"tiny @ 5 min": row("tiny", 5, [0.80, 0.90, 0.85], [0.82, 0.84, 0.88]),
            "tiny @ 2 min": row("tiny", 2, [0.70, 0.78], [0.74, 0.72]),
            "wide @ 2 min": row("wide", 2, [0.60, 0.66], [0.64, 0.62])}
    rows["tiny @ 5 min"]["runs"][0]["size"] = 24  # as a run downsized by its budget records it
    (work / "results.json").write_text(json.dumps(rows))
    figure = tmp_path / "anytime.png"
    time_to_accuracy.main(["--data", str(data), "--work", str(work), "--no-baseline", "--budgets", "2", "5",
                           "--figure", str(figure)])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if re.match(r"(tiny|wide) +[0-9]", line)]
    # By config, then budget. Held out, both ways: at 2 min val picks epoch 2 (0.72 held out) and the held-out half
    # epoch 1 (0.70 on val): 71.0; at 5 min (0.84 + 0.85) / 2.
    assert [line.split()[:2] for line in table] == [["tiny", "2"], ["tiny", "5"], ["wide", "2"]]
    assert table[0].split()[9:11] == ["72.0", "71.0"] and table[1].split()[9:11] == ["84.0", "84.5"]
    assert [line.split()[3] for line in table] == ["2.00", "5.00", "2.00"]  # when the last epoch ended
    assert [line.split()[4] for line in table] == ["-", "24", "-"]  # the size the runs trained at, where known
    assert f"Regenerate: python bench/time_to_accuracy.py --data {data} --work {work} --no-baseline" in out
    # One panel per config, side by side.
    height, width = matplotlib.image.imread(figure).shape[:2]
    assert width > 1.8 * height


def test_every_kept_epoch_is_scored_as_evaluate_py_scores_the_best_checkpoint(tmp_path):
    smoke = str(REPO / "configs" / "smoke.yaml")
    # Epochs 1-2 are a progressive-resizing stage at 16x16: their checkpoints resize the images to 16x16 first, and
    # epoch 3 must be scored as it is (32x32), not as its weights in the model of the stage before.
    cfg = config.resolve([smoke], [f"run.dir={tmp_path / 'runs'}", "run.name=smoke-seed0", "training.epochs=3",
                                   "data.synthetic_size=512", "run.keep_every_epoch=true",
                                   "training.progressive.sizes=[16]", "training.progressive.epochs=2"])
    run_dir = train(cfg, [smoke])
    expected = [evaluate(checkpoint=str(run_dir / "checkpoints" / f"epoch_00{e}.keras"), split="test",
                         out=str(tmp_path / f"eval{e}"))["accuracy"] for e in (1, 2, 3)]
    history = [{"epoch": e, "val_accuracy": 0.5} for e in (1, 2, 3)]
    rows = {"smoke": {"runs": [{"seed": 0, "history": history}]}}
    saved = []  # what results.json would get before the checkpoints go
    time_to_accuracy.add_held_out_curves(rows, tmp_path, lambda: saved.append(
        [h.get("held_out_accuracy") for h in history] + [(run_dir / "checkpoints" / "epoch_001.keras").exists()]))
    assert len(saved) == 1 and None not in saved[0] and saved[0][-1] is True
    scores = [h["held_out_accuracy"] for h in history]
    assert scores == pytest.approx(expected, abs=1e-9)
    # Once scored, the epoch checkpoints go; the run's own stay: initial, last, best and the files those two link to.
    state = json.loads((run_dir / "state.json").read_text())
    assert {p.name for p in (run_dir / "checkpoints").iterdir()} == {
        "best.keras", "initial.keras", "last.keras", state["last_checkpoint"], state["best_checkpoint"]}
    best_epoch = json.loads((run_dir / "metrics.json").read_text())["best_epoch"]
    best = evaluate(run=str(run_dir), split="test", out=str(tmp_path / "eval"))
    assert scores[best_epoch - 1] == pytest.approx(best["accuracy"], abs=1e-9)


def test_a_config_argument_may_carry_its_own_budgets(tmp_path):
    path = tmp_path / "net.yaml"
    path.write_text("training:\n  time_budget: 3\n")
    assert time_to_accuracy.config_budgets(f"{path}@10,5", [2.0]) == (str(path), [5.0, 10.0])
    assert time_to_accuracy.config_budgets(str(path), [2.0, 1.0]) == (str(path), [1.0, 2.0])
    assert time_to_accuracy.config_budgets(str(path), None) == (str(path), [3.0])  # its training.time_budget
    with pytest.raises(SystemExit) as info:
        time_to_accuracy.config_budgets(f"{path}@ten", None)
    assert info.value.code == 2


TINY_FOLDER_CONFIG = """\
data:
  source: folder
  image_size: [16, 16]
  batch_size: 4
model:
  standard:
    filters: [4, 8]
training:
  epochs: 2
runtime:
  log_histograms: false
"""


def test_resume_keeps_the_runs_of_an_unchanged_config_on_the_same_machine_only(tmp_path, capsys):
    data = make_image_folder(tmp_path / "photos", per_class=4, size=20)
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(TINY_FOLDER_CONFIG)
    work = tmp_path / "work"
    args = [f"{config_file}@0.02", "--data", str(data), "--work", str(work), "--no-baseline", "--resume"]

    def stored():
        return json.loads((work / "results.json").read_text())

    time_to_accuracy.main(args)
    first = stored()["tiny @ 0.02 min"]["runs"][0]
    assert first["history"] and "held_out_accuracy" in first["history"][-1]
    assert first["config_sha"] == time_to_accuracy.file_sha(config_file)
    capsys.readouterr()

    time_to_accuracy.main(args)  # the same command again: nothing left to run
    out = capsys.readouterr().out
    assert "(--resume: tiny-0.02min-seed0 is in" in out and "train.py" not in out
    assert stored()["tiny @ 0.02 min"]["runs"][0] == first

    config_file.write_text("# a comment changes nothing that runs\n" + TINY_FOLDER_CONFIG)
    time_to_accuracy.main(args)
    assert "(--resume: tiny-0.02min-seed0 is in" in capsys.readouterr().out

    # What the bench asks of each run before it trains it: a changed config, another machine, another seed or budget
    # is run (again).
    rows, sha, machine = stored(), first["config_sha"], first["machine"]
    assert time_to_accuracy.resumable(rows, "tiny", 0.02, 0, sha, machine)
    changed = tmp_path / "changed" / "tiny.yaml"
    changed.parent.mkdir()
    changed.write_text(TINY_FOLDER_CONFIG.replace("epochs: 2", "epochs: 3"))
    assert time_to_accuracy.file_sha(changed) != sha
    assert not time_to_accuracy.resumable(rows, "tiny", 0.02, 0, time_to_accuracy.file_sha(changed), machine)
    assert not time_to_accuracy.resumable(rows, "tiny", 0.02, 0, sha, machine + " (another)")
    assert not time_to_accuracy.resumable(rows, "tiny", 0.02, 1, sha, machine)
    assert not time_to_accuracy.resumable(rows, "tiny", 0.05, 0, sha, machine)


def test_the_speed_benchs_fused_batch_norm_computes_what_keras_batch_norm_does():
    import keras
    import numpy as np
    import tensorflow as tf

    training_speed = load_bench("training_speed")

    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(8, 3, use_bias=False)(inputs)
    x = keras.layers.BatchNormalization(momentum=0.9)(x)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    images = tf.constant(np.random.default_rng(0).uniform(0, 1, (4, 12, 12, 3)).astype("float32"))
    # A few training-mode calls move the moving statistics away from their start, so that inference uses them.
    for _ in range(3):
        model(images * 2 + 1, training=True)

    fused = training_speed.with_fused_batch_norm(model)
    assert [type(layer).__name__ for layer in fused.layers].count("FusedBatchNorm") == 1
    assert training_speed.matches_keras(model, images) < 1e-5

    def kernel_gradient(m):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(m(images, training=True))
        return np.asarray(tape.gradient(loss, m.trainable_weights[0]))

    expected = kernel_gradient(model)
    assert np.abs(expected).max() > 1e-4
    np.testing.assert_allclose(kernel_gradient(training_speed.with_fused_batch_norm(model)), expected, atol=1e-6)
