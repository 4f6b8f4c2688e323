"""Progressive resizing (`training.progressive`): early epochs at smaller network inputs with the same view, one
optimizer and one learning-rate schedule across the stages, and the config's own size at the end."""

import csv
import math

import keras
import numpy as np
import pytest

from cnnlab import config
from cnnlab.data import build_datasets
from cnnlab.errors import UserError
from cnnlab.modeling import build_model, family_network, network_input_size, resize_model
from cnnlab.training import train, training_phases
from tests.conftest import REPO

SMOKE = str(REPO / "configs" / "smoke.yaml")


def resolve(*sets):
    return config.resolve([SMOKE], list(sets))


def test_stages_split_the_train_phase_and_leave_the_last_epochs_at_the_configs_size():
    cfg = resolve("training.epochs=6", "training.progressive.sizes=[16, [20, 24]]", "training.progressive.epochs=[1, 2]")
    phases = training_phases(cfg)
    assert [(p["name"], p["end"], p["size"]) for p in phases] == [
        ("train", 1, 16), ("train", 3, [20, 24]), ("train", 6, None)]
    # one number of epochs for every stage
    cfg = resolve("training.epochs=6", "training.progressive.sizes=[8, 16]", "training.progressive.epochs=2")
    assert [p["end"] for p in training_phases(cfg)] == [2, 4, 6]


def test_a_stage_model_sees_the_same_view_as_the_full_model_at_lower_resolution():
    # 40x40 images, 32x32 centre crop at inference; a 16x16 stage resizes to 20x20 and crops 16x16 of that.
    cfg = resolve("data.image_size=[40, 40]", "augment.crop=[32, 32]", "augment.flip=none")
    full, stage = build_model(cfg, 2), build_model(cfg, 2, size=16)
    assert network_input_size(full) == (32, 32) and network_input_size(stage) == (16, 16)
    # A linear ramp: bilinear resampling reproduces it exactly, so any difference is a difference of view.
    yy, xx = np.meshgrid(np.arange(40.0), np.arange(40.0), indexing="ij")
    image = np.stack([3 * yy + 2 * xx, 5 * yy, 4 * xx], -1)[None].astype("float32")

    def network_input(model):
        x = image
        for layer in model.layers[1:-1]:  # everything between the image and the family network
            x = layer(x, training=False)
        return keras.ops.convert_to_numpy(x)

    centre = network_input(full)[0]
    assert centre.shape == (32, 32, 3) and centre[0, 0, 0] == pytest.approx(3 * 4 + 2 * 4)
    expected = keras.ops.convert_to_numpy(keras.ops.image.resize(centre[None], (16, 16)))[0]
    got = network_input(stage)[0]
    np.testing.assert_allclose(got, expected, atol=1e-3)
    # a 16x16 centre crop of the full-size image would show a quarter of the view
    assert np.abs(got - image[0, 12:28, 12:28]).max() > 10


def test_resizing_a_model_carries_every_weight_of_its_family_network():
    cfg = resolve("data.image_size=[40, 40]", "augment.crop=[32, 32]")
    model = build_model(cfg, 2)
    for w in family_network(model).weights:  # make them differ from a fresh build's
        w.assign(np.random.default_rng(0).normal(size=w.shape).astype(w.dtype))
    small = resize_model(model, cfg, 2, size=[16, 24])
    assert network_input_size(small) == (16, 24)
    assert small.input_shape == model.input_shape == (None, 40, 40, 3)
    for a, b in zip(family_network(model).weights, family_network(small).weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    back = resize_model(small, cfg, 2)
    assert network_input_size(back) == (32, 32)


def history(run_dir):
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def cosine(lr, epoch, epochs):
    return lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))


def test_a_progressive_run_keeps_one_schedule_across_stages_ends_at_full_size_and_resumes(tmp_path, capsys):
    sets = [f"run.dir={tmp_path}", "run.name=prog", "data.synthetic_size=128", "training.learning_rate=0.01",
            "training.progressive.sizes=[16]", "runtime.log_histograms=false"]
    run_dir = train(resolve(*sets, "training.epochs=3", "training.progressive.epochs=2"), [SMOKE])
    out = capsys.readouterr().out
    assert "Epochs 1-2: network input 16x16 (images resized to 16x16 first)." in out
    assert "Epochs 3-3: network input 32x32." in out
    rows = history(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    # One cosine over all 3 epochs: a stage that restarted the optimizer would restart the schedule too.
    for r in rows:
        assert float(r["learning_rate"]) == pytest.approx(cosine(0.01, int(r["epoch"]), 3), abs=1e-6)
    # Elapsed time runs on across the stages' fit() calls: it is at least the sum of the epochs so far.
    seconds = np.cumsum([float(r["epoch_seconds"]) for r in rows])
    assert all(float(r["elapsed_seconds"]) >= s - 1e-3 for r, s in zip(rows, seconds)), rows
    last = keras.models.load_model(run_dir / "checkpoints" / "last.keras")
    assert network_input_size(last) == (32, 32)
    assert last.optimizer.iterations.numpy() == 3 * 4  # 128 images, batch 32

    # Resumed with a longer run whose first stage now lasts to epoch 4: epoch 4 trains at 16x16 again, epoch 5 at
    # full size, with the step count (and so the schedule) carried on.
    resumed = train(resolve(*sets, "training.epochs=5", "training.progressive.epochs=4"), [SMOKE], resume=str(run_dir))
    out = capsys.readouterr().out
    assert "Epochs 4-4: network input 16x16" in out and "Epochs 5-5: network input 32x32." in out
    rows = history(resumed)
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4, 5]
    for r in rows[3:]:
        assert float(r["learning_rate"]) == pytest.approx(cosine(0.01, int(r["epoch"]), 5), abs=1e-6)
    last = keras.models.load_model(resumed / "checkpoints" / "last.keras")
    assert network_input_size(last) == (32, 32) and last.optimizer.iterations.numpy() == 5 * 4


@pytest.mark.parametrize(
    "sets, fragments",
    [
        (["training.progressive.sizes=[64]", "training.progressive.epochs=1"],
         ["training.progressive.sizes must each fit inside", "[32, 32]", "Received: 64"]),
        (["training.progressive.sizes=[16, 24]", "training.progressive.epochs=3"],
         ["their sum must be < training.epochs (6)", "Received: 3"]),
        (["training.progressive.sizes=[16, 24]", "training.progressive.epochs=[1]"],
         ["one per size (2)", "Received: [1]"]),
        (["training.progressive.sizes=[16]"], ["training.progressive.epochs must be >= 1", "Received: 0"]),
        (["training.progressive.sizes=[[16, 16, 3]]"], ["training.progressive.sizes must be a list of sizes"]),
    ],
)
def test_bad_progressive_settings_are_refused_with_the_key_and_value(sets, fragments):
    with pytest.raises(UserError) as info:
        resolve(*sets)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_a_progressive_run_with_weight_averaging_validates_and_saves_the_averaged_weights(tmp_path):
    sets = [f"run.dir={tmp_path}", "run.name=ema", "data.synthetic_size=128", "training.ema=0.9",
            "training.progressive.sizes=[16]", "training.progressive.epochs=1", "training.epochs=2",
            "runtime.log_histograms=false"]
    cfg = resolve(*sets)
    run_dir = train(cfg, [SMOKE])
    rows = history(run_dir)
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    # The last checkpoint holds the weights that were validated in the last epoch: the averaged ones.
    last = keras.models.load_model(run_dir / "checkpoints" / "last.keras")
    assert network_input_size(last) == (32, 32)
    data = build_datasets(cfg["data"], seed=cfg["run"]["seed"])
    last.compile(loss="binary_crossentropy", metrics=[keras.metrics.BinaryAccuracy(name="accuracy")])
    acc = last.evaluate(data.val, verbose=0, return_dict=True)["accuracy"]
    assert acc == pytest.approx(float(rows[-1]["val_accuracy"]), abs=1e-6)
