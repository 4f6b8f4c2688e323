"""Where a trained network looks: Grad-CAM (or gradient saliency) maps over your images, for any run or checkpoint.

    python gradcam.py my_cat.jpg --run runs/<name>
    python gradcam.py photos/ --run runs/<name>                 # one figure per image and a grid of them all
    python gradcam.py photos/ --run runs/<name> --layer vgg16/block5_conv3
    python gradcam.py photos/ --checkpoint model.keras --method smoothgrad
    python gradcam.py photos/ --run runs/<name> --method gradcam++
    python gradcam.py photos/ --run runs/a --run runs/b --run runs/c   # one figure: each run's map, side by side

The map is taken from the last spatial conv feature map before the classifier head, found automatically (also inside
a nested VGG16 / ResNet50 backbone), or from --layer. Red is where the evidence for the predicted class (or --class)
lies. Figures go to RUN/figures/gradcam/ for a run, else to ./figures/gradcam/; the grid's path is printed. With
several --run, one comparison figure (photo, then each run's map of its own predicted class) goes to
./figures/gradcam/.
"""

from __future__ import annotations

import time
from pathlib import Path

from cnnlab import cli

METHODS = ("gradcam", "gradcam++", "saliency", "smoothgrad")


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="gradcam.py", description=__doc__,
                                formatter_class=cli.argparse.RawDescriptionHelpFormatter)
    cli.add_images_and_model_arguments(parser, several_runs=True)
    parser.add_argument("--layer", help="the feature map to explain, e.g. vgg16/block5_conv3 (default: the last one)")
    parser.add_argument("--method", choices=METHODS, default="gradcam",
                        help="gradcam (default), gradcam++, saliency, smoothgrad")
    parser.add_argument("--class", dest="class_name", metavar="NAME",
                        help="explain this class instead of the predicted one")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--grid", type=int, default=None,
                        help="at most this many images in the grid (default 48; comparing runs: 8 rows)")
    args = parser.parse_args(argv)

    import numpy as np

    from cnnlab.cam import comparison_figure, explain, grid_figure, predicted_classes, save_pair
    from cnnlab.config import load_defaults
    from cnnlab.errors import UserError
    from cnnlab.evaluation import class_probabilities, image_files, num_model_classes
    from cnnlab.images import UnreadableImage, read_image
    from cnnlab.plots import save_figure
    from cnnlab.runs import RunDir, load_checkpoint

    files = image_files(args.target)
    # Every model to explain (several --run compare them), with its class names.
    runs = [RunDir.open(r) for r in args.run] if args.run else [RunDir.of_checkpoint(args.checkpoint)]
    models = [run.load("best") for run in runs] if args.run else [load_checkpoint(args.checkpoint)]
    names = [(run.class_names() if run else None) or [f"class_{i}" for i in range(max(num_model_classes(m), 2))]
             for run, m in zip(runs, models)]
    for class_names in names if args.class_name is not None else []:
        if args.class_name not in class_names:
            raise UserError(f"--class: the model's classes are {class_names}. Received: {args.class_name!r}")
    budget = (runs[0].config() if runs[0] else load_defaults())["data"]["max_image_megapixels"]

    def read(paths: list[str], size) -> tuple[list[str], np.ndarray | None]:
        """The readable files among `paths` and their pixels at `size`, as training reads them."""
        kept, images = [], []
        for f in paths:
            try:
                images.append(read_image(f, size, budget))
                kept.append(f)
            except UnreadableImage as e:
                if len(files) == 1:
                    raise UserError(f"IMAGE_OR_FOLDER: {e}") from None
                print(f"skipped: {e}")
        return kept, (np.stack(images) if images else None)

    def maps_of(model, class_names, images) -> tuple[np.ndarray, list[str]]:
        """The maps of a batch and a caption for each: the predicted class and its probability."""
        class_index = None if args.class_name is None else class_names.index(args.class_name)
        maps, probs = explain(model, images, args.method, class_index, args.layer)
        return maps, [f"{class_names[k]} {p[k]:.2f}" for k, p in zip(predicted_classes(probs),
                                                                     class_probabilities(probs))]

    what = args.method + (f" for {args.class_name}" if args.class_name else " of the predicted class")
    tag = args.method.replace("++", "pp")  # in file names
    if len(models) > 1:  # one figure: a row per photo, the photo and then each run's map
        shown, photos = read(files[:args.grid or 8], models[0].input_shape[1:3])
        if not shown:
            raise UserError(f"IMAGE_OR_FOLDER: none of the images in {args.target} could be read.")
        columns = []
        for run, model, class_names in zip(runs, models, names):
            _, images = read(shown, model.input_shape[1:3]) if model is not models[0] else (shown, photos)
            columns.append((run.path.name, images, *maps_of(model, class_names, images)))
        out = Path(args.out or Path("figures") / "gradcam")
        out.mkdir(parents=True, exist_ok=True)
        fig = comparison_figure(photos, [Path(f).name for f in shown], columns, f"Where each run looks: {what}")
        for path in save_figure(fig, out / f"compare_{tag}"):
            print(f"Wrote {path}")
        return 0

    run, model, class_names = runs[0], models[0], names[0]
    out = Path(args.out or ((run.figures_dir if run else Path("figures")) / "gradcam"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    shown_images, shown_maps, shown_captions, written = [], [], [], 0
    for start in range(0, len(files), 16):
        kept, images = read(files[start:start + 16], model.input_shape[1:3])
        if not kept:
            continue
        maps, captions = maps_of(model, class_names, images)
        for f, image, heat, text in zip(kept, images, maps, captions):
            save_pair(out / f"{Path(f).stem}_{tag}.png", image, heat, text)
            written += 1
            if len(shown_images) < (args.grid or 48):
                shown_images.append(image)
                shown_maps.append(heat)
                shown_captions.append(f"{Path(f).name[:18]}\n{text}")
    seconds = time.perf_counter() - started
    print(f"Wrote {written} figure{'s' if written != 1 else ''} (photo | {args.method} map) to {out}: "
          f"{written / seconds:.1f} images/s")
    if len(files) > 1 and shown_images:
        name = run.path.name if run else Path(args.checkpoint).stem
        for path in save_figure(grid_figure(np.stack(shown_images), np.stack(shown_maps), shown_captions,
                                            f"{name}: {what}"), out / f"grid_{tag}"):
            print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    cli.run(main)
