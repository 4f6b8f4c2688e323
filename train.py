"""Train a CNN from YAML configs.

    python train.py --config configs/smoke.yaml
    python train.py --config configs/cats_vs_dogs_standard.yaml --set data.source=folder --set data.path=DIR
    python train.py --resume runs/<name>          # continue an interrupted run
"""

from __future__ import annotations

from cnnlab import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=cli.argparse.RawDescriptionHelpFormatter)
    cli.add_config_arguments(parser)
    parser.add_argument("--resume", nargs="?", const=True, metavar="RUN_DIR",
                        help="continue an interrupted run: RUN_DIR, or the run.dir/run.name of the config")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run of the same run.name")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--dry-run", action="store_true", help="build the data pipeline and model, print, exit")
    args = parser.parse_args(argv)

    from cnnlab.config import dump
    from cnnlab.runs import config_for_training

    cfg = config_for_training(args.config, args.overrides, args.resume)
    if args.print_config:
        print(dump(cfg), end="")
        return 0
    from cnnlab.training import train  # imports TensorFlow: only once the config is known to be good

    train(cfg, args.config, resume=args.resume, overwrite=args.overwrite, dry_run=args.dry_run)
    return 0


if __name__ == "__main__":
    cli.run(main)
