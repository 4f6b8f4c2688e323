"""Augmentation: the per-image random (resized) crop, MixUp/CutMix in the input pipeline, and weight averaging."""

import csv

import keras
import numpy as np
import pytest
import tensorflow as tf

from cnnlab import config
from cnnlab.data import build_datasets, mix_batches
from cnnlab.errors import UserError
from cnnlab.modeling import augmentation_layers, build_model
from cnnlab.training import AveragedWeights, train
from models.augmentation import RandomResizedCrop
from tests.conftest import REPO

SMOKE = str(REPO / "configs" / "smoke.yaml")


def windows(image, h, w):
    """Every h x w window of an (H, W, C) image."""
    return [image[t:t + h, s:s + w] for t in range(image.shape[0] - h + 1) for s in range(image.shape[1] - w + 1)]


def test_fixed_crops_are_exact_windows_drawn_per_image():
    x = np.random.default_rng(0).uniform(0, 255, (16, 10, 12, 3)).astype("float32")
    out = keras.ops.convert_to_numpy(RandomResizedCrop(6, 8, seed=1)(x, training=True))
    assert out.shape == (16, 6, 8, 3)
    offsets = []
    for image, crop in zip(x, out):
        matches = [i for i, win in enumerate(windows(image, 6, 8)) if np.allclose(win, crop, atol=1e-3)]
        assert matches, "a fixed-size crop must copy pixels, not resample them"
        offsets.append(matches[0])
    assert len(set(offsets)) > 4  # Keras's RandomCrop cuts a whole batch at one place; this layer does not


def test_inference_is_the_central_crop():
    x = np.random.default_rng(1).uniform(0, 255, (2, 10, 12, 3)).astype("float32")
    for layer in (RandomResizedCrop(6, 8), RandomResizedCrop(6, 8, scale=(0.3, 1.0))):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), x[:, 2:8, 2:10])


def test_resized_crop_of_the_whole_image_matches_tf_crop_and_resize():
    x = np.random.default_rng(2).uniform(0, 255, (3, 20, 20, 3)).astype("float32")
    layer = RandomResizedCrop(7, 7, scale=(1.0, 1.0), ratio=(1.0, 1.0), seed=0)
    expected = tf.image.crop_and_resize(x, [[0.0, 0.0, 1.0, 1.0]] * 3, tf.range(3), (7, 7)).numpy()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x, training=True)), expected, atol=1e-3)


def test_resized_crops_zoom_in_by_the_area_asked_for():
    # A horizontal ramp: the spread of values in a crop measures the fraction of the width it covers.
    ramp = np.tile(np.linspace(0, 1, 101, dtype="float32")[None, :, None], (101, 1, 3))[None].repeat(64, 0)
    small = keras.ops.convert_to_numpy(RandomResizedCrop(16, 16, scale=(0.09, 0.09), ratio=(1, 1), seed=3)(
        ramp, training=True))
    spread = small[..., 0].max(axis=(1, 2)) - small[..., 0].min(axis=(1, 2))
    np.testing.assert_allclose(spread, 0.3, atol=0.02)  # sqrt(0.09) of the width


def test_crop_layer_compiles_with_xla_and_round_trips_through_get_config():
    layer = RandomResizedCrop(12, 12, scale=(0.4, 1.0), seed=5)
    f = tf.function(lambda a: layer(a, training=True), jit_compile=True)
    assert f(tf.zeros((2, 16, 16, 3))).shape == (2, 12, 12, 3)
    clone = RandomResizedCrop.from_config(layer.get_config())
    assert (clone.height, clone.width, clone.scale, clone.ratio) == (12, 12, (0.4, 1.0), layer.ratio)
    with pytest.raises(ValueError, match="Received: scale"):
        RandomResizedCrop(4, 4, scale=(0.5, 1.5))


def test_a_cropping_model_predicts_on_full_size_images_after_saving(tmp_path):
    cfg = config.resolve([SMOKE], ["augment.crop=[24,24]", "augment.crop_scale=[0.5,1.0]"])
    model = build_model(cfg, 2)
    size = cfg["data"]["image_size"]
    x = np.random.default_rng(0).uniform(0, 255, (2, *size, 3)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def batches(n=64, size=8):
    images = np.zeros((n, size, size, 3), "float32")
    images[n // 2:] = 255.0  # first half black, labelled 0; second half white, labelled 1
    labels = (np.arange(n) >= n // 2).astype("float32")[:, None]
    return tf.data.Dataset.from_tensors((images, labels))


def test_mixup_blends_images_and_labels_by_the_same_weight():
    images, labels = next(iter(mix_batches(batches(), mixup=0.4, cutmix=0.0, seed=0)))
    images, labels = images.numpy(), labels.numpy()[:, 0]
    # Every mixed image is uniformly grey at 255 x (its weight of the white image), which is its label.
    np.testing.assert_allclose(images[:, 0, 0, 0] / 255.0, labels, atol=1e-3)
    np.testing.assert_allclose(images.std(axis=(1, 2, 3)), 0.0, atol=1e-3)
    assert ((labels > 0.01) & (labels < 0.99)).mean() > 0.15  # pairs of different classes, weights not 0 or 1


def test_cutmix_pastes_a_box_and_labels_it_by_area():
    images, labels = next(iter(mix_batches(batches(size=64), mixup=0.0, cutmix=1.0, seed=0)))
    white_share = (images.numpy()[..., 0] > 127).mean(axis=(1, 2))
    # Keras's CutMix labels by the box's real-valued area, the image gets whole pixels: up to a pixel per side off.
    np.testing.assert_allclose(white_share, labels.numpy()[:, 0], atol=0.04)
    assert ((white_share > 0.05) & (white_share < 0.95)).mean() > 0.15
    assert set(np.unique(images.numpy())) <= {0.0, 255.0}  # pasted, not blended


def test_no_mixing_leaves_batches_alone():
    images, labels = next(iter(mix_batches(batches(), mixup=0.0, cutmix=0.0, seed=0)))
    assert set(np.unique(labels.numpy())) == {0.0, 1.0}


def test_averaged_weights_are_in_the_model_at_every_epoch_end_and_the_raw_ones_in_the_optimizer():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05, use_ema=True, ema_momentum=0.9), loss="mse")
    start = keras.ops.convert_to_numpy(model.weights[0])
    x = np.random.default_rng(0).normal(size=(256, 4)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [3.0], [0.5]], "float32")
    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            average = self.model.optimizer._model_variables_moving_average[0]
            seen[epoch] = (keras.ops.convert_to_numpy(self.model.weights[0]), keras.ops.convert_to_numpy(average))

    model.fit(x, y, batch_size=16, epochs=2, callbacks=[AveragedWeights(), Probe()], verbose=0)
    in_model, in_optimizer = seen[0]
    assert not np.allclose(in_model, in_optimizer)
    # The average lags behind the raw weights on their way from the start to the solution.
    assert np.linalg.norm(in_model - start) < np.linalg.norm(in_optimizer - start)
    # Epoch 2 begins from the raw weights again: the model ends nearer the solution than after epoch 1.
    assert np.linalg.norm(seen[1][0] - [[1], [-2], [3], [0.5]]) < np.linalg.norm(in_model - [[1], [-2], [3], [0.5]])


def test_an_ema_run_validates_and_saves_the_averaged_weights_and_resumes(tmp_path):
    overrides = [f"run.dir={tmp_path}", "run.name=ema", "training.ema=0.9", "runtime.log_histograms=false"]
    run_dir = train(config.resolve([SMOKE], overrides + ["training.epochs=2"]), [SMOKE])
    last = keras.models.load_model(run_dir / "checkpoints" / "last.keras")
    history = list(csv.DictReader(open(run_dir / "history.csv")))
    cfg = config.resolve([SMOKE], overrides)
    data = build_datasets(cfg["data"], seed=cfg["run"]["seed"])
    last.compile(loss="binary_crossentropy", metrics=[keras.metrics.BinaryAccuracy(name="accuracy")])
    acc = last.evaluate(data.val, verbose=0, return_dict=True)["accuracy"]
    assert acc == pytest.approx(float(history[-1]["val_accuracy"]), abs=1e-6)

    resumed = train(config.resolve([SMOKE], overrides + ["training.epochs=3"]), [SMOKE], resume=str(run_dir))
    assert [int(r["epoch"]) for r in csv.DictReader(open(resumed / "history.csv"))] == [1, 2, 3]


def jitter_layer(**keys):
    """The single augmentation layer that the smoke config plus `keys` asks for."""
    cfg = config.resolve([SMOKE], [f"augment.{k}={v}" for k, v in keys.items()] + ["augment.flip=none"])
    (layer,) = augmentation_layers(cfg["augment"], seed=0)
    return layer


def flat_colour_images(n=256):
    """n 8x8 images, each one random saturated colour (HSV saturation 0.4-0.8, value 0.5-0.9)."""
    rng = np.random.default_rng(0)
    hsv = np.stack([rng.uniform(0, 1, n), rng.uniform(0.4, 0.8, n), rng.uniform(0.5, 0.9, n)], -1)
    rgb = tf.image.hsv_to_rgb(hsv.astype("float32")).numpy() * 255
    return np.broadcast_to(rgb[:, None, None], (n, 8, 8, 3)).copy()


def hsv_of(images):
    return tf.image.rgb_to_hsv(np.asarray(images, "float32")[:, 0, 0] / 255).numpy()


def test_colour_jitter_changes_each_image_by_at_most_the_configured_amount():
    x = flat_colour_images()
    before = hsv_of(x)

    out = keras.ops.convert_to_numpy(jitter_layer(brightness=0.1)(x, training=True))
    shift = (out - x).mean(axis=(1, 2, 3))
    assert np.abs(shift).max() <= 0.1 * 255 + 1e-3 and shift.std() > 5  # up to 25.5 levels, per image

    after = hsv_of(jitter_layer(saturation=0.3)(x, training=True))
    ratio = after[:, 1] / before[:, 1]
    assert ratio.min() >= 0.7 - 1e-3 and ratio.max() <= 1.3 + 1e-3 and ratio.max() - ratio.min() > 0.4
    np.testing.assert_allclose(after[:, 0], before[:, 0], atol=2e-3)  # hue kept

    after = hsv_of(jitter_layer(hue=0.05)(x, training=True))
    turn = (after[:, 0] - before[:, 0] + 0.5) % 1.0 - 0.5  # signed shift around the colour wheel
    assert np.abs(turn).max() <= 0.05 + 2e-3 and (turn > 0.02).any() and (turn < -0.02).any()
    np.testing.assert_allclose(after[:, 1], before[:, 1], atol=5e-3)  # saturation kept

    for keys in ({"brightness": 0.1}, {"saturation": 0.3}, {"hue": 0.05}):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(jitter_layer(**keys)(x, training=False)), x)


def test_random_erasing_covers_the_configured_fraction_of_the_image():
    x = np.full((64, 40, 40, 3), 128.0, "float32")
    out = keras.ops.convert_to_numpy(jitter_layer(erasing=1.0, erasing_scale="[0.1,0.2]")(x, training=True))
    erased = (np.abs(out - x).max(axis=-1) > 0).mean(axis=(1, 2))
    assert erased.min() >= 0.05 and erased.max() <= 0.25 and erased.std() > 0  # every image, a box of it
    half = keras.ops.convert_to_numpy(jitter_layer(erasing=0.5)(x, training=True))
    assert 0.3 <= (np.abs(half - x).max(axis=(1, 2, 3)) > 0).mean() <= 0.7  # erasing is the probability
    with pytest.raises(UserError, match=r"augment\.hue must be a number in \[0, 0\.5\]\. Received: 0\.7"):
        config.resolve([SMOKE], ["augment.hue=0.7"])


def test_test_crop_fraction_resizes_the_central_box_at_inference_only():
    x = np.random.default_rng(4).uniform(0, 255, (2, 40, 40, 3)).astype("float32")
    layer = RandomResizedCrop(30, 30, scale=(0.35, 1.0), seed=0, test_crop_fraction=0.6)
    margin = (1 - 0.6) / 2
    expected = tf.image.crop_and_resize(x, [[margin, margin, 1 - margin, 1 - margin]] * 2, tf.range(2), (30, 30))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected.numpy(), atol=1e-2)
    # The same box for every image, whatever the batch; training still draws a box per image.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x[1:]))[0], expected.numpy()[1], atol=1e-2)
    assert not np.allclose(keras.ops.convert_to_numpy(layer(x, training=True)), expected.numpy(), atol=1.0)
    clone = RandomResizedCrop.from_config(layer.get_config())
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clone(x)), expected.numpy(), atol=1e-2)
    with pytest.raises(ValueError, match="Received: test_crop_fraction=1.2"):
        RandomResizedCrop(4, 4, test_crop_fraction=1.2)
