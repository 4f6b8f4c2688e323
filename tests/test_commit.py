"""The epoch commit protocol: a run killed at any write step resumes to what an uninterrupted run ends with.

A SIGKILL leaves the files exactly as they were at that instant. So instead of killing a process once per step
(seconds of start-up each), one run is watched in-process: before every rename, link or removal inside its run
directory the directory is copied as it stands, which is what a kill just then would have left. Each copy is then
resumed, and must end with the uninterrupted run's optimizer step count and history.
"""

import csv
import json
import os
import shutil
from pathlib import Path

import keras
import pytest

from cnnlab import config
from cnnlab.runs import RunDir
from cnnlab.training import train
from tests.conftest import REPO, tiny

SMOKE = "configs/smoke.yaml"
EPOCHS = 2


def watch_run_writes(monkeypatch, run_dir: Path, copies: Path) -> list[tuple[str, str]]:
    """Copies `run_dir` to `copies/NNN` before each file operation inside it, once its first epoch is committed."""
    steps: list[tuple[str, str]] = []
    state = run_dir / "state.json"

    def watched(name, operation):
        def step(*args, **kwargs):
            paths = [os.fspath(a) for a in args[:2] if isinstance(a, (str, os.PathLike))]
            inside = any(p.startswith(f"{run_dir}{os.sep}") for p in paths)
            # (removing a file that is not there changes nothing: the copy before it is the one before)
            if inside and state.exists() and os.path.lexists(paths[0]):
                shutil.copytree(run_dir, copies / f"{len(steps):03d}", ignore=shutil.ignore_patterns("logs"))
                steps.append((name, Path(paths[-1]).name))
            return operation(*args, **kwargs)
        return step

    for name in ("replace", "rename", "link", "unlink", "remove"):
        monkeypatch.setattr(os, name, watched(name, getattr(os, name)))
    return steps


def last_step_count(run: RunDir) -> int:
    return int(keras.models.load_model(run.checkpoint("last")).optimizer.iterations.numpy())


def assert_consistent(run: RunDir) -> None:
    """Every file derived from state.json agrees with it, and nothing uncommitted is left."""
    state = run.state()
    rows = list(csv.DictReader(open(run.path / "history.csv")))
    assert [int(r["epoch"]) for r in rows] == [r["epoch"] for r in state["history"]]
    assert json.loads((run.path / "metrics.json").read_text()) == json.loads(json.dumps(RunDir.metrics(state)))
    accuracies = [r["val_accuracy"] for r in state["history"]]
    assert state["best_epoch"] == accuracies.index(max(accuracies)) + 1  # ties go to the earliest epoch
    for which in ("last", "best"):
        assert os.path.samefile(run.checkpoints_dir / f"{which}.keras",
                                run.checkpoints_dir / state[f"{which}_checkpoint"])
    left = {p.name for p in run.checkpoints_dir.iterdir()}
    assert left == {"initial.keras", "last.keras", "best.keras", state["last_checkpoint"], state["best_checkpoint"]}
    assert not [p for p in run.path.iterdir() if p.name.endswith(".tmp")]


def test_a_run_killed_at_any_write_step_of_an_epoch_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    run_dir, copies = tmp_path / "runs" / "k", tmp_path / "killed"
    cfg = config.resolve([str(REPO / SMOKE)], tiny(tmp_path / "runs", "run.name=k", f"training.epochs={EPOCHS}"))
    steps = watch_run_writes(monkeypatch, run_dir, copies)
    train(cfg, [SMOKE])
    monkeypatch.undo()
    whole = RunDir(run_dir)
    assert_consistent(whole)
    expected_steps, expected_history = last_step_count(whole), whole.history()
    assert expected_steps > 0 and [r["epoch"] for r in expected_history] == list(range(1, EPOCHS + 1))
    # Epoch 2: the checkpoint, state.json, last/best links, history.csv, metrics.json, old files removed; and the
    # steps of epoch 1 after its commit.
    kinds = [kind for kind, _ in steps]
    assert kinds.count("replace") >= 6 + 3 and "link" in kinds, steps

    for copy in sorted(copies.iterdir()):
        killed = RunDir(copy)
        committed = killed.state()["epoch"]
        resumed = RunDir(train(killed.config(), [], resume=str(copy)))
        where = f"killed before step {int(copy.name)} {steps[int(copy.name)]} with {committed} epochs committed"
        assert last_step_count(resumed) == expected_steps, where
        history = resumed.history()
        assert [r["epoch"] for r in history] == list(range(1, EPOCHS + 1)), where
        assert history[:committed] == expected_history[:committed], where  # the committed epochs, untouched
        # The optimizer's step count came back with the checkpoint, so the schedule ran on where it was...
        assert [r["learning_rate"] for r in history] == pytest.approx([r["learning_rate"] for r in expected_history])
        # ... and so did the clock of the run.
        assert [r["elapsed_seconds"] for r in history] == sorted(r["elapsed_seconds"] for r in history), where
        assert_consistent(resumed)


def test_kept_epoch_checkpoints_are_the_committed_epochs(tmp_path):
    cfg = config.resolve([str(REPO / SMOKE)], tiny(tmp_path, "run.name=e", "training.epochs=3",
                                                   "run.keep_every_epoch=true"))
    run = RunDir(train(cfg, [SMOKE]))
    state = run.state()
    named = {state["last_checkpoint"], state["best_checkpoint"]}
    assert {p.name for p in run.kept_epochs().values()} == {f"epoch_{e:03d}.keras" for e in (1, 2, 3)}
    run.drop_kept_epochs()
    assert {p.name for p in run.kept_epochs().values()} == named
    assert run.checkpoint("best").name == "best.keras" and run.checkpoint("last").name == "last.keras"
