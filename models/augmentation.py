"""Augmentation layers of the project's own, for where Keras's preprocessing layers do not do what training needs.

Keras 3's `RandomCrop` draws one crop box per batch (every image in it is cut at the same place) and at inference
passes the image through uncropped, so a model trained on 112x112 crops of 126x126 images fails on its own
validation data. `RandomResizedCrop` draws a box per image and centre-crops at inference.
"""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="cnnlab")
class RandomResizedCrop(keras.layers.Layer):
    """A random box of each image, resized to `(height, width)`; a central crop at inference.

    With `scale=None` the box is always `(height, width)` pixels at a random place (a plain random crop, no
    resampling). With `scale=(lo, hi)` the box covers a random fraction in `[lo, hi]` of the image's area with an
    aspect ratio drawn log-uniformly from `ratio` (the Inception / timm "random resized crop").

    Args:
        height: output height in pixels.
        width: output width in pixels.
        scale: `(lo, hi)` fractions of the image area the box covers, or None for fixed-size crops.
        ratio: `(lo, hi)` range of the box's width / height aspect ratio (with `scale` only).
        seed: seed of the layer's random generator.
        test_crop_fraction: at inference, the central box whose sides are this fraction of the image's, resized to
            `(height, width)` (timm's `crop_pct`). Random boxes of `scale` show objects larger than the image does,
            and a box below `height / image height` matches that at test time (FixRes, Touvron et al. 2019). None:
            the central `(height, width)` pixels, unresampled.

    Example:

        >>> layer = RandomResizedCrop(112, 112, scale=(0.35, 1.0))
        >>> layer(keras.ops.zeros((4, 126, 126, 3)), training=True).shape
        TensorShape([4, 112, 112, 3])
    """

    def __init__(self, height: int, width: int, scale=None, ratio=(3 / 4, 4 / 3), seed: int | None = None,
                 test_crop_fraction: float | None = None, **kwargs):
        super().__init__(**kwargs)
        if scale is not None and not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"`scale` must be (lo, hi) with 0 < lo <= hi <= 1. Received: scale={scale!r}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"`ratio` must be (lo, hi) with 0 < lo <= hi. Received: ratio={ratio!r}")
        if test_crop_fraction is not None and not (0 < test_crop_fraction <= 1):
            raise ValueError(f"`test_crop_fraction` must be in (0, 1] or None. "
                             f"Received: test_crop_fraction={test_crop_fraction!r}")
        self.height, self.width = int(height), int(width)
        self.test_crop_fraction = None if test_crop_fraction is None else float(test_crop_fraction)
        self.scale = None if scale is None else tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=None):
        in_h, in_w = images.shape[1], images.shape[2]
        if in_h < self.height or in_w < self.width:
            raise ValueError(f"RandomResizedCrop: images must be at least {self.height}x{self.width}. "
                             f"Received: {in_h}x{in_w}")
        if not training:
            if self.test_crop_fraction is None:
                top, left = (in_h - self.height) // 2, (in_w - self.width) // 2
                return images[:, top:top + self.height, left:left + self.width, :]
            box_h, box_w = self.test_crop_fraction * (in_h - 1), self.test_crop_fraction * (in_w - 1)
            rows = (in_h - 1 - box_h) / 2 + box_h * ops.linspace(0.0, 1.0, self.height)
            cols = (in_w - 1 - box_w) / 2 + box_w * ops.linspace(0.0, 1.0, self.width)
            return self._resample(images, rows, cols, in_h, in_w)
        n = ops.shape(images)[0]
        uniform = lambda: keras.random.uniform((n,), seed=self.seed_generator)  # noqa: E731
        if self.scale is None:
            # Whole-pixel offsets and a box of exactly height x width pixels: the crop copies pixels, no resampling.
            top = ops.floor(uniform() * (in_h - self.height + 1))
            left = ops.floor(uniform() * (in_w - self.width + 1))
            rows = top[:, None] + ops.arange(self.height, dtype="float32")[None]
            cols = left[:, None] + ops.arange(self.width, dtype="float32")[None]
        else:
            area = self.scale[0] + (self.scale[1] - self.scale[0]) * uniform()
            log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
            aspect = ops.exp(log_lo + (log_hi - log_lo) * uniform())
            # Box sides as fractions of the image's sides, so the crop keeps the output's aspect ratio when aspect=1.
            box_h = ops.minimum(ops.sqrt(area / aspect), 1.0) * (in_h - 1)
            box_w = ops.minimum(ops.sqrt(area * aspect), 1.0) * (in_w - 1)
            top, left = (in_h - 1 - box_h) * uniform(), (in_w - 1 - box_w) * uniform()
            rows = top[:, None] + box_h[:, None] * ops.linspace(0.0, 1.0, self.height)[None]
            cols = left[:, None] + box_w[:, None] * ops.linspace(0.0, 1.0, self.width)[None]
        return self._resample(images, rows, cols, in_h, in_w)

    def _resample(self, images, rows, cols, in_h: int, in_w: int):
        """Bilinear samples of `images` at the grid `rows` x `cols` of pixel coordinates: (batch, height) and
        (batch, width), one grid per image, or (height,) and (width,), one grid for all."""
        # Bilinear resampling is separable: out = Wr @ image @ Wc^T, with the tent weights max(0, 1 - |coord - pixel|).
        # Two small matmuls instead of a gather keep the layer backend-neutral and XLA-compilable.
        weight_rows = ops.relu(1.0 - ops.abs(rows[..., None] - ops.arange(in_h, dtype="float32")))
        weight_cols = ops.relu(1.0 - ops.abs(cols[..., None] - ops.arange(in_w, dtype="float32")))
        if len(rows.shape) == 1:
            crops = ops.einsum("ip,bpqc,jq->bijc", weight_rows, ops.cast(images, "float32"), weight_cols)
        else:
            crops = ops.einsum("bip,bpqc,bjq->bijc", weight_rows, ops.cast(images, "float32"), weight_cols)
        return ops.cast(crops, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.height, self.width, input_shape[3])

    def get_config(self):
        return {**super().get_config(), "height": self.height, "width": self.width,
                "scale": None if self.scale is None else list(self.scale), "ratio": list(self.ratio),
                "seed": self.seed, "test_crop_fraction": self.test_crop_fraction}
