"""What every command-line tool shares: a quiet start (TensorFlow's native log held back unless --verbose), and a
hint with the --set form for flags that are really config keys."""

import os
import sys

import pytest

from cnnlab import config, console
from cnnlab.cli import config_key_hint
from cnnlab.training import train
from tests.conftest import REPO, TF_NOISE, run_cli, run_cli_in_process

def test_tensorflow_start_up_lines_are_held_back_and_verbose_shows_them(capsys, monkeypatch):
    # Quiet by default is checked on every tool run of the suite (run_cli); here, that --verbose brings back exactly
    # what a bare TensorFlow start prints on this machine, and nothing else changes.
    level = {"TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")}  # as the tools set it
    reference = run_cli("-c", "import tensorflow as tf; tf.config.list_physical_devices()", env=level, timeout=120)
    noise = sorted(TF_NOISE.findall(reference.stdout + reference.stderr))
    if not noise:
        pytest.skip("TensorFlow prints no start-up lines on this machine, so --verbose has nothing to show")
    verbose = run_cli("report.py", "configs/smoke.yaml", "--verbose", timeout=120)
    assert verbose.returncode == 0
    assert sorted(TF_NOISE.findall(verbose.stdout + verbose.stderr)) == noise
    monkeypatch.chdir(REPO)
    assert verbose.stdout == run_cli_in_process(capsys, "report.py", "configs/smoke.yaml").stdout


def test_training_says_what_it_runs_on_in_one_line(capsys):
    cfg = config.resolve([str(REPO / "configs/smoke.yaml")], ["runtime.precision=mixed_bfloat16"])
    train(cfg, [], dry_run=True)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("Running on CPU (") and "strategy: default (one device)" in first
    assert "precision: mixed_bfloat16" in first
    import keras

    keras.mixed_precision.set_global_policy("float32")


@pytest.mark.parametrize("flags, hint", [
    (["--epochs", "3"], "--set training.epochs=3"),
    (["--lr=0.01"], "--set training.learning_rate=0.01"),
    (["--batch-size", "8"], "--set data.batch_size=8"),
    (["--image-size", "[96,96]"], "--set data.image_size=[96,96]"),
])
def test_a_flag_that_is_a_config_key_gets_the_set_form(flags, hint):
    assert hint in config_key_hint(flags)


def test_unknown_flags_that_are_no_config_key_get_no_hint():
    assert config_key_hint(["--frobnicate", "3"]) == ""


def test_the_cli_error_for_a_key_like_flag_is_one_line_with_the_hint(capsys):
    proc = run_cli_in_process(capsys, "train.py", "--config", "configs/smoke.yaml", "--epochs", "3")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "unrecognized arguments: --epochs 3" in lines[0] and "--set training.epochs=3" in lines[0]


def test_verbose_is_read_from_the_command_line_or_the_environment(monkeypatch):
    from cnnlab.console import verbose_requested

    monkeypatch.delenv("CNNLAB_VERBOSE", raising=False)
    assert not verbose_requested(["--config", "x.yaml"])
    assert verbose_requested(["--config", "x.yaml", "--verbose"])
    monkeypatch.setenv("CNNLAB_VERBOSE", "0")
    assert not verbose_requested([])
    monkeypatch.setenv("CNNLAB_VERBOSE", "1")
    assert verbose_requested([])


def test_held_native_stderr_holds_writes_to_descriptor_2_and_releases_them_on_request(capfd):
    from cnnlab.console import held_native_stderr

    with held_native_stderr():
        os.write(2, b"held back\n")
    with held_native_stderr(release=True):
        os.write(2, b"shown after\n")
    with pytest.raises(RuntimeError):
        with held_native_stderr():
            os.write(2, b"shown because it failed\n")
            raise RuntimeError
    err = capfd.readouterr().err
    assert "held back" not in err and "shown after" in err and "shown because it failed" in err
    print("stderr still works", file=sys.stderr)
    assert "stderr still works" in capfd.readouterr().err


def test_first_item_held_hides_what_starting_an_iteration_writes_and_nothing_after(capfd):
    from cnnlab.console import first_item_held

    def batches():
        os.write(2, b"kernel notice\n")
        yield 1
        os.write(2, b"later message\n")
        yield 2

    assert list(first_item_held(batches())) == [1, 2]
    assert list(first_item_held([])) == []
    err = capfd.readouterr().err
    assert "kernel notice" not in err and "later message" in err


def test_cpu_features_names_the_speed_relevant_flags_in_a_fixed_order(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some Xeon\n"
                       "flags\t\t: fpu sse2 amx_int8 avx512f fma avx2 avx512_bf16 avx512fp16\n\nprocessor\t: 1\n")
    assert console.cpu_features(str(cpuinfo)) == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_int8"]
    assert console.cpu_features(str(tmp_path / "missing")) == []
