"""The figures of `visualize_filters.py`: which ones apply to a model, drawn and written to a folder."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from cnnlab import plots


def write_filter_figures(model: keras.Model, model_name: str, out_dir: Path, *, layer_name: str | None = None,
                         image: np.ndarray | None = None, image_label: str = "", initial: keras.Model | None = None,
                         per_tile: bool = True, svg: bool = False, max_filters: int = 64) -> list[str]:
    """Writes every figure that applies and returns the paths.

    - `kernels`: the chosen layer's kernels (first conv layer by default): RGB tiles, or per-channel tiles for
      depthwise kernels, or the C_out x C_in mixing matrix for a 1x1 conv.
    - `kernels_by_channel`: one grayscale panel per input channel (KxK kernels).
    - `feature_maps` (with an image): the layer's activations for it, the input beside them.
    - `classic_filters` (with an image, first layer only): Sobel, blur, Laplacian and edge filters applied to the
      image, and the learned filters most like them.
    - `before_after` (with the initial model, for a layer that trains): kernels at initialisation and trained. A
      layer held fixed (`model.first_conv_trainable: false`) has none: its kernels are its start.
    """
    layer = plots.find_conv_layer(model, layer_name)
    kind = plots.kernel_kind(layer)
    stem = f"{layer.name}"
    written: list[str] = []

    def save(fig, name):
        written.extend(plots.save_figure(fig, out_dir / f"{stem}_{name}", svg=svg))

    if kind == "pointwise":
        save(plots.plot_mixing_matrix(layer, model_name), "mixing_matrix")
    else:
        save(plots.plot_kernels(layer, model_name, per_tile, max_filters), "kernels")
        if kind == "standard":
            save(plots.plot_kernels_by_channel(layer, model_name, per_tile, max_filters), "kernels_by_channel")
    if image is not None:
        save(plots.plot_feature_maps(model, layer, image, model_name), "feature_maps")
        first = plots.find_conv_layer(model)
        if layer is first and kind == "standard":
            kernel = plots.layer_kernel(layer)
            title = (f"Classic filters on {Path(image_label).name or 'the input'} (NumPy reference conv2d), and the "
                     f"most similar of {model_name} / {layer.name}'s {kernel.shape[-1]} learned filters (|cosine|)")
            save(plots.plot_classic_filters(image, kernel, title), "classic_filters")
    if initial is not None and kind != "pointwise" and layer.trainable:
        before = plots.layer_kernel(plots.find_conv_layer(initial, layer.name))
        title = f"{model_name} / {layer.name}: kernels before and after training ({'per-tile' if per_tile else 'global'} scale)"
        save(plots.plot_before_after(before, plots.layer_kernel(layer), title, per_tile, max_filters), "before_after")
    return written
