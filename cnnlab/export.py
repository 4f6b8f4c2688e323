"""Exported models: a run's best checkpoint written as an inference model for use outside this project, and read
back so that evaluate.py and predict.py measure it exactly as they measure a checkpoint.

Every format takes the same input and gives the same output, described in a `metadata.json` beside the model:

    input   images: uint8 RGB pixels, shape (N, H, W, 3) at the run's data.image_size (read and resized the way
            training reads them: `cnnlab.images.read_image`); the model scales them itself
    output  probabilities: float32, shape (N, number of classes), one column per class name in the metadata

    <out>/saved_model/         a TensorFlow SavedModel (signature `serving_default`) + metadata.json
    <out>/tflite/              model.tflite, float32 + metadata.json
    <out>/tflite_int8/         model.tflite, full-integer int8, uint8 input + metadata.json
    <out>/onnx/                model.onnx (tf2onnx; requirements-onnx.txt) + metadata.json

A run validated on flip-averaged predictions (`augment.tta: flip`) is exported with the averaging inside the
model, and the metadata says `"tta": "flip"`. A mixed-precision run is exported in float32.

Example:

    >>> from cnnlab.export import export_run, load_exported
    >>> [folder] = export_run(RunDir.open("runs/smoke"), ["tflite"], out="runs/smoke/export")
    >>> model = load_exported(folder)
    >>> model.class_names, model.predict_on_batch(images).shape
    (['cats', 'dogs'], (8, 2))
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from cnnlab import console
from cnnlab.errors import UserError
from cnnlab.runs import RunDir

METADATA = "metadata.json"
SCHEMA = "cnnlab-export/1"
ONNX_OPSET = 17
PREPROCESSING = ("decode (a JPEG at the smallest DCT scale that still covers the image size), turn upright as the "
                 "EXIF orientation says, resize to the image size (bilinear, aspect ratio not kept), round to uint8")


@dataclass(frozen=True)
class Format:
    """One export format: the file it writes inside its folder (None: the folder is the model) and what it needs."""

    name: str
    file: str | None
    needs: tuple[str, ...] = ()
    description: str = ""


FORMATS = {f.name: f for f in (
    Format("saved_model", None, description="TensorFlow SavedModel (TF Serving, tf.saved_model.load)"),
    Format("tflite", "model.tflite", description="TensorFlow Lite, float32"),
    Format("tflite_int8", "model.tflite", description="TensorFlow Lite, full-integer int8 (uint8 input)"),
    Format("onnx", "model.onnx", needs=("tf2onnx", "onnxruntime"), description="ONNX (tf2onnx)"),
)}


def check_format(name: str) -> Format:
    if name not in FORMATS:
        raise UserError(f"--format: one of {', '.join(FORMATS)}. Received: {name!r}")
    missing = [m for m in FORMATS[name].needs if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--format {name} needs {' and '.join(missing)}: pip install -r requirements-onnx.txt")
    return FORMATS[name]


# ---------------------------------------------------------------------------------------------------------------
# Writing


def float32_model(model: keras.Model) -> keras.Model:
    """The model itself if it computes in float32; else a float32 copy with the same weights (a mixed-precision
    model's variables are float32 already, only its layers' compute dtype changes)."""

    def float32_policies(obj):
        if isinstance(obj, dict):
            if obj.get("class_name") == "DTypePolicy" and str(obj.get("config", {}).get("name", "")).startswith("mixed"):
                return {**obj, "config": {**obj["config"], "name": "float32"}}
            return {k: float32_policies(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [float32_policies(v) for v in obj]
        return obj

    from cnnlab.cam import named_layers

    if all(layer.compute_dtype == "float32" for _, layer in named_layers(model)):
        return model
    import models  # noqa: F401  registers the project's custom layers for deserialization

    copy = keras.saving.deserialize_keras_object(float32_policies(keras.saving.serialize_keras_object(model)))
    copy.set_weights(model.get_weights())
    return copy


def serving_function(model: keras.Model, tta: bool) -> tf.types.experimental.PolymorphicFunction:
    """uint8 images (N, H, W, 3) -> {"probabilities": (N, C) float32}; with `tta`, averaged with the mirror image
    (as `evaluation.predict_batch` does)."""
    height, width = model.input_shape[1:3]

    def probabilities(images):
        p = tf.cast(model(images, training=False), tf.float32)
        return tf.concat([1 - p, p], axis=1) if p.shape[-1] == 1 else p

    @tf.function(input_signature=[tf.TensorSpec((None, height, width, 3), tf.uint8, name="images")])
    def serve(images):
        images = tf.cast(images, tf.float32)
        p = probabilities(images)
        if tta:
            p = (p + probabilities(tf.reverse(images, axis=[2]))) / 2
        return {"probabilities": p}

    return serve


def representative_images(cfg: dict, count: int) -> np.ndarray:
    """`count` images of the run's training split (a seeded shuffle of all of it), read as training reads them:
    what int8 quantization calibrates its value ranges on."""
    from cnnlab.data import source_splits

    data = cfg["data"]
    if data["source"] == "folder" and not os.path.isdir(data["path"]):
        raise UserError(f"data.path: int8 calibrates on the run's training images, and the run's data folder is not "
                        f"there; pass --set data.path=DIR. Received: {data['path']!r}")
    splits, _ = source_splits(data, cfg["run"]["seed"])
    ds, n = splits["train"]
    # On some AVX-512 CPUs oneDNN logs an "E0000 ... supports DT_UINT8 only on platforms with AVX-512" line for
    # the pipeline's uint8 ops and falls back to its own kernels: a notice that reads as a failure, so it is held.
    with console.held_native_stderr():
        images = [image.numpy() for image, _, _ in ds.shuffle(n, seed=cfg["run"]["seed"]).take(count)]
    if not images:
        raise UserError("data: the run's training split holds no readable images to calibrate int8 on.")
    return np.stack(images)


def _write_saved_model(serve, model: keras.Model, folder: Path) -> None:
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", serve)
    with console.held_native_stderr():
        archive.write_out(str(folder), verbose=False)


def _convert_tflite(saved_model: Path, calibration: np.ndarray | None) -> bytes:
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=["serving_default"])
    if calibration is not None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([image[None]] for image in calibration)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8     # pixels as they are: no input scale to get wrong
        converter.inference_output_type = tf.float32  # probabilities in every format
    with console.held_native_stderr():  # the converter's MLIR passes log to the native stderr
        return converter.convert()


def _write_onnx(serve, path: Path) -> None:
    import logging

    import tf2onnx

    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    with console.held_native_stderr():
        tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=ONNX_OPSET,
                                      output_path=str(path))


def write_export(model: keras.Model, fmt: str, folder: Path, metadata: dict, tta: bool,
                 calibration: np.ndarray | None = None) -> None:
    """Writes one format of `model` into `folder` (which must not exist yet) with its metadata.json."""
    spec = check_format(fmt)
    model = float32_model(model)
    serve = serving_function(model, tta)
    folder.mkdir(parents=True)
    if fmt == "saved_model":
        _write_saved_model(serve, model, folder)
    elif fmt in ("tflite", "tflite_int8"):
        scratch = folder / "saved_model.tmp"
        _write_saved_model(serve, model, scratch)
        try:
            (folder / spec.file).write_bytes(_convert_tflite(scratch, calibration if fmt == "tflite_int8" else None))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    elif fmt == "onnx":
        _write_onnx(serve, folder / spec.file)
    (folder / METADATA).write_text(json.dumps({**metadata, "format": fmt, "file": spec.file,
                                               "tta": "flip" if tta else "none"}, indent=2) + "\n")


def model_metadata(model: keras.Model, class_names: list[str], cfg: dict | None = None) -> dict:
    """What every export's metadata.json says of its model: input, output, classes, how images are read, and the
    config it was trained with (which evaluate.py reads the data by)."""
    height, width = model.input_shape[1:3]
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "class_names": list(class_names),
        "input": {"name": "images", "dtype": "uint8", "shape": [None, height, width, 3], "pixels": "RGB, 0-255"},
        "output": {"name": "probabilities", "dtype": "float32", "shape": [None, len(class_names)]},
        "preprocessing": PREPROCESSING,
        "params": int(model.count_params()),
        "config": cfg,
    }


def export_run(run: RunDir, formats: list[str], out: str | Path | None = None, *, overrides: list[str] = (),
               tta: bool | None = None, calibration_images: int = 300, overwrite: bool = False) -> list[Path]:
    """Exports a run's best checkpoint in each of `formats`, each into `<out>/<format>/` (default out:
    RUN_DIR/export). Each is written to a temporary folder and renamed into place when complete; an existing
    export is replaced only with `overwrite`.

    Args:
        run: the run.
        formats: names from `FORMATS`.
        out: the folder the format folders go in.
        overrides: `--set` overrides on the run's config (e.g. `data.path=...` when the photos moved; int8 reads
            its calibration images from the run's training split).
        tta: bake flip averaging in; None: as the run validated (`augment.tta`).
        calibration_images: how many training images int8 calibrates on.
        overwrite: replace existing exports.

    Returns:
        The folders written, in the order of `formats`.
    """
    from cnnlab.config import flip_tta

    specs = [check_format(f) for f in dict.fromkeys(formats)]
    out = Path(out) if out is not None else run.export_dir
    targets = [out / spec.name for spec in specs]
    if calibration_images < 1:
        raise UserError(f"--calibration-images: a positive number of images. Received: {calibration_images}")
    for target in targets:
        if target.exists() and not overwrite:
            raise UserError(f"--out: {target} already exists; pass --overwrite to replace it, or choose another "
                            f"--out.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out: cannot write to {out} ({e.strerror or e}).") from None

    cfg = run.config(list(overrides))
    checkpoint = run.checkpoint("best")
    model = run.load("best")
    tta = flip_tta(cfg) if tta is None else tta
    state = run.state()
    metadata = {
        **model_metadata(model, run.class_names(), cfg),
        "run": str(run.path.resolve()),
        "checkpoint": str(checkpoint.resolve().relative_to(run.path.resolve())),
        "epoch": state["best_epoch"],
        "val_accuracy": state["best_val_accuracy"],
    }
    calibration, quantization = None, {}
    if "tflite_int8" in [s.name for s in specs]:
        calibration = representative_images(cfg, calibration_images)
        quantization = {"quantization": {"calibration_images": len(calibration), "weights": "int8",
                                         "activations": "int8", "input": "uint8 (scale 1, zero point 0)"}}
    written = []
    for spec, target in zip(specs, targets):
        staging = out / f".{spec.name}.tmp-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            extra = quantization if spec.name == "tflite_int8" else {}
            write_export(model, spec.name, staging, {**metadata, **extra}, tta, calibration)
            _replace(staging, target)
        except OSError as e:
            raise UserError(f"--out: could not write {target} ({e.strerror or e}).") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        written.append(target)
    return written


def _replace(new: Path, target: Path) -> None:
    """Puts the complete folder `new` at `target`; an old `target` is moved aside first and removed after."""
    aside = None
    if target.exists():
        aside = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, aside)
    os.replace(new, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------------
# Reading back


class ExportedModel:
    """An exported model loaded for inference, with its metadata.

    It offers the part of a Keras model's interface that evaluation and prediction use (`input_shape`,
    `output_shape`, `predict_on_batch`, `count_params`), so `evaluation.predict_split` and `predict_files` run
    it as they run a checkpoint.

    Args:
        folder: the export folder (holding metadata.json).
        metadata: its metadata.
        run: the format's inference function, uint8 (N, H, W, 3) -> (N, C) float32 probabilities.
    """

    def __init__(self, folder: Path, metadata: dict, run: Callable[[np.ndarray], np.ndarray]):
        self.folder = folder
        self.metadata = metadata
        self._run = run

    @property
    def format(self) -> str:
        return self.metadata["format"]

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    @property
    def tta(self) -> bool:
        return self.metadata.get("tta") == "flip"

    @property
    def input_shape(self) -> tuple:
        return (None, *self.metadata["input"]["shape"][1:])

    @property
    def output_shape(self) -> tuple:
        return (None, len(self.class_names))

    def flip_averaging(self, requested: bool | None) -> bool:
        """Whether a caller should average this model's predictions with the mirror image's itself, given --tta /
        --no-tta (None: not asked). Never by default: an export made from a run that averaged has it inside."""
        if requested and self.tta:
            raise UserError(f"--tta: {self.folder} already averages with the mirror image inside the model (its "
                            f"{METADATA} says tta: flip).")
        return bool(requested)

    def count_params(self) -> int:
        return int(self.metadata.get("params", 0))

    def predict_on_batch(self, images) -> np.ndarray:
        """(N, C) probabilities for images with values in [0, 255] (rounded to uint8, as they were read)."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            images = np.clip(np.round(images), 0, 255).astype(np.uint8)
        return np.asarray(self._run(images), dtype=np.float32)


def load_exported(path: str | Path, what: str = "--model") -> ExportedModel:
    """Loads an export folder (or the model file in it) for inference; anything else is a one-line UserError."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not path.exists():
        raise UserError(f"{what}: no such file or folder: {path}")
    if not (folder / METADATA).is_file():
        raise UserError(f"{what}: {path} is not an exported model (no {METADATA} beside it; export.py writes one).")
    try:
        metadata = json.loads((folder / METADATA).read_text())
        fmt = metadata["format"]
    except (ValueError, KeyError) as e:
        raise UserError(f"{what}: {folder / METADATA} is not an export's metadata ({e}).") from None
    if metadata.get("schema") != SCHEMA or fmt not in FORMATS:
        raise UserError(f"{what}: {folder / METADATA} is not a {SCHEMA} export. Received: schema "
                        f"{metadata.get('schema')!r}, format {fmt!r}")
    check_format(fmt)
    try:
        run = _RUNNERS[fmt](folder, FORMATS[fmt])
    except Exception as e:  # each runtime raises its own errors for files that are not its models
        raise UserError(f"{what}: {folder} could not be loaded as {fmt} ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    return ExportedModel(folder, metadata, run)


def _saved_model_runner(folder: Path, spec: Format):
    serve = tf.saved_model.load(str(folder)).signatures["serving_default"]
    return lambda images: serve(images=tf.constant(images))["probabilities"].numpy()


def _tflite_runner(folder: Path, spec: Format):
    with warnings.catch_warnings(), console.held_native_stderr():  # the native "Created ... delegate" notice
        # tf.lite.Interpreter is deprecated in favour of the ai-edge-litert package, but is what TF 2.21 ships.
        warnings.simplefilter("ignore", UserWarning)
        interpreter = tf.lite.Interpreter(model_path=str(folder / spec.file), num_threads=os.cpu_count())
    source = interpreter.get_input_details()[0]["index"]
    result = interpreter.get_output_details()[0]["index"]
    allocated_for = None

    def run(images: np.ndarray) -> np.ndarray:
        nonlocal allocated_for
        if allocated_for != images.shape:
            interpreter.resize_tensor_input(source, images.shape)
            with console.held_native_stderr():
                interpreter.allocate_tensors()
            allocated_for = images.shape
        interpreter.set_tensor(source, images)
        interpreter.invoke()
        return interpreter.get_tensor(result).copy()

    return run


def _onnx_runner(folder: Path, spec: Format):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(folder / spec.file), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda images: session.run(["probabilities"], {name: images})[0]


_RUNNERS = {"saved_model": _saved_model_runner, "tflite": _tflite_runner, "tflite_int8": _tflite_runner,
            "onnx": _onnx_runner}
