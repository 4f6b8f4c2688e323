"""Transfer learning: local weights files, the frozen phase, fine-tuning, preprocessing, offline ImageNet weights."""

import time

import keras
import numpy as np
import pytest

from cnnlab import config
from cnnlab.errors import UserError
from cnnlab.modeling import build_model, family_network
from cnnlab.training import compile_model
from models.transfer import ImageNetPreprocess, build_backbone, find_backbone, unfreeze

SIZE = 32


def rand_images(n, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype("float32")


def snapshot(layer_list):
    return {(layer.name, i): np.array(w) for layer in layer_list for i, w in enumerate(layer.get_weights())}


def one_step_fit(model, lr=0.01):
    cfg = config.resolve([], ["training.epochs=1", f"training.learning_rate={lr}", "training.schedule=constant",
                              "training.weight_decay=0"])
    compile_model(model, cfg["training"], 2, steps_per_epoch=1)
    x = rand_images(4, seed=3)
    y = np.array([[0], [1], [0], [1]], "float32")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50"])
def test_weights_from_a_local_file_are_loaded_exactly(backbone, tmp_path):
    source = build_backbone(backbone, (SIZE, SIZE, 3), None)
    path = str(tmp_path / f"{backbone}.weights.h5")
    source.save_weights(path)
    cfg = config.resolve([], ["model.name=transfer", f"model.transfer.backbone={backbone}",
                              f"model.transfer.weights={path}", f"data.image_size=[{SIZE},{SIZE}]"])
    loaded = find_backbone(build_model(cfg, 2))
    assert len(loaded.weights) == len(source.weights) > 0
    for a, b in zip(source.weights, loaded.weights):
        assert np.array_equal(np.array(a), np.array(b)), a.path


def test_frozen_phase_changes_the_head_only():
    cfg = config.resolve([], ["model.name=transfer", "model.transfer.weights=null", "data.image_size=[32,32]"])
    model = build_model(cfg, 2)
    base, head = find_backbone(model), family_network(model).get_layer("head_dense")
    before_base, before_head = snapshot(base.layers), snapshot([head])
    one_step_fit(model)
    after_base, after_head = snapshot(base.layers), snapshot([head])
    assert all(np.array_equal(before_base[k], after_base[k]) for k in before_base)
    assert not np.array_equal(before_head[("head_dense", 0)], after_head[("head_dense", 0)])


def test_fine_tuning_changes_exactly_the_unfrozen_layers_and_no_batchnorm_statistics():
    cfg = config.resolve([], ["model.name=transfer", "model.transfer.backbone=resnet50", "model.transfer.weights=null",
                              "data.image_size=[32,32]"])
    model = build_model(cfg, 2)
    base = find_backbone(model)
    unfrozen = unfreeze(model, "conv5_block3_1_conv")
    assert unfrozen[0] == "conv5_block3_1_conv" and not any("_bn" in name for name in unfrozen)
    assert unfrozen == [layer.name for layer in base.layers if layer.trainable and layer.weights]
    before = snapshot(base.layers)
    one_step_fit(model, lr=0.1)
    after = snapshot(base.layers)
    changed = {name for (name, i) in before if not np.array_equal(before[(name, i)], after[(name, i)])}
    assert changed == set(unfrozen)
    # BatchNorm moving mean and variance included: the backbone runs with training=False
    assert not any(isinstance(base.get_layer(name), keras.layers.BatchNormalization) for name in changed)
    assert unfreeze(model, 2) == ["conv5_block3_3_conv"]  # top 2 layers with weights: conv5_block3_3_conv and _bn


def test_unfreezing_an_unknown_layer_is_a_clear_error():
    cfg = config.resolve([], ["model.name=transfer", "model.transfer.weights=null", "data.image_size=[32,32]"])
    with pytest.raises(ValueError, match="Received: 'block9_conv1'"):
        unfreeze(build_model(cfg, 2), "block9_conv1")


def test_preprocessing_layer_matches_keras_applications():
    x = rand_images(2)
    expected = keras.applications.vgg16.preprocess_input(x.copy())
    assert np.allclose(keras.ops.convert_to_numpy(ImageNetPreprocess("caffe")(x)), expected, atol=1e-4)
    assert np.allclose(keras.ops.convert_to_numpy(ImageNetPreprocess("tf")(x)),
                       keras.applications.mobilenet_v2.preprocess_input(x.copy()), atol=1e-5)


def test_imagenet_weights_offline_fail_fast_with_how_to_pass_a_file(tmp_path, monkeypatch):
    from cnnlab.data import _online

    if _online(("storage.googleapis.com",)):
        pytest.skip("this machine can download the weights; the offline message cannot be exercised")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached weights
    cfg = config.resolve([], ["model.name=transfer", "data.image_size=[32,32]"])
    start = time.perf_counter()
    with pytest.raises(UserError) as info:
        build_model(cfg, 2)
    assert time.perf_counter() - start < 60
    message = str(info.value)
    assert message.startswith("model.transfer:") and "model.transfer.weights" in message and "\n" not in message


def test_two_phase_training_run_uses_the_fine_tune_learning_rate(tmp_path):
    from cnnlab.training import train

    cfg = config.resolve([str(config.DEFAULTS_FILE.parent / "smoke.yaml")], [
        f"run.dir={tmp_path}", "model.name=transfer", "model.transfer.weights=null", "data.image_size=[32,32]",
        "data.synthetic_size=64", "training.epochs=1", "training.schedule=constant", "training.fine_tune.epochs=1",
        "training.fine_tune.learning_rate=0.0002", "training.fine_tune.unfreeze=2", "runtime.log_histograms=false"])
    run_dir = train(cfg, ["smoke.yaml"])
    import csv

    rows = list(csv.DictReader(open(run_dir / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert float(rows[0]["learning_rate"]) == pytest.approx(cfg["training"]["learning_rate"])
    assert float(rows[1]["learning_rate"]) == pytest.approx(0.0002)
    last = keras.models.load_model(run_dir / "checkpoints" / "last.keras")
    assert [layer.name for layer in find_backbone(last).layers if layer.trainable and layer.weights] == [
        "block5_conv2", "block5_conv3"]
