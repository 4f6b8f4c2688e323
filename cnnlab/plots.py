"""Pictures of filters: kernel grids, channel-mixing matrices, feature maps, classic filters, before vs after.

Kernel tiles are scaled symmetrically around zero, so a weight of 0 is mid-gray, positive weights are lighter and
negative ones darker (in colour tiles, per RGB channel). The grids are plain NumPy arrays (`kernel_grid`), which is
what TensorBoard receives each epoch; the `plot_*` functions draw them with titles into Matplotlib figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import keras  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

from cnnlab import conv_math  # noqa: E402
from cnnlab.modeling import all_layers  # noqa: E402

CONV_TYPES = (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D)


# ---------------------------------------------------------------------------------------------------------------
# Finding kernels in a model


def conv_layers(model: keras.Model) -> list[layers.Layer]:
    """Every convolution layer in `model`, nested models included, input side first."""
    return [layer for layer in all_layers(model) if isinstance(layer, CONV_TYPES)]


def find_conv_layer(model: keras.Model, name: str | None = None) -> layers.Layer:
    """The convolution layer called `name`, or the first one; a ValueError lists the names there are."""
    convs = conv_layers(model)
    if not convs:
        raise ValueError(f"The model has no convolution layers. Received: model {model.name!r}")
    if name is None:
        return convs[0]
    for layer in convs:
        if layer.name == name:
            return layer
    names = ", ".join(layer.name for layer in convs[:12]) + (", ..." if len(convs) > 12 else "")
    raise ValueError(f"No convolution layer of that name; layers are: {names}. Received: {name!r}")


def layer_kernel(layer: layers.Layer) -> np.ndarray:
    """The spatial kernel of a conv layer as (K_h, K_w, C_in, C_out); depthwise ones as (K_h, K_w, C, M)."""
    kernel = layer.depthwise_kernel if isinstance(layer, layers.SeparableConv2D) else layer.kernel
    return np.asarray(keras.ops.convert_to_numpy(kernel), dtype=np.float32)


def kernel_kind(layer: layers.Layer) -> str:
    """`"depthwise"`, `"pointwise"` (1x1) or `"standard"`."""
    if isinstance(layer, (layers.DepthwiseConv2D, layers.SeparableConv2D)):
        return "depthwise"
    return "pointwise" if tuple(layer.kernel_size) == (1, 1) else "standard"


# ---------------------------------------------------------------------------------------------------------------
# Grids as arrays


def symmetric_scale(tiles: np.ndarray, per_tile: bool) -> np.ndarray:
    """Maps weights to [0, 1] with 0 at 0.5: divides by the largest |weight| of each tile, or of all tiles.

    Args:
        tiles: (N, ...) one entry per tile.
        per_tile: scale each tile on its own (shows each filter's pattern) or all together (shows which filters
            are strong).
    """
    axes = tuple(range(1, tiles.ndim)) if per_tile else None
    peak = np.max(np.abs(tiles), axis=axes, keepdims=per_tile)
    peak = np.where(peak == 0, 1.0, peak)
    return 0.5 + 0.5 * tiles / peak


def tile_origins(n: int, tile_size: tuple[int, int], columns: int | None = None, zoom: int = 8,
                 gap: int = 1) -> list[tuple[int, int]]:
    """The (row, column) pixel of each tile's top-left corner in `tile_grid`'s layout: row by row, about square."""
    columns = columns or math.ceil(math.sqrt(n))
    th, tw = tile_size[0] * zoom, tile_size[1] * zoom
    return [(gap + (i // columns) * (th + gap), gap + (i % columns) * (tw + gap)) for i in range(n)]


def tile_grid(tiles: np.ndarray, columns: int | None = None, zoom: int = 8, gap: int = 1,
              background: float = 1.0) -> np.ndarray:
    """Lays out (N, h, w[, 3]) tiles in [0, 1] as one image, each tile enlarged `zoom` times (nearest)."""
    n, h, w = tiles.shape[:3]
    channels = tiles.shape[3] if tiles.ndim == 4 else 1
    tiles = tiles.reshape(n, h, w, channels)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    th, tw = h * zoom, w * zoom
    grid = np.full((rows * (th + gap) + gap, columns * (tw + gap) + gap, channels), background, np.float32)
    for i, (top, left) in enumerate(tile_origins(n, (h, w), columns, zoom, gap)):
        grid[top:top + th, left:left + tw] = np.repeat(np.repeat(tiles[i], zoom, axis=0), zoom, axis=1)
    return grid if channels == 3 else grid[..., 0]


def kernel_grid(kernel: np.ndarray, per_tile: bool = True, zoom: int = 8, max_filters: int = 64) -> np.ndarray:
    """One tile per filter: RGB tiles for 3-input-channel kernels, grayscale (channel mean) otherwise.

    Args:
        kernel: (K_h, K_w, C_in, C_out).
        per_tile: scale each tile on its own, or all with one scale.
        zoom: pixels per kernel weight.
        max_filters: show at most this many filters.

    Returns:
        An (H, W, 3) image in [0, 1]; a zero kernel is mid-gray.
    """
    tiles = np.moveaxis(kernel[..., :max_filters], -1, 0)  # (N, K_h, K_w, C_in)
    if tiles.shape[-1] != 3:
        tiles = tiles.mean(axis=-1, keepdims=True)
    scaled = symmetric_scale(tiles, per_tile)
    if scaled.shape[-1] == 1:
        scaled = np.repeat(scaled, 3, axis=-1)
    return tile_grid(scaled, zoom=zoom)


# ---------------------------------------------------------------------------------------------------------------
# Figures


def number_tiles(ax, n: int, tile_size: tuple[int, int], zoom: int = 8, gap: int = 1) -> None:
    """Writes each tile's filter number in its top-left corner of a `tile_grid` image, so that text can point at a
    filter ("#2")."""
    for i, (top, left) in enumerate(tile_origins(n, tile_size, zoom=zoom, gap=gap)):
        ax.text(left + 1, top + 1, str(i), fontsize=6, color="white",
                va="top", ha="left", bbox={"boxstyle": "square,pad=0.1", "facecolor": "black", "alpha": 0.5,
                                           "linewidth": 0})




def _title(model_name: str, layer: layers.Layer, what: str) -> str:
    return f"{model_name} / {layer.name} ({type(layer).__name__}, kernel {'x'.join(map(str, layer_kernel(layer).shape))}): {what}"


def plot_kernels(layer: layers.Layer, model_name: str, per_tile: bool = True, max_filters: int = 64) -> plt.Figure:
    """The layer's kernels as a grid, one tile per filter (RGB for 3-channel kernels)."""
    kernel = layer_kernel(layer)
    if kernel_kind(layer) == "depthwise":
        return plot_depthwise(layer, model_name, per_tile, max_filters)
    grid = kernel_grid(kernel, per_tile, max_filters=max_filters)
    n = min(kernel.shape[-1], max_filters)
    fig, ax = plt.subplots(figsize=(6, 6 * grid.shape[0] / grid.shape[1] + 0.6))
    ax.imshow(grid, interpolation="nearest")
    number_tiles(ax, n, kernel.shape[:2])
    ax.set_axis_off()
    colour = "RGB" if kernel.shape[2] == 3 else f"mean over {kernel.shape[2]} input channels"
    title = _title(model_name, layer, f"{n} filters, {colour}, {'per-tile' if per_tile else 'global'} scale; gray = 0")
    summary = layer_structure_summary(layer)
    ax.set_title(title + (f"\n{summary}" if summary else ""), fontsize=8)
    return fig


def plot_kernels_by_channel(layer: layers.Layer, model_name: str, per_tile: bool = True, max_filters: int = 64,
                            max_channels: int = 8) -> plt.Figure:
    """One grayscale panel per input channel, each with one tile per filter: what each filter does to each channel."""
    kernel = layer_kernel(layer)[..., :max_filters]
    c_in = min(kernel.shape[2], max_channels)
    tiles = np.moveaxis(kernel, -1, 0)  # (N, K, K, C_in)
    scaled = symmetric_scale(tiles, per_tile)
    names = ["R", "G", "B"] if kernel.shape[2] == 3 else [f"in {c}" for c in range(c_in)]
    fig, axes = plt.subplots(1, c_in, figsize=(3.2 * c_in, 3.6), squeeze=False)
    for c, ax in enumerate(axes[0]):
        ax.imshow(tile_grid(scaled[..., c]), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        number_tiles(ax, scaled.shape[0], kernel.shape[:2])
        ax.set_title(f"input channel {names[c]}", fontsize=9)
        ax.set_axis_off()
    fig.suptitle(_title(model_name, layer, "kernels by input channel"), fontsize=8)
    return fig


def plot_depthwise(layer: layers.Layer, model_name: str, per_tile: bool = True, max_filters: int = 64) -> plt.Figure:
    """Depthwise kernels: one grayscale tile per (channel, multiplier): each filters one input channel only."""
    kernel = layer_kernel(layer)  # (K, K, C, M)
    tiles = kernel.reshape(*kernel.shape[:2], -1)[..., :max_filters]  # channel-major, like the layer's outputs
    tiles = np.moveaxis(tiles, -1, 0)
    fig, ax = plt.subplots(figsize=(6, 6.4))
    ax.imshow(tile_grid(symmetric_scale(tiles, per_tile)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    number_tiles(ax, tiles.shape[0], kernel.shape[:2])
    ax.set_axis_off()
    ax.set_title(_title(model_name, layer, f"one tile per channel ({tiles.shape[0]} shown)"), fontsize=8)
    return fig


def mixing_matrix(layer: layers.Layer) -> np.ndarray:
    """A 1x1 conv's kernel as the (C_out, C_in) matrix that mixes channels at every pixel."""
    kernel = keras.ops.convert_to_numpy(
        layer.pointwise_kernel if isinstance(layer, layers.SeparableConv2D) else layer.kernel)
    return np.asarray(kernel, np.float32)[0, 0].T


def plot_mixing_matrix(layer: layers.Layer, model_name: str) -> plt.Figure:
    """The C_out x C_in channel-mixing matrix of a 1x1 conv as a heat map (diverging, centred on 0)."""
    matrix = mixing_matrix(layer)
    peak = float(np.abs(matrix).max()) or 1.0
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(matrix, cmap="RdBu_r", vmin=-peak, vmax=peak, aspect="auto", interpolation="nearest")
    fig.colorbar(im, ax=ax, label="weight")
    ax.set_xlabel(f"input channel (C_in = {matrix.shape[1]})")
    ax.set_ylabel(f"output channel (C_out = {matrix.shape[0]})")
    ax.set_title(_title(model_name, layer, "1x1 channel mixing"), fontsize=8)
    return fig


def plot_feature_maps(model: keras.Model, layer: layers.Layer, image: np.ndarray, model_name: str,
                      max_maps: int = 32) -> plt.Figure:
    """The activations of `layer` for one image, as a grid of maps, with the input beside them."""
    maps = keras.ops.convert_to_numpy(activations(model, layer, image[None].astype("float32")))[0]
    # A mixed-precision model gives bfloat16/float16 maps, which Matplotlib draws as one flat colour.
    maps = np.asarray(maps, dtype=np.float32)
    n = min(maps.shape[-1], max_maps)
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    # One symmetric scale for all maps, so they compare with each other and 0 (no response) is white.
    peak = float(np.abs(maps[..., :n]).max()) or 1.0
    fig = plt.figure(figsize=(3.6 + 1.5 * columns, 1.5 * rows + 1.0))
    grid = fig.add_gridspec(rows, columns + 3, width_ratios=[1, 1, *[1] * columns, 0.15])
    ax = fig.add_subplot(grid[:, :2])
    ax.imshow(np.clip(image, 0, 255).astype(np.uint8))
    ax.set_title("input", fontsize=9)
    ax.set_axis_off()
    for i in range(n):
        ax = fig.add_subplot(grid[i // columns, 2 + i % columns])
        im = ax.imshow(maps[..., i], cmap="RdBu_r", vmin=-peak, vmax=peak)
        ax.set_axis_off()
        ax.set_title(str(i), fontsize=6)
    fig.colorbar(im, cax=fig.add_subplot(grid[:, -1]), label="layer output")
    activation = getattr(layer, "activation", None)
    raw = activation is None or getattr(activation, "__name__", "") == "linear"
    what = ("raw convolution outputs (before batch norm and activation)" if raw
            else f"outputs after its {getattr(activation, '__name__', 'activation')}")
    fig.suptitle(f"{model_name} / {layer.name}: {n} of {maps.shape[-1]} feature maps, "
                 f"{maps.shape[0]}x{maps.shape[1]}, {what}; one colour scale, 0 = white", fontsize=9)
    return fig


def _contains(model: keras.Model, layer: layers.Layer) -> bool:
    return any(child is layer or (isinstance(child, keras.Model) and _contains(child, layer)) for child in model.layers)


def activations(model: keras.Model, layer: layers.Layer, x: np.ndarray):
    """The output of `layer` (wherever it is nested in `model`) for the input batch `x`, in inference mode."""
    if any(child is layer for child in model.layers):
        return keras.Model(model.inputs[0], layer.output)(x, training=False)
    for child in model.layers:
        if isinstance(child, keras.Model) and _contains(child, layer):
            feed = child._inbound_nodes[0].input_tensors[0]  # the tensor of `model` that `child` is called on
            inner_x = keras.Model(model.inputs[0], feed)(x, training=False) if feed is not model.inputs[0] else x
            return activations(child, layer, inner_x)
    raise ValueError(f"The layer is not part of the model. Received: {layer.name!r}")


CLASSIC_FILTERS = {
    "Sobel x": np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32),
    "Sobel y": np.array([[-1, -2, -1], [0, 0, 0], [1, 2, 1]], np.float32),
    "Gaussian blur": np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], np.float32) / 16,
    "Laplacian": np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32),
    "edge [[1,1],[-1,-1]]": np.array([[1, 1], [-1, -1]], np.float32),
}


def _fit_kernel(kernel: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Brings a 2-D classic kernel to a learned kernel's `size`, one axis at a time: resampled (linear, end to end)
    where the learned one is larger, so a 3x3 Sobel becomes the smooth 7x7 derivative a 7x7 layer can learn;
    centre-cropped where it is smaller."""

    def fit_axis(k: np.ndarray, n: int) -> np.ndarray:  # along axis 0
        m = k.shape[0]
        if n >= m:
            at = np.linspace(0, m - 1, n)
            return np.stack([np.interp(at, np.arange(m), k[:, j]) for j in range(k.shape[1])], axis=1)
        start = (m - n) // 2
        return k[start:start + n]

    rows_fitted = fit_axis(np.asarray(kernel, np.float64), size[0])
    return fit_axis(rows_fitted.T, size[1]).T.astype(np.float32)


def most_similar_filters(kernel: np.ndarray) -> dict[str, tuple[int, float]]:
    """For each classic filter, the learned filter (channel-averaged) with the highest |cosine similarity|.

    Returns:
        name -> (filter index, signed cosine similarity); a negative value is the same detector, inverted.
    """
    learned = kernel.mean(axis=2)  # (K_h, K_w, C_out)
    flat = learned.reshape(-1, learned.shape[-1])
    norms = np.linalg.norm(flat, axis=0)
    out = {}
    for name, classic in CLASSIC_FILTERS.items():
        ref = _fit_kernel(classic - classic.mean() if name == "Gaussian blur" else classic, learned.shape[:2])
        ref = ref.reshape(-1)
        # A blur is a smoothing, not a contrast, detector: compare it after removing its mean, like the others.
        cos = flat.T @ ref / np.maximum(norms * np.linalg.norm(ref), 1e-12)
        best = int(np.argmax(np.abs(cos)))
        out[name] = (best, float(cos[best]))
    return out


@dataclass
class KernelStructure:
    """What one first-layer filter is made of: the shares of its energy (sum of squared weights) in each input
    channel's mean (a colour blob), in a linear ramp across the window per channel (an oriented edge), and the
    rest; and the ramp's direction."""

    kind: str           # "colour blob" | "oriented edge" | "other"
    blob: float         # energy share of the per-channel means
    edge: float         # energy share of the per-channel linear ramps
    angle: float        # orientation of the ramp in degrees [0, 180): 0 = changes left to right (a vertical
                        #   edge), 90 = top to bottom (a horizontal edge); meaningful for edges only


def kernel_structure(kernel: np.ndarray, threshold: float = 0.5) -> list[KernelStructure]:
    """Classifies each filter of a (K_h, K_w, C_in, C_out) kernel as a colour blob, an oriented edge or other.

    A filter is a colour blob when at least `threshold` of its energy lies in its per-channel means (it responds to
    a colour, wherever it is in the window), an oriented edge when at least `threshold` lies in per-channel linear
    ramps (it responds to brightness or colour changing in one direction across the window: a step edge through
    the centre has 86% of its energy in the ramp, a 3x3 edge detector in a corner of a 7x7 window very little).
    A random 7x7x3 filter puts about 2% of its energy in the means and 4% in the ramps. Ramps of several channels
    share one direction, the principal axis of their gradients, so a colour-opponent edge (red rising where green
    falls) counts as one edge.

    Example:

        >>> sobel_x = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float)
        >>> kernel_structure(np.repeat(sobel_x[:, :, None, None], 3, axis=2))[0].kind
        'oriented edge'
    """
    kh, kw = kernel.shape[:2]
    ys, xs = np.mgrid[0:kh, 0:kw].astype(np.float64)
    basis = [np.full((kh, kw), 1.0), xs - xs.mean(), ys - ys.mean()]
    basis = [b / np.linalg.norm(b) if np.linalg.norm(b) else b for b in basis]  # a 1-wide kernel has no ramp
    out = []
    for f in range(kernel.shape[-1]):
        k = kernel[..., f].astype(np.float64)  # (K_h, K_w, C_in)
        total = max(float((k ** 2).sum()), 1e-30)
        mean, gx, gy = (np.tensordot(b, k, axes=([0, 1], [0, 1])) for b in basis)  # each (C_in,)
        blob, edge = float((mean ** 2).sum()) / total, float((gx ** 2).sum() + (gy ** 2).sum()) / total
        # Principal axis of the per-channel gradients (gx_c, gy_c): sign-free, so opponent channels agree.
        m = np.array([[gx @ gx, gx @ gy], [gx @ gy, gy @ gy]])
        axis = np.linalg.eigh(m)[1][:, -1]
        angle = float(np.degrees(np.arctan2(axis[1], axis[0])) % 180)
        kind = "colour blob" if blob >= threshold else "oriented edge" if edge >= threshold else "other"
        out.append(KernelStructure(kind, blob, edge, angle))
    return out


def structure_summary(kernel: np.ndarray) -> str:
    """One line: how many filters are colour blobs, oriented edges (with their directions) and other."""
    found = kernel_structure(kernel)
    count = {kind: sum(s.kind == kind for s in found) for kind in ("colour blob", "oriented edge", "other")}
    angles = sorted(round(s.angle) for s in found if s.kind == "oriented edge")
    return (f"{count['colour blob']} colour blobs, {count['oriented edge']} oriented edges"
            + (f" (ramps at {', '.join(f'{a}' for a in angles)} degrees)" if angles else "")
            + f", {count['other']} other, of {len(found)} filters")


def layer_structure_summary(layer: layers.Layer) -> str | None:
    """`structure_summary` of a KxK conv layer that looks at RGB pixels (a first layer); None for other layers."""
    kernel = layer_kernel(layer)
    if kernel_kind(layer) != "standard" or kernel.shape[2] != 3:
        return None
    return structure_summary(kernel)


def plot_classic_filters(image: np.ndarray, kernel: np.ndarray | None, title: str) -> plt.Figure:
    """Classic hand-made filters applied to an image side by side (with the NumPy reference conv2d), and, when a
    learned first-layer kernel is given, the learned filter most similar to each, named under it."""
    gray = image.astype(np.float32).mean(axis=-1, keepdims=True)
    similar = most_similar_filters(kernel) if kernel is not None else {}
    n = len(CLASSIC_FILTERS) + 1
    rows = 3 if kernel is not None else 2
    fig, axes = plt.subplots(rows, n, figsize=(2.6 * n, 2.6 * rows + 0.4), squeeze=False)
    axes[0, 0].imshow(np.clip(image, 0, 255).astype(np.uint8))
    axes[0, 0].set_title("input", fontsize=9)
    for ax in axes[1:, 0]:
        ax.set_visible(False)
    for i, (name, classic) in enumerate(CLASSIC_FILTERS.items(), start=1):
        response = conv_math.conv2d(gray, classic[..., None, None], padding="same")[..., 0]
        axes[0, i].imshow(response, cmap="gray")
        axes[0, i].set_title(name, fontsize=9)
        peak = np.abs(classic).max()
        axes[1, i].imshow(classic, cmap="gray", vmin=-peak, vmax=peak, interpolation="nearest")
        axes[1, i].set_title("kernel", fontsize=8)
        if kernel is not None:
            index, cos = similar[name]
            tile = symmetric_scale(kernel[..., index][None], per_tile=True)[0]
            axes[2, i].imshow(tile if tile.shape[-1] == 3 else tile.mean(-1), cmap="gray", interpolation="nearest")
            axes[2, i].set_title(f"learned #{index}\ncos {cos:+.2f}", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    return fig


def plot_before_after(before: np.ndarray, after: np.ndarray, title: str, per_tile: bool = True,
                      max_filters: int = 64) -> plt.Figure:
    """Kernels at initialisation, trained, and the change between them, tile for tile.

    On small data the trained kernels often still look like their random start; the change (trained minus initial)
    shows what training added, which is where the edge and colour detectors appear.
    """
    change = after - before
    relative = float(np.linalg.norm(change) / max(np.linalg.norm(before), 1e-12))
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.8))
    panels = ((before, "at initialisation"), (after, "trained"),
              (change, f"learned change: trained - initial\n(size {relative:.2f} of the initial kernels)"))
    for ax, (kernel, name) in zip(axes, panels):
        ax.imshow(kernel_grid(kernel, per_tile, max_filters=max_filters), interpolation="nearest")
        number_tiles(ax, min(kernel.shape[-1], max_filters), kernel.shape[:2])
        ax.set_title(name, fontsize=10)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    return fig


def save_figure(fig: plt.Figure, path, svg: bool = False) -> list[str]:
    """Writes the figure as PNG (and SVG when asked) and closes it; returns the paths written."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = [str(path.with_suffix(".png"))]
    fig.savefig(written[0], dpi=120, bbox_inches="tight")
    if svg:
        written.append(str(path.with_suffix(".svg")))
        fig.savefig(written[1], bbox_inches="tight")
    plt.close(fig)
    return written
