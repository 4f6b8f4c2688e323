"""Shared test helpers: the repo root, the shared photos, running the CLIs, and writing tiny image folders."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

# pytest-xdist runs one worker per core (pytest.ini); each worker's TensorFlow (and the CLIs it starts, which inherit
# this environment) would otherwise size its compute thread pool to every core, so N workers would run N x N busy
# threads on N cores and spend the difference spinning and switching. Each worker gets its share of the cores instead.
# The inter-op pool keeps TensorFlow's default: its threads mostly wait, and too few of them can deadlock ops that block.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = str(max(1, len(os.sched_getaffinity(0)) // _WORKERS))
    for _name in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_name, _THREADS)

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data" / "cats_vs_dogs"

sys.path.insert(0, str(REPO))


# pytest-xdist's --dist loadfile hands whole files to the workers, in collection order (--no-loadscope-reorder in
# pytest.ini: by default it hands out the files with the most tests first, which put the few slow files that train
# nets last and left one worker idle for their length). So the slowest files come first, longest first, and the last
# files handed out are short ones. Ordered by each file's time on 2 cores (Zen 3), 2026-12-04; a new slow file
# belongs here.
SLOWEST_FIRST = ("test_cam.py", "test_reliability.py", "test_evaluation.py", "test_families_on_photos.py",
                 "test_export.py", "test_runtime.py", "test_training.py", "test_bench.py", "test_runs.py",
                 "test_budget.py", "test_transfer.py", "test_commit.py", "test_plots.py", "test_models.py",
                 "test_progressive.py", "test_cli.py", "test_augmentation.py", "test_images.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared cats/dogs photos; tests using them skip in a clone that has no ../shared beside it."""
    if not (SHARED_DATA / "train").is_dir():
        pytest.skip(f"needs the shared photos at {SHARED_DATA} (present on the project's machines, not in a clone)")
    return SHARED_DATA


# The start-up lines TensorFlow's C++ runtime writes to stderr before its log settings apply.
TF_NOISE = re.compile(r"^(I0000|W0000|E0000|WARNING: All log messages)", re.M)


def run_cli(*args: str, timeout: float = 300, cwd: Path = REPO, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `python <args>` in the repo root and returns the finished process (text output).

    Every run of one of the project's tools (a script, not `-c`) is also checked for a quiet start: no TensorFlow
    start-up line in its output unless it was asked for with --verbose or CNNLAB_VERBOSE.
    """
    env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if args[0].endswith(".py") and "--verbose" not in args and env.get("CNNLAB_VERBOSE", "") in ("", "0"):
        assert not TF_NOISE.findall(proc.stdout + proc.stderr), (args, proc.stderr[-2000:])
    return proc


def run_cli_in_process(capsys, script: str, *args: str) -> subprocess.CompletedProcess:
    """Runs a CLI's `main` through `cli.run` inside the test process, as `python <script> <args>` would, but without
    a new interpreter's TensorFlow import (seconds each); returns what a finished process would."""
    import importlib

    from cnnlab import cli

    capsys.readouterr()
    try:
        cli.run(importlib.import_module(Path(script).stem).main, list(args))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess([script, *args], code, out, err)


def error_lines(stderr: str) -> list[str]:
    """The lines of a CLI's stderr that are ours (TensorFlow's C++ start-up notices are left out)."""
    return [line for line in stderr.splitlines() if line.startswith("error:") or "Traceback" in line]


def assert_user_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    """A CLI refused input as it should: exit 2, one `error:` line naming the fragments, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def wait_for_epoch(run_dir: Path, epoch: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Waits until a training process has completed `epoch` epochs (its state.json says so), or has ended."""
    import json
    import time

    state = run_dir / "state.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if state.exists() and json.loads(state.read_text())["epoch"] >= epoch:
            return
        time.sleep(0.02)


def write_image(path: Path, rgb: np.ndarray, fmt: str = "jpeg") -> None:
    """Writes a uint8 HxWx3 array as a JPEG or PNG file."""
    import tensorflow as tf

    path.parent.mkdir(parents=True, exist_ok=True)
    data = tf.io.encode_jpeg(rgb) if fmt == "jpeg" else tf.io.encode_png(rgb)
    path.write_bytes(data.numpy())


def make_image_folder(root: Path, splits=("train", "val"), classes=("cats", "dogs"), per_class: int = 6,
                      size: int = 24, seed: int = 0) -> Path:
    """A tiny folder dataset: root/<split>/<class>/img_i.jpg, each class a different dominant colour."""
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, name in enumerate(classes):
            for i in range(per_class):
                base = np.zeros((size, size, 3)) + 60
                base[..., c % 3] = 200
                img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
                write_image(root / split / name / f"img_{i}.jpg" if split else root / name / f"img_{i}.jpg", img)
    return root


def tiny(runs: Path, *more: str) -> list[str]:
    """--set overrides for a one-epoch smoke run of a few tiny images under `runs`."""
    return [f"run.dir={runs}", "training.epochs=1", "data.synthetic_size=64", "data.image_size=[16,16]", *more]


def smoke_args(overrides: list[str]) -> list[str]:
    """The train.py arguments for the smoke config with these overrides."""
    return ["--config", str(REPO / "configs" / "smoke.yaml"), *[a for o in overrides for a in ("--set", o)]]
