"""Where a trained network looks: Grad-CAM and gradient saliency maps, for any model the project builds.

Grad-CAM (Selvaraju et al., 2017) weighs each channel of a late convolutional feature map by how much the class score
rises with it (its gradient, averaged over the map), sums the weighted channels and keeps the positive part: a coarse
map of the evidence for that class. Grad-CAM++ (Chattopadhay et al., 2018) weighs each place's positive gradient
instead of the mean, so separate pieces of evidence all show. Gradient saliency (Simonyan et al., 2014) is the size of the class score's
gradient with respect to each input pixel; SmoothGrad (Smilkov et al., 2017) averages it over noisy copies of the
image, which removes most of its speckle.

The feature map is read while the model runs as a whole, by wrapping the target layer's `call` for the duration of
one forward pass. That works the same for a flat model and for a backbone nested two models deep (the transfer
families), where Keras 3 does not allow a sub-model to be cut out of the outer graph.

Example:

    >>> maps, probs = grad_cam(model, images)            # the last spatial conv feature map, found automatically
    >>> maps, probs = grad_cam(model, images, layer="vgg16/block5_conv3")
"""

from __future__ import annotations

import contextlib

import keras
import numpy as np
import tensorflow as tf

from cnnlab.errors import UserError

CONV_TYPES = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D)
# Layers whose output is a feature map but not one to explain: they pool, drop or merely pass the map on.
_NOT_TARGETS = (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, keras.layers.Dropout,
                keras.layers.SpatialDropout2D, keras.layers.InputLayer)


def named_layers(model: keras.Model, prefix: str = "") -> list[tuple[str, keras.layers.Layer]]:
    """Every layer with its path (`outer/inner/name`), nested models walked into, input side first."""
    found = []
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if isinstance(layer, keras.Model):
            found += named_layers(layer, f"{path}/")
        else:
            found.append((path, layer))
    return found


def _spatial(layer: keras.layers.Layer) -> bool:
    shape = getattr(layer, "output", None)
    shape = getattr(shape, "shape", None)
    return shape is not None and len(shape) == 4 and (shape[1] or 0) >= 2 and (shape[2] or 0) >= 2


def target_layers(model: keras.Model) -> list[tuple[str, keras.layers.Layer]]:
    """The layers a map can be taken from: convolutions, and the feature maps after them (batch norm, activation,
    residual sums) while they are still spatial, up to the classifier head."""
    layers = named_layers(model)
    first_conv = next((i for i, (_, layer) in enumerate(layers) if isinstance(layer, CONV_TYPES)), None)
    if first_conv is None:
        return []
    # The families' classifier heads (`head_*`, e.g. the pointwise family's 1x1 class-score conv) are what is being
    # explained, not evidence.
    return [(path, layer) for path, layer in layers[first_conv:]
            if _spatial(layer) and not isinstance(layer, _NOT_TARGETS) and not layer.name.startswith("head")]


def find_target_layer(model: keras.Model, name: str | None = None) -> tuple[str, keras.layers.Layer]:
    """The layer Grad-CAM reads: `name` (a path such as `vgg16/block5_conv3`, or a unique layer name), else the last
    spatial feature map before the classifier head (after the last convolution's batch norm and activation), nested
    backbones included.

    Raises:
        UserError: no such layer; the message lists the valid ones.
    """
    candidates = target_layers(model)
    if not candidates:
        raise UserError(f"--layer: the model {model.name!r} has no spatial convolutional feature map.")
    if name is None:
        return candidates[-1]
    matches = [(path, layer) for path, layer in candidates if path == name or path.endswith(f"/{name}")]
    if len(matches) == 1:
        return matches[0]
    convs = [path for path, layer in candidates if isinstance(layer, CONV_TYPES)]
    shown = ", ".join(convs[-8:])
    why = "matches several layers" if matches else "is not a spatial conv layer of this model"
    raise UserError(f"--layer: {name!r} {why}; the last conv layers are: {shown}. Received: {name!r}")


@contextlib.contextmanager
def _captured(layer: keras.layers.Layer, tape: tf.GradientTape | None = None):
    """Records the outputs `layer` produces while the block runs (its `call`, wrapped for that time), and has `tape`
    watch them."""
    outputs = []
    call = layer.call

    def recording_call(*args, **kwargs):
        out = call(*args, **kwargs)
        if tape is not None:
            tape.watch(out)
        outputs.append(out)
        return out

    layer.call = recording_call
    try:
        yield outputs
    finally:
        del layer.call  # the class's own method again


def class_scores(probs: tf.Tensor, class_index: tf.Tensor) -> tf.Tensor:
    """The log-probability of `class_index` per image, for a sigmoid (one unit) or softmax head.

    Its gradient is the logit's times a positive factor per image, so Grad-CAM maps (normalised per image) are those
    of the logit, without the vanishing gradient of a saturated probability."""
    probs = tf.cast(probs, tf.float32)
    eps = 1e-7
    if probs.shape[-1] == 1:
        p = probs[:, 0]
        return tf.where(class_index == 1, tf.math.log(p + eps), tf.math.log(1.0 - p + eps))
    return tf.math.log(tf.gather(probs, class_index, batch_dims=1) + eps)


def predicted_classes(probs: np.ndarray) -> np.ndarray:
    """The class each image is predicted to be, as evaluate.py decides it."""
    from cnnlab.evaluation import class_probabilities

    return class_probabilities(probs).argmax(-1).astype(np.int32)


def logits_layer(model: keras.Model) -> keras.layers.Layer:
    """The classifier's last Dense layer (`head_dense` in every family), whose outputs are the class logits."""
    heads = [layer for path, layer in named_layers(model) if path.split("/")[-1] == "head_dense"]
    if not heads:
        raise UserError(f"--method gradcam++: the model {model.name!r} has no 'head_dense' layer to read the class "
                        "logits from (models this project builds all have one); use --method gradcam.")
    return heads[-1]


def grad_cam(model: keras.Model, images, class_index=None, layer: str | None = None, plus_plus: bool = False,
             ) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM (or Grad-CAM++) maps of a batch of images.

    Args:
        model: any model the project builds (augmentation layers run in inference mode).
        images: `(N, H, W, 3)` pixels in [0, 255], at the model's input size.
        class_index: the class to explain per image (an int or N ints); None: the predicted class.
        layer: the feature map to read (see `find_target_layer`); None: found automatically.
        plus_plus: Grad-CAM++ (Chattopadhay et al., 2018): each channel weighs its positive gradients place by place
            instead of by their mean, so several separate pieces of evidence all show. Its closed form holds for the
            exponential of the class logit, so it reads the logits (`logits_layer`).

    Returns:
        Maps `(N, H, W)` in [0, 1] (each scaled by its own maximum; all zero where no evidence is positive), and the
        model's probabilities `(N, classes)`.
    """
    _, target = find_target_layer(model, layer)
    head = logits_layer(model) if plus_plus else None
    images = tf.convert_to_tensor(np.asarray(images, np.float32))
    # The tape records only what follows the feature map (it watches the map, not the weights), so the gradient is a
    # backward pass through the head alone, not through the whole network (9x faster with a ResNet50 backbone).
    tape = tf.GradientTape(watch_accessed_variables=False)
    with (_captured(target, tape) as outputs, _captured(head) if head else contextlib.nullcontext([]) as logits,
          tape):
        probs = model(images, training=False)
        feature_map = outputs[-1]
        if class_index is None:
            chosen = tf.constant(predicted_classes(np.asarray(probs, np.float32)))
        else:
            chosen = tf.broadcast_to(tf.constant(class_index, tf.int32), [images.shape[0]])
        score = tf.reduce_sum(class_logits(logits[-1], chosen) if head else class_scores(probs, chosen))
    grads = tf.cast(tape.gradient(score, feature_map), tf.float32)
    feature_map = tf.cast(feature_map, tf.float32)
    if plus_plus:
        denominator = 2 * grads ** 2 + tf.reduce_sum(feature_map, axis=(1, 2), keepdims=True) * grads ** 3
        alpha = tf.math.divide_no_nan(grads ** 2, denominator)
        weights = tf.reduce_sum(alpha * tf.nn.relu(grads), axis=(1, 2), keepdims=True)
    else:
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * feature_map, axis=-1))
    return _upsampled_and_scaled(cam, images.shape[1:3]), np.asarray(probs, np.float32)


def class_logits(logits: tf.Tensor, class_index: tf.Tensor) -> tf.Tensor:
    """The logit of `class_index` per image; a single sigmoid unit's logit z is class 1's, and -z class 0's."""
    logits = tf.cast(logits, tf.float32)
    if logits.shape[-1] == 1:
        return tf.where(class_index == 1, logits[:, 0], -logits[:, 0])
    return tf.gather(logits, class_index, batch_dims=1)


def saliency(model: keras.Model, images, class_index=None, smooth: int = 0, noise: float = 0.15,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gradient saliency: how much the class score changes with each pixel (the largest over the colour channels).

    Args:
        smooth: 0 for the plain gradient; else SmoothGrad over this many noisy copies of each image.
        noise: SmoothGrad's noise, as a fraction of the pixel range (255).

    Returns:
        Maps `(N, H, W)` in [0, 1], and the model's probabilities on the clean images.
    """
    images = tf.convert_to_tensor(np.asarray(images, np.float32))
    probs = np.asarray(model(images, training=False), np.float32)
    chosen = (predicted_classes(probs) if class_index is None
              else np.broadcast_to(np.asarray(class_index, np.int32), [images.shape[0]]))
    rng = np.random.default_rng(seed)
    total = tf.zeros(images.shape, tf.float32)
    for _ in range(max(1, smooth)):
        noisy = images + (rng.normal(0, noise * 255, images.shape).astype(np.float32) if smooth else 0.0)
        with tf.GradientTape() as tape:
            tape.watch(noisy)
            score = tf.reduce_sum(class_scores(model(noisy, training=False), tf.constant(chosen)))
        total += tf.abs(tf.cast(tape.gradient(score, noisy), tf.float32))
    return _upsampled_and_scaled(tf.reduce_max(total, axis=-1), images.shape[1:3]), probs


def explain(model: keras.Model, images: np.ndarray, method: str = "gradcam", class_index=None,
            layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Maps of a batch by `method`: "gradcam", "gradcam++", "saliency" or "smoothgrad" (saliency over 8 noisy
    copies).
    Returns the maps `(N, H, W)` in [0, 1] and the model's probabilities."""
    if method in ("gradcam", "gradcam++"):
        return grad_cam(model, images, class_index, layer=layer, plus_plus=method == "gradcam++")
    if layer is not None:
        raise UserError(f"--layer: only Grad-CAM reads a layer; saliency maps are of the input. Received: --method "
                        f"{method}")
    return saliency(model, images, class_index, smooth=8 if method == "smoothgrad" else 0)


def _upsampled_and_scaled(maps: tf.Tensor, size) -> np.ndarray:
    maps = tf.image.resize(maps[..., None], size, method="bilinear")[..., 0]
    peak = tf.reduce_max(maps, axis=(1, 2), keepdims=True)
    return np.asarray(tf.math.divide_no_nan(maps, peak), np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Pictures


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The photo with the map laid over it in the `jet` colours (red: most evidence), as uint8 RGB."""
    from matplotlib import colormaps

    colours = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * colours, 0, 255).astype(np.uint8)


def save_pair(path, image: np.ndarray, heat: np.ndarray, text: str) -> None:
    """One image's figure: the photo and the overlaid map side by side, the caption above (PIL: milliseconds per
    image, where a matplotlib figure each would take a tenth of a second)."""
    from PIL import Image, ImageDraw

    height, width = image.shape[:2]
    scale = max(1, 224 // max(height, width))
    canvas = Image.new("RGB", (2 * width * scale + 4, height * scale + 18), "white")
    for i, picture in enumerate((image, overlay(image, heat))):
        tile = Image.fromarray(picture).resize((width * scale, height * scale), Image.NEAREST)
        canvas.paste(tile, (i * (width * scale + 4), 18))
    ImageDraw.Draw(canvas).text((2, 2), text, fill="black")
    canvas.save(path)


def grid_figure(images: np.ndarray, maps: np.ndarray, captions: list[str], title: str, columns: int = 8):
    """The overlays of many images in one figure, each with its caption."""
    import matplotlib.pyplot as plt

    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, heat, text in zip(axes.flat, images, maps, captions):
        ax.imshow(overlay(image, heat))
        ax.set_title(text, fontsize=6)
    fig.suptitle(title, fontsize=9)
    return fig


def comparison_figure(photos: np.ndarray, photo_names: list[str],
                      columns: list[tuple[str, np.ndarray, np.ndarray, list[str]]], title: str):
    """Several models' maps of the same photos: a row per photo, its picture first, then a column per model.

    Args:
        photos: the photos as the first model read them.
        photo_names: a caption for each photo.
        columns: per model, its name and the photos as it read them (its input size), its maps and captions.
        title: the figure's title.
    """
    import matplotlib.pyplot as plt

    rows, width = len(photos), 1 + len(columns)
    fig, axes = plt.subplots(rows, width, figsize=(1.9 * width, 1.9 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(rows):
        axes[i, 0].imshow(photos[i])
        axes[i, 0].set_title(photo_names[i][:22], fontsize=6)
        for j, (name, images, maps, captions) in enumerate(columns, start=1):
            axes[i, j].imshow(overlay(images[i], maps[i]))
            axes[i, j].set_title(f"{name[:18]}: {captions[i]}", fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
