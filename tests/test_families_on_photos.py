"""Every family's cats-vs-dogs config trains on the shared photos, saves, and reloads identically; the small-data
standard config's first layer learns visible structure from its small start."""

import keras
import numpy as np
import pytest

from cnnlab import config
from cnnlab.data import build_datasets
from cnnlab.modeling import build_model
from cnnlab.training import compile_model
from tests.conftest import REPO

SIZE = 32  # small enough that even VGG16 trains in seconds (most of a case's time goes to tracing the graph)
STEPS = 4  # batches of 64 photos each family trains on: real photos through every layer, not a whole epoch


@pytest.fixture(scope="module")
def photos(request):
    shared = request.getfixturevalue("shared_data")
    # Uncached, the file names are shuffled and only the batches taken are decoded (a cache would first fill the
    # shuffle buffer with 2,000 decoded photos, in every test).
    cfg = config.resolve([], ["data.source=folder", f"data.path={shared}", f"data.image_size=[{SIZE},{SIZE}]",
                              "data.batch_size=64", "data.cache=none"])
    return build_datasets(cfg["data"], seed=0), shared


@pytest.mark.parametrize("family", ["standard", "pointwise", "separable", "vgg16", "resnet50"])
def test_family_config_trains_on_the_photos_and_reloads_identically(family, photos, tmp_path):
    data, shared = photos
    cfg = config.resolve([str(REPO / f"configs/cats_vs_dogs_{family}.yaml")], [
        "data.source=folder", f"data.path={shared}", f"data.image_size=[{SIZE},{SIZE}]",
        "model.transfer.weights=null", "training.epochs=1"])
    assert data.num_train == 2000 and data.class_names == ["cats", "dogs"]
    model = build_model(cfg, data.num_classes)
    compile_model(model, cfg["training"], data.num_classes, data.steps_per_epoch)
    history = model.fit(data.train.take(STEPS), validation_data=data.val.take(2), epochs=1, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and 0 <= history.history["val_accuracy"][0] <= 1
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    images, _ = next(iter(data.val))
    assert np.array_equal(model.predict(images, verbose=0), reloaded.predict(images, verbose=0))


def test_the_small_data_standard_first_layer_becomes_colour_blobs_and_edges_from_its_small_start(shared_data):
    # The config's first conv starts at std 0.001 so that what training adds outweighs the random start. 40 AdamW
    # steps on photos, still in the warmup, turned 16 of its 32 kernels into colour blobs or oriented edges (31 after
    # the full 10 minutes); from he_normal (std 0.27) the same steps leave all 32 random (docs/filters.md). A third
    # of 32 separates the two with room for the seed.
    from cnnlab.plots import find_conv_layer, kernel_structure, layer_kernel

    keras.utils.set_random_seed(0)
    # 64x64: the net's five poolings need at least 64 pixels (32 after the stride-2 first conv)
    cfg = config.resolve([str(REPO / "configs/small_data/standard.yaml")], [
        f"data.path={shared_data}", "data.image_size=[64,64]", "data.cache=none", "augment.crop=null",
        "augment.crop_scale=null", "training.progressive.sizes=[]", "training.time_budget=null"])
    data = build_datasets(cfg["data"], seed=0)
    model = build_model(cfg, data.num_classes)
    compile_model(model, cfg["training"], data.num_classes, data.steps_per_epoch)
    conv = find_conv_layer(model, "stage1_block1_conv")

    def structured():
        return sum(s.kind != "other" for s in kernel_structure(layer_kernel(conv)))

    assert structured() <= 2  # random 3x3x3 kernels: 1.6% pass either test
    model.fit(data.train.take(20).repeat(2), epochs=1, shuffle=False, verbose=0)
    assert structured() >= 11
