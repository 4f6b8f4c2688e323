"""Where and how the computation runs: devices, distribution strategy, precision, XLA, seeds and determinism.

Batch size under a strategy: `data.batch_size` is the global batch. Each of N replicas (GPUs, or workers x GPUs)
gets batch_size / N examples per step, and the gradients are averaged, so the learning rate means the same thing
whatever N is. Keeping the per-replica batch fixed while adding replicas multiplies the global batch; raise
`training.learning_rate` in proportion (the linear scaling rule), with a warmup.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable

import keras
import tensorflow as tf

from cnnlab.errors import UserError


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seeds Python's `random`, NumPy and TensorFlow; with `deterministic`, also makes TF ops deterministic
    (same results run to run, at some cost in speed)."""
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()


def enable_memory_growth() -> None:
    """Lets TensorFlow take GPU memory as it needs it instead of all at start (several processes can share)."""
    for gpu in tf.config.list_physical_devices("GPU"):
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:  # already initialised: the setting can no longer change, and that is fine
            pass


def cpu_supports_bfloat16() -> bool:
    """True on CPUs with native bfloat16 arithmetic (AVX512_BF16 or AMX), where mixed_bfloat16 pays off."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    caps = []
    for gpu in tf.config.list_physical_devices("GPU"):
        details = tf.config.experimental.get_device_details(gpu)
        if details.get("compute_capability"):
            caps.append(tuple(details["compute_capability"]))
    return caps


def resolve_precision(precision: str) -> str:
    """`auto`: mixed_float16 on GPUs of compute capability 7.0+ (tensor cores), mixed_bfloat16 on CPUs with
    native bfloat16, float32 otherwise. Other values pass through."""
    if precision != "auto":
        return precision
    caps = gpu_compute_capabilities()
    if caps:
        return "mixed_float16" if min(caps) >= (7, 0) else "float32"
    return "mixed_bfloat16" if cpu_supports_bfloat16() else "float32"


def set_precision(precision: str) -> str:
    """Sets the global Keras dtype policy and returns it (`auto` resolved).

    Under a mixed policy layers compute in 16 bits and keep float32 variables; the models' output layers are float32
    whatever the policy, so losses and probabilities stay float32. Under mixed_float16 Keras wraps the optimizer in a
    LossScaleOptimizer at compile time, so small gradients do not underflow.
    """
    resolved = resolve_precision(precision)
    keras.mixed_precision.set_global_policy(resolved)
    return resolved


def resolve_jit(jit_compile: str | bool) -> bool | str:
    """`runtime.jit_compile` for `model.compile`: true, false, or "auto" (Keras decides per model)."""
    return jit_compile if isinstance(jit_compile, bool) else "auto"


@dataclass
class Distribution:
    """The strategy a run trains under and this process's place in it."""

    strategy: tf.distribute.Strategy
    is_chief: bool
    description: str

    @property
    def num_replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def agreed_clock(self, clock: Callable[[], float]) -> Callable[[], float]:
        """`clock` as every worker reads it. Workers start at different moments and never read their clocks at the
        same instant, so under several workers each reading is the latest of theirs (one all-gather per read): what
        a time budget decides from it (the learning rate, the last step) is then the same on every worker, as their
        collective steps need. Every worker must read it at the same points of training. One worker: `clock` itself.
        """
        if not isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy):
            return clock
        strategy = self.strategy

        @tf.function
        def latest(reading):
            return tf.reduce_max(tf.distribute.get_replica_context().all_gather(reading[None], axis=0))

        def read() -> float:
            per_replica = strategy.run(latest, args=(tf.constant(clock(), tf.float64),))
            return float(strategy.experimental_local_results(per_replica)[0])

        return read


def _tf_config() -> dict | None:
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise UserError(f"TF_CONFIG must be JSON. Received: {raw[:80]!r}") from None


def is_chief(tf_config: dict | None) -> bool:
    """The chief is task `chief` 0, or `worker` 0 when the cluster names no chief; it alone writes the run dir."""
    if not tf_config:
        return True
    task = tf_config.get("task", {})
    cluster = tf_config.get("cluster", {})
    if "chief" in cluster:
        return task.get("type") == "chief"
    return task.get("type", "worker") == "worker" and int(task.get("index", 0)) == 0


def _patch_keras_symbolic_build_for_multi_worker() -> None:
    """Works around keras-team/keras#20585: under MultiWorkerMirroredStrategy, Keras 3's `fit` averages one
    distributed input batch with `strategy.reduce` just to learn its shapes, and that reduce fails ("Attempt to
    convert a value (PerReplica...)"). The shapes of this worker's first replica are what the build needs, so this
    hands those over instead. Applied only when a multi-worker strategy is created; remove once Keras fixes it."""
    from keras.src.backend.tensorflow import trainer as tf_trainer

    original = tf_trainer.TensorFlowTrainer._maybe_symbolic_build
    if getattr(original, "_cnnlab_multi_worker", False):
        return

    def first_replica(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return value.values[0] if hasattr(value, "values") else value
        return value

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        if iterator is not None and data_batch is None and isinstance(
                self._distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            for _, _, it in iterator:
                data_batch = tf.nest.map_structure(first_replica, next(it))
                break
            iterator = None
        return original(self, iterator=iterator, data_batch=data_batch)

    maybe_symbolic_build._cnnlab_multi_worker = True
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = maybe_symbolic_build

    # The same issue, one step later: the per-step logs (loss, metrics) are scalars, and Keras averages them across
    # workers with `strategy.reduce("MEAN", v, axis=0)`, which has no axis 0 to reduce. Scalars reduce over replicas.
    reduce_per_replica = tf_trainer.reduce_per_replica

    def reduce_scalars_too(values, strategy, reduction):
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and reduction in ("auto", "mean"):
            return tf.nest.map_structure(
                lambda v: strategy.reduce("MEAN", v, axis=None if v.shape.rank == 0 else 0), values)
        return reduce_per_replica(values, strategy, reduction)

    tf_trainer.reduce_per_replica = reduce_scalars_too


def make_strategy(name: str) -> Distribution:
    """Builds the strategy `runtime.strategy` names.

    `auto`: MultiWorkerMirroredStrategy when TF_CONFIG is set, MirroredStrategy when more than one GPU is
    visible, else the default strategy. Create it before any other TensorFlow work: multi-worker needs that.
    """
    tf_config = _tf_config()
    if name == "auto":
        if tf_config:
            name = "multi_worker"
        elif len(tf.config.list_physical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "multi_worker":
        if not tf_config:
            raise UserError("runtime.strategy=multi_worker needs TF_CONFIG describing the cluster (see README).")
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        _patch_keras_symbolic_build_for_multi_worker()
        task = tf_config.get("task", {})
        return Distribution(strategy, is_chief(tf_config),
                            f"multi_worker ({task.get('type')} {task.get('index')}, "
                            f"{strategy.num_replicas_in_sync} replicas)")
    if name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in gpus] or [d.name for d in tf.config.list_logical_devices("CPU")]
        strategy = tf.distribute.MirroredStrategy(devices=devices)
        return Distribution(strategy, True, f"mirrored over {len(devices)} devices")
    return Distribution(tf.distribute.get_strategy(), True, "default (one device)")
