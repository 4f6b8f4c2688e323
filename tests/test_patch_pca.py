"""The first conv from the principal components of its input patches (`model.first_conv_init: pca`), and a first
conv held fixed (`model.first_conv_trainable: false`)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from cnnlab import config
from cnnlab.errors import UserError
from cnnlab.modeling import build_model, family_network, first_conv
from cnnlab.patch_pca import conv_inputs, principal_kernels, set_first_conv_to_pca
from cnnlab.training import train
from tests.conftest import REPO

SMOKE = str(REPO / "configs" / "smoke.yaml")


def smooth_colour_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Images whose neighbouring pixels and colour channels are correlated, as in photos: blurred noise shared by
    the channels, plus a little noise of each channel's own, in [0, 255]."""
    rng = np.random.default_rng(seed)
    grey = rng.normal(size=(n, size, size, 1))
    blur = np.ones((5, 5, 1, 1)) / 25
    grey = tf.nn.conv2d(grey, blur, 1, "SAME").numpy()
    rgb = grey * np.array([1.0, 0.8, 0.6]) + 0.05 * rng.normal(size=(n, size, size, 3))
    return (128 + 300 * rgb).clip(0, 255).astype("float32")


def channel_correlations(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """Correlation matrix of the first conv's output channels (before batch norm) over the positions whose window
    lies inside the image (a window over the zero padding is not an image patch)."""
    conv = first_conv(model)
    out = conv(conv_inputs(model, tf.constant(images), conv)).numpy()[:, 1:-1, 1:-1]
    return np.corrcoef(out.reshape(-1, out.shape[-1]).T)


def test_principal_kernels_are_unit_pairs_of_the_principal_axes_largest_variance_first():
    rng = np.random.default_rng(0)
    axes = np.linalg.qr(rng.normal(size=(3, 3)))[0]  # columns: the true principal axes
    patches = (rng.normal(size=(20_000, 3)) * [5.0, 2.0, 0.5]) @ axes.T + [7.0, -3.0, 1.0]
    kernel = principal_kernels(patches, (1, 1, 3, 8))
    assert kernel.shape == (1, 1, 3, 8)
    k = kernel.reshape(3, 8)
    for i in range(3):
        assert abs(k[:, 2 * i] @ axes[:, i]) > 0.999, i  # the i-th largest variance first, whatever the mean
        assert np.allclose(k[:, 2 * i + 1], -k[:, 2 * i])
        assert np.linalg.norm(k[:, 2 * i]) == pytest.approx(1.0)
    assert np.allclose(k[:, :6:2].T @ k[:, :6:2], np.eye(3), atol=1e-9)
    assert not k[:, 6:].any()  # 3 components make 6 filters; the others stay zero
    # The sign of each pair is fixed by the data, not by the solver: the same patches negated give the same kernel.
    assert np.allclose(principal_kernels(-patches, (1, 1, 3, 8)), kernel)


def test_principal_kernels_refuse_patches_of_another_kernel_size():
    with pytest.raises(ValueError, match=r"patches must be \(n, 27\).*Received: \(10, 12\)"):
        principal_kernels(np.zeros((10, 12)), (3, 3, 3, 16))


FIRST_CONV_OF_16 = {
    "standard": ["model.standard.filters=[16, 8]"],
    "separable": ["model.separable.stem_filters=16", "model.separable.filters=[8]"],
}


@pytest.mark.parametrize("family", sorted(FIRST_CONV_OF_16))
def test_a_pca_first_conv_decorrelates_its_channels_where_a_random_one_does_not(family):
    cfg = config.resolve([], [f"model.name={family}", "data.image_size=[24,24]", "augment.crop=[20,20]",
                              *FIRST_CONV_OF_16[family]])
    images = smooth_colour_images(64, 24)
    model = build_model(cfg, num_classes=2)
    random_corr = channel_correlations(model, images)
    train_ds = tf.data.Dataset.from_tensor_slices((images, np.zeros(64, np.int32))).batch(16)
    assert set_first_conv_to_pca(model, train_ds, max_images=48) == 48
    corr = channel_correlations(model, images)
    plus = corr[0::2, 0::2]  # one filter of each +/- pair: the components themselves
    off = ~np.eye(len(plus), dtype=bool)
    assert np.abs(plus[off]).max() < 0.1
    assert np.allclose(corr[0::2, 1::2].diagonal(), -1)  # each pair is a component and its negative
    # A random first conv mostly measures the brightness the channels share.
    assert np.abs(random_corr[~np.eye(len(random_corr), dtype=bool)]).mean() > 0.3


def test_a_fixed_first_conv_is_the_only_frozen_layer_and_the_config_keys_are_checked():
    cfg = config.resolve([SMOKE], ["model.first_conv_trainable=false"])
    model = build_model(cfg, num_classes=2)
    conv = first_conv(model)
    assert not conv.trainable and conv.name == "stage1_block1_conv"
    frozen = {id(w) for w in conv.weights}
    assert all(id(w) not in frozen for w in model.trainable_weights)
    assert len(model.trainable_weights) == len(build_model(config.resolve([SMOKE]), 2).trainable_weights) - 1
    with pytest.raises(UserError, match=r"model.first_conv_init must be one of 'random', 'pca'. Received: 'whiten'"):
        config.resolve([SMOKE], ["model.first_conv_init=whiten"])
    with pytest.raises(UserError, match=r"model.first_conv_init is for the from-scratch families.*Received: 'pca'"):
        config.resolve([], ["model.name=transfer", "model.first_conv_init=pca"])


def test_training_starts_from_the_pca_kernels_and_a_fixed_first_conv_keeps_them(tmp_path, capsys):
    cfg = config.resolve([SMOKE], [f"run.dir={tmp_path}", "training.epochs=2", "data.synthetic_size=128",
                                   "model.first_conv_init=pca", "model.first_conv_trainable=false"])
    run_dir = train(cfg, [SMOKE])
    assert "First conv: the principal components of 128 training images' patches" in capsys.readouterr().out
    initial, last = (keras.models.load_model(run_dir / "checkpoints" / f"{n}.keras") for n in ("initial", "last"))
    k0 = keras.ops.convert_to_numpy(first_conv(initial).kernel)
    n = k0.shape[-1] // 2
    plus = k0.reshape(-1, 2 * n)[:, 0::2]
    assert np.allclose(plus.T @ plus, np.eye(n), atol=1e-5)  # orthonormal components, not a random draw
    assert np.array_equal(keras.ops.convert_to_numpy(first_conv(last).kernel), k0)
    assert not first_conv(last).trainable  # the checkpoint keeps it fixed for anyone who trains it on
    second = [layer.name for layer in family_network(initial).layers if isinstance(layer, keras.layers.Conv2D)][1]
    assert not np.array_equal(*(family_network(m).get_layer(second).kernel for m in (initial, last)))
