"""Training speed: images/s per model family and precision, and the project against the tutorial way.

    python bench/training_speed.py                        # families x {float32, mixed_bfloat16}, 160x160
    python bench/training_speed.py --tutorial-epochs 3    # + project vs image_dataset_from_directory + fit

Part 1 trains each config on in-memory batches (so only the model is timed) for --steps steps after a warm-up,
alternating precisions, and reports the median of --rounds. It then takes the first config apart (without its
augmentation layers, then also without batch norm, then its convolutions alone in a single Conv2D step) to show
which parts bfloat16 speeds up and which it does not, and times the same network with its batch norm computed by
TensorFlow's one-kernel FusedBatchNormV3 instead of Keras's composite (checked to compute the same first).
Part 2 trains the standard config's model through `train.py`'s code path and the way the TensorFlow tutorial does
it (image_dataset_from_directory + model.fit, no cache, float32), for the same epochs and image size, on the
shared photos, and compares images/s.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import cnnlab  # noqa: E402,F401
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from cnnlab import config, data  # noqa: E402
from cnnlab.modeling import build_model, family_network  # noqa: E402
from cnnlab.runs import RunDir  # noqa: E402
from cnnlab.runtime import set_precision  # noqa: E402
from cnnlab.training import compile_model, train  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data" / "cats_vs_dogs"


PRECISIONS = ("float32", "mixed_bfloat16")


def fit_rate(model: keras.Model, x: tf.Tensor, y: tf.Tensor, steps: int) -> float:
    """Images/s of `steps` training steps on one in-memory batch, after a warm-up that compiles the step."""
    # The project's tf.data options (autotuning off): with autotuning on, tearing down an iterator can stall for
    # seconds, which lands inside the timed fit() and swamped the model's own time in earlier runs of this bench.
    ds = tf.data.Dataset.from_tensors((x, y)).repeat(steps + 3).with_options(data.pipeline_options())
    model.fit(ds.take(3), verbose=0)
    start = time.perf_counter()
    model.fit(ds.take(steps), verbose=0)
    return steps * int(x.shape[0]) / (time.perf_counter() - start)


def model_rate(cfg: dict, precision: str, steps: int, batch: int, augmentation: bool = True,
               fused_batch_norm: bool = False) -> float:
    """Images/s of a config's whole model under `precision`, or of its family network alone (no augmentation),
    optionally with its batch norm computed by TensorFlow's fused kernel (`FusedBatchNorm`)."""
    set_precision(precision)
    keras.utils.set_random_seed(0)
    model = build_model(cfg, 2)
    if not augmentation:
        model = family_network(model)
    if fused_batch_norm:
        model = with_fused_batch_norm(model)
    compile_model(model, cfg["training"], 2, steps_per_epoch=steps, jit_compile=cfg["runtime"]["jit_compile"])
    h, w = model.input_shape[1:3]
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (batch, h, w, 3)).astype("float32"))
    y = tf.constant(np.random.default_rng(1).integers(0, 2, (batch, 1)).astype("float32"))
    rate = fit_rate(model, x, y, steps)
    set_precision("float32")
    return rate


class FusedBatchNorm(keras.layers.BatchNormalization):
    """Keras's batch norm, computed by TensorFlow's FusedBatchNormV3 kernel on 4-D channels-last inputs.

    Keras composes batch norm from `moments` and elementwise ops, and under mixed precision casts every activation
    to float32 and back for the statistics: several passes over memory each way. The fused kernel takes bfloat16 or
    float32 activations with float32 statistics in one op forward and one backward. Same variables and results
    (`matches_keras` checks), so the bench can time one against the other.
    """

    def call(self, inputs, training=None, mask=None):
        if len(inputs.shape) != 4 or self.axis not in (3, -1) or mask is not None:
            return super().call(inputs, training=training, mask=mask)
        gamma = tf.cast(self.gamma, "float32") if self.scale else tf.ones(inputs.shape[-1])
        beta = tf.cast(self.beta, "float32") if self.center else tf.zeros(inputs.shape[-1])
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, is_training=True)
            # The kernel returns the unbiased (n-1) variance; Keras's moving average takes the biased one.
            n = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], "float32")
            variance = variance * (n - 1.0) / n
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
            return outputs
        outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, mean=tf.cast(self.moving_mean, "float32"),
            variance=tf.cast(self.moving_variance, "float32"), epsilon=self.epsilon, is_training=False)
        return outputs


def with_fused_batch_norm(model: keras.Model) -> keras.Model:
    """A copy of `model`, weights included, whose BatchNormalization layers are `FusedBatchNorm`."""
    def clone(layer):
        if type(layer) is keras.layers.BatchNormalization:
            return FusedBatchNorm.from_config(layer.get_config())
        return layer.__class__.from_config(layer.get_config())

    fused = keras.models.clone_model(model, clone_function=clone)
    fused.set_weights(model.get_weights())
    return fused


def matches_keras(model: keras.Model, x: tf.Tensor) -> float:
    """Largest difference between `model` and its fused-batch-norm copy: outputs in training and inference mode and
    the moving statistics after one training-mode call (0 up to float32 rounding when they compute the same)."""
    fused = with_fused_batch_norm(model)
    differences = [np.max(np.abs(np.asarray(model(x, training=True)) - np.asarray(fused(x, training=True))))]
    differences += [np.max(np.abs(np.asarray(a) - np.asarray(b))) for a, b in
                    zip(model.non_trainable_weights, fused.non_trainable_weights)]
    differences.append(np.max(np.abs(np.asarray(model(x, training=False)) - np.asarray(fused(x, training=False)))))
    return float(max(differences))


def conv_rate(precision: str, size: int, batch: int, channels: int, steps: int) -> float:
    """Images/s of one 3x3 Conv2D (channels -> channels, same padding) trained alone: the kernel bfloat16 is for."""
    set_precision(precision)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, channels))
    model = keras.Model(inputs, keras.layers.Conv2D(channels, 3, padding="same")(inputs))
    model.compile(optimizer="sgd", loss="mse", jit_compile="auto")
    x = tf.constant(np.random.default_rng(0).normal(size=(batch, size, size, channels)).astype("float32"))
    rate = fit_rate(model, x, x, steps)
    set_precision("float32")
    return rate


def median_rates(measure, rounds: int) -> dict[str, float]:
    """`measure(precision)` for both precisions, alternating them for `rounds` rounds; the median of each."""
    rates: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(rounds):
        for precision in PRECISIONS:
            rates[precision].append(measure(precision))
    return {p: statistics.median(r) for p, r in rates.items()}


def print_row(label: str, rates: dict[str, float], width: int) -> None:
    f32, bf16 = rates["float32"], rates["mixed_bfloat16"]
    print(f"{label:<{width}} {f32:>10.1f} {bf16:>10.1f} {bf16 / f32:>9.2f}")


def bench_config(name: str, args, sets: list[str] = ()) -> dict:
    return config.resolve([str(REPO / "configs" / f"{name}.yaml")],
                          [f"data.image_size=[{args.size},{args.size}]", "model.transfer.weights=null",
                           f"data.batch_size={args.batch}", *sets])


def why_bfloat16(args, name: str) -> None:
    """Where bfloat16 helps: the config's model with parts removed, and a convolution alone, in both precisions."""
    family = bench_config(name, args)["model"]["name"]
    # label: (config overrides, augmentation layers kept, fused batch norm); each "..." row changes one thing in
    # the row "without the augmentation layers", so that a row's ratio to it is that one thing's cost
    variants = {
        "whole model (augmentation layers included)": ([], True, False),
        "without the augmentation layers": ([], False, False),
        "... with TensorFlow's fused batch norm": ([], False, True),
        "... without batch norm": ([f"model.{family}.batch_norm=false"], False, False),
    }
    cfg = bench_config(name, args)
    set_precision("float32")
    keras.utils.set_random_seed(0)
    network = family_network(build_model(cfg, 2))
    x = tf.constant(np.random.default_rng(0).uniform(0, 1, (4, *network.input_shape[1:])).astype("float32"))
    difference = matches_keras(network, x)
    print(f"\nWhere bfloat16 helps, {name} ({args.size}x{args.size}, batch {args.batch}, median of {args.rounds}); "
          f"fused and Keras batch norm differ by at most {difference:.1e} (float32)")
    print(f"{'variant':<46} {'float32':>10} {'bfloat16':>10} {'bf16/f32':>9}")
    for label, (sets, augmentation, fused) in variants.items():
        cfg = bench_config(name, args, sets)
        rates = median_rates(lambda p: model_rate(cfg, p, args.steps, args.batch, augmentation, fused), args.rounds)
        print_row(label, rates, 46)
    for channels, size in ((32, args.size), (128, args.size // 4)):
        rates = median_rates(lambda p: conv_rate(p, size, args.batch, channels, args.steps), args.rounds)
        print_row(f"one 3x3 conv alone, {channels}->{channels} at {size}x{size}", rates, 46)


def families(args) -> None:
    rows = {}
    for name in args.configs:
        cfg = bench_config(name, args)
        rows[name] = median_rates(lambda p: model_rate(cfg, p, args.steps, args.batch), args.rounds)
    print(f"\nTraining images/s (model only, in-memory batches of {args.batch}, {args.size}x{args.size}, "
          f"median of {args.rounds})")
    print(f"{'config':<28} {'float32':>10} {'bfloat16':>10} {'bf16/f32':>9}")
    for name, rates in rows.items():
        print_row(name, rates, 28)


def tutorial_way(cfg: dict, epochs: int) -> tuple[float, float]:
    """image_dataset_from_directory + model.fit, as the TF tutorial writes it (the same model, float32)."""
    set_precision("float32")
    keras.utils.set_random_seed(0)
    size = tuple(cfg["data"]["image_size"])
    train_ds = keras.utils.image_dataset_from_directory(SHARED / "train", image_size=size, batch_size=32,
                                                         label_mode="binary", verbose=False)
    val_ds = keras.utils.image_dataset_from_directory(SHARED / "val", image_size=size, batch_size=32,
                                                       label_mode="binary", verbose=False)
    model = build_model(cfg, 2)
    compile_model(model, cfg["training"], 2, steps_per_epoch=63, jit_compile="auto")
    seconds = []

    class EpochClock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.start)

    start = time.perf_counter()
    model.fit(train_ds, validation_data=val_ds, epochs=epochs, verbose=0, callbacks=[EpochClock()])
    return 2000 * epochs / (time.perf_counter() - start), 2000 / seconds[-1]


def project_way(cfg: dict, epochs: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as runs:
        cfg = config.resolve([], [f"run.dir={runs}", f"training.epochs={epochs}"], base=cfg)
        start = time.perf_counter()
        run = RunDir(train(cfg, ["bench.yaml"]))
        wall = 2000 * epochs / (time.perf_counter() - start)
        return wall, 2000 / run.history()[-1]["epoch_seconds"]


def versus_tutorial(args) -> None:
    base = config.resolve([str(REPO / "configs/cats_vs_dogs_standard.yaml")], [
        "data.source=folder", f"data.path={SHARED}", f"data.image_size=[{args.size},{args.size}]",
        "runtime.log_histograms=false", "runtime.log_kernel_images=false"])
    project_f32 = project_way(config.resolve([], ["runtime.precision=float32"], base=base), args.tutorial_epochs)
    project_auto = project_way(config.resolve([], ["runtime.precision=auto"], base=base), args.tutorial_epochs)
    tutorial = tutorial_way(base, args.tutorial_epochs)
    print(f"\nThe standard config's model, {args.tutorial_epochs} epochs on the 2,000 shared photos at "
          f"{args.size}x{args.size}: images/s over the whole run (wall clock: start-up, decoding, validation) and in "
          f"its last epoch (validation included)")
    print(f"{'way':<52} {'whole run':>10} {'vs tutorial':>12} {'last epoch':>11} {'vs tutorial':>12}")
    for name, (wall, last) in (("tutorial: image_dataset_from_directory + fit, float32", tutorial),
                               ("project: train.py, float32", project_f32),
                               ("project: train.py, runtime.precision=auto", project_auto)):
        print(f"{name:<52} {wall:>10.1f} {wall / tutorial[0]:>12.2f} {last:>11.1f} {last / tutorial[1]:>12.2f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["cats_vs_dogs_standard", "cats_vs_dogs_pointwise",
                                                          "cats_vs_dogs_separable"])
    parser.add_argument("--size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tutorial-epochs", type=int, default=0, help="also compare with the tutorial way")
    args = parser.parse_args(argv)
    families(args)
    why_bfloat16(args, args.configs[0])
    if args.tutorial_epochs:
        versus_tutorial(args)


if __name__ == "__main__":
    main()
