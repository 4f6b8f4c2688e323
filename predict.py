"""Classify your own photos with a trained model.

    python predict.py my_cat.jpg --run runs/<name>
    python predict.py photos/ --run runs/<name> --csv predictions.csv
    python predict.py photos/ --checkpoint model.keras --class-names cats,dogs
    python predict.py photos/ --model runs/<name>/export/tflite_int8     # an exported model (export.py)

Images are decoded and resized exactly as in training; the model carries its own preprocessing. A run that
validated on flip-averaged predictions (`augment.tta: flip`) predicts the same way unless told --no-tta.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from cnnlab import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="predict.py", description=__doc__,
                                formatter_class=cli.argparse.RawDescriptionHelpFormatter)
    cli.add_images_and_model_arguments(parser, exported=True)
    parser.add_argument("--class-names", help="comma-separated class names, for a checkpoint outside a run")
    parser.add_argument("--csv", metavar="FILE", help="also write the predictions to a CSV file")
    parser.add_argument("--tta", action=cli.argparse.BooleanOptionalAction, default=None,
                        help="average each prediction with the mirror image's (default: as the run's augment.tta)")
    args = parser.parse_args(argv)

    from cnnlab.config import flip_tta, load_defaults
    from cnnlab.errors import UserError
    from cnnlab.evaluation import image_files, num_model_classes, predict_files
    from cnnlab.runs import RunDir, load_checkpoint

    files = image_files(args.target)
    if args.model:
        from cnnlab.export import load_exported

        model = load_exported(args.model)
        tta, trained_on = model.flip_averaging(args.tta), model.class_names
        data_cfg = (model.metadata.get("config") or load_defaults())["data"]
    else:
        ckpt = RunDir.open(args.run).checkpoint("best") if args.run else Path(args.checkpoint)
        model = load_checkpoint(ckpt)
        run = RunDir.of_checkpoint(ckpt)  # a checkpoint inside a run knows its class names and how it validated
        cfg = run.config() if run else load_defaults()
        tta = args.tta if args.tta is not None else flip_tta(cfg)
        trained_on = run.class_names() if run else None
        data_cfg = cfg["data"]
    n = num_model_classes(model)
    if args.class_names:
        class_names = [c.strip() for c in args.class_names.split(",")]
    elif trained_on:
        class_names = trained_on
    else:
        class_names = [f"class_{i}" for i in range(n)]
    if len(class_names) != n:
        raise UserError(f"--class-names: the model predicts {n} classes. Received: {len(class_names)} names")

    rows, unreadable = predict_files(model, files, class_names, data_cfg["max_image_megapixels"], tta=tta)
    if len(files) == 1 and unreadable:
        raise UserError(f"IMAGE_OR_FOLDER: {files[0]} {unreadable[files[0]]}.")
    for f, reason in unreadable.items():
        print(f"skipped: {f} {reason}", file=sys.stderr)
    for row in rows:
        print(f"{row['label']:<12} {row['probability']:.4f}  {row['file']}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["file", "label", "probability"])
            writer.writeheader()
            writer.writerows(rows)
        print(f"Wrote {args.csv}")
    return 0


if __name__ == "__main__":
    cli.run(main)
