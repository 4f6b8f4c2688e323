"""Training end to end: the run directory, TensorBoard logs, seeding, resume after a kill, and run-dir safety."""

import csv
import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml

from cnnlab import config
from cnnlab.data import build_datasets
from cnnlab.training import train
from tests.conftest import REPO, assert_user_error, run_cli

SMOKE = str(REPO / "configs" / "smoke.yaml")


def read_history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv") as f:
        return list(csv.DictReader(f))


def tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """Scalars read back from the event files with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    # tf.summary writes scalars as tensor events; older writers used scalar events.
    if tag in acc.Tags().get("tensors", []):
        return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, float]:
    runs = tmp_path_factory.mktemp("runs")
    start = time.perf_counter()
    proc = run_cli("train.py", "--config", SMOKE, "--set", f"run.dir={runs}", timeout=120)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = runs.iterdir()
    return run_dir, proc, seconds


def test_smoke_run_is_fast_and_its_last_line_names_the_run(smoke_run):
    run_dir, proc, seconds = smoke_run
    assert seconds < 60
    assert run_dir.name.startswith("smoke-")
    last = proc.stdout.strip().splitlines()[-1]
    assert str(run_dir) in last and "best val_accuracy" in last
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"{metrics['val_accuracy']:.4f}" in last


def test_smoke_run_dir_holds_config_checkpoints_history_and_metrics(smoke_run):
    run_dir, _, _ = smoke_run
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved == config.resolve([SMOKE], [f"run.dir={run_dir.parent}"])
    epochs = saved["training"]["epochs"]
    history = read_history(run_dir)
    assert [int(r["epoch"]) for r in history] == list(range(1, epochs + 1))
    val_acc = [float(r["val_accuracy"]) for r in history]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_epoch"] == int(np.argmax(val_acc)) + 1
    assert metrics["val_accuracy"] == pytest.approx(max(val_acc))
    assert metrics["val_accuracy"] > 0.8  # the synthetic stripes are learnable in seconds
    lrs = [float(r["learning_rate"]) for r in history]
    assert lrs[0] > lrs[-1] >= 0  # cosine decay


def test_best_checkpoint_reproduces_its_val_accuracy(smoke_run):
    run_dir, _, _ = smoke_run
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    model = keras.models.load_model(run_dir / "checkpoints" / "best.keras")
    data = build_datasets(cfg["data"], seed=cfg["run"]["seed"])
    _, accuracy = model.evaluate(data.val, verbose=0)
    assert accuracy == pytest.approx(json.loads((run_dir / "metrics.json").read_text())["val_accuracy"], abs=1e-6)
    assert keras.models.load_model(run_dir / "checkpoints" / "last.keras").optimizer.iterations.numpy() > 0


def test_tensorboard_event_files_hold_loss_accuracy_and_learning_rate_per_epoch(smoke_run):
    run_dir, _, _ = smoke_run
    history = read_history(run_dir)
    loss = tensorboard_scalars(run_dir / "logs" / "train", "epoch_loss")
    assert sorted(loss) == list(range(len(history)))
    assert [loss[i] for i in sorted(loss)] == pytest.approx([float(r["loss"]) for r in history], rel=1e-5)
    val_acc = tensorboard_scalars(run_dir / "logs" / "validation", "epoch_accuracy")
    assert [val_acc[i] for i in sorted(val_acc)] == pytest.approx([float(r["val_accuracy"]) for r in history])
    assert len(tensorboard_scalars(run_dir / "logs" / "train", "epoch_learning_rate")) == len(history)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_tensorboard_server_serves_the_runs_scalars(smoke_run):
    run_dir, _, _ = smoke_run
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(run_dir / "logs"), "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=train&tag=epoch_loss"
    try:
        deadline, points = time.time() + 60, None
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    points = json.loads(response.read())
                if points:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
    finally:
        server.terminate()
        server.wait(timeout=20)
    assert points, "TensorBoard served no epoch_loss scalars within 60 s"
    history = read_history(run_dir)
    assert [p[1] for p in points] == list(range(len(history)))
    assert [p[2] for p in points] == pytest.approx([float(r["loss"]) for r in history], rel=1e-5)


def tiny_cfg(tmp_path, *sets):
    return config.resolve([SMOKE], [f"run.dir={tmp_path}", "data.synthetic_size=128", "data.image_size=[16, 16]",
                                    "training.epochs=1", *sets])


def test_same_seed_gives_the_same_first_epoch_loss_and_another_seed_does_not(tmp_path):
    losses = []
    for seed in (7, 7, 8):
        run_dir = train(tiny_cfg(tmp_path, f"run.seed={seed}"), [SMOKE])
        losses.append(float(read_history(run_dir)[0]["loss"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert losses[0] != pytest.approx(losses[2], rel=1e-4)


def test_keep_every_epoch_keeps_each_epochs_model_and_the_last_one_is_last_keras(tmp_path):
    run_dir = train(tiny_cfg(tmp_path, "training.epochs=3", "run.keep_every_epoch=true"), [SMOKE])
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("epoch_*.keras")) == [f"epoch_00{e}.keras" for e in (1, 2, 3)]
    weights = {e: keras.models.load_model(ckpts / f"epoch_00{e}.keras").get_weights() for e in (1, 2, 3)}
    last = keras.models.load_model(ckpts / "last.keras").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(weights[3], last))
    # Each epoch keeps its own weights, not a link to whatever last.keras later becomes.
    assert not all(np.array_equal(a, b) for a, b in zip(weights[1], weights[2]))
    assert not all(np.array_equal(a, b) for a, b in zip(weights[2], weights[3]))
    # Off by default: a run keeps only initial, last and best (and the epoch files these two are links to).
    plain = train(tiny_cfg(tmp_path, "training.epochs=2"), [SMOKE])
    state = json.loads((plain / "state.json").read_text())
    committed = {state["last_checkpoint"], state["best_checkpoint"]}
    assert {p.name for p in (plain / "checkpoints").iterdir()} == {"best.keras", "initial.keras", "last.keras",
                                                                     *committed}
    assert state["last_checkpoint"] == "epoch_002.keras"


def test_flip_validation_scores_every_epoch_on_predictions_averaged_with_the_mirror_image(tmp_path):
    run_dir = train(tiny_cfg(tmp_path, "training.epochs=3", "augment.tta=flip", "run.keep_every_epoch=true",
                             "training.label_smoothing=0.1"), [SMOKE])
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = build_datasets(cfg["data"], seed=cfg["run"]["seed"])
    history = read_history(run_dir)
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    loss_fn = keras.losses.BinaryCrossentropy(label_smoothing=0.1, reduction=None)
    for row in history:
        model = keras.models.load_model(run_dir / "checkpoints" / f"epoch_00{row['epoch']}.keras")
        labels, averaged = [], []
        for images, y in data.val:
            averaged.append((model.predict_on_batch(images) + model.predict_on_batch(tf.reverse(images, [2]))) / 2)
            labels.append(y.numpy().reshape(-1, 1))
        labels, averaged = np.concatenate(labels), np.concatenate(averaged)
        assert float(row["val_accuracy"]) == pytest.approx(np.mean((averaged > 0.5) == labels), abs=1e-6)
        assert float(row["val_loss"]) == pytest.approx(float(np.mean(loss_fn(labels, averaged))), rel=1e-4)
        # Not the plain figure: the mirror images changed the loss.
        plain_loss, _ = model.evaluate(data.val, verbose=0)
        assert float(row["val_loss"]) != pytest.approx(plain_loss, rel=1e-4)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["best_epoch"] == int(np.argmax([float(r["val_accuracy"]) for r in history])) + 1
    # evaluate.py scores the run the way it validated, unless told otherwise.
    from cnnlab.evaluation import evaluate

    scored = evaluate(run=str(run_dir), split="val", out=str(tmp_path / "eval"))
    assert scored["tta"] is True and scored["accuracy"] == pytest.approx(metrics["val_accuracy"], abs=1e-6)
    assert evaluate(run=str(run_dir), split="val", out=str(tmp_path / "plain"), tta=False)["tta"] is False


def test_an_existing_run_is_never_overwritten_without_the_flag(tmp_path, capsys):
    from tests.conftest import run_cli_in_process

    cfg = tiny_cfg(tmp_path, "run.name=fixed")
    run_dir = train(cfg, [SMOKE])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    proc = run_cli_in_process(capsys, "train.py", "--config", SMOKE, "--set", f"run.dir={tmp_path}", "--set",
                              "run.name=fixed")
    assert_user_error(proc, "already exists", "--resume", "--overwrite")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    proc = run_cli_in_process(capsys, "train.py", "--config", SMOKE, "--set", f"run.dir={tmp_path}", "--set",
                              "run.name=fixed", "--set", "training.epochs=1", "--set", "data.synthetic_size=64",
                              "--set", "data.image_size=[16,16]", "--overwrite")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["synthetic_size"] == 64


def test_runs_of_one_config_never_share_a_directory(tmp_path):
    cfg = tiny_cfg(tmp_path)
    first, second = train(cfg, [SMOKE]), train(cfg, [SMOKE])
    assert first != second and first.parent == second.parent


def test_tensorboard_holds_one_kernel_image_per_epoch(smoke_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = smoke_run
    acc = EventAccumulator(str(run_dir / "logs" / "kernels"), size_guidance={"tensors": 0})
    acc.Reload()
    (tag,) = acc.Tags()["tensors"]
    assert tag == "kernels/stage1_block1_conv"
    events = acc.Tensors(tag)
    assert [e.step for e in events] == list(range(len(read_history(run_dir))))
    width, height, png = tf.make_ndarray(events[-1].tensor_proto)[:3]
    image = tf.io.decode_png(png).numpy()
    assert image.shape[:2] == (int(height), int(width)) and image.shape[0] > 24


ALL_CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.yaml") if p.name != "defaults.yaml")


@pytest.mark.parametrize("config_file", ALL_CONFIGS)
def test_every_config_prints_and_dry_runs_without_its_data_or_the_network(config_file, capsys, tmp_path, monkeypatch):
    from tests.conftest import run_cli_in_process

    # From an empty folder: relative data paths (data/cats_and_dogs_filtered) point at nothing, as in a fresh clone;
    # TFDS has nothing prepared in a fresh TFDS folder, and transfer configs name ImageNet weights that are not here.
    monkeypatch.chdir(tmp_path)
    path = str(REPO / config_file)
    overrides = ["--set", f"data.data_dir={tmp_path / 'tfds'}", "--set", f"run.dir={tmp_path / 'runs'}"]
    printed = run_cli_in_process(capsys, "train.py", "--config", path, *overrides, "--print-config")
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout) == config.resolve([path], [o for o in overrides if o != "--set"])
    dry = run_cli_in_process(capsys, "train.py", "--config", path, *overrides, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "Model:" in dry.stdout and "Parameters:" in dry.stdout and "total" in dry.stdout
    assert not (tmp_path / "runs").exists()


def readme_load_snippet() -> str:
    """The README's Python block that loads a checkpoint: the test runs what the README tells users to run."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (snippet,) = [b for b in blocks if "load_model(" in b]
    return snippet


def test_a_checkpoint_of_every_family_loads_in_a_fresh_process_as_the_readme_says(tmp_path):
    from cnnlab.modeling import build_model

    cases = {
        "smoke": ("configs/smoke.yaml", []),
        "standard_crop": ("configs/small_data/standard.yaml", []),
        "pointwise": ("configs/small_data/pointwise.yaml", []),
        "separable": ("configs/small_data/separable.yaml", []),
        "vgg16": ("configs/cats_vs_dogs_vgg16.yaml", ["model.transfer.weights=null", "data.image_size=[48,48]"]),
        "resnet50": ("configs/cats_vs_dogs_resnet50.yaml", ["model.transfer.weights=null", "data.image_size=[48,48]"]),
    }
    expected = {}
    for name, (config_file, overrides) in cases.items():
        cfg = config.resolve([str(REPO / config_file)], overrides)
        model = build_model(cfg, 2)
        model.save(tmp_path / f"{name}.keras")
        x = np.random.default_rng(0).uniform(0, 255, (1, *model.input_shape[1:])).astype("float32")
        np.save(tmp_path / f"{name}.npy", x)
        expected[name] = model.predict(x, verbose=0)
    snippet = readme_load_snippet()
    script = "import json, sys\nimport numpy as np\nout = {}\n"
    for name in cases:
        path = tmp_path / f"{name}.keras"
        script += re.sub(r'load_model\(".*?"\)', f'load_model("{path}")', snippet)
        script += f'out["{name}"] = model.predict(np.load("{tmp_path / name}.npy"), verbose=0).tolist()\n'
    script += "print(json.dumps(out))\n"
    proc = run_cli("-c", script, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    for name in cases:
        np.testing.assert_allclose(loaded[name], expected[name], rtol=1e-5, atol=1e-6)
