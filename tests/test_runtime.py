"""Runtime: precision, determinism, and distribution (MirroredStrategy on two logical CPUs, two local workers)."""

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from cnnlab import config, runtime
from cnnlab.modeling import family_network
from cnnlab.training import train
from tests.conftest import REPO

SMOKE = str(REPO / "configs" / "smoke.yaml")

# Runs train.py in a process whose CPU is split into two logical devices, as a two-GPU machine looks to TF.
TWO_CPUS = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
sys.path.insert(0, {repo!r})
import train
train.main(sys.argv[1:])
"""


def history(run_dir: Path) -> list[dict]:
    return list(csv.DictReader(open(run_dir / "history.csv")))


def small_args(runs: Path, name: str, *extra: str) -> list[str]:
    # no batch norm, no random augmentation: per-replica batch statistics and random streams would differ
    return ["--config", SMOKE, "--set", f"run.dir={runs}", "--set", f"run.name={name}", "--set", "training.epochs=1",
            "--set", "data.synthetic_size=256", "--set", "model.standard.batch_norm=false",
            "--set", "runtime.log_histograms=false", "--set", "runtime.log_kernel_images=false",
            "--set", "augment.flip=none", *extra]


def test_mirrored_over_two_cpu_devices_matches_the_single_device_loss(tmp_path):
    script = tmp_path / "two_cpus.py"
    script.write_text(TWO_CPUS.format(repo=str(REPO)))
    epochs = {}
    for strategy in ("mirrored", "default"):
        # Distributing a dataset rebuilds it, and a rebuilt shuffle draws another (equally seeded) order; without
        # shuffling both see the same batches, so the losses compare the arithmetic alone. The validation averages
        # each image's prediction with its mirror's (augment.tta: flip), evaluated through the strategy too.
        proc = subprocess.run([sys.executable, str(script), *small_args(tmp_path, strategy, "--set",
                               f"runtime.strategy={strategy}", "--set", "data.shuffle_buffer=1",
                               "--set", "augment.tta=flip")],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        epochs[strategy] = history(tmp_path / strategy)[0]
        if strategy == "mirrored":
            assert "strategy: mirrored over 2 devices" in proc.stdout
    for key in ("loss", "val_loss", "val_accuracy"):
        assert float(epochs["mirrored"][key]) == pytest.approx(float(epochs["default"][key]), rel=1e-4), key


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def two_local_workers(tmp_path: Path, name: str, *extra: str) -> list[str]:
    """Runs train.py as the two workers of a local cluster (MultiWorkerMirroredStrategy) and returns their stdouts."""
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    worker_tmp = tmp_path / "worker_tmp"
    worker_tmp.mkdir(exist_ok=True)
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
               "TMPDIR": str(worker_tmp)}
        procs.append(subprocess.Popen([sys.executable, "train.py", *small_args(tmp_path / "runs", name, *extra)],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=400))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        assert "multi_worker" in out and "2 replicas" in out
    assert not [p for p in worker_tmp.iterdir() if p.name.startswith("cnnlab-worker-")]  # the workers cleaned up
    return [out for out, _ in outputs]


def test_two_local_workers_train_an_epoch_and_only_the_chief_writes(tmp_path):
    two_local_workers(tmp_path, "mw", "--set", "augment.tta=flip")
    assert [d.name for d in (tmp_path / "runs").iterdir()] == ["mw"]
    run_dir = tmp_path / "runs" / "mw"
    assert [int(r["epoch"]) for r in history(run_dir)] == [1]
    keras.models.load_model(run_dir / "checkpoints" / "best.keras")


def test_two_local_workers_train_a_budget_at_the_configs_own_size(tmp_path):
    # Each worker would time its own steps and might choose another size, so several workers keep the config's own.
    outs = two_local_workers(tmp_path, "mwd", "--set", "training.time_budget=0.05", "--set",
                             "training.downsize.sizes=[16, 24]", "--set", "training.downsize.min_epochs=1000")
    for out in outs:
        assert "training.downsize is not used across several workers" in out and "a training step at" not in out
    # The workers' clocks start apart; the budget's decisions come from one clock they agree on, so each worker
    # trained the same epochs at the same learning rates, and they stopped together.
    rates = [re.findall(r"^Epoch (\d+) \(.*?, lr ([^,]+),", out, re.M) for out in outs]
    assert rates[0] and rates[0] == rates[1], outs  # one epoch or more: a loaded machine fits fewer
    run_dir = tmp_path / "runs" / "mwd"
    assert config.resolve([str(run_dir / "config.yaml")])["data"]["image_size"] == [32, 32]
    assert history(run_dir)


def test_mixed_bfloat16_trains_with_float32_outputs(tmp_path):
    cfg = config.resolve([SMOKE], [f"run.dir={tmp_path}", "runtime.precision=mixed_bfloat16", "training.epochs=2",
                                   "data.synthetic_size=256"])
    try:
        run_dir = train(cfg, [SMOKE])
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model = keras.models.load_model(run_dir / "checkpoints" / "best.keras")
    conv = family_network(model).get_layer("stage1_block1_conv")
    assert conv.compute_dtype == "bfloat16" and conv.kernel.dtype == "float32"
    out = model(np.full((2, 32, 32, 3), 100, np.float32))
    assert out.dtype == "float32" and np.all(np.isfinite(keras.ops.convert_to_numpy(out)))
    assert all(np.isfinite(float(r["loss"])) for r in history(run_dir))


def test_auto_precision_follows_the_hardware():
    expected = "mixed_bfloat16" if runtime.cpu_supports_bfloat16() else "float32"
    if runtime.gpu_compute_capabilities():
        pytest.skip("a GPU is visible; the CPU rule does not apply")
    assert runtime.resolve_precision("auto") == expected
    assert runtime.resolve_precision("float32") == "float32"


def test_deterministic_mode_repeats_a_run_exactly(tmp_path):
    script = tmp_path / "run.py"  # op determinism is process-wide, so each run gets its own process
    script.write_text(f"import sys; sys.path.insert(0, {str(REPO)!r}); import train; train.main(sys.argv[1:])")
    losses = []
    for name in ("a", "b"):
        proc = subprocess.run([sys.executable, str(script), "--config", SMOKE, "--set", f"run.dir={tmp_path}",
                               "--set", f"run.name={name}", "--set", "training.epochs=2", "--set",
                               "data.synthetic_size=256", "--set", "runtime.deterministic=true"],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        losses.append([r["loss"] + r["val_loss"] for r in history(tmp_path / name)])
    assert losses[0] == losses[1]


@pytest.mark.parametrize("tf_config, chief", [
    (None, True),
    ({"cluster": {"worker": ["a", "b"]}, "task": {"type": "worker", "index": 0}}, True),
    ({"cluster": {"worker": ["a", "b"]}, "task": {"type": "worker", "index": 1}}, False),
    ({"cluster": {"chief": ["c"], "worker": ["a"]}, "task": {"type": "worker", "index": 0}}, False),
    ({"cluster": {"chief": ["c"], "worker": ["a"]}, "task": {"type": "chief", "index": 0}}, True),
])
def test_only_one_task_is_chief(tf_config, chief):
    assert runtime.is_chief(tf_config) is chief


def test_multi_worker_without_a_run_name_is_refused(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker",
                                                                                                  "index": 0}}))
    from cnnlab.errors import UserError

    with pytest.raises(UserError, match="needs an explicit run.name"):
        config.resolve([SMOKE])
