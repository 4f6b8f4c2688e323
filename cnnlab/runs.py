"""The run directory: one object, `RunDir`, owns every file a run writes and every way of reading one back.

    <run.dir>/<run.name>/
        config.yaml                  the resolved config (re-running it reproduces the run)
        state.json                   the commit point: completed epochs, history, which checkpoints are last and best
        checkpoints/last.keras       the model (with optimizer state) after the last completed epoch
        checkpoints/best.keras       the model of the epoch with the best val accuracy
        checkpoints/epoch_NNN.keras  the committed files that last.keras and best.keras are links to; with
                                     run.keep_every_epoch, one per epoch
        checkpoints/initial.keras    the model as initialised, before any training
        history.csv, metrics.json    one row per completed epoch; the best epoch and its val metrics
        logs/                        TensorBoard (append-only: an epoch cut short by a kill may show there)
        bad_images.txt, eval/, figures/  what the data scan left out; evaluate.py's and the filters script's output
        export/                      export.py's inference models (cnnlab/export.py)
        .lock                        held (an OS lock) by the one process that writes the run

How an epoch is committed (`RunDir.commit_epoch`), so that its files become visible together or not at all:

    1. the model is saved as checkpoints/epoch_NNN.keras (a temporary name, fsync, rename);
    2. state.json is replaced by one naming that file as last (and as best, if val accuracy improved): the commit;
    3. last.keras and best.keras are pointed at the committed files, history.csv and metrics.json are rewritten
       from the state, and epoch files the state no longer names are removed.

Readers go by state.json, never by what happens to be in checkpoints/. A kill before step 2 leaves an uncommitted
file that the next writer removes (`RunDir.recover`); a kill after it leaves step 3 for the next writer to redo.
Either way `--resume` continues exactly after the last committed epoch.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import os
import re
import shutil
import sys
import zipfile
from datetime import datetime
from pathlib import Path

from cnnlab import config as config_lib
from cnnlab.errors import TrainingError, UserError

# What a checkpoint cannot follow when a run is resumed with --set: the network, and the images it takes.
FIXED_ON_RESUME = ("model", "data.image_size", "augment.crop")

_EPOCH_FILE = re.compile(r"^epoch_(\d{3,})\.keras$")


def fresh_state() -> dict:
    """The state of a run with no completed epoch."""
    return {"epoch": 0, "best_epoch": 0, "best_val_accuracy": None, "history": []}


def write_text_atomic(path: Path, text: str) -> None:
    """Writes `text` to `path` through a temporary file, fsync and a rename, so readers never see half a file.

    Raises:
        TrainingError: the file could not be written (a full disk, a lost mount); the previous one is kept.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise TrainingError(f"could not write {path} ({e.strerror or e}); the files written before it are kept. "
                            "Free some space, then resume.") from None


def save_model_atomic(model, path: Path) -> None:
    """Saves a `.keras` checkpoint through a temporary file, fsync and a rename; the previous one stays until then.

    Raises:
        TrainingError: the file could not be written; earlier checkpoints are kept.
    """
    tmp = path.with_name(f"{path.stem}.tmp.keras")  # Keras insists on the .keras suffix
    try:
        model.save(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise TrainingError(f"could not write checkpoint {path} ({e.strerror or e}); the checkpoints written before "
                            f"it are kept in {path.parent}. Free some space, then resume.") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _point(link: Path, target: Path) -> None:
    """Makes `link` the same file as `target`, atomically: a hard link (no bytes copied) renamed into place, or a
    copy where the file system has no hard links."""
    if link.exists() and os.path.samefile(link, target):
        return
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:
        shutil.copyfile(target, tmp)
    os.replace(tmp, link)


def history_csv(rows: list[dict]) -> str:
    """history.csv's text: one row per epoch, the columns in the order they first appear."""
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


class RunDir:
    """One run directory: its paths, its lock, its committed state, and reading its config and checkpoints back.

    Args:
        path: the run directory (`<run.dir>/<run.name>`).

    Example:

        >>> run = RunDir.open("runs/smoke")
        >>> run.state()["epoch"], run.class_names()
        (3, ['class_0', 'class_1'])
        >>> model = run.load("best")
    """

    CONFIG, STATE, HISTORY, METRICS, LOCK, BAD_IMAGES = (
        "config.yaml", "state.json", "history.csv", "metrics.json", ".lock", "bad_images.txt")

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # -- finding and claiming ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, what: str = "--run") -> "RunDir":
        """An existing run directory; anything else is a UserError starting with `what`."""
        run = cls(path)
        if not (run.path / cls.CONFIG).is_file():
            raise UserError(f"{what}: {path} is not a run directory (no {cls.CONFIG}).")
        return run

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> "RunDir | None":
        """The run a checkpoint file sits in (`RUN/checkpoints/x.keras`), or None for a file elsewhere."""
        checkpoint = Path(checkpoint)
        run = cls(checkpoint.parent.parent)
        in_run = checkpoint.parent.name == "checkpoints" and (run.path / cls.CONFIG).is_file()
        return run if in_run else None

    @classmethod
    def for_resume(cls, resume: str | bool, cfg: dict) -> "RunDir":
        """The run `--resume [RUN_DIR]` points at: the one given, or `run.dir/run.name` of the config."""
        if isinstance(resume, str):
            return cls.open(resume, "--resume")
        if cfg["run"]["name"]:
            return cls.open(Path(cfg["run"]["dir"]) / cfg["run"]["name"], "--resume")
        raise UserError("--resume: give the run directory (--resume runs/NAME), or a config that sets run.name.")

    @classmethod
    def create(cls, cfg: dict, config_files: list[str], overwrite: bool) -> tuple["RunDir", Path | None]:
        """Claims a new run directory. `os.mkdir` is atomic, so two runs started at once never share one.

        Returns the run and, with `overwrite` of an existing run, where the old run was moved aside: it is removed
        only once the new run has committed an epoch (`settle_replaced`). run.name is a plain folder name (the
        config schema says so), so the run directory is always directly inside run.dir.
        """
        parent = Path(cfg["run"]["dir"])
        parent.mkdir(parents=True, exist_ok=True)
        explicit = cfg["run"]["name"]
        if explicit:
            path = parent / explicit
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                raise UserError(f"run.name: {path} exists and is not a run directory (a link or a file); choose "
                                f"another run.name. Received: {explicit!r}")
            aside = None
            if path.exists():
                if not overwrite:
                    raise UserError(f"run.name: {path} already exists; continue it with --resume {path}, "
                                    "replace it with --overwrite, or choose another run.name.")
                aside = parent / f".{explicit}.replaced-{os.getpid()}"
                os.replace(path, aside)
            try:
                path.mkdir()
            except FileExistsError:
                raise UserError(f"run.name: {path} was just created by another run; choose another run.name.") from None
            return cls(path), aside
        stem = Path(config_files[0]).stem if config_files else "run"
        base = f"{stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        for attempt in range(1, 1000):
            path = parent / (base if attempt == 1 else f"{base}-{attempt}")
            try:
                path.mkdir()
                return cls(path), None
            except FileExistsError:
                continue
        raise UserError(f"run.dir: could not find a free run name under {parent} for {base}.")

    def settle_replaced(self, aside: Path | None) -> None:
        """After `--overwrite`: removes the old run once this one has committed an epoch; else removes this
        epoch-less directory and puts the old run back where it was."""
        if aside is None:
            return
        if self.state()["epoch"]:
            shutil.rmtree(aside, ignore_errors=True)
            return
        shutil.rmtree(self.path, ignore_errors=True)
        os.replace(aside, self.path)
        print(f"The new run ended before its first epoch; {self.path} is the old run again, as it was.",
              file=sys.stderr)

    @contextlib.contextmanager
    def lock(self):
        """Holds an exclusive OS lock on the run while this process writes it; the OS releases it if the process
        dies. A second writer gets a one-line error naming the holder's pid."""
        with open(self.path / self.LOCK, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise UserError(f"--resume: {self.path} is being written by another process (pid {holder}); wait for "
                                "it to end, or stop it first.") from None
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            try:
                yield self
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # -- paths --------------------------------------------------------------------------------------------------

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def logs_dir(self) -> Path:
        return self.path / "logs"

    @property
    def figures_dir(self) -> Path:
        return self.path / "figures"

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    def eval_dir(self, split: str) -> Path:
        return self.path / "eval" / split

    def epoch_file(self, epoch: int) -> Path:
        return self.checkpoints_dir / f"epoch_{epoch:03d}.keras"

    # -- reading ------------------------------------------------------------------------------------------------

    def state(self) -> dict:
        """The committed state; a run killed before its first epoch ended has none (epoch 0)."""
        path = self.path / self.STATE
        return json.loads(path.read_text()) if path.exists() else fresh_state()

    def config(self, overrides: list[str] = (), config_files: list[str] = ()) -> dict:
        """The run's saved config with config files and `--set` overrides applied on top (e.g. another data.path).
        Reading it never checks the machine: the data folder may have moved."""
        saved = config_lib.resolve([str(self.path / self.CONFIG)])
        return config_lib.resolve(list(config_files), list(overrides), base=saved)

    def saved_config(self) -> dict:
        """config.yaml as written, not resolved (nothing in it is checked)."""
        import yaml

        return yaml.safe_load((self.path / self.CONFIG).read_text()) or {}

    def history(self) -> list[dict]:
        """The committed epochs' rows, oldest first."""
        return self.state()["history"]

    def class_names(self) -> list[str] | None:
        """The class names the run trains on, in class-id order, or None before its first epoch."""
        names = self.state().get("data", {}).get("class_names")
        if names is None and (self.path / self.METRICS).is_file():  # runs written before state.json held them
            names = json.loads((self.path / self.METRICS).read_text()).get("class_names")
        return names

    def checkpoint(self, which: str = "best") -> Path:
        """The committed `best`, `last` or `initial` checkpoint file; a missing one is a UserError.

        `best.keras` / `last.keras` when they are the committed file (as they are unless a kill came between the
        commit and pointing them), else the committed epoch file itself."""
        named = self.checkpoints_dir / f"{which}.keras"
        committed = self.state().get(f"{which}_checkpoint")
        if committed and (self.checkpoints_dir / committed).is_file():
            target = self.checkpoints_dir / committed
            return named if named.is_file() and os.path.samefile(named, target) else target
        if not named.is_file():  # runs from before the commit protocol have only the named files
            raise UserError(f"--run: {self.path} has no checkpoints/{named.name} (did its first epoch finish?).")
        return named

    def has_checkpoint(self, which: str) -> bool:
        try:
            self.checkpoint(which)
            return True
        except UserError:
            return False

    def load(self, which: str = "best", what: str = "--run"):
        """The `best`, `last` or `initial` model of the run."""
        return load_checkpoint(self.checkpoint(which), what=what)

    def kept_epochs(self) -> dict[int, Path]:
        """The epoch checkpoints on disk that the state commits to (`run.keep_every_epoch` keeps every one)."""
        done = self.state()["epoch"]
        found = {}
        if self.checkpoints_dir.is_dir():
            for path in self.checkpoints_dir.iterdir():
                match = _EPOCH_FILE.match(path.name)
                if match and int(match.group(1)) <= done:
                    found[int(match.group(1))] = path
        return dict(sorted(found.items()))

    # -- writing (only the process holding the lock) ----------------------------------------------------------

    def write_text(self, name: str, text: str) -> None:
        write_text_atomic(self.path / name, text)

    def write_config(self, cfg: dict) -> None:
        self.write_text(self.CONFIG, config_lib.dump(cfg))

    def save_initial(self, model) -> None:
        """The model as initialised, for before-and-after filter plots."""
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        save_model_atomic(model, self.checkpoints_dir / "initial.keras")

    def commit_epoch(self, model, state: dict, row: dict, keep_every_epoch: bool = False) -> dict:
        """Commits epoch `row["epoch"]`: its checkpoint, then state.json (the commit point), then the files derived
        from the state. Returns the new state; `state` is not changed.

        Args:
            model: the model after the epoch (saved with its optimizer state).
            state: the committed state before the epoch.
            row: the epoch's history row (`epoch`, metrics, timings).
            keep_every_epoch: keep this epoch's checkpoint after later epochs (`run.keep_every_epoch`).
        """
        epoch = row["epoch"]
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        save_model_atomic(model, self.epoch_file(epoch))
        new = {**state, "epoch": epoch, "last_checkpoint": self.epoch_file(epoch).name,
               "history": [r for r in state["history"] if r["epoch"] < epoch] + [row]}
        val_acc, best = row.get("val_accuracy"), state["best_val_accuracy"]
        if val_acc is not None and (best is None or val_acc > best):
            new.update(best_val_accuracy=val_acc, best_epoch=epoch, best_checkpoint=self.epoch_file(epoch).name)
        self.write_text(self.STATE, json.dumps(new, indent=1) + "\n")
        self.publish(new, keep_every_epoch)
        return new

    def publish(self, state: dict, keep_every_epoch: bool) -> None:
        """Brings every file derived from a committed state in line with it: last.keras and best.keras, history.csv,
        metrics.json; then removes the epoch files it no longer names. Redoing it changes nothing."""
        for which in ("last", "best"):
            if state.get(f"{which}_checkpoint"):
                _point(self.checkpoints_dir / f"{which}.keras", self.checkpoints_dir / state[f"{which}_checkpoint"])
        self.write_text(self.HISTORY, history_csv(state["history"]))
        self.write_text(self.METRICS, json.dumps(self.metrics(state), indent=2) + "\n")
        if not keep_every_epoch:
            self.drop_kept_epochs(state)

    def drop_kept_epochs(self, state: dict | None = None) -> None:
        """Removes the epoch checkpoints that the committed state does not name as last or best (those that
        `run.keep_every_epoch` kept, once they have served)."""
        state = state or self.state()
        named = {state.get("last_checkpoint"), state.get("best_checkpoint")}
        for path in self.kept_epochs().values():
            if path.name not in named:
                path.unlink()

    @staticmethod
    def metrics(state: dict) -> dict:
        """metrics.json: the best epoch's val metrics, the epochs completed and what the run trained on."""
        best_row = next((r for r in state["history"] if r["epoch"] == state["best_epoch"]), {})
        return {"best_epoch": state["best_epoch"], **{k: v for k, v in best_row.items() if k.startswith("val_")},
                "epochs_completed": state["epoch"], **state.get("data", {})}

    def recover(self, keep_every_epoch: bool) -> dict:
        """Before a writer continues the run: drops what a killed process left uncommitted (temporary files, epoch
        checkpoints past the committed epoch) and redoes the committed epoch's last step. Returns the state."""
        state = self.state()
        for folder in (self.path, self.checkpoints_dir):
            if folder.is_dir():
                for path in folder.iterdir():
                    if path.name.endswith((".tmp", ".tmp.keras")) and path.is_file():
                        path.unlink()
        if self.checkpoints_dir.is_dir():
            for path in self.checkpoints_dir.iterdir():
                match = _EPOCH_FILE.match(path.name)
                if match and int(match.group(1)) > state["epoch"]:
                    path.unlink()
        if state["epoch"] and state.get("last_checkpoint"):
            self.publish(state, keep_every_epoch)
        return state

    def check_resumable(self, cfg: dict, class_names: list[str], state: dict) -> None:
        """Refuses, before anything is written, a resume whose checkpoint cannot continue: a change to the network,
        the images it takes or the classes it predicts, or a run that records epochs but lost its last checkpoint."""
        if not state["epoch"]:
            return  # nothing was committed: the run starts over in its directory, with whatever config it is given
        last = self.checkpoints_dir / state.get("last_checkpoint", "last.keras")
        if not last.is_file() or not zipfile.is_zipfile(last):
            raise UserError(f"--resume: {self.path} records {state['epoch']} completed epochs but its last "
                            f"checkpoint (checkpoints/{last.name}) is {'damaged' if last.is_file() else 'missing'}; "
                            "start a new run (another run.name, or --overwrite).")
        saved = self.config()
        for key in FIXED_ON_RESUME:
            old, new = saved, cfg
            for part in key.split("."):
                old, new = old[part], new[part]
            if old != new:
                raise UserError(f"--resume: {key} cannot change for a run with checkpoints ({self.path} has "
                                f"{old!r}); start a new run instead. Received: {new!r}")
        trained = self.class_names()
        if trained is not None and list(trained) != list(class_names):
            raise UserError(f"--resume: the data's classes must be the run's {list(trained)}, the classes its "
                            f"checkpoints predict. Received: {list(class_names)}")


def config_for_training(config_files: list[str], overrides: list[str], resume: str | bool | None = None) -> dict:
    """The config of a training command: a run's saved config when resuming RUN_DIR, else the defaults; then the
    --config files and the --set overrides on top."""
    if isinstance(resume, str):
        return RunDir.open(resume, "--resume").config(overrides, config_files)
    if not config_files:
        raise UserError("give --config FILE (e.g. --config configs/smoke.yaml), or --resume RUN_DIR.")
    return config_lib.resolve(config_files, overrides)


def load_checkpoint(path: str | Path, what: str = "--checkpoint"):
    """Loads a `.keras` checkpoint; a missing or unreadable file is a one-line UserError that starts with `what`."""
    import keras

    import models  # noqa: F401  registers the project's custom layers for deserialization

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: no such file: {path}")
    try:
        return keras.models.load_model(path)
    except Exception as e:  # Keras raises ValueError, OSError or zipfile errors for files that are not checkpoints
        raise UserError(f"{what}: {path} is not a loadable .keras model ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
