"""The first convolution's kernels from the training images: the principal components of the patches it sees.

A first conv drawn at random mostly measures one thing, the brightness of a patch, which holds most of the pixels'
variance: its channels are near-copies of each other, and the layers after it start from that. Started from the
principal components of its input patches, each channel is one component (brightness, the colour opposites,
gradients in each direction, then finer detail), and the batch norm that follows gives each the same scale: the
next layer sees the patches whitened. Held fixed (`model.first_conv_trainable: false`), this is airbench's
patch-whitening layer, and the rest of the net learns faster on it (docs/results.md). Each component comes as a
pair `+v, -v`, so that the ReLU after the conv keeps both signs.

Example:

    model = build_model(cfg, num_classes=2)
    set_first_conv_to_pca(model, datasets.train)
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from cnnlab.modeling import family_network, first_conv


def principal_kernels(patches: np.ndarray, kernel_shape: tuple[int, int, int, int]) -> np.ndarray:
    """Conv kernels from flattened patches.

    Args:
        patches: (n, kh * kw * in) patches, flattened in the order of a Conv2D kernel's first three axes.
        kernel_shape: the kernel's (kh, kw, in, out).

    Returns:
        A kernel of `kernel_shape` whose filters `2i` and `2i + 1` are `+v_i` and `-v_i`, `v_i` the unit-norm
        principal component of the patches with the i-th largest variance. Filters beyond twice the number of
        components (kh * kw * in) are zero.
    """
    kh, kw, cin, cout = kernel_shape
    if patches.ndim != 2 or patches.shape[1] != kh * kw * cin:
        raise ValueError(f"patches must be (n, {kh * kw * cin}) for a kernel of shape {kernel_shape}. "
                         f"Received: {patches.shape}")
    x = patches.astype(np.float64)
    x -= x.mean(axis=0)
    _, eigenvectors = np.linalg.eigh(x.T @ x / len(x))  # eigenvalues ascending
    components = eigenvectors[:, ::-1][:, : cout // 2]
    # An eigenvector's sign is arbitrary; fixing it keeps the +/- order of each pair the same on every machine.
    components = components * np.where(components.sum(axis=0) < 0, -1.0, 1.0)
    kernels = np.zeros((kh * kw * cin, cout))
    n = components.shape[1]
    kernels[:, 0:2 * n:2], kernels[:, 1:2 * n:2] = components, -components
    return kernels.reshape(kernel_shape)


def conv_input_fn(model: keras.Model, conv: keras.layers.Conv2D) -> Callable[[tf.Tensor], tf.Tensor]:
    """A function from a batch of images to what `conv`, a layer of the family network inside `model`, receives
    for them at inference (augmentation off: the centre crop)."""
    net = family_network(model)
    front = [layer for layer in (model.layers if net is not model else [])
             if layer is not net and not isinstance(layer, keras.layers.InputLayer)]
    to_conv = keras.Model(net.inputs, conv.input)

    def inputs(images: tf.Tensor) -> tf.Tensor:
        x = images
        for layer in front:
            x = layer(x, training=False)
        return to_conv(x, training=False)

    return inputs


def conv_inputs(model: keras.Model, images: tf.Tensor, conv: keras.layers.Conv2D) -> tf.Tensor:
    """What `conv` receives for a batch of `images` at inference (see `conv_input_fn`)."""
    return conv_input_fn(model, conv)(images)


def set_first_conv_to_pca(model: keras.Model, train: tf.data.Dataset, *, max_images: int = 512,
                          patches_per_image: int = 400, read_all: bool = True, seed: int = 0) -> int:
    """Sets the first conv's kernels (`cnnlab.modeling.first_conv`) to the principal components of its input
    patches (`principal_kernels`).

    Args:
        model: a model from `build_model`.
        train: `(images, labels)` batches; the first `max_images` images are used.
        max_images: how many images the patches come from.
        patches_per_image: patches drawn at random from each image's conv positions.
        read_all: read `train` to its end, so that a cached pipeline fills its cache (the first epoch then reads
            from it instead of decoding); False stops after `max_images`.
        seed: seed of the patch draw.

    Returns:
        The number of images the patches came from.
    """
    conv = first_conv(model)
    kh, kw = conv.kernel_size
    sh, sw = conv.strides
    dh, dw = conv.dilation_rate
    rng = np.random.default_rng(seed)
    inputs = conv_input_fn(model, conv)
    chunks, used = [], 0
    for batch in train:
        if used < max_images:
            images = batch[0][: max_images - used]
            x = tf.cast(inputs(images), tf.float32)
            # The positions the conv's own strides visit, without padding: padded borders are not image statistics.
            patches = tf.image.extract_patches(x, sizes=[1, kh, kw, 1], strides=[1, sh, sw, 1],
                                               rates=[1, dh, dw, 1], padding="VALID").numpy()
            per_image = patches.reshape(len(patches), -1, patches.shape[-1])
            pick = rng.choice(per_image.shape[1], min(per_image.shape[1], patches_per_image), replace=False)
            chunks.append(per_image[:, pick].reshape(-1, patches.shape[-1]))
            used += len(images)
        elif not read_all:
            break
    if not used:
        raise ValueError("the training data has no images to take the first conv's patches from")
    kernel = principal_kernels(np.concatenate(chunks), tuple(conv.kernel.shape))
    conv.kernel.assign(kernel.astype(np.float32))
    return used
