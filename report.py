"""Compare model configs by cost: parameters and multiply-accumulates per image, layer by layer or side by side.

    python report.py configs/cats_vs_dogs_standard.yaml configs/cats_vs_dogs_separable.yaml
    python report.py configs/cats_vs_dogs_*.yaml --set data.image_size=[224,224]
    python report.py configs/cats_vs_dogs_separable.yaml --layers      # the per-layer table of each

Each config is one model (unlike train.py, where several --config files layer into one). Transfer configs are
built with random backbone weights: costs do not depend on them.
"""

from __future__ import annotations

from cnnlab import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="report.py", description=__doc__,
                                formatter_class=cli.argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="one YAML config per model")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override a key in every config, e.g. --set data.image_size=[160,160]")
    parser.add_argument("--num-classes", type=int, default=2, help="classes of the head (default 2)")
    parser.add_argument("--layers", action="store_true", help="also print each model's per-layer table")
    args = parser.parse_args(argv)

    from cnnlab.report import compare_configs

    print(compare_configs(args.configs, args.overrides, args.num_classes, per_layer=args.layers))
    return 0


if __name__ == "__main__":
    cli.run(main)
