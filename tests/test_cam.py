"""Grad-CAM and saliency: the maths against a hand computation, the layer search (nested backbones included), and a
task with a known answer: the class evidence sits in one quadrant, so a right map peaks there."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cnnlab import config
from cnnlab.cam import find_target_layer, grad_cam, saliency
from cnnlab.errors import UserError
from cnnlab.modeling import build_model
from cnnlab.training import compile_model
from models.transfer import find_backbone
from tests.conftest import REPO, assert_user_error, run_cli_in_process, write_image

SIZE = 64


def quadrant_task(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grey noise with one 20x20 patch of stripes in a random quadrant (horizontal stripes for class 0, vertical for
    class 1) and a white square, as bright but saying nothing, in another. Returns images, labels and the quadrant
    (0-3, row-major) that holds the evidence."""
    rng = np.random.default_rng(seed)
    images = np.repeat(rng.uniform(64, 192, (n, SIZE, SIZE, 1)), 3, axis=-1)
    labels, quadrants = rng.integers(0, 2, n), rng.integers(0, 4, n)
    stripes = (np.arange(20) // 2 % 2 * 255.0)
    patches = [np.repeat(stripes[:, None], 20, 1), np.repeat(stripes[None, :], 20, 0)]
    half = SIZE // 2
    for i in range(n):
        top = quadrants[i] // 2 * half + rng.integers(2, half - 22)
        left = quadrants[i] % 2 * half + rng.integers(2, half - 22)
        images[i, top:top + 20, left:left + 20] = patches[labels[i]][..., None]
        other = (quadrants[i] + rng.integers(1, 4)) % 4
        top = other // 2 * half + rng.integers(2, half - 22)
        left = other % 2 * half + rng.integers(2, half - 22)
        images[i, top:top + 20, left:left + 20] = 255.0
    return images.astype(np.float32), labels, quadrants


def quadrant_of_peak(maps: np.ndarray) -> np.ndarray:
    rows, cols = np.unravel_index(maps.reshape(len(maps), -1).argmax(-1), maps.shape[1:])
    return rows // (SIZE // 2) * 2 + cols // (SIZE // 2)


def trained_on_quadrants(*sets: str, learning_rate: float = 0.003, epochs: int = 4,
                          head_only: bool = False) -> keras.Model:
    """A small net of a family (`sets`), trained for a few seconds on 768 images of the quadrant task.

    `head_only`, for a transfer model with a frozen backbone: only the layers after the backbone learn, so they are
    trained on its features, computed once, rather than running the backbone again every epoch (the same training,
    4x cheaper).
    """
    cfg = config.resolve([], ["data.source=synthetic", f"data.image_size=[{SIZE},{SIZE}]", "augment.flip=none",
                              "training.optimizer=adam", f"training.learning_rate={learning_rate}",
                              "training.schedule=constant", *sets])
    keras.utils.set_random_seed(0)
    model = build_model(cfg, 2)
    images, labels, _ = quadrant_task(768, seed=1)
    learner, inputs = model, images
    if head_only:
        backbone = find_backbone(model)
        net = next(m for m in (model, *model.layers) if isinstance(m, keras.Model) and backbone in m.layers)
        layers = net.layers[1:]  # a chain: preprocessing, the backbone, then the head
        cut = layers.index(backbone) + 1
        assert not layers[cut - 1].trainable and all(layer.trainable for layer in layers[cut:])
        features = keras.Sequential(layers[:cut]).predict(images, batch_size=64, verbose=0)
        learner, inputs = keras.Sequential([keras.Input(features.shape[1:]), *layers[cut:]]), features
    compile_model(learner, cfg["training"], 2, steps_per_epoch=24)
    learner.fit(inputs, labels[:, None].astype(np.float32), batch_size=32, epochs=epochs, verbose=0)
    return model


@pytest.fixture(scope="module")
def standard_on_quadrants():
    return trained_on_quadrants("model.name=standard", "model.standard.filters=[16,32,32]")


def test_grad_cam_equals_the_hand_computation_on_the_named_layer():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="first")(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.Conv2D(5, 3, name="target")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    images = np.random.default_rng(0).uniform(0, 255, (3, 12, 12, 3)).astype(np.float32)
    # By hand: the sub-model view of the same layer, the class's log-probability, the textbook formula.
    both = keras.Model(inputs, [model.get_layer("target").output, outputs])
    with tf.GradientTape() as tape:
        feature_map, probs = both(images)
        predicted = tf.cast(probs[:, 0] >= 0.5, tf.int32)
        score = tf.reduce_sum(tf.where(predicted == 1, tf.math.log(probs[:, 0] + 1e-7),
                                       tf.math.log(1 - probs[:, 0] + 1e-7)))
    grads = tape.gradient(score, feature_map)
    cam = tf.nn.relu(tf.reduce_sum(tf.reduce_mean(grads, axis=(1, 2), keepdims=True) * feature_map, axis=-1))
    cam = tf.image.resize(cam[..., None], (12, 12))[..., 0]
    expected = tf.math.divide_no_nan(cam, tf.reduce_max(cam, axis=(1, 2), keepdims=True)).numpy()
    maps, _ = grad_cam(model, images, layer="target")
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    # A real map for at least one class (an untrained net may see no positive evidence for the other)
    other, _ = grad_cam(model, images, class_index=1 - predicted.numpy(), layer="target")
    assert max(maps.std(), other.std()) > 0.05
    # The first conv is another map: the layer named is the layer read.
    assert np.abs(grad_cam(model, images, class_index=1 - predicted.numpy(), layer="first")[0] - other).max() > 0.05


def test_grad_cam_plus_plus_equals_the_hand_computation_from_the_logits():
    keras.utils.set_random_seed(1)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="target")(keras.layers.Rescaling(1 / 255)(inputs))
    logits = keras.layers.Dense(1, name="head_dense")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, keras.layers.Activation("sigmoid", name="predictions")(logits))
    images = np.random.default_rng(1).uniform(0, 255, (3, 12, 12, 3)).astype(np.float32)
    both = keras.Model(inputs, [model.get_layer("target").output, logits])
    with tf.GradientTape() as tape:
        feature_map, z = both(images)
        score = tf.reduce_sum(z[:, 0])  # class 1's logit
    g = tape.gradient(score, feature_map)
    alpha = tf.math.divide_no_nan(g ** 2, 2 * g ** 2 + tf.reduce_sum(feature_map, axis=(1, 2), keepdims=True) * g ** 3)
    weights = tf.reduce_sum(alpha * tf.nn.relu(g), axis=(1, 2), keepdims=True)
    cam = tf.image.resize(tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1))[..., None], (12, 12))[..., 0]
    expected = tf.math.divide_no_nan(cam, tf.reduce_max(cam, axis=(1, 2), keepdims=True)).numpy()
    maps, _ = grad_cam(model, images, class_index=1, layer="target", plus_plus=True)
    assert expected.std() > 0.05
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    assert np.abs(grad_cam(model, images, class_index=1, layer="target")[0] - maps).max() > 1e-3  # not Grad-CAM


def test_the_standard_net_looks_at_the_quadrant_that_holds_the_evidence(standard_on_quadrants):
    model = standard_on_quadrants
    images, labels, quadrants = quadrant_task(100, seed=2)
    path, _ = find_target_layer(model)
    assert path.endswith("stage3_block1_act")
    maps, probs = grad_cam(model, images, class_index=labels)
    assert ((probs[:, 0] >= 0.5) == labels).mean() >= 0.9  # it learnt the task
    hits = (quadrant_of_peak(maps) == quadrants).mean()
    assert hits >= 0.9, hits
    # The pointing game can fail: an inverted map or a uniform one misses the quadrant ...
    assert (quadrant_of_peak(1 - maps) == quadrants).mean() < 0.5
    assert (quadrant_of_peak(np.ones_like(maps)) == quadrants).mean() < 0.5
    # ... as does a map read off the wrong tensor: the input's (local) brightness peaks on the white square.
    brightness = tf.nn.avg_pool2d(images.mean(-1, keepdims=True), 15, 1, "SAME")[..., 0].numpy()
    assert (quadrant_of_peak(brightness) == quadrants).mean() < 0.2
    # Grad-CAM++ and SmoothGrad's pixels point there too.
    plus, _ = grad_cam(model, images, class_index=labels, plus_plus=True)
    assert (quadrant_of_peak(plus) == quadrants).mean() >= 0.9
    smooth, _ = saliency(model, images[:20], class_index=labels[:20], smooth=8)
    assert (quadrant_of_peak(smooth) == quadrants[:20]).mean() >= 0.8


# Over seeds 0-2, pointwise learns the task in 2 epochs (100%, 96-100 hits); separable, with its stride-2 stem, in 3
# (100%, 100 hits; at stride 1 it needed 4 epochs of 4x the cost).
@pytest.mark.parametrize("family, sets, learning_rate, epochs, layer", [
    ("pointwise", ["model.pointwise.stem_filters=16", "model.pointwise.filters=[16,32,32]"], 0.003, 2,
     "stage3_block1_out"),
    ("separable", ["model.separable.stem_filters=16", "model.separable.stem_strides=2",
                   "model.separable.filters=[16,32,32]"], 0.01, 3, "stage3_block1_pointwise_act"),
])
def test_pointwise_and_separable_nets_look_at_the_evidence_too(family, sets, learning_rate, epochs, layer):
    model = trained_on_quadrants(f"model.name={family}", *sets, learning_rate=learning_rate, epochs=epochs)
    assert_points_at_the_evidence(model, layer, accuracy=0.9)


def assert_points_at_the_evidence(model: keras.Model, layer: str, accuracy: float) -> None:
    images, labels, quadrants = quadrant_task(100, seed=2)
    assert find_target_layer(model)[0].endswith(layer)
    maps, probs = grad_cam(model, images, class_index=labels)
    assert ((probs[:, 0] >= 0.5) == labels).mean() >= accuracy  # it learnt the task
    hits = (quadrant_of_peak(maps) == quadrants).mean()
    assert hits >= 0.5, hits  # chance is 0.25
    assert (quadrant_of_peak(1 - maps) == quadrants).mean() < 0.5


def test_a_transfer_net_looks_at_the_evidence_through_its_nested_backbone():
    # ResNet50 with random weights, frozen, at 64x64: its last feature map (inside the nested backbone) is 2x2, one
    # cell per quadrant, and the head learns the task on it in 4 epochs (92-100% over seeds 0-2; the map's peak in
    # the right quadrant for 59-64 of 100 images). Unfreezing conv5 costs 40 ms an image a step here, 8x the rest.
    model = trained_on_quadrants("model.name=transfer", "model.transfer.backbone=resnet50",
                                 "model.transfer.weights=null", head_only=True)
    assert_points_at_the_evidence(model, "resnet50/conv5_block3_out", accuracy=0.85)


@pytest.mark.parametrize("config_file, expected", [
    ("configs/cats_vs_dogs_vgg16.yaml", "transfer_vgg16/vgg16/block5_conv3"),
    ("configs/cats_vs_dogs_resnet50.yaml", "transfer_resnet50/resnet50/conv5_block3_out"),
])
def test_the_map_of_a_transfer_model_is_found_inside_its_nested_backbone(config_file, expected):
    cfg = config.resolve([str(REPO / config_file)], ["model.transfer.weights=null", f"data.image_size=[{SIZE},{SIZE}]"])
    model = build_model(cfg, 2)
    assert find_target_layer(model)[0] == expected
    assert find_target_layer(model, expected.split("/", 1)[1])[0] == expected  # as a user names it
    images = np.random.default_rng(0).uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)
    maps, probs = grad_cam(model, images)
    assert maps.shape == (2, SIZE, SIZE) and np.isfinite(maps).all() and maps.max() == pytest.approx(1.0)
    np.testing.assert_allclose(probs, model.predict(images, verbose=0), atol=1e-5)
    with pytest.raises(UserError, match="block5_conv9.*is not a spatial conv layer"):
        find_target_layer(model, "block5_conv9")


def test_the_cli_writes_a_figure_per_image_and_a_grid_and_refuses_a_wrong_layer(standard_on_quadrants, tmp_path,
                                                                              capsys):
    checkpoint = tmp_path / "quadrants.keras"
    standard_on_quadrants.save(checkpoint)
    images, _, _ = quadrant_task(5, seed=3)
    for i, image in enumerate(images):
        write_image(tmp_path / "photos" / f"p{i}.png", image.astype(np.uint8), fmt="png")
    proc = run_cli_in_process(capsys, "gradcam.py", str(tmp_path / "photos"), "--checkpoint", str(checkpoint),
                              "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [f"p{i}_gradcam.png" for i in range(5)] + ["grid_gradcam.png"])
    assert f"Wrote {tmp_path / 'out' / 'grid_gradcam.png'}" in proc.stdout
    wrong = run_cli_in_process(capsys, "gradcam.py", str(tmp_path / "photos"), "--checkpoint", str(checkpoint),
                               "--layer", "no_such_layer")
    line = assert_user_error(wrong, "--layer: 'no_such_layer' is not a spatial conv layer", "stage3_block1_conv")
    assert "Received: 'no_such_layer'" in line
    saliency_with_layer = run_cli_in_process(capsys, "gradcam.py", str(tmp_path / "photos"), "--checkpoint",
                                             str(checkpoint), "--method", "saliency", "--layer", "stage1_block1_conv")
    assert_user_error(saliency_with_layer, "--layer: only Grad-CAM reads a layer", "Received: --method saliency")


def test_the_worst_mistakes_figure_shows_where_the_model_saw_the_class_it_wrongly_said(standard_on_quadrants):
    from cnnlab.cam import overlay
    from cnnlab.evaluation import Predictions, mistake_maps, plot_worst_mistakes

    model = standard_on_quadrants
    images, labels, _ = quadrant_task(4, seed=4)
    wrong = 1 - labels  # as if it had said the other class
    worst = [(0.9, image.astype(np.uint8), int(t), int(w), f"img{i}.png")
             for i, (image, t, w) in enumerate(zip(images, labels, wrong))]
    preds = Predictions([w[4] for w in worst], labels, np.zeros((4, 1)), ["h", "v"], 1.0, worst)
    maps = mistake_maps(model, preds)
    expected, _ = grad_cam(model, np.stack([w[1] for w in worst]), class_index=wrong)
    np.testing.assert_allclose(np.stack(maps), expected, atol=1e-6)
    fig = plot_worst_mistakes(preds, "t", maps)
    drawn = np.asarray(fig.axes[0].images[0].get_array())
    assert np.array_equal(drawn, overlay(worst[0][1], maps[0])) and not np.array_equal(drawn, worst[0][1])
    assert "where it saw the class it said" in fig._suptitle.get_text()


def test_tensorboard_gets_grad_cam_overlays_of_fixed_val_images_each_epoch(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cnnlab.training import train
    from tests.conftest import tiny

    cfg = config.resolve([str(REPO / "configs" / "smoke.yaml")],
                         tiny(tmp_path, "run.name=c", "training.epochs=2", "runtime.log_cam_images=3"))
    run_dir = train(cfg, ["smoke.yaml"])
    acc = EventAccumulator(str(run_dir / "logs" / "gradcam"), size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors("gradcam/val")
    assert [e.step for e in events] == [0, 1]
    pictures = tf.make_ndarray(events[-1].tensor_proto)[2:]  # width, height, then one PNG per image
    assert len(pictures) == 3
    first = tf.io.decode_png(pictures[0]).numpy()
    # The last epoch's picture is the Grad-CAM of the trained model (its last checkpoint) on the first val image.
    from cnnlab.cam import overlay
    from cnnlab.data import build_datasets

    image = next(iter(build_datasets(cfg["data"], seed=cfg["run"]["seed"]).val))[0].numpy()[0]
    maps, _ = grad_cam(keras.models.load_model(run_dir / "checkpoints" / "last.keras"), image[None])
    assert first.shape == (16, 16, 3) and np.abs(first.astype(int) - overlay(image, maps[0]).astype(int)).max() <= 1


def test_several_runs_are_compared_on_the_same_photos_in_one_figure(tmp_path, capsys):
    from PIL import Image

    from cnnlab.training import train

    runs = [train(config.resolve([str(REPO / "configs" / "smoke.yaml")], [
        f"run.dir={tmp_path}", f"run.name=r{seed}", f"run.seed={seed}", "training.epochs=1",
        "data.synthetic_size=64"]), ["smoke.yaml"]) for seed in (0, 1)]
    images, _, _ = quadrant_task(3, seed=4)
    for i, image in enumerate(images):
        write_image(tmp_path / "photos" / f"p{i}.png", image.astype(np.uint8), fmt="png")
    (tmp_path / "photos" / "broken.png").write_bytes(b"not an image")
    proc = run_cli_in_process(capsys, "gradcam.py", str(tmp_path / "photos"), "--run", str(runs[0]), "--run",
                              str(runs[1]), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["compare_gradcam.png"]
    assert "skipped:" in proc.stdout and "broken.png" in proc.stdout
    width, height = Image.open(tmp_path / "out" / "compare_gradcam.png").size
    assert width / height == pytest.approx((1.9 * 3) / (1.9 * 3 + 0.5), rel=0.02)  # 3 photos x (photo + 2 runs)
    wrong = run_cli_in_process(capsys, "gradcam.py", str(tmp_path / "photos"), "--run", str(runs[0]), "--run",
                               str(runs[1]), "--class", "dogs")
    assert_user_error(wrong, "--class", "Received: 'dogs'")
