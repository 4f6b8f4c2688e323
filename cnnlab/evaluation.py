"""Evaluating checkpoints: predictions, metrics, plots and comparisons.

    python evaluate.py --run runs/<name>                  # best checkpoint on the test split (or val)
    python evaluate.py --run runs/a --run runs/b          # one comparison table

Writes `metrics.json`, `predictions.csv` and PNG plots to `RUN_DIR/eval/<split>/`, and the metrics to the run's
TensorBoard logs under `eval/`. Metrics are computed here in NumPy from the predicted probabilities, so they can be
recomputed from predictions.csv by anyone.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from cnnlab import config as config_lib
from cnnlab import console
from cnnlab.config import as_size
from cnnlab.data import source_splits
from cnnlab.images import IMAGE_EXTENSIONS, UnreadableImage, find_images, read_image
from cnnlab.errors import UserError
from cnnlab.runs import RunDir, load_checkpoint

WORST = 16  # how many confidently wrong images the mistakes plot shows


@dataclass
class Predictions:
    """Per-image results of one model on one split."""

    ids: list[str]
    labels: np.ndarray          # (N,) true class ids
    probs: np.ndarray           # (N, C) class probabilities (two columns for a sigmoid model)
    class_names: list[str]
    seconds: float              # time spent in the model alone
    worst: list[tuple[float, np.ndarray, int, int, str]]  # (confidence, image, true, predicted, id)

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(axis=1)


def num_model_classes(model: keras.Model) -> int:
    units = model.output_shape[-1]
    return 2 if units == 1 else int(units)


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """Model outputs to an (N, C) probability matrix: a single sigmoid unit p becomes [1 - p, p]."""
    outputs = np.asarray(outputs, dtype=np.float64)
    return np.concatenate([1 - outputs, outputs], axis=1) if outputs.shape[1] == 1 else outputs


def predict_batch(model: keras.Model, images: np.ndarray | tf.Tensor, tta: bool = False) -> np.ndarray:
    """(N, C) probabilities for a batch of [0, 255] images; with `tta`, averaged with the horizontal mirror."""
    probs = class_probabilities(model.predict_on_batch(images))
    if tta:
        probs = (probs + class_probabilities(model.predict_on_batch(tf.reverse(images, axis=[2])))) / 2
    return probs


def check_compatible(model: keras.Model, image_size: tuple[int, int], num_classes: int, what: str) -> None:
    """A checkpoint (or an exported model) must take the data's image size and predict its number of classes."""
    expected = tuple(model.input_shape[1:3])
    if expected != tuple(image_size):
        raise UserError(f"{what}: the checkpoint takes {expected[0]}x{expected[1]} images but data.image_size is "
                        f"{list(image_size)}; pass --set data.image_size=[{expected[0]},{expected[1]}].")
    if num_model_classes(model) != num_classes:
        raise UserError(f"{what}: the checkpoint predicts {num_model_classes(model)} classes but the data has "
                        f"{num_classes}. Received: data with classes {num_classes}")


def predict_split(model: keras.Model, cfg: dict, split: str, tta: bool = False,
                  trained_on: list[str] | None = None) -> tuple[Predictions, str]:
    """Runs the model over one split of the config's data. Returns the predictions and the split used (a missing
    test split falls back to val).

    `trained_on`: the class names the model learned, in class-id order; data whose classes differ (other names, or
    the same names in another order, which would swap the labels) is refused.
    """
    config_lib.check_environment(cfg)
    splits, class_names = source_splits(cfg["data"], cfg["run"]["seed"])
    if trained_on is not None and list(trained_on) != list(class_names):
        raise UserError(f"data: its classes {class_names} are not the ones the run was trained on, in class-id "
                        f"order: {list(trained_on)}; point data.path at photos of the run's classes. "
                        f"Received: {class_names}")
    if split not in splits:
        if split != "test":
            raise UserError(f"--split: the data has no {split!r} split. Received: {split!r}")
        print(f"Notice: {cfg['data']['source']} data at hand has no test split; evaluating on val instead.")
        split = "val"
    check_compatible(model, as_size(cfg["data"]["image_size"]), len(class_names),
                     "--checkpoint" if isinstance(model, keras.Model) else "--model")
    ds = splits[split][0].batch(cfg["data"]["batch_size"]).prefetch(tf.data.AUTOTUNE)
    ids, labels, probs, worst, seconds = [], [], [], [], 0.0
    for images, y, batch_ids in console.first_item_held(ds):
        images = tf.cast(images, tf.float32)
        start = time.perf_counter()
        p = predict_batch(model, images, tta)
        seconds += time.perf_counter() - start
        y = y.numpy()
        predicted = p.argmax(axis=1)
        for i in np.flatnonzero(predicted != y):
            worst.append((float(p[i, predicted[i]]), images[i].numpy().astype(np.uint8), int(y[i]),
                          int(predicted[i]), batch_ids[i].numpy().decode()))
        worst = sorted(worst, key=lambda w: -w[0])[:WORST]
        ids += [i.decode() for i in batch_ids.numpy()]
        labels.append(y)
        probs.append(p)
    if not ids:
        raise UserError(f"--split: the {split} split holds no readable images.")
    return Predictions(ids, np.concatenate(labels), np.concatenate(probs), class_names, seconds, worst), split


# ---------------------------------------------------------------------------------------------------------------
# Metrics, in NumPy


def roc_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every threshold, from (0, 0) to (1, 1)."""
    order = np.argsort(-scores, kind="stable")
    positive, scores = positive[order].astype(bool), scores[order]
    distinct = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # last index of each distinct score
    tps = np.cumsum(positive)[distinct]
    fps = (distinct + 1) - tps
    tpr = np.r_[0, tps / max(positive.sum(), 1)]
    fpr = np.r_[0, fps / max((~positive).sum(), 1)]
    return fpr, tpr


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive scores above a random negative (ties count half)."""
    positive = positive.astype(bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if not n_pos or not n_neg:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(scores)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def compute_metrics(labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy, per-class and macro precision/recall/F1, confusion matrix, log loss and (two classes) ROC-AUC."""
    k = len(class_names)
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {}
    for c, name in enumerate(class_names):
        tp = confusion[c, c]
        precision = tp / confusion[:, c].sum() if confusion[:, c].sum() else 0.0
        recall = tp / confusion[c].sum() if confusion[c].sum() else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": float(precision), "recall": float(recall), "f1": float(f1),
                           "support": int(confusion[c].sum())}
    true_prob = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    metrics = {
        "accuracy": float((predicted == labels).mean()),
        "num_examples": int(len(labels)),
        "class_names": list(class_names),
        "confusion_matrix": confusion.tolist(),
        "per_class": per_class,
        "macro": {m: float(np.mean([per_class[n][m] for n in class_names])) for m in ("precision", "recall", "f1")},
        "log_loss": float(-np.log(true_prob).mean()),
    }
    if k == 2:
        metrics["roc_auc"] = roc_auc(labels == 1, probs[:, 1])
    return metrics


# ---------------------------------------------------------------------------------------------------------------
# Files and plots


def write_predictions_csv(path: Path, preds: Predictions) -> None:
    names = preds.class_names
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "true_label", "predicted_label", "probability", *[f"p_{n}" for n in names]])
        for i, ident in enumerate(preds.ids):
            p = preds.probs[i]
            writer.writerow([ident, names[preds.labels[i]], names[p.argmax()], f"{p.max():.6f}",
                             *[f"{v:.6f}" for v in p]])


def plot_confusion_matrix(metrics: dict, title: str):
    import matplotlib.pyplot as plt

    matrix = np.array(metrics["confusion_matrix"])
    names = metrics["class_names"]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 3, 1.2 * len(names) + 2.5))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {metrics['accuracy']:.4f} on {metrics['num_examples']} images", fontsize=9)
    return fig


def plot_roc(preds: Predictions, metrics: dict, title: str):
    import matplotlib.pyplot as plt

    fpr, tpr = roc_curve(preds.labels == 1, preds.probs[:, 1])
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC {metrics['roc_auc']:.4f}")
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=0.8)
    ax.set_xlabel(f"false positive rate ({preds.class_names[0]} called {preds.class_names[1]})")
    ax.set_ylabel(f"true positive rate ({preds.class_names[1]} found)")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right")
    return fig


def mistake_maps(model: keras.Model, preds: Predictions) -> list[np.ndarray] | None:
    """Grad-CAM of the most confidently wrong images, for the class the model wrongly said: where it saw that class.
    None when there are no mistakes, or no feature map to read."""
    from cnnlab.cam import grad_cam

    if not preds.worst or not isinstance(model, keras.Model):  # an exported model has no gradients to read
        return None
    try:
        maps, _ = grad_cam(model, np.stack([w[1] for w in preds.worst]), class_index=[w[3] for w in preds.worst])
    except UserError:
        return None
    return list(maps)


def plot_worst_mistakes(preds: Predictions, title: str, maps: list[np.ndarray] | None = None):
    """The most confidently wrong images; with `maps`, each with its Grad-CAM overlaid (`mistake_maps`)."""
    import matplotlib.pyplot as plt

    from cnnlab.cam import overlay

    n = max(len(preds.worst), 1)
    columns = min(n, 4)
    rows = math.ceil(n / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    names = preds.class_names
    for i, (ax, (confidence, image, true, predicted, ident)) in enumerate(zip(axes.flat, preds.worst)):
        ax.imshow(overlay(image, maps[i]) if maps is not None else image)
        ax.set_title(f"true {names[true]}, said {names[predicted]}\np={confidence:.3f}  {Path(ident).name[:24]}",
                     fontsize=7)
    where = " (Grad-CAM: where it saw the class it said)" if maps is not None else ""
    fig.suptitle(f"{title}: the {len(preds.worst)} most confidently wrong{where}" if preds.worst
                 else f"{title}: no mistakes", fontsize=9)
    return fig


def plot_training_curves(rows: list[dict], title: str):
    """Loss and accuracy per epoch, training and validation, from a run's history rows."""
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            if rows and f"{prefix}{metric}" in rows[0]:
                ax.plot(epochs, [float(r[f"{prefix}{metric}"]) for r in rows], style, label=f"{prefix or 'train_'}{metric}")
        ax.set_xlabel("epoch")
        ax.set_title(metric)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    return fig


def log_to_tensorboard(log_dir: Path, split: str, metrics: dict, confusion_png: str, step: int) -> None:
    """Eval scalars and the confusion-matrix image, under the `eval` run of the run's TensorBoard logs."""
    writer = tf.summary.create_file_writer(str(log_dir / "eval"))
    with writer.as_default():
        for name in ("accuracy", "log_loss", "roc_auc"):
            if name in metrics and not math.isnan(metrics[name]):
                tf.summary.scalar(f"eval/{split}/{name}", metrics[name], step=step)
        tf.summary.scalar(f"eval/{split}/macro_f1", metrics["macro"]["f1"], step=step)
        image = tf.io.decode_png(tf.io.read_file(confusion_png), channels=3)
        tf.summary.image(f"eval/{split}/confusion_matrix", image[None], step=step)
    writer.close()


def write_evaluation(preds: Predictions, metrics: dict, out_dir: Path, title: str,
                     run: RunDir | None = None, maps: list[np.ndarray] | None = None) -> list[str]:
    """metrics.json, predictions.csv and the plots; returns the paths written."""
    from cnnlab.plots import save_figure

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    write_predictions_csv(out_dir / "predictions.csv", preds)
    written = [str(out_dir / "metrics.json"), str(out_dir / "predictions.csv")]
    written += save_figure(plot_confusion_matrix(metrics, title), out_dir / "confusion_matrix")
    if "roc_auc" in metrics:
        written += save_figure(plot_roc(preds, metrics, title), out_dir / "roc")
    written += save_figure(plot_worst_mistakes(preds, title, maps), out_dir / "worst_mistakes")
    history = run.history() if run is not None else []
    if history:
        curves_title = f"{run.path.name}: loss and accuracy per epoch, training and validation split"
        written += save_figure(plot_training_curves(history, curves_title), out_dir / "training_curves")
    return written


def format_metrics(metrics: dict) -> str:
    lines = [f"{'class':<20} {'precision':>10} {'recall':>10} {'f1':>10} {'support':>8}"]
    for name, m in metrics["per_class"].items():
        lines.append(f"{name[:20]:<20} {m['precision']:>10.4f} {m['recall']:>10.4f} {m['f1']:>10.4f} {m['support']:>8}")
    macro = metrics["macro"]
    lines.append(f"{'macro':<20} {macro['precision']:>10.4f} {macro['recall']:>10.4f} {macro['f1']:>10.4f} "
                 f"{metrics['num_examples']:>8}")
    extra = f"  roc_auc {metrics['roc_auc']:.4f}" if "roc_auc" in metrics else ""
    lines.append(f"accuracy {metrics['accuracy']:.4f}  log_loss {metrics['log_loss']:.4f}{extra}  "
                 f"{metrics['images_per_second']:.1f} images/s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# Entry points


def evaluate(*, run: str | None = None, checkpoint: str | None = None, exported: str | None = None,
             config_files: list[str] = (), overrides: list[str] = (), split: str = "test", out: str | None = None,
             tta: bool | None = None) -> dict:
    """Evaluates a run's best checkpoint, a checkpoint file, or an exported model (export.py) on one split, writes
    the results, returns metrics.

    `tta`: average each prediction with the mirror image's; None: as the config says (`augment.tta`), so a run is
    scored the way its validation picked its best checkpoint. An export with the averaging inside it is not
    averaged again."""
    if exported:
        return _evaluate_exported(exported, config_files, overrides, split, out, tta)
    run_dir = None
    if run:
        run_dir = RunDir.open(run)
        cfg = run_dir.config(overrides)
        ckpt = run_dir.checkpoint("best")
    else:
        ckpt = Path(checkpoint)
        if config_files:
            cfg = config_lib.resolve(list(config_files), list(overrides))
        elif (run_dir := RunDir.of_checkpoint(ckpt)) is not None:  # a checkpoint inside a run knows its config
            cfg = run_dir.config(overrides)
        else:
            raise UserError(f"--checkpoint: {ckpt} is not inside a run directory; pass --config FILE to say how to "
                            "read the data.")
    model = load_checkpoint(ckpt)
    tta = config_lib.flip_tta(cfg) if tta is None else tta
    preds, split = predict_split(model, cfg, split, tta, trained_on=run_dir.class_names() if run_dir else None)
    metrics = _metrics(preds, model, split, str(ckpt), tta)
    default_out = run_dir.eval_dir(split) if run_dir else Path("eval") / ckpt.stem / split
    out_dir = Path(out) if out else default_out
    title = f"{run_dir.path.name if run_dir else ckpt.stem} / {ckpt.name} / {split}{' + flip TTA' if tta else ''}"
    written = write_evaluation(preds, metrics, out_dir, title, run_dir, mistake_maps(model, preds))
    if run_dir is not None:
        log_to_tensorboard(run_dir.logs_dir, split, metrics, str(out_dir / "confusion_matrix.png"),
                           run_dir.state()["best_epoch"])
    _report(metrics, written)
    return metrics


def _evaluate_exported(path: str, config_files: list[str], overrides: list[str], split: str, out: str | None,
                       tta: bool | None) -> dict:
    """`evaluate` of an exported model: the data as the run it came from read it (its config is in the export's
    metadata), with --config and --set on top; results in EXPORT/eval/<split>."""
    from cnnlab.export import load_exported

    model = load_exported(path)
    tta = model.flip_averaging(tta)
    cfg = config_lib.resolve(list(config_files), list(overrides), base=model.metadata["config"])
    preds, split = predict_split(model, cfg, split, tta, trained_on=model.class_names)
    metrics = _metrics(preds, model, split, str(model.folder), tta or model.tta)
    metrics["format"] = model.format
    out_dir = Path(out) if out else model.folder / "eval" / split
    title = (f"{Path(model.metadata['run']).name} / {model.format} export / {split}"
             f"{' + flip TTA' if metrics['tta'] else ''}")
    _report(metrics, write_evaluation(preds, metrics, out_dir, title))
    return metrics


def _metrics(preds: Predictions, model, split: str, source: str, tta: bool) -> dict:
    metrics = compute_metrics(preds.labels, preds.probs, preds.class_names)
    metrics.update({
        "split": split, "checkpoint": source, "tta": tta, "params": int(model.count_params()),
        "images_per_second": len(preds.ids) / preds.seconds if preds.seconds else float("nan"),
    })
    return metrics


def _report(metrics: dict, written: list[str]) -> None:
    print(format_metrics(metrics))
    for path in written:
        print(f"Wrote {path}")


def format_comparison(results: dict[str, dict]) -> str:
    """One row per evaluated run: params, accuracy, AUC, images/s."""
    header = f"{'run':<36} {'split':>6} {'params':>12} {'accuracy':>9} {'roc_auc':>8} {'img/s':>9}"
    lines = [header, "-" * len(header)]
    for name, m in results.items():
        auc = f"{m['roc_auc']:.4f}" if "roc_auc" in m else "-"
        lines.append(f"{name[:36]:<36} {m['split']:>6} {m['params']:>12,} {m['accuracy']:>9.4f} {auc:>8} "
                     f"{m['images_per_second']:>9.1f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# predict


def image_files(target: str) -> list[str]:
    """The image files of a path: the file itself, or every image under a folder (sorted, hidden ones skipped)."""
    path = Path(target)
    if path.is_file():
        return [str(path)]
    if not path.is_dir():
        raise UserError(f"IMAGE_OR_FOLDER: no such file or folder: {target}")
    files, _ = find_images(str(path))
    if not files:
        raise UserError(f"IMAGE_OR_FOLDER: {target} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return files


def predict_files(model: keras.Model, files: list[str], class_names: list[str], max_megapixels: float,
                  batch_size: int = 32, tta: bool = False) -> tuple[list[dict], dict[str, str]]:
    """Label and probabilities for each readable file (read exactly as in training: `images.read_image`); with
    `tta`, averaged with the mirror image's.

    Returns:
        The rows, and the files that were not read, each with the reason.
    """
    size = tuple(model.input_shape[1:3])
    rows, unreadable, batch, batch_files = [], {}, [], []

    def flush():
        if batch:
            probs = predict_batch(model, tf.cast(tf.stack(batch), tf.float32), tta)
            for f, p in zip(batch_files, probs):
                rows.append({"file": f, "label": class_names[p.argmax()], "probability": float(p.max()),
                             **{f"p_{n}": float(v) for n, v in zip(class_names, p)}})
            batch.clear()
            batch_files.clear()

    for f in files:
        try:
            batch.append(read_image(f, size, max_megapixels))
            batch_files.append(f)
        except UnreadableImage as e:
            unreadable[f] = e.reason
        if len(batch) == batch_size:
            flush()
    flush()
    return rows, unreadable
