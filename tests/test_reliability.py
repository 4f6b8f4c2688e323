"""Reliability: dirty image folders, bad-image policy, kills during checkpoint writes, NaN, Ctrl-C, full disks,
concurrent runs, and the scan cache. Each acceptance row of the reliability table is a test here."""

import csv
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

from cnnlab import config, data
from cnnlab.training import train
from tests.conftest import REPO, assert_user_error, run_cli, run_cli_in_process, smoke_args, tiny, wait_for_epoch

SMOKE = "configs/smoke.yaml"


def _save(path: Path, image, fmt, **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def dirty_folder(root: Path) -> tuple[set[str], set[str]]:
    """train/ and val/ with good photos and every kind of dirt; returns (undecodable, decodable) train files."""
    from PIL import Image

    rng = np.random.default_rng(0)

    def rgb(h=40, w=40, base=None):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        return img if base is None else np.clip(img // 4 + base, 0, 255).astype(np.uint8)

    bad, good = set(), set()
    for split in ("train", "val"):
        for c, name in enumerate(("cats", "dogs")):
            d = root / split / name
            for i in range(6):
                f = d / f"good_{i}.jpg"
                _save(f, Image.fromarray(rgb(base=np.array([180, 60, 60]) if c == 0 else np.array([60, 60, 180]))),
                      "JPEG")
                if split == "train":
                    good.add(str(f))
    d = root / "train" / "cats"
    jpeg = _save(d / "source.jpg", Image.fromarray(rgb()), "JPEG")
    good.add(str(d / "source.jpg"))
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("this is not an image")
    bad |= {str(d / n) for n in ("truncated.jpg", "empty.jpg", "notes.jpg")}
    d = root / "train" / "dogs"
    decodable = {
        "png.png": (Image.fromarray(rgb()), "PNG"),
        "bmp_named.jpg": (Image.fromarray(rgb()), "BMP"),
        "gif_named.jpg": (Image.fromarray(rgb()).convert("P"), "GIF"),
        "cmyk.jpg": (Image.fromarray(rgb()).convert("CMYK"), "JPEG"),
        "gray.jpg": (Image.fromarray(rgb()[..., 0]), "JPEG"),
        "rgba.png": (Image.fromarray(np.dstack([rgb(), rgb()[..., :1]])), "PNG"),
        "one_pixel.jpg": (Image.fromarray(rgb(1, 1)), "JPEG"),
        "huge_6000x4000.jpg": (Image.fromarray(np.full((4000, 6000, 3), 90, np.uint8)), "JPEG"),
    }
    for name, (image, fmt) in decodable.items():
        _save(d / name, image, fmt)
        good.add(str(d / name))
    (d / ".hidden.jpg").write_bytes(jpeg)
    (d / "readme.txt").write_text("ignored by extension")
    return bad, good


def train_args(runs: Path, folder: Path, *extra: str) -> list[str]:
    return ["train.py", "--config", SMOKE, "--set", "data.source=folder", "--set", f"data.path={folder}",
            "--set", f"run.dir={runs}", "--set", "run.name=r", "--set", "training.epochs=2",
            "--set", "data.batch_size=4", *extra]


def test_a_dirty_folder_trains_two_epochs_lists_the_bad_files_and_uses_every_good_one(tmp_path):
    bad, good = dirty_folder(tmp_path / "data")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = run_cli(*train_args(tmp_path / "runs", tmp_path / "data"), env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "r"
    listed = set((run_dir / "bad_images.txt").read_text().split())
    assert listed == bad
    assert "Skipped 3 files that cannot be decoded" in proc.stdout
    assert "Ignored 2 hidden, non-image (by extension) or non-UTF-8-named files" in proc.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["num_train"] == len(good) and metrics["epochs_completed"] == 2
    # every decodable train file really went through the pipeline
    cfg = config.resolve([str(REPO / SMOKE)], ["data.source=folder", f"data.path={tmp_path / 'data'}"])
    os.environ["XDG_CACHE_HOME"] = env["XDG_CACHE_HOME"]
    try:
        splits, _ = data.source_splits(cfg["data"], seed=0)
    finally:
        del os.environ["XDG_CACHE_HOME"]
    seen = {i.decode() for _, _, i in splits["train"][0].as_numpy_iterator()}
    assert seen == good
    assert "Traceback" not in proc.stderr
    # decoder complaints about the bad files stay out of the output (TensorFlow's start-up notices aside)
    assert not [line for line in proc.stderr.splitlines() if "JPEG" in line or line.startswith("W0000")]


def test_on_bad_image_fail_stops_before_training_naming_the_first_bad_file(tmp_path, capsys, monkeypatch):
    bad, _ = dirty_folder(tmp_path / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    proc = run_cli_in_process(capsys, *train_args(tmp_path / "runs", tmp_path / "data", "--set",
                                                  "data.on_bad_image=fail"))
    line = assert_user_error(proc, "data.on_bad_image=fail", "3 such files")
    assert sorted(bad)[0] in line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_second_scan_of_an_unchanged_folder_decodes_nothing(tmp_path, monkeypatch, shared_data):
    from cnnlab import images

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    decoded = []
    real_decodes = images._decodes

    def counting_decodes(paths, orientations, image_size):
        decoded.append(len(paths))
        return real_decodes(paths, orientations, image_size)

    monkeypatch.setattr(images, "_decodes", counting_decodes)
    cfg = config.resolve([], ["data.source=folder", f"data.path={shared_data}"])
    files, _ = data.folder_files(cfg["data"], seed=0)
    paths = [p for ps, _ in files.values() for p in ps]
    assert data.scan_images(paths, (160, 160), 50).left_out == set()
    assert data.scan_images(paths, (160, 160), 50).left_out == set()
    # Behaviour, not a timing (which a busy machine or a warm page cache blurs): the cache spares every decode.
    assert sum(decoded[:1]) == len(paths) and sum(decoded[1:]) == 0, decoded


def test_the_scan_cache_notices_a_changed_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bad, good = dirty_folder(tmp_path / "data")
    paths = sorted(bad | good)
    assert data.scan_images(paths, (32, 32), 50).left_out == bad
    fixed = sorted(bad)[0]
    Path(fixed).write_bytes(Path(sorted(good)[0]).read_bytes())
    assert data.scan_images(paths, (32, 32), 50).left_out == bad - {fixed}


SLOW_SAVE = """
import sys, time
import keras
save = keras.Model.save
def slow_save(self, path, *args, **kwargs):
    save(self, path, *args, **kwargs)
    if "epoch_" in str(path) and ".tmp.keras" in str(path) and "{marker}" != "" and __import__("os").path.exists("{armed}"):
        open("{marker}", "w").close()
        time.sleep(120)  # killed here: the new checkpoint is written but not yet renamed into place
keras.Model.save = slow_save
sys.argv = ["train.py"] + sys.argv[1:]
sys.path.insert(0, "{repo}")
import train
train.main(sys.argv[1:])
"""


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_checkpoint_loadable(tmp_path, capsys):
    marker, armed = tmp_path / "writing", tmp_path / "armed"
    script = tmp_path / "slow_train.py"
    script.write_text(SLOW_SAVE.format(marker=marker, armed=armed, repo=REPO))
    args = ["--config", SMOKE, "--set", f"run.dir={tmp_path}", "--set", "run.name=k", "--set", "training.epochs=3"]
    proc = subprocess.Popen([sys.executable, str(script), *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    state = tmp_path / "k" / "state.json"
    wait_for_epoch(tmp_path / "k", 1, proc, timeout=120)
    armed.touch()  # from now on, the next last.keras write hangs half-way
    deadline = time.time() + 120
    while time.time() < deadline and not marker.exists():
        time.sleep(0.05)
    assert marker.exists(), proc.stderr.read()[-2000:] if proc.poll() is not None else "no slow write seen"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    saved_epoch = json.loads(state.read_text())["epoch"]
    model = keras.models.load_model(tmp_path / "k" / "checkpoints" / "last.keras")
    assert int(model.optimizer.iterations.numpy()) == saved_epoch * 32  # 1,024 images / batch 32 per epoch
    resumed = run_cli_in_process(capsys, "train.py", "--resume", str(tmp_path / "k"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"Resuming {tmp_path / 'k'} after epoch {saved_epoch} of 3." in resumed.stdout
    assert [int(r["epoch"]) for r in csv.DictReader(open(tmp_path / "k" / "history.csv"))] == [1, 2, 3]


def test_a_nan_loss_stops_with_epoch_and_batch_and_keeps_the_good_checkpoint(tmp_path, capsys):
    train(config.resolve([str(REPO / SMOKE)], [f"run.dir={tmp_path}", "run.name=n", "training.epochs=1"]), [SMOKE])
    proc = run_cli_in_process(capsys, "train.py", "--resume", str(tmp_path / "n"), "--set", "training.epochs=3",
                              "--set", "training.learning_rate=1e10", "--set", "training.schedule=constant")
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "NaN or infinite at epoch 2, batch" in line and "lower training.learning_rate" in line
    assert "epochs 1-1 are saved" in line
    model = keras.models.load_model(tmp_path / "n" / "checkpoints" / "best.keras")
    assert np.all(np.isfinite(model.predict(np.full((2, 32, 32, 3), 128.0, np.float32), verbose=0)))
    assert json.loads((tmp_path / "n" / "state.json").read_text())["epoch"] == 1


def test_ctrl_c_mid_epoch_prints_the_resume_command_and_resuming_finishes(tmp_path, capsys):
    args = ["train.py", "--config", SMOKE, "--set", f"run.dir={tmp_path}", "--set", "run.name=c",
            "--set", "training.epochs=3", "--set", "data.synthetic_size=2048", "--set", "data.image_size=[32,32]"]
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    state = tmp_path / "c" / "state.json"
    wait_for_epoch(tmp_path / "c", 1, proc)
    time.sleep(0.5)  # into epoch 2
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    command = out.strip().splitlines()[-1].strip()
    assert command == f"python train.py --resume {tmp_path / 'c'}"
    done = json.loads(state.read_text())["epoch"]
    assert 1 <= done < 3
    resumed = run_cli_in_process(capsys, *command.split()[1:])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [int(r["epoch"]) for r in csv.DictReader(open(tmp_path / "c" / "history.csv"))] == [1, 2, 3]


def test_a_full_disk_at_checkpoint_time_is_a_clear_error_and_keeps_earlier_checkpoints(tmp_path):
    args = ["--config", SMOKE, "--set", f"run.dir={tmp_path}", "--set", "run.name=d", "--set",
            "model.standard.filters=[64,128]", "--set", "runtime.log_histograms=false"]
    train(config.resolve([str(REPO / SMOKE)], [a for a in args[1::2] if "=" in a] + ["training.epochs=1"]), [SMOKE])
    last = tmp_path / "d" / "checkpoints" / "last.keras"
    size = last.stat().st_size
    before = last.read_bytes()

    def limit_file_size():  # files cannot grow past half a checkpoint: like a disk that just filled up
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    proc = subprocess.run([sys.executable, "train.py", "--resume", str(tmp_path / "d"), "--set", "training.epochs=2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size)
    assert proc.returncode == 1, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "could not write checkpoint" in line and "File too large" in line and "are kept" in line
    assert last.read_bytes() == before
    assert not list((tmp_path / "d" / "checkpoints").glob("*.tmp.keras"))
    keras.models.load_model(last)


def test_two_runs_started_at_once_with_one_name_never_share_a_directory(tmp_path):
    args = ["train.py", "--config", SMOKE, "--set", f"run.dir={tmp_path}", "--set", "run.name=same",
            "--set", "training.epochs=1"]
    procs = [subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "already exists" in loser or "just created by another run" in loser
    assert len(list(csv.DictReader(open(tmp_path / "same" / "history.csv")))) == 1


# ---------------------------------------------------------------------------------------------------------------
# Folder data that used to be misread silently or crash the scan


def folder_train(runs: Path, photos: Path, capsys):
    return run_cli_in_process(capsys, "train.py", *smoke_args(tiny(runs, "data.source=folder", f"data.path={photos}",
                                                                   "run.name=f")))


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_class_left_without_a_decodable_image_is_an_error_naming_it(split, tmp_path, capsys):
    from tests.conftest import make_image_folder

    photos = make_image_folder(tmp_path / "photos", per_class=3, size=16)
    for f in (photos / split / "dogs").iterdir():
        f.write_bytes(b"not an image")
    proc = folder_train(tmp_path / "runs", photos, capsys)
    assert_user_error(proc, f"the {split} split has no decodable image of class 'dogs'", "all 3 of its files")


def test_images_in_class_sub_folders_are_read_as_predict_reads_them(tmp_path, capsys):
    from cnnlab.evaluation import image_files
    from tests.conftest import make_image_folder

    photos = make_image_folder(tmp_path / "photos", per_class=3, size=16)
    make_image_folder(tmp_path / "more", splits=("",), classes=("x",), per_class=2, size=16)
    (tmp_path / "more" / "x").rename(photos / "train" / "cats" / "phone")
    assert folder_train(tmp_path / "runs", photos, capsys).returncode == 0
    assert json.loads((tmp_path / "runs" / "f" / "metrics.json").read_text())["num_train"] == 8
    assert len(image_files(str(photos / "train"))) == 8


def test_a_file_name_that_is_not_utf8_is_left_out_and_counted(tmp_path, capsys):
    from tests.conftest import make_image_folder

    photos = make_image_folder(tmp_path / "photos", per_class=3, size=16)
    odd = os.path.join(os.fsencode(photos / "train" / "cats"), b"caf\xe9.jpg")  # Latin-1, not UTF-8
    with open(odd, "wb") as f:
        f.write((photos / "train" / "cats" / "img_0.jpg").read_bytes())
    proc = folder_train(tmp_path / "runs", photos, capsys)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Ignored 1 hidden, non-image (by extension) or non-UTF-8-named files" in proc.stdout
    assert json.loads((tmp_path / "runs" / "f" / "metrics.json").read_text())["num_train"] == 6
