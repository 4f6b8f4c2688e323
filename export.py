"""Export a run's best model for use outside this project: SavedModel, TensorFlow Lite (float or int8), ONNX.

    python export.py --run runs/<name>                                  # RUN_DIR/export/saved_model
    python export.py --run runs/<name> --format tflite --format tflite_int8
    python export.py --run runs/<name> --format onnx --out exported/    # needs requirements-onnx.txt

Each format goes into its own folder with a metadata.json: class names, input (uint8 pixels at the run's image
size), output (class probabilities), how to read images, and whether flip averaging is inside. Check an export with
the same tools as a checkpoint:

    python evaluate.py --model runs/<name>/export/tflite_int8 --split val
    python predict.py photos/ --model runs/<name>/export/tflite_int8
"""

from __future__ import annotations

from cnnlab import cli

FORMAT_NAMES = ("saved_model", "tflite", "tflite_int8", "onnx")  # cnnlab.export.FORMATS, without importing TF


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="export.py", description=__doc__,
                                formatter_class=cli.argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, metavar="RUN_DIR", help="a run directory (its best checkpoint)")
    parser.add_argument("--format", action="append", choices=FORMAT_NAMES, dest="formats",
                        help="repeat for several (default: saved_model)")
    parser.add_argument("--out", metavar="DIR", help="where the format folders go (default RUN_DIR/export)")
    parser.add_argument("--calibration-images", type=int, default=300, metavar="N",
                        help="training images int8 quantization calibrates on (default 300)")
    parser.add_argument("--tta", action=cli.argparse.BooleanOptionalAction, default=None,
                        help="put flip averaging inside the model (default: as the run's augment.tta)")
    parser.add_argument("--overwrite", action="store_true", help="replace exports already in --out")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override the run's config, e.g. --set data.path=photos when its photos moved")
    args = parser.parse_args(argv)

    from cnnlab.export import export_run
    from cnnlab.runs import RunDir

    run = RunDir.open(args.run)
    for folder in export_run(run, args.formats or ["saved_model"], args.out, overrides=args.overrides, tta=args.tta,
                             calibration_images=args.calibration_images, overwrite=args.overwrite):
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        print(f"Wrote {folder} ({size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    cli.run(main)
