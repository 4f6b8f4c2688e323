"""Where a trained network looks: Grad-CAM (or gradient saliency) maps over your images, for any run or checkpoint.

    python gradcam.py my_cat.jpg --run runs/<name>
    python gradcam.py photos/ --run runs/<name>                 # one figure per image and a grid of them all
    python gradcam.py photos/ --run runs/<name> --layer vgg16/block5_conv3
    python gradcam.py photos/ --checkpoint model.keras --method smoothgrad

The map is taken from the last spatial conv feature map before the classifier head, found automatically (also inside
a nested VGG16 / ResNet50 backbone), or from --layer. Red is where the evidence for the predicted class (or --class)
lies. Figures go to RUN/figures/gradcam/ for a run, else to ./figures/gradcam/; the grid's path is printed.
"""

from __future__ import annotations

import time
from pathlib import Path

from cnnlab import cli

METHODS = ("gradcam", "saliency", "smoothgrad")


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="gradcam.py", description=__doc__,
                                formatter_class=cli.argparse.RawDescriptionHelpFormatter)
    cli.add_images_and_model_arguments(parser)
    parser.add_argument("--layer", help="the feature map to explain, e.g. vgg16/block5_conv3 (default: the last one)")
    parser.add_argument("--method", choices=METHODS, default="gradcam", help="gradcam (default), saliency, smoothgrad")
    parser.add_argument("--class", dest="class_name", metavar="NAME",
                        help="explain this class instead of the predicted one")
    parser.add_argument("--out", help="output folder")
    parser.add_argument("--grid", type=int, default=48, help="at most this many images in the grid (default 48)")
    args = parser.parse_args(argv)

    import numpy as np

    from cnnlab.cam import grad_cam, grid_figure, predicted_classes, saliency, save_pair
    from cnnlab.config import load_defaults
    from cnnlab.errors import UserError
    from cnnlab.evaluation import class_probabilities, image_files, num_model_classes
    from cnnlab.images import UnreadableImage, read_image
    from cnnlab.plots import save_figure
    from cnnlab.runs import RunDir, load_checkpoint

    files = image_files(args.target)
    run = RunDir.open(args.run) if args.run else RunDir.of_checkpoint(args.checkpoint)
    model = run.load("best") if args.run else load_checkpoint(args.checkpoint)
    n = num_model_classes(model)
    class_names = (run.class_names() if run else None) or [f"class_{i}" for i in range(max(n, 2))]
    class_index = None
    if args.class_name is not None:
        if args.class_name not in class_names:
            raise UserError(f"--class: the model's classes are {class_names}. Received: {args.class_name!r}")
        class_index = class_names.index(args.class_name)
    if args.layer is not None and args.method != "gradcam":
        raise UserError(f"--layer: only Grad-CAM reads a layer; saliency maps are of the input. Received: --method "
                        f"{args.method}")
    budget = (run.config() if run else load_defaults())["data"]["max_image_megapixels"]
    out = Path(args.out or ((run.figures_dir if run else Path("figures")) / "gradcam"))
    out.mkdir(parents=True, exist_ok=True)

    size = tuple(model.input_shape[1:3])
    started = time.perf_counter()
    shown_images, shown_maps, shown_captions, written = [], [], [], 0
    for start in range(0, len(files), 16):
        batch, names = [], []
        for f in files[start:start + 16]:
            try:
                batch.append(read_image(f, size, budget))
                names.append(f)
            except UnreadableImage as e:
                if len(files) == 1:
                    raise UserError(f"IMAGE_OR_FOLDER: {e}") from None
                print(f"skipped: {e}")
        if not batch:
            continue
        images = np.stack(batch)
        if args.method == "gradcam":
            maps, probs = grad_cam(model, images, class_index, layer=args.layer)
        else:
            maps, probs = saliency(model, images, class_index, smooth=8 if args.method == "smoothgrad" else 0)
        for f, image, heat, k, p in zip(names, images, maps, predicted_classes(probs), class_probabilities(probs)):
            text = f"{class_names[k]} {p[k]:.2f}"
            save_pair(out / f"{Path(f).stem}_{args.method}.png", image, heat, text)
            written += 1
            if len(shown_images) < args.grid:
                shown_images.append(image)
                shown_maps.append(heat)
                shown_captions.append(f"{Path(f).name[:18]}\n{text}")
    seconds = time.perf_counter() - started
    print(f"Wrote {written} figure{'s' if written != 1 else ''} (photo | {args.method} map) to {out}: "
          f"{written / seconds:.1f} images/s")
    if len(files) > 1 and shown_images:
        name = run.path.name if run else Path(args.checkpoint).stem
        title = f"{name}: {args.method}" + (f" for {args.class_name}" if args.class_name else " of the predicted class")
        for path in save_figure(grid_figure(np.stack(shown_images), np.stack(shown_maps), shown_captions, title),
                                out / f"grid_{args.method}"):
            print(f"Wrote {path}")
    return 0


if __name__ == "__main__":
    cli.run(main)
