"""Input pipeline speed: the project's pipeline against decoding alone and against image_dataset_from_directory.

    python bench/input_pipeline.py                       # ../shared/data/cats_vs_dogs/train at 160x160
    python bench/input_pipeline.py --data DIR --size 224 --rounds 5

Every mode reads the same files, batches of 32, one full pass, uncached unless it says so; the modes run in turns
for several rounds and the table shows each mode's median, and its ratio to decoding alone. The decode-only modes run
with the project pipeline's tf.data options (autotuning off): with autotuning on, a pass ran at anywhere from half
to all of the rate. The "DCT-scaled, no resize" row splits the project's cost into decoding and resizing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cnnlab  # noqa: E402,F401  (quiet TensorFlow logs)
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from cnnlab import config, data, images  # noqa: E402
from cnnlab.modeling import augmentation_layers  # noqa: E402

AUTOTUNE = tf.data.AUTOTUNE


def images_per_second(ds: tf.data.Dataset) -> float:
    start, n = time.perf_counter(), 0
    for batch in ds:
        n += int(batch[0].shape[0]) if isinstance(batch, tuple) else int(batch.shape[0])
    return n / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/cats_vs_dogs"))
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    size = (args.size, args.size)
    cfg = config.resolve([], ["data.source=folder", f"data.path={args.data}", f"data.image_size=[{args.size},"
                              f"{args.size}]", "data.cache=none", "augment.flip=horizontal", "augment.rotation=0.05",
                              "augment.zoom=0.1"])
    files, _ = data.folder_files(cfg["data"], seed=0)
    paths = files["train"][0]
    augment = keras.Sequential(augmentation_layers(cfg["augment"], seed=0))

    def decode_only(decode):
        def make():  # a 1x1 corner of each image is all that gets batched: the rate is the decoder's
            ds = tf.data.Dataset.from_tensor_slices(paths).map(lambda p: decode(tf.io.read_file(p))[:1, :1],
                                                               num_parallel_calls=AUTOTUNE)
            return ds.batch(32).prefetch(AUTOTUNE).with_options(data.pipeline_options())
        return make

    def project(augmented: bool):
        def make():
            ds = data.build_datasets(cfg["data"], seed=0).train
            if augmented:  # what the model's own augmentation layers do, mapped here to time it with the input
                ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=AUTOTUNE)
            return ds
        return make

    def project_cached():
        ds = data.build_datasets({**cfg["data"], "cache": "memory"}, seed=0).train
        for _ in ds:  # the first epoch fills the cache
            pass
        return ds

    def tutorial():
        return keras.utils.image_dataset_from_directory(
            Path(args.data) / "train", image_size=size, batch_size=32, verbose=False).prefetch(AUTOTUNE)

    modes = {
        "decode only (read + decode_image)": decode_only(
            lambda b: tf.io.decode_image(b, channels=3, expand_animations=False)),
        "project: decode (DCT-scaled), no resize": decode_only(lambda b: images.decode_scaled(b, size)),
        "project: decode + resize": project(False),
        "project: decode + resize + augment": project(True),
        "image_dataset_from_directory": tutorial,
        "project, cached (epoch 2+)": project_cached,
    }
    results: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, make in modes.items():
            results[name].append(images_per_second(make()))
    base = statistics.median(results["decode only (read + decode_image)"])
    print(f"\nInput pipeline, {len(paths)} files of {args.data}/train at {args.size}x{args.size}, batch 32, "
          f"median of {args.rounds} rounds")
    print(f"{'mode':<42} {'images/s':>10} {'vs decode only':>15}")
    for name, rates in results.items():
        median = statistics.median(rates)
        print(f"{name:<42} {median:>10.0f} {median / base:>15.2f}")


if __name__ == "__main__":
    main()
