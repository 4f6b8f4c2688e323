"""Training: a resolved config in, a run directory out (its files and how an epoch is committed: `cnnlab.runs`)."""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cnnlab import config as config_lib
from cnnlab.budget import EpochLine, TimeBudget, downsized, epochs_held, fallback_sizes, pick_size, plan_for
from cnnlab.console import describe_devices
from cnnlab.data import Datasets, build_datasets, class_names_at_hand
from cnnlab.errors import TrainingError, UserError
from cnnlab.modeling import (build_model, model_input_size, network_input_size, resize_model,
                              stage_image_size, without_pretrained_weights)
from cnnlab.patch_pca import set_first_conv_to_pca
from cnnlab.report import format_report, model_report
from cnnlab.runs import RunDir, fresh_state
from cnnlab.runtime import enable_memory_growth, make_strategy, resolve_jit, set_precision, set_seed



# ---------------------------------------------------------------------------------------------------------------
# Optimizer and compile


def lr_schedule(training_cfg: dict, steps_per_epoch: int) -> keras.optimizers.schedules.LearningRateSchedule | float:
    """The learning rate of a `training` config section over optimizer steps: warmup, then constant or cosine."""
    lr = training_cfg["learning_rate"]
    total = training_cfg["epochs"] * steps_per_epoch
    warmup = min(training_cfg["warmup_epochs"] * steps_per_epoch, max(total - 1, 0))
    if training_cfg["schedule"] == "cosine":
        if warmup:
            return keras.optimizers.schedules.CosineDecay(
                0.0, decay_steps=max(total - warmup, 1), warmup_target=lr, warmup_steps=warmup)
        return keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(total, 1))
    if warmup:
        return keras.optimizers.schedules.PolynomialDecay(0.0, warmup, end_learning_rate=lr, power=1.0)
    return lr


def make_optimizer(training_cfg: dict, steps_per_epoch: int, budgeted: bool = False) -> keras.optimizers.Optimizer:
    """The optimizer and learning-rate schedule of a `training` config section.

    With `budgeted`, the learning rate is a plain variable that `cnnlab.budget.TimeBudget` sets before every step
    from the time spent, instead of a schedule over the optimizer's step count.
    """
    schedule = float(training_cfg["learning_rate"]) if budgeted else lr_schedule(training_cfg, steps_per_epoch)
    name = training_cfg["optimizer"]
    wd = training_cfg["weight_decay"]
    ema = training_cfg["ema"]
    common = {"use_ema": bool(ema), "ema_momentum": ema or 0.99}
    if name == "adamw":
        opt = keras.optimizers.AdamW(schedule, weight_decay=wd, **common)
    elif name == "adam":
        opt = keras.optimizers.Adam(schedule, **common)
    elif name == "sgd":
        opt = keras.optimizers.SGD(schedule, momentum=training_cfg["momentum"], nesterov=True, weight_decay=wd or None,
                                   **common)
    else:
        opt = keras.optimizers.RMSprop(schedule, **common)
    if wd and name in ("adamw", "sgd"):
        # Decaying BatchNorm scales/offsets and biases only fights the normalisation; decay the kernels alone.
        opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return opt


def loss_and_metrics(training_cfg: dict, num_classes: int) -> tuple[keras.losses.Loss, list[keras.metrics.Metric]]:
    """The loss and accuracy that match the head: binary (sigmoid) or categorical (softmax)."""
    smoothing = training_cfg["label_smoothing"]
    if num_classes == 2:
        return (keras.losses.BinaryCrossentropy(label_smoothing=smoothing),
                [keras.metrics.BinaryAccuracy(name="accuracy")])
    return (keras.losses.CategoricalCrossentropy(label_smoothing=smoothing),
            [keras.metrics.CategoricalAccuracy(name="accuracy")])


def compile_model(model: keras.Model, training_cfg: dict, num_classes: int, steps_per_epoch: int,
                  jit_compile: bool | str = "auto", budgeted: bool = False) -> None:
    """Compiles with the optimizer of `training_cfg` and the loss and accuracy of `loss_and_metrics`."""
    loss, metrics = loss_and_metrics(training_cfg, num_classes)
    model.compile(optimizer=make_optimizer(training_cfg, steps_per_epoch, budgeted), loss=loss, metrics=metrics,
                  jit_compile=jit_compile)


def training_phases(cfg: dict) -> list[dict]:
    """The phases of a run: `train` for training.epochs, then `fine_tune` when training.fine_tune.epochs > 0.

    Each phase has its own `training` section (epochs counted within the phase, learning rate), the epoch at which
    it ends, counting from the start of the run, the epoch at which its learning-rate schedule `start`s, and the
    network input `size` it trains at (None: the config's own). Progressive resizing (`training.progressive`)
    splits `train` into stages at growing sizes; they share one optimizer and one learning-rate schedule, as a
    single phase does.
    """
    training_cfg = cfg["training"]
    phases, start = [], 0
    for size, epochs in config_lib.progressive_stages(training_cfg):
        start += epochs
        phases.append({"name": "train", "training": training_cfg, "start": 0, "end": start, "size": size})
    phases.append({"name": "train", "training": training_cfg, "start": 0, "end": training_cfg["epochs"],
                   "size": None})
    fine_tune = training_cfg["fine_tune"]
    if fine_tune["epochs"]:
        tuned = {**training_cfg, "epochs": fine_tune["epochs"], "learning_rate": fine_tune["learning_rate"],
                 "warmup_epochs": 0}
        phases.append({"name": "fine_tune", "training": tuned, "start": training_cfg["epochs"],
                       "end": training_cfg["epochs"] + fine_tune["epochs"], "size": None})
    return phases


def phase_size(cfg: dict, phase: dict) -> tuple[int, int]:
    """The network input size a phase of `training_phases` trains at."""
    return config_lib.as_size(phase["size"]) if phase["size"] is not None else model_input_size(cfg)


def unfreeze_for_fine_tuning(model: keras.Model, which: int | str) -> list[str]:
    from models.transfer import unfreeze

    try:
        return unfreeze(model, which)
    except ValueError as e:
        raise UserError(f"training.fine_tune.unfreeze: {e}") from None


def _in_optimizer(variable) -> str:
    return variable.path.split("/", 1)[-1]


def carry_optimizer_state(previous: keras.optimizers.Optimizer, model: keras.Model) -> None:
    """Copies a loaded optimizer's variables (step count, moments) into the model's new optimizer, except the
    learning rate, which comes from the config. A different optimizer type starts with fresh moments."""
    new = model.optimizer
    new.build(model.trainable_variables)
    # Paths start with the optimizer's name, which Keras makes unique per process ("adam_w", "adam_w_1"): match on
    # the rest ("iteration", "<weight>_momentum").
    old = {_in_optimizer(v): v for v in previous.variables}
    if type(previous) is not type(new):
        print(f"Note: the optimizer changed from {type(previous).__name__} to {type(new).__name__}; "
              "its moments start afresh.")
    for var in new.variables:
        source = old.get(_in_optimizer(var))
        if var.name == "learning_rate" or source is None or tuple(source.shape) != tuple(var.shape):
            continue
        var.assign(source)


# ---------------------------------------------------------------------------------------------------------------
# The callback that keeps the run directory


class RunCheckpoint(keras.callbacks.Callback):
    """Commits every completed epoch to the run directory (`RunDir.commit_epoch`: checkpoint, then state.json, then
    the files derived from it).

    It also stops training at the end of a step when the loss is not finite or Ctrl-C was pressed, and then leaves
    the partial epoch uncommitted.
    """

    def __init__(self, run: RunDir, state: dict, keep_every_epoch: bool = False, spent_before: float = 0.0):
        super().__init__()
        self.keep_every_epoch = keep_every_epoch
        self.stop_reason: str | None = None   # set when training stops early: "nan" or "interrupt"
        self.stop_where = ""
        self.interrupt_requested = False      # set by the SIGINT handler; acted on at the end of the step
        self.run = run
        self.state = state                    # the committed state, updated in place as epochs are committed
        self._epoch_start = 0.0
        self._elapsed_before = state["history"][-1]["elapsed_seconds"] if state["history"] else spent_before
        self._train_start: float | None = None

    def on_train_begin(self, logs=None):
        # Once per process: phases and progressive-resizing stages each call fit() again, and their elapsed time
        # (with the rebuilds between them) runs on from the first.
        if self._train_start is None:
            self._train_start = time.perf_counter()

    def elapsed(self) -> float:
        """Seconds of training in this run so far, earlier processes of a resumed run included."""
        running = time.perf_counter() - self._train_start if self._train_start is not None else 0.0
        return self._elapsed_before + running

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self.stop_reason, self.stop_where = "nan", f"epoch {self._epoch + 1}, batch {batch + 1}"
            self.model.stop_training = True
        elif self.interrupt_requested:
            self.stop_reason, self.stop_where = "interrupt", f"epoch {self._epoch + 1}, batch {batch + 1}"
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.stop_reason:
            return  # a partial epoch, or NaN weights: the files of the last complete epoch stay as they are
        if self.interrupt_requested:  # Ctrl-C during validation: this epoch is complete, save it, then stop
            self.stop_reason, self.stop_where = "interrupt", f"the end of epoch {epoch + 1}"
            self.model.stop_training = True
        logs = dict(logs or {})
        row = {"epoch": epoch + 1}
        row.update({k: float(v) for k, v in logs.items() if k != "learning_rate"})
        row["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row["epoch_seconds"] = round(time.perf_counter() - self._epoch_start, 3)
        row["elapsed_seconds"] = round(self.elapsed(), 3)
        committed = self.run.commit_epoch(self.model, self.state, row, self.keep_every_epoch)
        self.state.clear()
        self.state.update(committed)


class AveragedWeights(keras.callbacks.SwapEMAWeights):
    """Puts the optimizer's moving average of the weights (`training.ema`) into the model for validation and for the
    end of every epoch, so the metrics, checkpoints and kernel images of an epoch are those of the averaged weights.

    A checkpoint saved that way holds the averaged weights in the model and the raw ones in the optimizer, so a run
    resumed from it (`resumed=True`) swaps them back before it trains on.
    """

    def __init__(self, resumed: bool = False):
        super().__init__(swap_on_epoch=True)
        self._ema_weights_in_model = resumed


class FlipValidation(keras.callbacks.Callback):
    """Validates each epoch on predictions averaged with the mirror image's (`augment.tta: flip`).

    fit() then runs without `validation_data`, and this callback puts `val_loss` and `val_accuracy` into the epoch's
    logs ahead of the callbacks that read them (checkpoints, TensorBoard, the progress line), so best.keras is
    picked on the figure that `evaluate.py` reports for the run. It evaluates a second model that calls the trained
    one on each image and on its mirror: the two share every layer, so it always sees the current weights, and
    Keras's own `evaluate` spreads the work over a distribution strategy's replicas as fit() would have.
    """

    def __init__(self, val: "tf.data.Dataset", training_cfg: dict, num_classes: int, jit_compile: bool | str):
        super().__init__()
        self.val = val
        self.training_cfg = training_cfg
        self.num_classes = num_classes
        self.jit_compile = jit_compile
        self._averaged: keras.Model | None = None

    def on_train_begin(self, logs=None):
        inputs = keras.Input(self.model.input_shape[1:])
        mirrored = keras.ops.flip(inputs, axis=2)
        # float32 whatever the precision policy: these are probabilities, as the model's own output is.
        outputs = keras.layers.Average(dtype="float32")([self.model(inputs), self.model(mirrored)])
        self._averaged = keras.Model(inputs, outputs, name="flip_averaged")
        loss, metrics = loss_and_metrics(self.training_cfg, self.num_classes)
        self._averaged.compile(loss=loss, metrics=metrics, jit_compile=self.jit_compile)

    def on_epoch_end(self, epoch, logs=None):
        scores = self._averaged.evaluate(self.val, verbose=0, return_dict=True)
        if logs is not None:
            logs.update({f"val_{name}": value for name, value in scores.items()})


class KernelImages(keras.callbacks.Callback):
    """Logs the first conv layer's kernels as one image per epoch, so TensorBoard shows filters as they learn."""

    def __init__(self, log_dir: Path):
        super().__init__()
        self.log_dir = log_dir
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        import tensorflow as tf

        from cnnlab.plots import find_conv_layer, kernel_grid, layer_kernel

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        layer = find_conv_layer(self.model)
        with self._writer.as_default():
            tf.summary.image(f"kernels/{layer.name}", kernel_grid(layer_kernel(layer))[None], step=epoch)
        self._writer.flush()


class CamImages(keras.callbacks.Callback):
    """Logs Grad-CAM overlays of a few fixed val images each epoch (`runtime.log_cam_images`), so TensorBoard shows
    where the network looks as it trains."""

    def __init__(self, val: "tf.data.Dataset", count: int, log_dir: Path):
        super().__init__()
        import numpy as np

        images = []
        for batch, _ in val:
            images += list(np.asarray(batch))
            if len(images) >= count:
                break
        self.images = np.stack(images[:count]).astype(np.uint8)
        self.log_dir = log_dir
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        import numpy as np
        import tensorflow as tf

        from cnnlab.cam import grad_cam, overlay

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.log_dir))
        maps, _ = grad_cam(self.model, self.images)
        overlays = np.stack([overlay(image, heat) for image, heat in zip(self.images, maps)])
        with self._writer.as_default():
            tf.summary.image("gradcam/val", overlays, step=epoch, max_outputs=len(overlays))
        self._writer.flush()


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def describe(cfg: dict) -> str:
    """The dry-run summary, built without reading the data or the network: where the data would come from, then the
    model layer by layer with parameters, MACs and receptive field.

    The head is built for the classes the data will give when they can be known here (`class_names_at_hand`),
    else for 2, and a transfer backbone gets random weights (costs do not depend on them); both are said.
    """
    data_cfg = cfg["data"]
    class_names = class_names_at_hand(data_cfg)
    source = {"folder": f"folder {data_cfg['path']}", "tfds": f"tfds {data_cfg['name']}",
              "synthetic": f"synthetic, {data_cfg['synthetic_size']} training images"}[data_cfg["source"]]
    classes = (f"classes={class_names}" if class_names else
               "classes: not known here (the data is not at hand), so the head is built for 2")
    lines = [f"Data: {source}  {classes}  image_size={list(config_lib.as_size(data_cfg['image_size']))}"
             f"  batch_size={data_cfg['batch_size']}"]
    costed = without_pretrained_weights(cfg)
    model = build_model(costed, len(class_names) if class_names else 2)
    lines.append(f"Model: {model.name}" + ("  (backbone built with random weights for this report: costs do not "
                                           "depend on them)" if costed is not cfg else ""))
    lines.append(format_report(model_report(model)))
    trainable = sum(int(keras.ops.size(w)) for w in model.trainable_weights)
    total = sum(int(keras.ops.size(w)) for w in model.weights)
    lines.append(f"Parameters: {total:,} ({trainable:,} trainable)")
    budget = cfg["training"]["time_budget"]
    if budget:
        lines.append(f"Time budget: {budget:g} min (the plan's {training_phases(cfg)[-1]['end']} epochs are shares "
                     "of it)")
    return "\n".join(lines)


def report_left_out(data: Datasets, run: RunDir) -> None:
    """Says which files a folder source left out, and lists the undecodable ones in the run directory."""
    if data.skipped:
        run.write_text(run.BAD_IMAGES, "".join(f"{p}\n" for p in data.skipped))
        shown = ", ".join(data.skipped[:3]) + (", ..." if len(data.skipped) > 3 else "")
        print(f"Skipped {len(data.skipped)} files that cannot be decoded as images ({shown}); the full list is in "
              f"{run.path / run.BAD_IMAGES}.")
    if data.too_large:
        print(f"Of those, {len(data.too_large)} would decode to more than data.max_image_megapixels and were not "
              "decoded.")
    if data.ignored:
        print(f"Ignored {len(data.ignored)} hidden, non-image (by extension) or non-UTF-8-named files in data.path.")


class stop_on_first_interrupt:
    """While training: the first Ctrl-C asks the run to stop at the end of the current step; a second one stops
    at once."""

    def __init__(self, checkpoint: RunCheckpoint):
        self.checkpoint = checkpoint
        self.previous = None

    def _handler(self, signum, frame):
        if self.checkpoint.interrupt_requested:
            raise KeyboardInterrupt
        self.checkpoint.interrupt_requested = True
        print("\nStopping at the end of this step (Ctrl-C again to stop at once)...", file=sys.stderr, flush=True)

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread: leave Ctrl-C alone
            self.previous = None
        return self

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False


def raise_stop(checkpoint: RunCheckpoint, run_dir: RunDir, cfg: dict) -> None:
    """Ends a run that stopped early: an interrupt exits 130 with the resume command; a NaN loss is an error."""
    done = checkpoint.state["epoch"]
    saved = f"epochs 1-{done} are saved in {run_dir}" if done else "no epoch was completed"
    if checkpoint.stop_reason == "interrupt":
        print(f"Interrupted at {checkpoint.stop_where}; {saved}. Resume with:\n"
              f"  python train.py --resume {run_dir}", flush=True)
        raise SystemExit(130)
    hint = "lower training.learning_rate"
    if cfg["runtime"]["precision"] != "float32":
        hint += " or set runtime.precision=float32"
    raise TrainingError(f"the loss became NaN or infinite at {checkpoint.stop_where}; {hint}. The last good "
                        f"checkpoints ({saved}) are in {run_dir.checkpoints_dir}.")


# ---------------------------------------------------------------------------------------------------------------
# A budget too short for the plan: smaller images (training.downsize)


def _takes(cfg: dict, size: tuple[int, int]) -> bool:
    """Whether the config's family network builds at network input `size` (its strides and poolings leave at
    least one pixel)."""
    try:
        build_model(without_pretrained_weights(cfg), 2, size=size)
    except (UserError, ValueError):
        return False
    return True


def check_network_sizes(cfg: dict) -> None:
    """Refuses, in one line, a network input size the run could train at that the family network cannot take: a
    progressive stage, or one of a `training.downsize` size's stages (they shrink with it). Checked before anything is
    timed or written; otherwise Keras's error would stop the run at that stage's start.

    An output size never grows when an input shrinks, so building at the smallest height and width is enough.
    """
    candidates = [(cfg, None)] + [(downsized(cfg, h), h) for h in fallback_sizes(cfg)]
    sizes = [(phase_size(c, phase), c, height) for c, height in candidates for phase in training_phases(c)]
    smallest = (min(s[0] for s, _, _ in sizes), min(s[1] for s, _, _ in sizes))
    if _takes(cfg, smallest):
        return
    failing = next((s for s in sorted(sizes, key=lambda s: s[0][0] * s[0][1]) if not _takes(cfg, s[0])), None)
    if failing is None:  # the smallest height and the smallest width came from different sizes
        return
    size, c, height = failing
    # The smallest square it takes, for the message (a handful of quick builds, on this error path only).
    low, high = min(size), max(model_input_size(cfg))
    while not _takes(cfg, (high, high)) and high < 4096:
        low, high = high, 2 * high
    while low + 1 < high:
        mid = (low + high) // 2
        low, high = (low, mid) if _takes(cfg, (mid, mid)) else (mid, high)
    name, at = f"model.{cfg['model']['name']}", f"{size[0]}x{size[1]}"
    needs = f"smaller than {name} takes (its strides and poolings need at least {high}x{high})"
    stage = size != tuple(model_input_size(c))
    if height is not None:
        raise UserError(f"training.downsize.sizes: training at {height} pixels"
                        + (f" makes a progressive stage {at}, " if stage else ", ") + f"{needs}; drop the size"
                        + (" or make training.progressive.sizes larger" if stage else "")
                        + f". Received: {cfg['training']['downsize']['sizes']}")
    key = "training.progressive.sizes" if stage else (
        "augment.crop" if cfg["augment"]["crop"] is not None else "data.image_size")
    value = cfg["training"]["progressive"]["sizes"] if stage else list(size)
    raise UserError(f"{key}: {at} is {needs}. Received: {value}")


class _StepTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.ends: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.ends.append(time.perf_counter())


def time_training_step(cfg: dict, data: Datasets, jit_compile: bool | str, steps: int = 6) -> float:
    """Seconds of one training step of the config's model at its own size, on a batch of random images shaped like
    `data.train`'s (a step's time does not depend on what the pixels show): the median of `steps` steps after the
    one that traces and compiles. Call it under the run's strategy scope."""
    images, labels = data.train.element_spec[:2]
    batch = cfg["data"]["batch_size"]
    x = tf.cast(tf.random.uniform([batch, *data.image_size, 3], 0, 255), images.dtype)
    y = tf.zeros([batch, *labels.shape[1:]], labels.dtype)
    model = build_model(cfg, data.num_classes)
    compile_model(model, cfg["training"], data.num_classes, 1, jit_compile=jit_compile, budgeted=True)
    batches = tf.data.Dataset.from_tensors((x, y)).repeat(steps + 1)
    options = tf.data.Options()  # every worker steps through all of them, in step with the others
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    times = _StepTimes()
    model.fit(batches.with_options(options), epochs=1, verbose=0, callbacks=[times], shuffle=False)
    return float(np.median(np.diff(times.ends)))


def fit_size_to_budget(cfg: dict, data: Datasets, dist, budget_s: float) -> tuple[dict, float]:
    """Applies `training.downsize`: times a training step at the config's own size, then returns the config at the
    size the budget holds `min_epochs` of the plan at (`cnnlab.budget.pick_size`) and the seconds the timing took,
    which count towards the budget."""
    start = time.perf_counter()
    jit_compile = resolve_jit(cfg["runtime"]["jit_compile"])
    with dist.strategy.scope():
        step_s = time_training_step(cfg, data, jit_compile)
    spent = time.perf_counter() - start
    own = model_input_size(cfg)[0]
    phases = training_phases(cfg)
    plan = plan_for(phases, model_input_size(cfg), lambda phase: phase_size(cfg, phase))
    downsize = cfg["training"]["downsize"]

    def held(scale: float) -> float:
        return epochs_held(plan, budget_s - spent, step_s * data.steps_per_epoch, scale)

    sizes = fallback_sizes(cfg)
    height = pick_size(own, sizes, downsize["min_epochs"], held)
    fits = ", ".join(f"{h}: {held(h / own):.0f}" for h in [own, *reversed(sizes)])
    print(f"Time budget: a training step at {own} pixels takes {step_s:.2f} s, so the budget holds this many of the "
          f"plan's {plan.end:g} epochs at each size: {fits} (training.downsize.min_epochs {downsize['min_epochs']}); "
          f"training at {height}.", flush=True)
    if height == own:
        return {**cfg, "training": {**cfg["training"], "downsize": {**downsize, "sizes": []}}}, spent
    return downsized(cfg, height), spent


def with_size_of(cfg: dict, saved: dict) -> dict:
    """`cfg` at the sizes a run's saved config chose (`fit_size_to_budget` spent its training.downsize)."""
    training = {**cfg["training"], "downsize": saved["training"]["downsize"],
                "progressive": {**cfg["training"]["progressive"],
                                "sizes": saved["training"]["progressive"]["sizes"]}}
    return {**cfg, "training": training, "data": {**cfg["data"], "image_size": saved["data"]["image_size"]},
            "augment": {**cfg["augment"], "crop": saved["augment"]["crop"]}}


def train(cfg: dict, config_files: list[str], *, resume: str | bool | None = None, overwrite: bool = False,
          dry_run: bool = False) -> Path | None:
    """Trains the model a resolved config describes and returns its run directory.

    Args:
        cfg: a resolved config (see `cnnlab.config.resolve`).
        config_files: the config files it came from; the first one names the run by default.
        resume: a run directory to continue, or True to continue the run `run.dir/run.name`.
        overwrite: replace an existing run directory of the same explicit `run.name`.
        dry_run: build the model, print its per-layer report, and return None without reading the data.
    """
    runtime = cfg["runtime"]
    if not dry_run:
        config_lib.check_environment(cfg)
    enable_memory_growth()
    dist = make_strategy(runtime["strategy"])  # first: multi-worker collectives must start before other TF work
    set_seed(cfg["run"]["seed"], runtime["deterministic"])
    precision = set_precision(runtime["precision"])
    print(f"Running on {describe_devices()}; strategy: {dist.description}; precision: {precision}; "
          f"global batch {cfg['data']['batch_size']}.", flush=True)
    if dry_run:
        with dist.strategy.scope():
            print(describe(cfg))
        return None
    check_network_sizes(cfg)
    probe_s = 0.0
    if fallback_sizes(cfg) and isinstance(dist.strategy, tf.distribute.MultiWorkerMirroredStrategy):
        # Each worker would time its own steps, and a size chosen near the threshold could differ between them.
        print("training.downsize is not used across several workers: training at the config's own size.", flush=True)
    elif fallback_sizes(cfg):
        if resume:
            # The size this run chose when it started, not one timed again now: its checkpoints are at that size.
            cfg = with_size_of(cfg, RunDir.for_resume(resume, cfg).config())
        else:
            data = build_datasets(cfg["data"], seed=cfg["run"]["seed"], augment_cfg=cfg["augment"])
            cfg, probe_s = fit_size_to_budget(cfg, data, dist, cfg["training"]["time_budget"] * 60)
    data = build_datasets(cfg["data"], seed=cfg["run"]["seed"], augment_cfg=cfg["augment"])

    aside = None  # with --overwrite, the old run until the new one has committed an epoch
    keep_every_epoch = cfg["run"]["keep_every_epoch"]
    with contextlib.ExitStack() as held:
        if resume:
            run = RunDir.for_resume(resume, cfg)
            if dist.is_chief:
                held.enter_context(run.lock())
            state = run.state()
            run.check_resumable(cfg, data.class_names, state)  # before anything in the run is touched
            if dist.is_chief:
                state = run.recover(keep_every_epoch)
        elif dist.is_chief:
            run, aside = RunDir.create(cfg, config_files, overwrite)
            held.enter_context(run.lock())
            state = fresh_state()
        else:
            run, state = RunDir(Path(cfg["run"]["dir"]) / cfg["run"]["name"]), fresh_state()
        # Only the chief writes the run directory. Other workers take part in every save (saving is collective under
        # multi-worker training) but write into a folder of their own that is removed at the end.
        out = run if dist.is_chief else RunDir(tempfile.mkdtemp(prefix="cnnlab-worker-"))
        try:
            with dist.strategy.scope():
                return _train_in(cfg, data, run, out, state, dist, probe_s)
        finally:
            if dist.is_chief:
                run.settle_replaced(aside)
            else:
                shutil.rmtree(out.path, ignore_errors=True)


def _train_in(cfg: dict, data: Datasets, run: RunDir, out: RunDir, state: dict, dist, probe_s: float) -> Path:
    """The body of `train`, under the strategy's scope; files go to `out` (the run itself on the chief). `probe_s`:
    seconds of the budget already spent timing steps (`fit_size_to_budget`); setting the first conv's kernels
    (`model.first_conv_init: pca`) adds its own."""
    out.checkpoints_dir.mkdir(parents=True, exist_ok=True)
    out.write_config(cfg)
    report_left_out(data, out)

    phases = training_phases(cfg)
    total_epochs = phases[-1]["end"]
    budget_s = cfg["training"]["time_budget"] * 60 if cfg["training"]["time_budget"] else None
    if state["epoch"]:  # check_resumable made sure the last checkpoint is there
        model = run.load("last", what="--resume")
        print(f"Resuming {run} after epoch {state['epoch']}"
              + (f" ({state['history'][-1]['elapsed_seconds'] / 60:.1f} of {budget_s / 60:g} min)." if budget_s
                 else f" of {total_epochs}."))
    else:
        state = fresh_state()  # killed before its first epoch ended: start over in the same directory
        model = build_model(cfg, data.num_classes)
        if cfg["model"]["first_conv_init"] == "pca":
            start = time.perf_counter()
            used = set_first_conv_to_pca(model, data.train, read_all=cfg["data"]["cache"] != "none")
            spent = time.perf_counter() - start
            probe_s += spent
            print(f"First conv: the principal components of {used} training images' patches ({spent:.1f} s, "
                  "reading the training images once).", flush=True)
        out.save_initial(model)

    state["data"] = {"class_names": data.class_names, "num_train": data.num_train, "num_val": data.num_val,
                     "params": int(model.count_params())}
    checkpoint = RunCheckpoint(out, state, keep_every_epoch=cfg["run"]["keep_every_epoch"],
                               spent_before=probe_s)
    callbacks = [
        keras.callbacks.TensorBoard(
            log_dir=str(out.logs_dir), histogram_freq=1 if cfg["runtime"]["log_histograms"] else 0,
            write_graph=False),
        checkpoint,
    ]
    if cfg["runtime"]["log_kernel_images"]:
        callbacks.insert(1, KernelImages(out.logs_dir / "kernels"))
    if cfg["runtime"]["log_cam_images"]:
        callbacks.insert(1, CamImages(data.val, cfg["runtime"]["log_cam_images"], out.logs_dir / "gradcam"))
    progressive = any(phase["size"] is not None for phase in phases)
    flip_validation = config_lib.flip_tta(cfg)
    jit_compile = resolve_jit(cfg["runtime"]["jit_compile"])

    plan = plan_for(phases, model_input_size(cfg), lambda phase: phase_size(cfg, phase)) if budget_s else None
    if budget_s and not state["epoch"]:
        print(f"Time budget: {budget_s / 60:g} min; the plan's {total_epochs} epochs are shares of it.", flush=True)

    # What decides a budgeted run's course is read off one clock that every worker agrees on.
    clock = dist.agreed_clock(checkpoint.elapsed)

    def phase_done(phase: dict) -> bool:
        if budget_s is None:
            return state["epoch"] >= phase["end"]
        spent = clock()
        return spent >= budget_s or plan.position(spent / budget_s) >= phase["end"]

    for index, phase in enumerate(phases):
        if phase_done(phase):
            continue
        entering = state.get("phase") != phase["name"]
        previous = None if entering else model.optimizer
        size = phase_size(cfg, phase)
        if network_input_size(model) != size:
            # A progressive-resizing stage: the same weights in the model built for this size. Its augmentation
            # gets a seed of its own, so that stages do not replay the first stage's random crops.
            model = resize_model(model, cfg, data.num_classes, size=phase["size"], seed=cfg["run"]["seed"] + index)
        if progressive and phase["name"] == "train":
            resized = "x".join(map(str, stage_image_size(cfg, size)))
            epochs = f"From epoch {state['epoch'] + 1}" if budget_s else f"Epochs {state['epoch'] + 1}-{phase['end']}"
            print(f"{epochs}: network input {size[0]}x{size[1]}"
                  + (f" (images resized to {resized} first)." if phase["size"] is not None else "."), flush=True)
        if entering and phase["name"] == "fine_tune":
            unfrozen = unfreeze_for_fine_tuning(model, cfg["training"]["fine_tune"]["unfreeze"])
            print(f"Fine-tuning {len(unfrozen)} backbone layers from {unfrozen[0] if unfrozen else '-'} "
                  f"at learning rate {phase['training']['learning_rate']:g}.")
        # Entering a phase starts a fresh optimizer. Resuming inside one, or moving to the next progressive-resizing
        # stage, rebuilds it from the current config (which may add epochs or change the learning rate) and carries
        # the step count and moments over, so the learning-rate schedule runs on.
        compile_model(model, phase["training"], data.num_classes, data.steps_per_epoch, jit_compile=jit_compile,
                      budgeted=budget_s is not None)
        if previous is not None:
            carry_optimizer_state(previous, model)
        state["phase"] = phase["name"]
        phase_callbacks = callbacks
        if phase["training"]["ema"]:
            # First in the list, so that the checkpoints and kernel images of each epoch get the averaged weights.
            # Keras puts the averaged weights into the model for good when a fit() ends, so a progressive-resizing
            # stage trains on from the previous stage's averaged weights.
            phase_callbacks = [AveragedWeights(resumed=not entering), *callbacks]
        if flip_validation:
            # After the averaged weights are swapped in, before anything reads the epoch's val figures.
            at = 1 if phase["training"]["ema"] else 0
            validate = FlipValidation(data.val, phase["training"], data.num_classes, jit_compile)
            phase_callbacks = [*phase_callbacks[:at], validate, *phase_callbacks[at:]]
        epochs, verbose, timer = phase["end"], 1 if sys.stdout.isatty() else 2, None
        if budget_s:
            # Time, not an epoch count, ends a budgeted phase: fit() gets room for more epochs than any machine
            # fits, and the run prints its own line per epoch (Keras's would count towards that cap).
            timer = TimeBudget(plan, budget_s, clock, lr_schedule(phase["training"], data.steps_per_epoch),
                               phase["start"], data.steps_per_epoch, phase["end"])
            phase_callbacks = [*phase_callbacks, timer, EpochLine(budget_s, checkpoint.elapsed)]
            epochs, verbose = state["epoch"] + 100_000, 0
        with warnings.catch_warnings(), stop_on_first_interrupt(checkpoint):
            # Folder pipelines skip undecodable files, so their length is unknown until the first epoch ends; Keras
            # then warns that the input "ran out of data", which is exactly how it learns the epoch length.
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            model.fit(data.train, validation_data=None if flip_validation else data.val, epochs=epochs,
                      initial_epoch=state["epoch"], callbacks=phase_callbacks, shuffle=False, verbose=verbose)
        if checkpoint.stop_reason:
            raise_stop(checkpoint, run, cfg)
        if timer is not None and timer.spent:
            break
    best = state["best_val_accuracy"]
    best_text = f"{best:.4f} (epoch {state['best_epoch']})" if best is not None else "n/a"
    print(f"Run directory: {run}  best val_accuracy: {best_text}")
    return run.path
