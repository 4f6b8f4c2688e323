"""Plot what convolution filters are and what they learn: kernels, feature maps, classic filters, before vs after.

    python visualize_filters.py --run runs/<name>                      # the run's best checkpoint
    python visualize_filters.py --run runs/<name> --layer stage2_block1_conv --image my_cat.jpg
    python visualize_filters.py --checkpoint model.keras --image dog.jpg
    python visualize_filters.py --config configs/cats_vs_dogs_vgg16.yaml --set model.transfer.weights=vgg16_notop.h5

Figures go to RUN/figures/ for a run (or a checkpoint inside one), else to ./figures/, as PNG (and SVG with --svg);
each path is printed. Kernel tiles carry their filter numbers; feature maps share one colour scale.
"""

from __future__ import annotations

from pathlib import Path

from cnnlab import cli


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="visualize_filters.py", description=__doc__,
                                formatter_class=cli.argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", metavar="RUN_DIR", help="a run directory (best checkpoint; initial one for before/after)")
    source.add_argument("--checkpoint", metavar="FILE", help="a .keras model file")
    source.add_argument("--config", action="append", metavar="FILE",
                        help="build the model of a config (untrained, or a transfer model with its weights)")
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                        help="override a config key (with --config or --run)")
    parser.add_argument("--layer", help="the conv layer to show (default: the first one)")
    parser.add_argument("--image", help="an image for feature maps and classic filters (default: the run's first "
                                        "validation image, when its data is at hand)")
    parser.add_argument("--scale", choices=["tile", "global"], default="tile",
                        help="scale each kernel tile on its own (default) or all with one scale")
    parser.add_argument("--max-filters", type=int, default=64, help="show at most this many filters (default 64)")
    parser.add_argument("--svg", action="store_true", help="write SVG files too")
    parser.add_argument("--out", help="output folder")
    args = parser.parse_args(argv)

    from cnnlab.config import load_defaults, resolve
    from cnnlab.data import load_image, sample_image
    from cnnlab.errors import UserError
    from cnnlab.modeling import build_model
    from cnnlab.runs import RunDir, load_checkpoint
    from cnnlab import plots
    from cnnlab.visualize import write_filter_figures

    cfg, initial = None, None
    if args.run:
        run = RunDir.open(args.run)
        cfg = run.config(args.overrides)
        model = run.load("best")
        initial = run.load("initial") if run.has_checkpoint("initial") else None
        name, out = run.path.name, Path(args.out or run.figures_dir)
    elif args.checkpoint:
        model = load_checkpoint(args.checkpoint)
        run = RunDir.of_checkpoint(args.checkpoint)
        name = f"{run.path.name}/{Path(args.checkpoint).stem}" if run else Path(args.checkpoint).stem
        out = Path(args.out or (run.figures_dir if run else "figures"))
    else:
        cfg = resolve(args.config, args.overrides)
        model = build_model(cfg, num_classes=2)
        name, out = Path(args.config[-1]).stem, Path(args.out or "figures")

    size = tuple(model.input_shape[1:3])
    image, label = None, ""
    if args.image:
        budget = (cfg or load_defaults())["data"]["max_image_megapixels"]
        image, label = load_image(args.image, size, budget), args.image
    elif cfg is not None:
        found = sample_image({**cfg["data"], "image_size": list(size)}, seed=cfg["run"]["seed"])
        if found is not None:
            image, label = found
    try:
        written = write_filter_figures(model, name, out, layer_name=args.layer, image=image, image_label=label,
                                       initial=initial, per_tile=args.scale == "tile", svg=args.svg,
                                       max_filters=args.max_filters)
    except ValueError as e:
        raise UserError(f"--layer: {e}") from None
    for path in written:
        print(f"Wrote {path}")
    layer = plots.find_conv_layer(model, args.layer)
    summary = plots.layer_structure_summary(layer)
    if summary:
        print(f"{layer.name}: {summary}")
    if image is None:
        print("No image given (--image), so no feature maps or classic-filter comparison.")
    return 0


if __name__ == "__main__":
    cli.run(main)
