"""The NumPy reference convolution against TensorFlow, the worked example, and the size formulas."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from cnnlab import conv_math

IMAGE = np.arange(1, 17, dtype=np.float64).reshape(4, 4, 1)
EDGE = np.array([[1, 1], [-1, -1]], np.float64).reshape(2, 2, 1, 1)
SWAP = np.array([[0, 1], [1, 0]], np.float64).reshape(2, 2, 1, 1)

GRID = [  # kernel, stride, padding, dilation; TF's CPU kernels refuse stride > 1 together with dilation > 1
    (k, s, p, d) for k, s, p, d in itertools.product([1, 2, 3, 5], [1, 2, 3], ["valid", "same", 1, 2], [1, 2])
    if not (s > 1 and d > 1)
]


def tf_padding(padding):
    return padding.upper() if isinstance(padding, str) else [[0, 0], [padding, padding], [padding, padding], [0, 0]]


@pytest.mark.parametrize("kernel, stride, padding, dilation", GRID)
def test_conv2d_matches_tf_nn_conv2d(kernel, stride, padding, dilation):
    rng = np.random.default_rng(kernel * 100 + stride * 10 + dilation)
    h, w, c_in, c_out = rng.integers(9, 14), rng.integers(9, 14), rng.integers(1, 4), rng.integers(1, 5)
    x = rng.normal(size=(2, h, w, c_in))
    k = rng.normal(size=(kernel, kernel, c_in, c_out))
    b = rng.normal(size=c_out)
    ours = conv_math.conv2d(x, k, b, stride=stride, padding=padding, dilation=dilation)
    theirs = tf.nn.conv2d(x.astype(np.float32), k.astype(np.float32), strides=stride, padding=tf_padding(padding),
                          dilations=dilation).numpy() + b
    assert ours.shape == theirs.shape
    assert np.allclose(ours, theirs, atol=1e-5 * max(1.0, np.abs(theirs).max()))
    pad = {"valid": 0}.get(padding, padding)
    if padding != "same":
        assert ours.shape[1] == conv_math.output_size(h, kernel, stride, pad, dilation)
        assert ours.shape[1] == (h + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1


@pytest.mark.parametrize("kernel, stride, padding, multiplier", itertools.product([1, 3, 4], [1, 2], ["valid", "same"],
                                                                                 [1, 2]))
def test_depthwise_conv2d_matches_tf_nn_depthwise_conv2d(kernel, stride, padding, multiplier):
    rng = np.random.default_rng(kernel + 10 * stride + 100 * multiplier)
    x = rng.normal(size=(2, 11, 10, 3))
    k = rng.normal(size=(kernel, kernel, 3, multiplier))
    ours = conv_math.depthwise_conv2d(x, k, stride=stride, padding=padding)
    theirs = tf.nn.depthwise_conv2d(x.astype(np.float32), k.astype(np.float32), strides=[1, stride, stride, 1],
                                    padding=padding.upper()).numpy()
    assert ours.shape == theirs.shape and np.allclose(ours, theirs, atol=1e-5)


def test_dilated_depthwise_matches_tf():
    rng = np.random.default_rng(7)
    x, k = rng.normal(size=(1, 12, 12, 2)), rng.normal(size=(3, 3, 2, 2))
    theirs = tf.nn.depthwise_conv2d(x.astype(np.float32), k.astype(np.float32), [1, 1, 1, 1], "SAME",
                                    dilations=[2, 2]).numpy()
    assert np.allclose(conv_math.depthwise_conv2d(x, k, padding="same", dilation=2), theirs, atol=1e-5)


def test_worked_example_cross_correlation_is_minus_8_and_true_convolution_plus_8():
    assert np.array_equal(conv_math.conv2d(IMAGE, EDGE)[..., 0], np.full((3, 3), -8.0))
    assert np.array_equal(conv_math.conv2d(IMAGE, EDGE, flip_kernel=True)[..., 0], np.full((3, 3), 8.0))
    layer = keras.layers.Conv2D(1, 2, use_bias=False)
    layer.build((None, 4, 4, 1))
    layer.set_weights([EDGE.astype(np.float32)])
    keras_out = keras.ops.convert_to_numpy(layer(IMAGE[None].astype(np.float32)))[0, ..., 0]
    assert np.array_equal(keras_out, np.full((3, 3), -8.0))  # Conv2D cross-correlates


def test_worked_example_swap_kernel():
    expected = np.array([[7, 9, 11], [15, 17, 19], [23, 25, 27]], np.float64)
    assert np.array_equal(conv_math.conv2d(IMAGE, SWAP)[..., 0], expected)
    # the kernel is symmetric under a 180-degree turn, so true convolution gives the same
    assert np.array_equal(conv_math.conv2d(IMAGE, SWAP, flip_kernel=True)[..., 0], expected)


def test_output_size_and_same_padding():
    assert conv_math.output_size(224, 7, stride=2, padding=3) == 112      # ResNet's first conv
    assert conv_math.output_size(5, 3, dilation=2) == 1
    assert conv_math.output_size(7, 3, stride=2, padding="same") == 4
    assert conv_math.same_padding(7, 3, stride=2) == (1, 1)
    assert conv_math.same_padding(6, 2) == (0, 1)                           # the odd pixel goes after
    with pytest.raises(ValueError, match="Received: 3"):
        conv_math.output_size(3, 5)


def test_parameter_and_mac_counts():
    assert conv_math.conv2d_params(3, 16, 32) == 3 * 3 * 16 * 32 + 32
    assert conv_math.conv2d_params(1, 16, 32, bias=False) == 16 * 32                # pointwise
    assert conv_math.separable_params(3, 16, 32, depth_multiplier=2) == 3 * 3 * 16 * 2 + 16 * 2 * 32 + 32
    assert conv_math.dense_params(128, 10) == 1290
    assert conv_math.conv2d_macs(10, 10, 3, 16, 32) == 10 * 10 * 9 * 16 * 32
    assert conv_math.separable_macs(10, 10, 3, 16, 32) == 10 * 10 * (9 * 16 + 16 * 32)
    sep = keras.layers.SeparableConv2D(32, 3, depth_multiplier=2)
    sep.build((None, 10, 10, 16))
    assert sep.count_params() == conv_math.separable_params(3, 16, 32, depth_multiplier=2)
