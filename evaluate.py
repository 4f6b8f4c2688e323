"""Evaluate checkpoints: metrics, confusion matrix, ROC, worst mistakes, training curves; compare runs.

    python evaluate.py --run runs/<name>                         # best checkpoint, test split (or val)
    python evaluate.py --run runs/<name> --split val --tta       # + horizontal-flip test-time augmentation
    python evaluate.py --run runs/<name> --set data.path=other_photos
    python evaluate.py --checkpoint model.keras --config configs/cats_vs_dogs_standard.yaml
    python evaluate.py --model runs/<name>/export/tflite_int8 --split val   # an exported model (export.py)
    python evaluate.py --run runs/a --run runs/b                 # one comparison table
"""

from __future__ import annotations

from pathlib import Path

from cnnlab import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=cli.argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", action="append", metavar="RUN_DIR", help="a run directory; repeat to compare runs")
    source.add_argument("--checkpoint", metavar="FILE", help="a .keras checkpoint")
    source.add_argument("--model", metavar="EXPORT", help="an exported model's folder (export.py), or its file")
    cli.add_config_arguments(parser)
    parser.add_argument("--split", choices=["test", "val"], default="test",
                        help="test (default; val when the data has no test split) or val")
    parser.add_argument("--tta", action=cli.argparse.BooleanOptionalAction, default=None,
                        help="average each prediction with the mirror image's (default: as the run's augment.tta)")
    parser.add_argument("--out", help="output folder (default RUN_DIR/eval/<split>)")
    args = parser.parse_args(argv)

    from cnnlab.evaluation import evaluate, format_comparison

    if args.checkpoint or args.model:
        evaluate(checkpoint=args.checkpoint, exported=args.model, config_files=args.config,
                 overrides=args.overrides, split=args.split, out=args.out, tta=args.tta)
        return 0
    if args.out and len(args.run) > 1:
        parser.error("--out takes one run; each run writes to its own RUN_DIR/eval/<split>")
    results = {}
    for run in args.run:
        print(f"== {run}")
        results[Path(run).name] = evaluate(run=run, overrides=args.overrides, split=args.split, out=args.out,
                                           tta=args.tta)
    if len(results) > 1:
        print(format_comparison(results))
    return 0


if __name__ == "__main__":
    cli.run(main)
