"""Data sources: folder layouts, splits, labels, bad files, synthetic images and TFDS (offline)."""


import numpy as np
import pytest
import tensorflow_datasets as tfds

from cnnlab import config, data
from cnnlab.errors import UserError
from tests.conftest import make_image_folder


def folder_cfg(path, **extra):
    sets = ["data.source=folder", f"data.path={path}", "data.image_size=[20, 16]", "data.batch_size=4"]
    return config.resolve([], sets + [f"{k}={v}" for k, v in extra.items()])["data"]


def collect(ds):
    images, labels = [], []
    for x, y in ds:
        images.append(x.numpy())
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def test_folder_with_train_and_validation_dirs(tmp_path):
    make_image_folder(tmp_path, splits=("train", "validation"), classes=("dogs", "cats"), per_class=5)
    ds = data.build_datasets(folder_cfg(tmp_path), seed=1)
    assert ds.class_names == ["cats", "dogs"]  # sorted, whatever order they were made in
    assert (ds.num_train, ds.num_val, ds.num_test) == (10, 10, 0)
    x, y = collect(ds.val)
    assert x.shape == (10, 20, 16, 3) and x.dtype == np.uint8  # the model casts at its input
    assert 0 <= x.min() and x.max() <= 255 and x.max() > 100
    assert y.shape == (10, 1) and sorted(y[:, 0].tolist()) == [0] * 5 + [1] * 5
    # cats were made red-dominant (channel 0 of class index 0 in make order was dogs): check colours follow labels
    red_minus_green = x[..., 0].mean(axis=(1, 2)) - x[..., 1].mean(axis=(1, 2))
    assert np.all((red_minus_green > 0) == (y[:, 0] == 1))  # "dogs" got colour channel 0 when made


def test_folder_of_class_dirs_is_split_by_validation_split_per_class_and_repeatably(tmp_path):
    make_image_folder(tmp_path, splits=("",), classes=("a", "b", "c"), per_class=10)
    cfg = folder_cfg(tmp_path, **{"data.validation_split": 0.2})
    splits_1, names = data.folder_files(cfg, seed=3)
    splits_2, _ = data.folder_files(cfg, seed=3)
    assert names == ["a", "b", "c"]
    assert splits_1 == splits_2
    assert np.bincount(splits_1["val"][1]).tolist() == [2, 2, 2]
    assert not set(splits_1["val"][0]) & set(splits_1["train"][0])
    ds = data.build_datasets(cfg, seed=3)
    _, y = collect(ds.train)
    assert y.shape == (24, 3) and np.allclose(y.sum(axis=1), 1)  # one-hot for more than two classes


def test_folder_with_a_test_split_serves_it(tmp_path):
    make_image_folder(tmp_path, splits=("train", "val", "test"), per_class=3)
    ds = data.build_datasets(folder_cfg(tmp_path), seed=0)
    assert ds.num_test == 6 and collect(ds.test)[0].shape[0] == 6


def test_mismatched_classes_and_empty_class_are_clear_errors(tmp_path):
    make_image_folder(tmp_path / "one", splits=("train",), classes=("cats", "dogs"), per_class=2)
    make_image_folder(tmp_path / "one", splits=("val",), classes=("cats", "birds"), per_class=2)
    with pytest.raises(UserError, match=r"has classes \['birds', 'cats'\], but the training split has"):
        data.build_datasets(folder_cfg(tmp_path / "one"), seed=0)
    make_image_folder(tmp_path / "two", splits=("train", "val"), per_class=2)
    for f in (tmp_path / "two" / "train" / "dogs").iterdir():
        f.unlink()
    with pytest.raises(UserError, match=r"train/dogs holds no images"):
        data.build_datasets(folder_cfg(tmp_path / "two"), seed=0)


def test_an_undecodable_file_is_dropped_not_fatal(tmp_path):
    make_image_folder(tmp_path, per_class=4)
    (tmp_path / "train" / "cats" / "broken.jpg").write_text("not an image")
    ds = data.build_datasets(folder_cfg(tmp_path), seed=0)
    x, _ = collect(ds.train)
    assert x.shape[0] == 8  # the text file is skipped, the 8 real images all arrive


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_training_order_is_reshuffled_every_epoch_and_serves_each_image_once(tmp_path, cache):
    # Uncached folders shuffle file names before decoding, cached ones shuffle decoded images: both must give
    # every image once per epoch, in a new order each epoch.
    make_image_folder(tmp_path, per_class=12)
    train = data.build_datasets(folder_cfg(tmp_path, **{"data.cache": cache}), seed=0).train
    epochs = [[x.tobytes() for x in collect(train)[0]] for _ in range(3)]
    assert all(len(e) == 24 and sorted(e) == sorted(epochs[0]) and len(set(e)) == 24 for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_mixed_batches_are_float32_and_stay_in_pixel_range(tmp_path):
    # 8 batches of 4: MixUp pairs each image with another of its batch, and with 2 batches of 4 every pair came from
    # one class now and then (the test failed about one run in three); in 8 batches some pair is of two classes.
    make_image_folder(tmp_path, per_class=16)
    train = data.build_datasets(folder_cfg(tmp_path), seed=0, augment_cfg={"mixup": 1.0, "cutmix": 0.0}).train
    x, y = collect(train)
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 255
    assert np.any((y > 0) & (y < 1))  # blended labels: MixUp really ran
    assert np.any(x != np.round(x))   # and blended pixels were not rounded back to whole values


def test_synthetic_images_are_deterministic_and_class_dependent():
    a, la = data.synthetic_images(64, (24, 24), 2, seed=5)
    b, lb = data.synthetic_images(64, (24, 24), 2, seed=5)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    assert a.dtype == np.uint8 and set(np.unique(la)) == {0, 1}
    # class 0 stripes run near 0 degrees (varying along x), class 1 near 90 degrees (varying along y)
    gx = np.abs(np.diff(a.astype(float).mean(-1), axis=2)).mean(axis=(1, 2))
    gy = np.abs(np.diff(a.astype(float).mean(-1), axis=1)).mean(axis=(1, 2))
    assert np.mean((gx > gy) == (la == 0)) > 0.9


class TinyPets(tfds.core.GeneratorBasedBuilder):
    """A real, locally generated TFDS dataset with only a train split, like cats_vs_dogs."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["cat", "dog"]),
        }), supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(40):
            yield i, {"image": rng.integers(0, 255, (12 + i % 5, 10, 3), dtype=np.uint8), "label": i % 2}


def test_tfds_source_carves_train_val_test_by_split_slicing(tmp_path):
    TinyPets(data_dir=str(tmp_path)).download_and_prepare()
    cfg = config.resolve([], ["data.source=tfds", "data.name=tiny_pets", f"data.data_dir={tmp_path}",
                              "data.image_size=[8, 8]", "data.validation_split=0.2", "data.test_split=0.1"])
    ds = data.build_datasets(cfg["data"], seed=0)
    assert ds.class_names == ["cat", "dog"]
    assert (ds.num_train, ds.num_val, ds.num_test) == (28, 8, 4)
    x, y = collect(ds.train)
    assert x.shape == (28, 8, 8, 3) and y.shape == (28, 1)


def test_tfds_offline_fails_fast_with_what_to_do(tmp_path):
    if data._online():
        pytest.skip("this machine can reach TFDS's servers; the offline path cannot be exercised")
    cfg = config.resolve([], [f"data.data_dir={tmp_path}"])
    with pytest.raises(UserError) as info:
        data.build_datasets(cfg["data"], seed=0)
    assert "cats_vs_dogs" in str(info.value) and "data.source=folder" in str(info.value)
