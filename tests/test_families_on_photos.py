"""Every family's cats-vs-dogs config trains on the shared photos, saves, and reloads identically."""

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
    history = model.fit(data.train.take(STEPS), validation_data=data.val.take(2), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0]) and 0 <= history.history["val_accuracy"][0] <= 1
    model.save(tmp_path / "model.keras")
    reloaded = keras.models.load_model(tmp_path / "model.keras")
    images, _ = next(iter(data.val))
    assert np.array_equal(model.predict(images, verbose=0), reloaded.predict(images, verbose=0))
