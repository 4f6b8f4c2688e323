"""Data sources (tfds | folder | synthetic) turned into batched tf.data pipelines.

Every source ends in the same shape of pipeline: `(image, label)` pairs where `image` is uint8 at `data.image_size`
(float32 in [0, 255] after MixUp / CutMix) and `label` is float32, shaped `(1,)` for two classes (sigmoid output) or
one-hot for more. Images stay uint8 to the model, whose float32 input casts them inside the compiled step: a quarter
of the bytes through the pipeline and to the device, and no conversion pass on the CPU.
Normalisation and augmentation are not done here: they are layers of the model, so a saved model carries them and
prediction uses exactly the preprocessing training used.

Example:

    >>> ds = build_datasets(cfg["data"], seed=42)
    >>> ds.class_names
    ['cats', 'dogs']
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import dataclass, field

import keras
import numpy as np
import tensorflow as tf

from cnnlab.config import as_size
from cnnlab.errors import UserError
from cnnlab.images import (IMAGE_EXTENSIONS, UnreadableImage, decode_and_resize, find_images, read_image,
                           resize_decoded, scan_images)

AUTOTUNE = tf.data.AUTOTUNE


@dataclass
class Datasets:
    """The batched splits of one source and what they hold."""

    train: tf.data.Dataset
    val: tf.data.Dataset
    test: tf.data.Dataset | None
    class_names: list[str]
    image_size: tuple[int, int]
    num_train: int
    num_val: int
    num_test: int
    batch_size: int
    skipped: list[str] = field(default_factory=list)   # files that cannot be read (folder source)
    too_large: list[str] = field(default_factory=list)  # of those, the ones over data.max_image_megapixels
    ignored: list[str] = field(default_factory=list)   # hidden or non-image files (folder source)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.num_train / self.batch_size))


def encode_labels(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
    """Integer class ids to what the loss expects: `(1,)` floats for two classes, one-hot for more."""
    if num_classes == 2:
        return tf.cast(tf.expand_dims(labels, -1), tf.float32)
    return tf.one_hot(labels, num_classes, dtype=tf.float32)


def mix_batches(ds: tf.data.Dataset, mixup: float, cutmix: float, seed: int) -> tf.data.Dataset:
    """MixUp and/or CutMix on batches of `(image, label)`; with both, each batch gets one of them at random.

    They run in the input pipeline rather than in the model because they mix labels too. They mix the full-size
    images, before the model's random crop: a CutMix box can then be partly cropped away, so its label weight is
    right only on average, which is all a regulariser needs.
    """
    mixers = []  # float32 whatever the global mixed-precision policy: pixels and labels stay exact
    if mixup:
        mixers.append(keras.layers.MixUp(alpha=mixup, seed=seed, dtype="float32"))
    if cutmix:
        mixers.append(keras.layers.CutMix(factor=cutmix, seed=seed, dtype="float32"))
    if not mixers:
        return ds

    def mix(images, labels):
        images = tf.cast(images, tf.float32)
        branches = [lambda m=m: tuple(m({"images": images, "labels": labels}, training=True).values())
                    for m in mixers]
        if len(branches) == 1:
            out = branches[0]()
        else:
            out = tf.switch_case(tf.random.uniform([], maxval=len(branches), dtype=tf.int32, seed=seed), branches)
        return out[0], tf.cast(out[1], labels.dtype)

    return ds.map(mix, num_parallel_calls=AUTOTUNE)


def _finish(ds: tf.data.Dataset, *, training: bool, cache: str, batch_size: int, num_classes: int,
            shuffle_buffer: int, seed: int, mixup: float = 0.0, cutmix: float = 0.0,
            shuffled: bool = False) -> tf.data.Dataset:
    """`(image, label, id)` examples: cache decoded images, shuffle (training only, unless the source already `shuffled` its files), batch, encode
    labels, mix (training only) and prefetch."""
    if cache == "memory":
        ds = ds.cache()
    elif cache != "none":
        ds = ds.cache(cache)
    if training and not shuffled:
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    # Ids (file paths) ride along to here and are dropped per batch: a per-image map of its own would cost more.
    ds = ds.map(lambda x, y, _id: (x, encode_labels(y, num_classes)), num_parallel_calls=AUTOTUNE)
    if training:
        ds = mix_batches(ds, mixup, cutmix, seed)
    return ds.prefetch(AUTOTUNE).with_options(pipeline_options())


def pipeline_options() -> tf.data.Options:
    """tf.data options of every pipeline: autotuning off.

    Keras makes a new iterator over the data every epoch. Destroying the old one, every few epochs, blocked for up to
    20 s with the CPU idle (py-spy: in ~RootDataset::Iterator, waiting for one of its threads; the autotuning thread
    sleeps for an optimisation period that doubles as the iterator ages). That was 10-15% of a 10-minute run. Without
    autotuning, AUTOTUNE parallelism means one thread per core.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return options


# ---------------------------------------------------------------------------------------------------------------
# folder


def _class_dirs(split_dir: str) -> list[str]:
    return sorted(
        d for d in os.listdir(split_dir) if not d.startswith(".") and os.path.isdir(os.path.join(split_dir, d))
    )


def list_images(split_dir: str, class_names: list[str] | None = None,
                ignored: list[str] | None = None) -> tuple[list[str], list[int], list[str]]:
    """Image files under `split_dir/<class>/`, with their class ids and the sorted class names.

    Hidden files and files without an image extension are left out (and appended to `ignored` when given).
    """
    found = _class_dirs(split_dir)
    if class_names is None:
        class_names = found
    if not class_names:
        raise UserError(f"data.path: {split_dir} holds no class sub-folders (expected e.g. cats/ and dogs/).")
    if found != class_names:
        raise UserError(f"data.path: {split_dir} has classes {found}, but the training split has {class_names}.")
    paths, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(split_dir, name)
        files, left_out = find_images(class_dir)
        if ignored is not None:
            ignored += left_out
        if not files:
            raise UserError(f"data.path: class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
        paths += files
        labels += [label] * len(files)
    return paths, labels, class_names


def find_split_dirs(root: str) -> dict[str, str]:
    """`{"train": ..., "val": ..., "test": ...}` for the split folders a root has (val also from validation/)."""
    splits = {}
    for split, names in (("train", ["train"]), ("val", ["val", "validation"]), ("test", ["test"])):
        for name in names:
            if os.path.isdir(os.path.join(root, name)):
                splits[split] = os.path.join(root, name)
                break
    return splits


def _stratified_split(paths, labels, fraction: float, seed: int):
    """Deterministically holds out `fraction` of each class."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    labels_arr = np.asarray(labels)
    for label in np.unique(labels_arr):
        idx = np.flatnonzero(labels_arr == label)
        rng.shuffle(idx)
        n_held = max(1, int(round(len(idx) * fraction)))
        held += idx[:n_held].tolist()
        keep += idx[n_held:].tolist()
    pick = lambda idx: ([paths[i] for i in sorted(idx)], [labels[i] for i in sorted(idx)])  # noqa: E731
    return pick(keep), pick(held)


def folder_files(data_cfg: dict, seed: int,
                 ignored: list[str] | None = None) -> tuple[dict[str, tuple[list[str], list[int]]], list[str]]:
    """The files and labels of each split of a folder source, and the class names."""
    root = data_cfg["path"]
    split_dirs = find_split_dirs(root)
    if "train" in split_dirs:
        paths, labels, class_names = list_images(split_dirs["train"], ignored=ignored)
        if "val" not in split_dirs:
            train, val = _stratified_split(paths, labels, data_cfg["validation_split"], seed)
            splits = {"train": train, "val": val}
        else:
            splits = {"train": (paths, labels)}
            splits["val"] = list_images(split_dirs["val"], class_names, ignored)[:2]
        if "test" in split_dirs:
            splits["test"] = list_images(split_dirs["test"], class_names, ignored)[:2]
    else:
        paths, labels, class_names = list_images(root, ignored=ignored)
        train, val = _stratified_split(paths, labels, data_cfg["validation_split"], seed)
        splits = {"train": train, "val": val}
    if len(class_names) < 2:
        raise UserError(f"data.path: {root} must hold at least two class folders. Received: {class_names}")
    return splits, class_names


def _folder_dataset(paths: list[str], labels: list[int], orientations: list[int], image_size,
                    shuffle_seed: int | None = None) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_tensor_slices((paths, np.asarray(labels, np.int32), np.asarray(orientations, np.int32)))
    if shuffle_seed is not None:
        # Shuffling file names before decoding is a perfect shuffle for free; a buffer of decoded images costs ~10%
        # of the uncached pipeline's rate (measured: the batch reads images long gone from the CPU caches).
        ds = ds.shuffle(len(paths), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = ds.map(lambda p, y, o: (decode_and_resize(tf.io.read_file(p), image_size, o), y, p),
                num_parallel_calls=AUTOTUNE)
    # A file that passed the listing but fails to decode is dropped rather than ending the epoch.
    return ds.ignore_errors()


# ---------------------------------------------------------------------------------------------------------------
# synthetic


def synthetic_images(n: int, image_size, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images of oriented stripes, the orientation set by the class, with random frequency, phase, colour and noise.

    Class `c` has stripes at about `c * 180 / num_classes` degrees (±10), so a small CNN must learn oriented edge
    filters to tell the classes apart, which is what the first layer of a real image model learns too.
    """
    rng = np.random.default_rng(seed)
    h, w = image_size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    labels = rng.integers(0, num_classes, size=n).astype(np.int32)
    angles = labels * np.pi / num_classes + rng.uniform(-np.pi / 18, np.pi / 18, size=n)
    freq = rng.uniform(0.15, 0.35, size=n)
    phase = rng.uniform(0, 2 * np.pi, size=n)
    coords = np.cos(angles)[:, None, None] * xx + np.sin(angles)[:, None, None] * yy
    wave = 0.5 + 0.5 * np.sin(freq[:, None, None] * coords + phase[:, None, None])
    # One light and one dark colour (in random order) keep the stripes visible whatever the hues.
    light = rng.uniform(140, 255, size=(n, 1, 1, 3))
    dark = rng.uniform(0, 110, size=(n, 1, 1, 3))
    swap = rng.random((n, 1, 1, 1)) < 0.5
    fg, bg = np.where(swap, dark, light), np.where(swap, light, dark)
    images = wave[..., None] * fg + (1 - wave[..., None]) * bg + rng.normal(0, 12, size=(n, h, w, 3))
    return np.clip(images, 0, 255).astype(np.uint8), labels


def synthetic_class_names(num_classes: int) -> list[str]:
    """The synthetic source's classes, named by their stripes' orientation."""
    return [f"orientation_{round(c * 180 / num_classes)}deg" for c in range(num_classes)]


# ---------------------------------------------------------------------------------------------------------------
# tfds

_TFDS_HOSTS = ("storage.googleapis.com", "download.microsoft.com")


def _online(hosts=_TFDS_HOSTS, timeout: float = 3.0) -> bool:
    for host in hosts:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            return True
        except OSError:
            continue
    return False


def _tfds_splits(data_cfg: dict, builder) -> dict[str, str]:
    available = set(builder.info.splits.keys())
    splits = {"train": "train"}
    val_pct = int(round(data_cfg["validation_split"] * 100))
    test_pct = int(round(data_cfg["test_split"] * 100))
    # Carve what the dataset lacks from the end of its train split, deterministically, by split slicing.
    carve = 0
    if "test" in available:
        splits["test"] = "test"
    elif test_pct:
        carve += test_pct
        splits["test"] = f"train[{100 - test_pct}%:]"
    if "validation" in available:
        splits["val"] = "validation"
    else:
        splits["val"] = f"train[{100 - carve - val_pct}%:{100 - carve}%]"
        carve += val_pct
    if carve:
        splits["train"] = f"train[:{100 - carve}%]"
    return splits


def tfds_builder(data_cfg: dict):
    """The TFDS builder for `data.name`, prepared (downloaded) if needed; offline, fails fast with what to do."""
    import tensorflow_datasets as tfds

    name = data_cfg["name"]
    try:
        builder = tfds.builder(name, data_dir=data_cfg["data_dir"])
    except Exception as e:  # TFDS raises several types for unknown names
        raise UserError(f"data.name: TFDS has no dataset {name!r} ({type(e).__name__}).") from None
    if not builder.is_prepared():
        if not _online():
            raise UserError(
                f"data.source=tfds: TFDS dataset {name!r} is not in {builder.data_dir} and its download servers "
                "cannot be reached; use a local copy with --set data.source=folder --set data.path=DIR "
                "(DIR/train/<class>/*.jpg, DIR/val/<class>/*.jpg), or set data.data_dir to a prepared TFDS folder."
            )
        builder.download_and_prepare()
    return builder


def _tfds_datasets(data_cfg: dict, image_size, seed: int):
    builder = tfds_builder(data_cfg)
    split_names = _tfds_splits(data_cfg, builder)
    label_feature = builder.info.features["label"]
    out = {}
    for split, spec in split_names.items():
        ds = builder.as_dataset(split=spec, as_supervised=True, shuffle_files=False).enumerate()
        ds = ds.map(lambda i, xy: (resize_decoded(xy[0], image_size), tf.cast(xy[1], tf.int32),
                                   tf.strings.join([spec, "#", tf.strings.as_string(i)])),
                    num_parallel_calls=AUTOTUNE)
        out[split] = (ds.ignore_errors(), builder.info.splits[spec].num_examples)
    return out, list(label_feature.names)


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class SourceReport:
    """What a folder source left out: files it cannot read (skipped: undecodable, or `too_large` for the pixel
    budget) and hidden or non-image files (ignored)."""

    skipped: list[str] = field(default_factory=list)
    too_large: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def source_splits(data_cfg: dict, seed: int,
                  report: SourceReport | None = None, shuffle_train_files: bool = False,
                  ) -> tuple[dict[str, tuple[tf.data.Dataset, int]], list[str]]:
    """The unbatched splits of the configured source and the class names.

    Each split is `(dataset, number of examples)`; the dataset yields `(uint8 image, int32 label, id)` where `id` is
    the file path (folder), `"<split spec>#<index>"` (TFDS) or `"<split>#<index>"` (synthetic). Folder sources are
    scanned first: undecodable files are skipped (`data.on_bad_image: skip`) or stop everything (`fail`); both
    they and the ignored files are recorded in `report`. With `shuffle_train_files`, a folder source's training
    split reshuffles its file list every epoch, before decoding.
    """
    report = report if report is not None else SourceReport()
    image_size = as_size(data_cfg["image_size"])
    source = data_cfg["source"]
    splits: dict[str, tuple[tf.data.Dataset, int]] = {}
    if source == "synthetic":
        n = data_cfg["synthetic_size"]
        k = data_cfg["synthetic_classes"]
        for i, (split, size) in enumerate((("train", n), ("val", n // 4), ("test", n // 4))):
            images, labels = synthetic_images(size, image_size, k, seed + 1000 * i)
            ids = [f"{split}#{j}" for j in range(size)]
            splits[split] = (tf.data.Dataset.from_tensor_slices((images, labels, ids)), size)
        class_names = synthetic_class_names(k)
    elif source == "folder":
        files, class_names = folder_files(data_cfg, seed, report.ignored)
        scan = scan_images([p for paths, _ in files.values() for p in paths], image_size,
                           data_cfg["max_image_megapixels"])
        bad = scan.left_out
        if bad and data_cfg["on_bad_image"] == "fail":
            first = next(p for paths, _ in files.values() for p in paths if p in bad)
            why = ("is over data.max_image_megapixels" if first in scan.over_budget else
                   "cannot be decoded as an image")
            raise UserError(f"data.on_bad_image=fail: {first} {why} ({len(bad)} such files in data.path); remove "
                            "them or set data.on_bad_image=skip.")
        report.too_large += scan.over_budget
        for split, (paths, labels) in files.items():
            kept = [(p, y) for p, y in zip(paths, labels) if p not in bad]
            report.skipped += [p for p in paths if p in bad]
            for label, name in enumerate(class_names):
                if not any(y == label for _, y in kept):
                    lost = [p for p, y in zip(paths, labels) if y == label]
                    raise UserError(f"data.path: the {split} split has no decodable image of class {name!r}: all "
                                    f"{len(lost)} of its files fail to decode (e.g. {lost[0]}); replace or remove them.")
            shuffle_seed = seed if shuffle_train_files and split == "train" else None
            splits[split] = (_folder_dataset([p for p, _ in kept], [y for _, y in kept],
                                             [scan.orientation[p] for p, _ in kept], image_size, shuffle_seed),
                             len(kept))
    else:
        splits, class_names = _tfds_datasets(data_cfg, image_size, seed)
    return splits, class_names


def class_names_at_hand(data_cfg: dict) -> list[str] | None:
    """The class names the configured source will give, found without reading an image (for a dry run), or None
    when that cannot be known here: a folder that does not exist, a TFDS dataset TFDS does not describe offline."""
    source = data_cfg["source"]
    if source == "synthetic":
        return synthetic_class_names(data_cfg["synthetic_classes"])
    if source == "folder":
        root = data_cfg["path"]
        if not root or not os.path.isdir(root):
            return None
        return _class_dirs(find_split_dirs(root).get("train", root)) or None
    try:
        import absl.logging
        import tensorflow_datasets as tfds

        absl.logging.set_verbosity(absl.logging.ERROR)  # TFDS warns about half-made data folders it will not use
        return list(tfds.builder(data_cfg["name"], data_dir=data_cfg["data_dir"]).info.features["label"].names)
    except Exception:  # an unknown name, a dataset without a label feature, a broken TFDS install
        return None


def build_datasets(data_cfg: dict, seed: int, augment_cfg: dict | None = None) -> Datasets:
    """Builds the train, val and (where the source has one) test pipelines of the `data` config section.

    Args:
        data_cfg: the `data` section of a resolved config.
        seed: shuffling and split seed (the run seed).
        augment_cfg: the `augment` section, for its batch-level keys (mixup, cutmix); None for no mixing.

    Returns:
        A `Datasets` with batched `(image, label)` pipelines and the class names.

    Raises:
        UserError: a missing or malformed folder, an unknown or unreachable TFDS dataset.
    """
    report = SourceReport()
    cache = data_cfg["cache"]
    # Uncached folder images are shuffled as file names; cached ones must be shuffled after the cache, every epoch.
    shuffled = cache == "none" and data_cfg["source"] == "folder"
    splits, class_names = source_splits(data_cfg, seed, report, shuffle_train_files=shuffled)
    mixing = augment_cfg or {}
    built = {}
    for split, (ds, _) in splits.items():
        split_cache = cache if cache in ("memory", "none") else f"{cache}.{split}"
        built[split] = _finish(
            ds, training=split == "train", cache=split_cache,
            batch_size=data_cfg["batch_size"], num_classes=len(class_names),
            shuffle_buffer=data_cfg["shuffle_buffer"], seed=seed,
            mixup=mixing.get("mixup", 0.0), cutmix=mixing.get("cutmix", 0.0), shuffled=shuffled,
        )
    return Datasets(
        train=built["train"], val=built["val"], test=built.get("test"), class_names=class_names,
        image_size=as_size(data_cfg["image_size"]), num_train=splits["train"][1], num_val=splits["val"][1],
        num_test=splits["test"][1] if "test" in splits else 0, batch_size=data_cfg["batch_size"],
        skipped=report.skipped, too_large=report.too_large, ignored=report.ignored,
    )


def load_image(path: str, image_size, max_megapixels: float) -> np.ndarray:
    """One image file read as training reads it (`images.read_image`), as float32 in [0, 255]."""
    if not os.path.isfile(path):
        raise UserError(f"--image: no such file: {path}")
    try:
        return read_image(path, as_size(image_size), max_megapixels).astype(np.float32)
    except UnreadableImage as e:
        raise UserError(f"--image: {e}") from None


def sample_image(data_cfg: dict, seed: int = 0) -> tuple[np.ndarray, str] | None:
    """A representative input image of a config's data (the first validation image), or None when the source
    is not at hand (TFDS not downloaded). Returns the image and where it came from."""
    if data_cfg["source"] == "synthetic":
        images, _ = synthetic_images(1, as_size(data_cfg["image_size"]), data_cfg["synthetic_classes"], seed)
        return images[0].astype(np.float32), "synthetic"
    if data_cfg["source"] == "folder" and data_cfg["path"] and os.path.isdir(data_cfg["path"]):
        files, _ = folder_files(data_cfg, seed)
        for path in files["val"][0]:
            try:
                return load_image(path, data_cfg["image_size"], data_cfg["max_image_megapixels"]), path
            except UserError:
                continue
    return None
