"""export.py: every format gives the Keras model's probabilities; exports are measured by evaluate.py and predict.py
like checkpoints; bad input is one line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from cnnlab import config
from tests.conftest import REPO, assert_user_error, run_cli_in_process

SMOKE = str(REPO / "configs" / "smoke.yaml")
FAMILIES = {
    "standard": [],
    "pointwise": ["model.name=pointwise"],
    "separable": ["model.name=separable"],
    # VGG16 with random weights: a transfer model whose backbone is a nested Keras model
    "vgg16": ["model.name=transfer", "model.transfer.backbone=vgg16", "model.transfer.weights=null"],
}


def tiny_model(family: str, *sets: str):
    """A smoke-sized model of the family whose classifier is rescaled so its logits spread (std 2, mean 0) over
    test images: at initialisation every image gets nearly the same probability, which would make a parity check
    at 1e-4 blind."""
    from cnnlab.modeling import build_model

    model = build_model(config.resolve([SMOKE], [*FAMILIES[family], *sets]), 2)

    def layers(m):
        for layer in m.layers:
            yield from layers(layer) if hasattr(layer, "layers") else [layer]

    head = [layer for layer in layers(model) if hasattr(layer, "kernel")][-1]
    p = np.asarray(model.predict_on_batch(images(16, seed=9).astype(np.float32)), np.float64).ravel()
    logits = np.log(p / (1 - p)) - head.bias.numpy()[0]
    scale = 2 / logits.std()
    head.kernel.assign(head.kernel * scale)
    head.bias.assign(-scale * logits.mean() * np.ones_like(head.bias.numpy()))
    return model


def images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def export_and_load(model, fmt: str, folder: Path, tta: bool = False, calibration=None):
    from cnnlab.export import load_exported, model_metadata, write_export

    write_export(model, fmt, folder, model_metadata(model, ["cats", "dogs"]), tta, calibration)
    return load_exported(folder)


def test_the_cli_offers_the_formats_the_library_writes():
    import export
    from cnnlab.export import FORMATS

    assert export.FORMAT_NAMES == tuple(FORMATS)  # export.py keeps its own copy: --help needs no TensorFlow


@pytest.mark.parametrize("family", FAMILIES)
def test_every_format_gives_the_keras_models_probabilities(family, tmp_path):
    from cnnlab.evaluation import predict_batch

    model = tiny_model(family)
    x = images(8)
    expected = predict_batch(model, x.astype(np.float32))
    assert expected.shape == (8, 2) and expected[:, 1].std() > 0.02
    for fmt in ("saved_model", "tflite", "onnx"):
        exported = export_and_load(model, fmt, tmp_path / fmt)
        got = exported.predict_on_batch(x)
        assert got.shape == (8, 2) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-4, err_msg=f"{family} {fmt}")
        assert exported.predict_on_batch(x[:1]).shape == (1, 2)  # any batch size


def test_an_enlarged_centre_crop_is_inside_the_export(tmp_path):
    from cnnlab.evaluation import predict_batch
    from cnnlab.modeling import build_model

    crop = ["augment.crop=[24, 24]", "augment.crop_scale=[0.35, 1.0]"]
    model = tiny_model("standard", *crop, "augment.test_crop_fraction=0.6")
    x = images(6, seed=2)
    expected = predict_batch(model, x.astype(np.float32))
    plain = build_model(config.resolve([SMOKE], [*FAMILIES["standard"], *crop]), 2)
    plain.set_weights(model.get_weights())
    assert np.abs(expected - predict_batch(plain, x.astype(np.float32))).max() > 1e-3  # the box changes them
    for fmt in ("tflite", "onnx"):
        exported = export_and_load(model, fmt, tmp_path / fmt)
        np.testing.assert_allclose(exported.predict_on_batch(x), expected, atol=1e-4, err_msg=fmt)


def test_flip_averaging_is_inside_the_export_when_asked(tmp_path):
    from cnnlab.evaluation import predict_batch

    model = tiny_model("standard")
    x = images(6, seed=1)
    exported = export_and_load(model, "tflite", tmp_path / "tta", tta=True)
    averaged = predict_batch(model, x.astype(np.float32), tta=True)
    np.testing.assert_allclose(exported.predict_on_batch(x), averaged, atol=1e-4)
    assert np.abs(averaged - predict_batch(model, x.astype(np.float32))).max() > 1e-4  # averaging changes them
    assert exported.tta and json.loads((tmp_path / "tta" / "metadata.json").read_text())["tta"] == "flip"


def test_a_mixed_precision_model_is_exported_in_float32(tmp_path):
    import keras

    from cnnlab.export import float32_model

    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        model = tiny_model("standard")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.layers[-2].compute_dtype == "bfloat16"
    x = images(8, seed=2)
    full = float32_model(model)
    assert full is not model and all(layer.compute_dtype == "float32" for layer in full.layers)
    expected = np.asarray(full.predict_on_batch(x.astype(np.float32)))
    exported = export_and_load(model, "tflite", tmp_path / "tflite")
    np.testing.assert_allclose(exported.predict_on_batch(x)[:, 1:], expected, atol=1e-4)
    # the bfloat16 model itself differs by its rounding, more than the export does
    assert np.abs(np.asarray(model.predict_on_batch(x.astype(np.float32))) - expected).max() > 1e-4
    import tensorflow as tf

    details = tf.lite.Interpreter(model_path=str(tmp_path / "tflite" / "model.tflite")).get_tensor_details()
    assert {d["dtype"] for d in details} <= {np.float32, np.uint8, np.int32}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    from cnnlab.training import train

    runs = tmp_path_factory.mktemp("runs")
    return train(config.resolve([SMOKE], [f"run.dir={runs}", "run.name=s", "training.epochs=2"]), [SMOKE])


def test_an_export_is_evaluated_and_predicted_like_its_run(smoke_run, tmp_path, capsys):
    out = tmp_path / "exports"
    proc = run_cli_in_process(capsys, "export.py", "--run", str(smoke_run), "--out", str(out),
                              "--format", "tflite", "--format", "tflite_int8", "--calibration-images", "64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == "", proc.stderr  # the converter's and interpreter's native notices are held back
    assert sorted(p.name for p in out.iterdir()) == ["tflite", "tflite_int8"]  # no temporary folders left
    meta = json.loads((out / "tflite_int8" / "metadata.json").read_text())
    assert meta["class_names"] == json.loads((smoke_run / "metrics.json").read_text())["class_names"]
    assert meta["input"] == {"name": "images", "dtype": "uint8", "shape": [None, 32, 32, 3], "pixels": "RGB, 0-255"}
    assert meta["quantization"]["calibration_images"] == 64 and meta["checkpoint"].startswith("checkpoints/")
    assert f"Wrote {out / 'tflite'}" in proc.stdout

    def evaluated(*source):
        proc = run_cli_in_process(capsys, "evaluate.py", *source, "--out", str(tmp_path / "eval" / source[-1][-6:]))
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / "eval" / source[-1][-6:] / "metrics.json").read_text())

    keras_m = evaluated("--run", str(smoke_run))
    float_m = evaluated("--model", str(out / "tflite"))
    int8_m = evaluated("--model", str(out / "tflite_int8" / "model.tflite"))
    assert float_m["num_examples"] == keras_m["num_examples"] == 256
    assert float_m["accuracy"] == keras_m["accuracy"] and float_m["log_loss"] == pytest.approx(keras_m["log_loss"],
                                                                                               abs=1e-5)
    assert float_m["format"] == "tflite" and int8_m["format"] == "tflite_int8"
    assert abs(int8_m["accuracy"] - keras_m["accuracy"]) <= 0.03

    folder = tmp_path / "photos"
    folder.mkdir()
    from PIL import Image

    for i, image in enumerate(images(5, size=40, seed=3)):  # another size: read and resized as training reads
        Image.fromarray(image).save(folder / f"{i}.png")
    csvs = {}
    for name, source in (("keras", ["--run", str(smoke_run)]), ("tflite", ["--model", str(out / "tflite")])):
        proc = run_cli_in_process(capsys, "predict.py", str(folder), *source, "--csv", str(tmp_path / f"{name}.csv"))
        assert proc.returncode == 0, proc.stderr[-2000:]
        csvs[name] = np.loadtxt(tmp_path / f"{name}.csv", delimiter=",", skiprows=1, usecols=(2, 3, 4))
    np.testing.assert_allclose(csvs["tflite"], csvs["keras"], atol=1e-4)


def test_an_export_runs_in_a_fresh_process_with_tensorflow_and_onnxruntime_alone(smoke_run, tmp_path):
    from cnnlab.export import export_run, load_exported

    folders = export_run(__import__("cnnlab.runs").runs.RunDir(smoke_run), ["saved_model", "tflite", "onnx"],
                         tmp_path)
    x = images(4, seed=4)
    np.save(tmp_path / "x.npy", x)
    expected = load_exported(folders[0]).predict_on_batch(x)
    script = f"""
import json, sys, numpy as np, tensorflow as tf, onnxruntime
assert "cnnlab" not in sys.modules and "models" not in sys.modules
x = np.load({str(tmp_path / 'x.npy')!r}); out = {{}}
serve = tf.saved_model.load({str(folders[0])!r}).signatures["serving_default"]
out["saved_model"] = serve(images=tf.constant(x))["probabilities"].numpy().tolist()
lite = tf.lite.Interpreter(model_path={str(folders[1] / 'model.tflite')!r})
lite.resize_tensor_input(lite.get_input_details()[0]["index"], x.shape); lite.allocate_tensors()
lite.set_tensor(lite.get_input_details()[0]["index"], x); lite.invoke()
out["tflite"] = lite.get_tensor(lite.get_output_details()[0]["index"]).tolist()
session = onnxruntime.InferenceSession({str(folders[2] / 'model.onnx')!r})
out["onnx"] = session.run(["probabilities"], {{"images": x}})[0].tolist()
print(json.dumps(out))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for fmt, got in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        np.testing.assert_allclose(np.array(got), expected, atol=1e-4, err_msg=fmt)


def test_bad_input_is_one_line_and_an_existing_export_is_kept(smoke_run, tmp_path, capsys):
    def export(*args):
        return run_cli_in_process(capsys, "export.py", *args)

    assert_user_error(export("--run", str(tmp_path)), "--run", "is not a run directory")
    proc = export("--run", str(smoke_run), "--format", "coreml")  # argparse's own one line
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--format: invalid choice: 'coreml'" in proc.stderr
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert_user_error(export("--run", str(smoke_run), "--out", str(blocker / "sub")), "--out", "cannot write")
    assert_user_error(export("--run", str(smoke_run), "--calibration-images", "0", "--format", "tflite_int8",
                             "--out", str(tmp_path / "c")), "--calibration-images", "Received: 0")
    assert not (tmp_path / "c").exists()  # refused before anything was written
    moved = tmp_path / "moved_run"
    shutil.copytree(smoke_run, moved)
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    cfg["data"].update(source="folder", path=str(tmp_path / "gone"))
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert_user_error(export("--run", str(moved), "--format", "tflite_int8", "--out", str(tmp_path / "m")),
                      "data.path", "--set data.path=DIR")
    out = tmp_path / "out"
    assert export("--run", str(smoke_run), "--out", str(out), "--format", "tflite").returncode == 0
    before = (out / "tflite" / "model.tflite").read_bytes()
    (out / "tflite" / "note.txt").write_text("mine")
    assert_user_error(export("--run", str(smoke_run), "--out", str(out), "--format", "tflite"), "already exists",
                      "--overwrite")
    assert (out / "tflite" / "note.txt").read_text() == "mine"
    assert export("--run", str(smoke_run), "--out", str(out), "--format", "tflite", "--overwrite").returncode == 0
    assert not (out / "tflite" / "note.txt").exists() and (out / "tflite" / "model.tflite").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["tflite"]
    # evaluate/predict: something that is not an export, a doubled flip averaging
    assert_user_error(run_cli_in_process(capsys, "evaluate.py", "--model", str(smoke_run)), "--model",
                      "is not an exported model")
    assert export("--run", str(smoke_run), "--out", str(tmp_path / "tta"), "--format", "tflite", "--tta"
                  ).returncode == 0
    assert_user_error(run_cli_in_process(capsys, "evaluate.py", "--model", str(tmp_path / "tta" / "tflite"),
                                         "--tta"), "--tta", "already averages")
    (out / "tflite" / "model.tflite").write_bytes(b"not a model")
    assert_user_error(run_cli_in_process(capsys, "predict.py", str(blocker), "--model", str(out / "tflite")),
                      "--model", "could not be loaded as tflite")
