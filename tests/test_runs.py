"""Run directories safe by construction: nothing a user types reaches outside run.dir, --overwrite loses nothing
until the new run has an epoch, resume refuses what its checkpoint cannot follow, and one process writes a run."""

import csv
import json
import os
import time
from pathlib import Path

import keras
import pytest
import yaml

from cnnlab import config
from cnnlab.training import train
from tests.conftest import REPO, assert_user_error, run_cli_in_process, smoke_args, tiny

SMOKE = "configs/smoke.yaml"


def train_tiny(runs: Path, *more: str) -> Path:
    return train(config.resolve([str(REPO / SMOKE)], tiny(runs, *more)), [SMOKE])


@pytest.mark.parametrize("name", ["..", ".", "a/b", "~x", "OUTSIDE"])
def test_no_run_name_can_delete_or_write_outside_run_dir(name, tmp_path, capsys):
    runs, outside = tmp_path / "runs", tmp_path / "outside"
    runs.mkdir()
    outside.mkdir()
    canaries = [tmp_path / "canary.txt", outside / "canary.txt", runs / "canary.txt"]
    for canary in canaries:
        canary.write_text("still here")
    name = str(outside) if name == "OUTSIDE" else name  # an absolute path
    proc = run_cli_in_process(capsys, "train.py", *smoke_args(tiny(runs, f"run.name={name}")), "--overwrite")
    assert_user_error(proc, "run.name must be a plain folder name")
    assert all(c.read_text() == "still here" for c in canaries)
    assert sorted(p.name for p in runs.iterdir()) == ["canary.txt"]


def test_a_run_name_that_is_a_link_is_refused_and_its_target_kept(tmp_path, capsys):
    runs, target = tmp_path / "runs", tmp_path / "target"
    runs.mkdir()
    target.mkdir()
    (target / "canary.txt").write_text("still here")
    (runs / "link").symlink_to(target, target_is_directory=True)
    proc = run_cli_in_process(capsys, "train.py", *smoke_args(tiny(runs, "run.name=link")), "--overwrite")
    assert_user_error(proc, "is not a run directory (a link or a file)")
    assert (target / "canary.txt").read_text() == "still here" and (runs / "link").is_symlink()


def test_overwrite_keeps_the_old_run_when_the_new_one_fails_before_its_first_epoch(tmp_path, capsys):
    runs = tmp_path / "runs"
    old = train_tiny(runs, "run.name=keep")
    before = {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()}
    proc = run_cli_in_process(capsys, "train.py", *smoke_args(tiny(runs, "run.name=keep",
                                                                   "model.standard.activation=relux")), "--overwrite")
    assert_user_error(proc, "model.standard")
    assert {p.relative_to(old): p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in runs.iterdir()) == ["keep"]  # nothing left aside
    # and a new run that completes an epoch replaces the old one, leaving nothing aside either
    proc = run_cli_in_process(capsys, "train.py", *smoke_args(tiny(runs, "run.name=keep", "run.seed=7")),
                              "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load((old / "config.yaml").read_text())["run"]["seed"] == 7
    assert sorted(p.name for p in runs.iterdir()) == ["keep"]


@pytest.mark.parametrize("text, fragment", [
    ("training:\n  learning_rate: .inf\n", "training.learning_rate must be a number > 0. Received: inf"),
    ("augment:\n  mixup: .nan\n", "augment.mixup must be a number >= 0"),
    ("augment:\n  crop_ratio: [0.5, .inf]\n", "augment.crop_ratio must be a pair"),
    ("data:\n  cache: memroy\n", "data.cache must be 'memory', 'none' or a cache file path"),
    ("run:\n  seed: 4294967296\n", "run.seed must be an integer in [0, 2**32 - 1]"),
    ("training:\n  epochs: 3\n  epochs: 5\n", "the key 'epochs' is given twice"),
    ("data:\n  image_size: [32, 32]\ndata:\n  batch_size: 8\n", "the key 'data' is given twice"),
    ("x: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"x{i}: &a{i} [{', '.join([f'*a{i - 1}' if i > 1 else '*a'] * 10)}]\n" for i in range(1, 12)),
     "more than 100 aliases"),
])
def test_config_values_that_cannot_be_right_are_one_line_errors(text, fragment, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    start = time.perf_counter()
    proc = run_cli_in_process(capsys, "train.py", "--config", str(bad), "--print-config")
    assert_user_error(proc, "bad.yaml", fragment)
    assert time.perf_counter() - start < 20  # the alias bomb is refused, not expanded


def test_evaluate_refuses_data_whose_classes_are_not_the_runs(tmp_path, capsys):
    from tests.conftest import make_image_folder

    run = train_tiny(tmp_path, "run.name=r", "data.image_size=[32,32]")
    photos = make_image_folder(tmp_path / "photos", classes=("dogs", "cats"), per_class=2, size=32)
    proc = run_cli_in_process(capsys, "evaluate.py", "--run", str(run), "--set", "data.source=folder", "--set",
                              f"data.path={photos}")
    line = assert_user_error(proc, "are not the ones the run was trained on")
    assert "['cats', 'dogs']" in line and "['orientation_0deg', 'orientation_90deg']" in line


def test_a_run_whose_data_moved_is_evaluated_with_the_new_path(tmp_path, capsys):
    from tests.conftest import make_image_folder

    photos = make_image_folder(tmp_path / "photos", per_class=4, size=16)
    run = train(config.resolve([str(REPO / SMOKE)], [f"run.dir={tmp_path}", "run.name=m", "training.epochs=1",
                                                     "data.source=folder", f"data.path={photos}",
                                                     "data.image_size=[16,16]"]), [SMOKE])
    moved = photos.rename(tmp_path / "moved")
    proc = run_cli_in_process(capsys, "evaluate.py", "--run", str(run), "--split", "val", "--set", f"data.path={moved}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "eval" / "val" / "metrics.json").read_text())["num_examples"] == 8


@pytest.mark.parametrize("change, fragment", [
    ("data.synthetic_classes=3", "the data's classes must be the run's"),
    ("data.image_size=[24,24]", "data.image_size cannot change for a run with checkpoints"),
    ("model.standard.filters=[4,8]", "model cannot change for a run with checkpoints"),
])
def test_resume_refuses_changes_its_checkpoint_cannot_follow_and_leaves_the_config(change, fragment, tmp_path,
                                                                                   capsys):
    run = train_tiny(tmp_path, "run.name=r")
    saved = (run / "config.yaml").read_bytes()
    proc = run_cli_in_process(capsys, "train.py", "--resume", str(run), "--set", change, "--set", "training.epochs=2")
    assert_user_error(proc, "--resume:", fragment)
    assert (run / "config.yaml").read_bytes() == saved
    assert len(list(csv.DictReader(open(run / "history.csv")))) == 1


def test_resume_without_a_readable_last_checkpoint_is_refused_and_keeps_the_best_one(tmp_path, capsys):
    run = train_tiny(tmp_path, "run.name=r")
    best = (run / "checkpoints" / "best.keras").read_bytes()
    last = run / "checkpoints" / "last.keras"
    committed = run / "checkpoints" / json.loads((run / "state.json").read_text())["last_checkpoint"]
    for path in (last, committed):  # truncated, as a copy cut short leaves them
        path.unlink()
        path.write_bytes(best[:1000])
    proc = run_cli_in_process(capsys, "train.py", "--resume", str(run), "--set", "training.epochs=2")
    assert_user_error(proc, "--resume:", "its last checkpoint (checkpoints/epoch_001.keras) is damaged")
    last.unlink()  # missing
    committed.unlink()
    proc = run_cli_in_process(capsys, "train.py", "--resume", str(run), "--set", "training.epochs=2")
    assert_user_error(proc, "records 1 completed epochs but its last checkpoint (checkpoints/epoch_001.keras) "
                      "is missing")
    assert (run / "checkpoints" / "best.keras").read_bytes() == best


def test_resume_after_last_keras_was_deleted_continues_from_the_committed_checkpoint(tmp_path, capsys):
    run = train_tiny(tmp_path, "run.name=r")
    steps = int(keras.models.load_model(run / "checkpoints" / "last.keras").optimizer.iterations.numpy())
    (run / "checkpoints" / "last.keras").unlink()
    proc = run_cli_in_process(capsys, "train.py", "--resume", str(run), "--set", "training.epochs=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Resuming" in proc.stdout and "after epoch 1" in proc.stdout
    model = keras.models.load_model(run / "checkpoints" / "last.keras")
    assert steps > 0 and int(model.optimizer.iterations.numpy()) == 2 * steps  # the first epoch was not redone


def test_a_run_being_written_cannot_be_resumed_by_a_second_process(tmp_path, capsys):
    from cnnlab.runs import RunDir

    run = train_tiny(tmp_path, "run.name=r")
    with RunDir(run).lock():  # as a training process holds it
        proc = run_cli_in_process(capsys, "train.py", "--resume", str(run), "--set", "training.epochs=2")
        assert_user_error(proc, "is being written by another process", f"pid {os.getpid()}")
    assert len(list(csv.DictReader(open(run / "history.csv")))) == 1
    proc = run_cli_in_process(capsys, "train.py", "--resume", str(run), "--set", "training.epochs=2")
    assert proc.returncode == 0, proc.stderr[-2000:]  # released: the next writer gets it
    assert len(list(csv.DictReader(open(run / "history.csv")))) == 2


def test_a_failed_write_after_the_commit_is_one_line_and_resume_completes_the_epochs_files(tmp_path, capsys,
                                                                                          monkeypatch):
    run = train_tiny(tmp_path, "run.name=h")
    steps = int(keras.models.load_model(run / "checkpoints" / "last.keras").optimizer.iterations.numpy())
    replace = os.replace

    def disk_full_for_history(src, dst, *args, **kwargs):
        if Path(dst).name == "history.csv" and json.loads((run / "state.json").read_text())["epoch"] == 2:
            raise OSError(28, "No space left on device")
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", disk_full_for_history)
    proc = run_cli_in_process(capsys, "train.py", "--resume", str(run), "--set", "training.epochs=2")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "could not write" in line and "history.csv (No space left on device)" in line
    assert len(list(csv.DictReader(open(run / "history.csv")))) == 1  # epoch 2 is committed, its history not yet
    monkeypatch.undo()
    proc = run_cli_in_process(capsys, "train.py", "--resume", str(run))
    assert proc.returncode == 0 and "after epoch 2" in proc.stdout, proc.stderr[-2000:]
    assert [int(r["epoch"]) for r in csv.DictReader(open(run / "history.csv"))] == [1, 2]
    model = keras.models.load_model(run / "checkpoints" / "last.keras")
    assert int(model.optimizer.iterations.numpy()) == 2 * steps  # epoch 2 was not trained twice
