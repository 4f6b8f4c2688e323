"""The arithmetic of convolutions, in plain NumPy, written to be read and checked.

What deep-learning frameworks call convolution is cross-correlation: the kernel slides over the input as it is,
without being flipped. True (mathematical) convolution flips the kernel in both spatial axes first. For the 4x4
image 1..16 and the kernel [[1, 1], [-1, -1]] (stride 1, no padding):

    >>> image = np.arange(1, 17, dtype=float).reshape(4, 4, 1)
    >>> kernel = np.array([[1, 1], [-1, -1]], dtype=float).reshape(2, 2, 1, 1)
    >>> conv2d(image, kernel)[..., 0]                       # what keras.layers.Conv2D computes
    array([[-8., -8., -8.],
           [-8., -8., -8.],
           [-8., -8., -8.]])
    >>> conv2d(image, kernel, flip_kernel=True)[..., 0]     # true convolution
    array([[8., 8., 8.],
           [8., 8., 8.],
           [8., 8., 8.]])

Output size of a convolution (or pooling) along one axis, for input size H, kernel K, stride S, padding P on each
side and dilation D:

    H_out = floor((H + 2P - D(K - 1) - 1) / S) + 1

This module imports only NumPy; the model report (`cnnlab.report`) uses these same functions.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

Padding = str | int | tuple[int, int]


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if np.isscalar(value) else (int(value[0]), int(value[1]))


def output_size(size: int, kernel: int, stride: int = 1, padding: Padding = 0, dilation: int = 1) -> int:
    """Output length along one axis: floor((H + 2P - D(K-1) - 1) / S) + 1.

    `padding` is a number of pixels added on each side, `"valid"` (0) or `"same"` (as many as needed for
    ceil(H / S) outputs, the way TensorFlow pads).
    """
    if padding == "same":
        return math.ceil(size / stride)
    pad = 0 if padding == "valid" else int(padding)
    effective = dilation * (kernel - 1) + 1
    if size + 2 * pad < effective:
        raise ValueError(f"The kernel (effective size {effective}) is larger than the padded input. Received: {size}")
    return (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


def same_padding(size: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's "same" padding along one axis: (before, after), the odd pixel going after."""
    effective = dilation * (kernel - 1) + 1
    total = max((math.ceil(size / stride) - 1) * stride + effective - size, 0)
    return total // 2, total - total // 2


def _pad_amounts(h: int, w: int, kh: int, kw: int, stride, padding: Padding, dilation) -> tuple:
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    if padding == "same":
        return same_padding(h, kh, sh, dh), same_padding(w, kw, sw, dw)
    if padding == "valid":
        return (0, 0), (0, 0)
    ph, pw = _pair(padding)
    return (ph, ph), (pw, pw)


def _windows(x: np.ndarray, kh: int, kw: int, stride, dilation) -> np.ndarray:
    """All kernel windows of a padded (N, H, W, C) input: (N, H_out, W_out, kh, kw, C)."""
    sh, sw = _pair(stride)
    dh, dw = _pair(dilation)
    n, h, w, c = x.shape
    h_out = (h - dh * (kh - 1) - 1) // sh + 1
    w_out = (w - dw * (kw - 1) - 1) // sw + 1
    if h_out < 1 or w_out < 1:
        raise ValueError(f"The kernel does not fit the (padded) input. Received: input {(h, w)}, kernel {(kh, kw)}")
    rows = (np.arange(h_out) * sh)[:, None] + np.arange(kh) * dh  # (h_out, kh)
    cols = (np.arange(w_out) * sw)[:, None] + np.arange(kw) * dw  # (w_out, kw)
    return x[:, rows[:, None, :, None], cols[None, :, None, :], :]


def _prepare(x: np.ndarray, kernel: np.ndarray, stride, padding, dilation, flip_kernel):
    batched = x.ndim == 4
    if x.ndim not in (3, 4):
        raise ValueError(f"`x` must be (H, W, C) or (N, H, W, C). Received: shape {x.shape}")
    x = np.asarray(x, dtype=np.float64)
    if not batched:
        x = x[None]
    kernel = np.asarray(kernel, dtype=np.float64)
    if flip_kernel:
        kernel = kernel[::-1, ::-1]
    kh, kw = kernel.shape[:2]
    (pt, pb), (pl, pr) = _pad_amounts(x.shape[1], x.shape[2], kh, kw, stride, padding, dilation)
    x = np.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    return _windows(x, kh, kw, stride, dilation), kernel, batched


def conv2d(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None, stride=1, padding: Padding = "valid",
           dilation=1, flip_kernel: bool = False) -> np.ndarray:
    """A 2-D convolution layer's output, the slow and obvious way.

    Args:
        x: input of shape (H, W, C_in), or (N, H, W, C_in) for a batch.
        kernel: (K_h, K_w, C_in, C_out), the layout of `keras.layers.Conv2D` kernels.
        bias: (C_out,) added to every output position, or None.
        stride: an int, or (S_h, S_w).
        padding: `"valid"`, `"same"` (TensorFlow's), or pixels per side as an int or (P_h, P_w).
        dilation: an int, or (D_h, D_w): spacing between kernel taps.
        flip_kernel: False computes cross-correlation (what Conv2D and tf.nn.conv2d compute); True computes
            true convolution (kernel rotated by 180 degrees).

    Returns:
        (H_out, W_out, C_out), or (N, H_out, W_out, C_out) for a batch, as float64.
    """
    if kernel.ndim != 4 or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"`kernel` must be (K_h, K_w, C_in={x.shape[-1]}, C_out). Received: shape {kernel.shape}")
    win, kernel, batched = _prepare(x, kernel, stride, padding, dilation, flip_kernel)
    out = np.einsum("nhwijc,ijco->nhwo", win, kernel)
    if bias is not None:
        out = out + np.asarray(bias, dtype=np.float64)
    return out if batched else out[0]


def depthwise_conv2d(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray | None = None, stride=1,
                     padding: Padding = "valid", dilation=1, flip_kernel: bool = False) -> np.ndarray:
    """A depthwise convolution: each input channel filtered on its own by `depth_multiplier` kernels.

    Args:
        x: (H, W, C) or (N, H, W, C).
        kernel: (K_h, K_w, C, M), the layout of `keras.layers.DepthwiseConv2D` kernels (M = depth multiplier).
        bias, stride, padding, dilation, flip_kernel: as in `conv2d`.

    Returns:
        (..., H_out, W_out, C * M); output channel c * M + m comes from input channel c and kernel m, as in
        `tf.nn.depthwise_conv2d`.
    """
    if kernel.ndim != 4 or kernel.shape[2] != x.shape[-1]:
        raise ValueError(f"`kernel` must be (K_h, K_w, C={x.shape[-1]}, M). Received: shape {kernel.shape}")
    win, kernel, batched = _prepare(x, kernel, stride, padding, dilation, flip_kernel)
    out = np.einsum("nhwijc,ijcm->nhwcm", win, kernel)
    out = out.reshape(*out.shape[:3], -1)
    if bias is not None:
        out = out + np.asarray(bias, dtype=np.float64)
    return out if batched else out[0]


# ---------------------------------------------------------------------------------------------------------------
# Receptive field


def receptive_field(layers: Iterable[Sequence[int]]) -> int:
    """Receptive field, in input pixels, of one output pixel of a stack of layers.

    Args:
        layers: `(kernel, stride)` or `(kernel, stride, dilation)` per layer, input side first. Pooling layers
            count as layers with their pool size as kernel.

    Each layer widens the field by D(K-1) times the product of the strides before it:

        >>> receptive_field([(3, 1), (3, 1)])
        5
        >>> receptive_field([(3, 1), (2, 2), (3, 1)])
        8
    """
    field, jump = 1, 1
    for spec in layers:
        kernel, stride, dilation = (tuple(spec) + (1,))[:3]
        field, jump = grow_receptive_field(field, jump, kernel, stride, dilation)
    return field


def grow_receptive_field(field: int, jump: int, kernel: int, stride: int = 1, dilation: int = 1) -> tuple[int, int]:
    """One layer's step of `receptive_field`: the new (field, jump), jump being the input-pixel distance between
    neighbouring outputs."""
    return field + dilation * (kernel - 1) * jump, jump * stride


# ---------------------------------------------------------------------------------------------------------------
# Parameters and multiply-accumulates (MACs). A MAC is one multiply and one add; FLOPs are about 2x MACs.


def conv2d_params(kernel: int | tuple, c_in: int, c_out: int, bias: bool = True) -> int:
    """K_h·K_w·C_in·C_out weights (+ C_out biases). A 1x1 (pointwise) conv is the case K = 1: C_in·C_out."""
    kh, kw = _pair(kernel)
    return kh * kw * c_in * c_out + (c_out if bias else 0)


def conv2d_macs(out_h: int, out_w: int, kernel: int | tuple, c_in: int, c_out: int) -> int:
    """H_out·W_out·K_h·K_w·C_in·C_out: every output value is a K_h·K_w·C_in dot product."""
    kh, kw = _pair(kernel)
    return out_h * out_w * kh * kw * c_in * c_out


def depthwise_params(kernel: int | tuple, channels: int, depth_multiplier: int = 1, bias: bool = True) -> int:
    """K_h·K_w·C·M weights (+ C·M biases)."""
    kh, kw = _pair(kernel)
    return kh * kw * channels * depth_multiplier + (channels * depth_multiplier if bias else 0)


def depthwise_macs(out_h: int, out_w: int, kernel: int | tuple, channels: int, depth_multiplier: int = 1) -> int:
    """H_out·W_out·K_h·K_w·C·M: each output channel sees one input channel only."""
    kh, kw = _pair(kernel)
    return out_h * out_w * kh * kw * channels * depth_multiplier


def separable_params(kernel: int | tuple, c_in: int, c_out: int, depth_multiplier: int = 1,
                     bias: bool = True) -> int:
    """Depthwise K_h·K_w·C_in·M plus pointwise (C_in·M)·C_out weights (+ C_out biases, as SeparableConv2D has)."""
    return depthwise_params(kernel, c_in, depth_multiplier, bias=False) + conv2d_params(
        1, c_in * depth_multiplier, c_out, bias)


def separable_macs(out_h: int, out_w: int, kernel: int | tuple, c_in: int, c_out: int,
                   depth_multiplier: int = 1) -> int:
    """Depthwise H_out·W_out·K_h·K_w·C_in·M plus pointwise H_out·W_out·C_in·M·C_out.

    Against a standard conv with the same K, C_in and C_out this is a fraction 1/C_out + M/(K_h·K_w) of the cost
    (for M = 1, K = 3, C_out = 128: about 0.12).
    """
    return depthwise_macs(out_h, out_w, kernel, c_in, depth_multiplier) + conv2d_macs(
        out_h, out_w, 1, c_in * depth_multiplier, c_out)


def dense_params(n_in: int, n_out: int, bias: bool = True) -> int:
    """n_in·n_out weights (+ n_out biases)."""
    return n_in * n_out + (n_out if bias else 0)


def dense_macs(n_in: int, n_out: int) -> int:
    """n_in·n_out."""
    return n_in * n_out
