"""What exporting costs and buys: for each run, every export format against the Keras checkpoint it came from.

    python bench/export.py --run runs/standard --run runs/separable        # the val split of each run's data
    python bench/export.py --run runs/standard --formats tflite tflite_int8 --single 300

One table per run: the file's size, accuracy on the split, how often the export predicts the Keras model's class
(and the largest probability difference), single-image speed (one image per call, median latency, as a phone or a
request handler runs it; the models take turns in rounds, so the ratios hold on a shared, noisy machine) and batch
speed (the run's batch size, as evaluate.py runs it over the split, one model after the other). The exports are written to a
temporary folder; the run is not touched.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from export import FORMAT_NAMES  # noqa: E402  (export.py's list: no TensorFlow import before the quiet start)


def single_image_rates(models: list, images: np.ndarray, calls: int, rounds: int = 10) -> list[tuple[float, float]]:
    """Per model: the median milliseconds of one call on one image, and the images/s that makes. The models take
    turns, `calls / rounds` calls each per round, so a slow spell of a shared machine falls on all of them."""
    for model in models:  # warm-up: graphs traced, tensors allocated
        for image in images[:2]:
            model.predict_on_batch(image[None])
    times = [[] for _ in models]
    for r in range(rounds):
        for m, model in enumerate(models):
            for i in range(max(1, calls // rounds)):
                image = images[(r + i) % len(images)][None]
                start = time.perf_counter()
                model.predict_on_batch(image)
                times[m].append(time.perf_counter() - start)
    return [(1000 * float(np.median(t)), 1 / float(np.median(t))) for t in times]


def file_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def bench_run(run_path: str, formats: list[str], split: str, calls: int, calibration_images: int) -> None:
    from cnnlab.config import flip_tta
    from cnnlab.evaluation import predict_split
    from cnnlab.export import export_run, load_exported
    from cnnlab.runs import RunDir

    run = RunDir.open(run_path)
    cfg = run.config()
    tta = flip_tta(cfg)
    keras_model = run.load("best")
    reference, split = predict_split(keras_model, cfg, split, tta, trained_on=run.class_names())
    # single-image calls cycle through the split's most confidently wrong images (up to 16): real photos at hand
    images = np.stack([w[1] for w in reference.worst] or [np.zeros((*keras_model.input_shape[1:3], 3), np.uint8)])
    rows = [("keras (.keras file)", file_size(run.checkpoint("best")), reference, 1.0, 0.0)]
    models = [keras_model]
    with tempfile.TemporaryDirectory() as work:
        folders = export_run(run, formats, work, tta=tta, calibration_images=calibration_images)
        for folder in folders:
            model = load_exported(folder)
            preds, _ = predict_split(model, cfg, split, False, trained_on=run.class_names())
            assert preds.ids == reference.ids
            agree = float((preds.predicted == reference.predicted).mean())
            diff = float(np.abs(preds.probs - reference.probs).max())
            size = file_size(folder / model.metadata["file"] if model.metadata["file"] else folder)
            rows.append((model.format, size, preds, agree, diff))
            models.append(model)
        rates = single_image_rates(models, images, calls)
    rows = [(*row, *rate) for row, rate in zip(rows, rates)]

    print(f"\n{run.path.name}: {len(reference.ids)} {split} images at {keras_model.input_shape[1]}x"
          f"{keras_model.input_shape[2]}{', flip TTA inside' if tta else ''}; single image: median of {calls} calls, "
          f"the formats taking turns; "
          f"batch: {cfg['data']['batch_size']} images per call")
    header = (f"{'format':<20} {'MB':>7} {'size':>6} {'accuracy':>9} {'Δ points':>9} {'agree':>7} {'max |Δp|':>9} "
              f"{'1-img ms':>9} {'1-img/s':>8} {'x keras':>8} {'batch/s':>8} {'x keras':>8}")
    print(header)
    print("-" * len(header))
    accuracies = [float((preds.predicted == preds.labels).mean()) for _, _, preds, *_ in rows]
    batch_rates = [len(preds.ids) / preds.seconds for _, _, preds, *_ in rows]
    base_size, base_acc, base_rate, base_batch = rows[0][1], accuracies[0], rows[0][6], batch_rates[0]
    for (name, size, preds, agree, diff, ms, rate), accuracy, batch_rate in zip(rows, accuracies, batch_rates):
        print(f"{name:<20} {size / 1e6:>7.2f} {size / base_size:>6.2f} {accuracy:>9.4f} "
              f"{100 * (accuracy - base_acc):>+9.2f} {agree:>7.4f} {diff:>9.2e} {ms:>9.2f} {rate:>8.1f} "
              f"{rate / base_rate:>8.2f} {batch_rate:>8.1f} {batch_rate / base_batch:>8.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="RUN_DIR", help="repeat for several runs")
    parser.add_argument("--formats", nargs="+", default=list(FORMAT_NAMES), choices=FORMAT_NAMES)
    parser.add_argument("--split", default="val", choices=["val", "test"])
    parser.add_argument("--single", type=int, default=200, metavar="CALLS", help="single-image calls to time")
    parser.add_argument("--calibration-images", type=int, default=300)
    args = parser.parse_args(argv)

    from cnnlab.console import machine_summary, start_tensorflow

    start_tensorflow()
    print(machine_summary())
    from cnnlab.errors import UserError

    try:
        for run in args.run:
            bench_run(run, args.formats, args.split, args.single, args.calibration_images)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
