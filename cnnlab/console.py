"""What the command-line tools print: TensorFlow's native start-up log held back, and one line on the hardware.

TensorFlow's C++ runtime writes lines such as `E0000 ... failed call to cuInit` straight to file descriptor 2 while it
loads and probes for GPUs, before its logging settings (TF_CPP_MIN_LOG_LEVEL) take effect. On a CPU machine they
read like failures. The tools hold descriptor 2 while TensorFlow starts and show what was held only when asked
(`--verbose`, or CNNLAB_VERBOSE=1) or when the start itself fails.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
_NOTHING = object()  # what next() gives for an empty iterable in first_item_held

VERBOSE_ENV = "CNNLAB_VERBOSE"


@contextlib.contextmanager
def held_native_stderr(release: bool = False):
    """Points file descriptor 2 at a temporary file for the duration, so native code's writes to stderr are held.

    Args:
        release: write what was held to stderr afterwards. It is also written when the body raises, since it may
            say why.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    failed = False
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            failed = True
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if release or failed:
                held.seek(0)
                os.write(2, held.read())


def first_item_held(iterable: Iterable[T]) -> Iterator[T]:
    """Yields the items of `iterable`, starting it and fetching its first item with native stderr held.

    A tf.data pipeline creates its kernels when its first element is fetched, and on some AVX-512 CPUs oneDNN then
    logs "E0000 ... supports DT_UINT8 only on platforms with AVX-512" for the uint8 image ops (a notice that it uses
    other kernels, which reads as a failure). What the rest of the iteration writes is shown as usual.
    """
    with held_native_stderr():
        iterator = iter(iterable)
        first = next(iterator, _NOTHING)
    if first is _NOTHING:
        return
    yield first
    yield from iterator


def verbose_requested(argv: list[str]) -> bool:
    """`--verbose` on the command line, or CNNLAB_VERBOSE set to anything but empty or 0."""
    return "--verbose" in argv or os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def start_tensorflow(verbose: bool = False) -> None:
    """Imports TensorFlow and lets it find its devices with its native start-up lines held (shown if `verbose`)."""
    with held_native_stderr(release=verbose):
        import tensorflow as tf

        tf.config.list_physical_devices()


def cpu_model() -> str:
    """The CPU's model name (for benchmark tables: figures mean little without it)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# The instruction sets that decide how fast TensorFlow trains and infers on a CPU: bfloat16 and int8 dot products.
_CPU_FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu_features(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """Which of the CPU features that matter for training and inference speed this CPU has (from `cpuinfo`;
    empty where it cannot be read), e.g. ['avx2', 'fma'] on an AMD EPYC of family 25."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [name for name in _CPU_FEATURES if name in flags]


def machine_summary() -> str:
    """The line benchmarks print beside their figures, e.g. '2 cores, AMD EPYC (avx2 fma)'."""
    return f"{os.cpu_count()} cores, {cpu_model()} ({' '.join(cpu_features()) or 'no AVX2'})"


def describe_devices() -> str:
    """What TensorFlow computes on, in a few words: the GPUs by name, or the CPU and its core count."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return f"CPU ({os.cpu_count()} cores, no GPU found)"
    names = [tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name) for gpu in gpus]
    return f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''} ({', '.join(names)})"
