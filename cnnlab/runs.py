"""Reading a run directory back: its config and checkpoints. Everything that reads a run goes through here."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

import keras

from cnnlab import config as config_lib
from cnnlab.errors import UserError


def run_config(run_dir: str | Path, overrides: list[str] = ()) -> dict:
    """The saved config of a run, with `--set` overrides applied (e.g. another data.path)."""
    saved = Path(run_dir) / "config.yaml"
    if not saved.is_file():
        raise UserError(f"--run: {run_dir} is not a run directory (no config.yaml).")
    return config_lib.resolve([], list(overrides), base=config_lib.resolve([str(saved)]))


LOCK_FILE = ".lock"


@contextlib.contextmanager
def hold_run_lock(run_dir: str | Path):
    """Holds an exclusive OS lock on a run directory while a process writes it; the OS releases it if the process
    dies. A second writer (two `--resume` of one run at once) gets a one-line error naming the holder's pid."""
    path = Path(run_dir) / LOCK_FILE
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise UserError(f"--resume: {run_dir} is being written by another process (pid {holder}); wait for it to "
                            "end, or stop it first.") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def run_class_names(run_dir: str | Path) -> list[str] | None:
    """The class names a run trained on, in class-id order (from its metrics.json), or None when it has none yet."""
    metrics = Path(run_dir) / "metrics.json"
    if not metrics.is_file():
        return None
    return json.loads(metrics.read_text()).get("class_names")


def run_of_checkpoint(checkpoint: str | Path) -> Path | None:
    """The run directory a checkpoint file sits in (`RUN/checkpoints/x.keras`), or None for a file elsewhere."""
    run_dir = Path(checkpoint).parent.parent
    return run_dir if Path(checkpoint).parent.name == "checkpoints" and (run_dir / "config.yaml").is_file() else None


def checkpoint_path(run_dir: str | Path, which: str = "best") -> Path:
    """`checkpoints/<which>.keras` of a run; a missing one is a UserError."""
    path = Path(run_dir) / "checkpoints" / f"{which}.keras"
    if not path.is_file():
        raise UserError(f"--run: {run_dir} has no checkpoints/{which}.keras (did its first epoch finish?).")
    return path


def load_checkpoint(path: str | Path, what: str = "--checkpoint") -> keras.Model:
    """Loads a `.keras` checkpoint; a missing or unreadable file is a one-line UserError that starts with `what`."""
    import models  # noqa: F401  registers the project's custom layers for deserialization

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: no such file: {path}")
    try:
        return keras.models.load_model(path)
    except Exception as e:  # Keras raises ValueError, OSError or zipfile errors for files that are not checkpoints
        raise UserError(f"{what}: {path} is not a loadable .keras model ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
