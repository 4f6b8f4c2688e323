"""Filter pictures: tiles, scaling, orientation, mixing matrices, the CLI, and famous backbones out of the box."""

import re

import keras
import numpy as np
import pytest

from cnnlab import config, plots
from cnnlab.modeling import build_model
from cnnlab.runtime import set_precision
from cnnlab.visualize import write_filter_figures
from tests.conftest import REPO, assert_user_error, run_cli, run_cli_in_process

SOBEL_X = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)


def test_one_tile_per_filter():
    kernel = np.zeros((3, 3, 3, 10), np.float32)
    for i in range(10):
        kernel[..., i] = i + 1  # each filter one value: tiles of distinct grays under a global scale
    grid = plots.kernel_grid(kernel, per_tile=False, zoom=2)
    values = set(np.round(np.unique(grid), 5)) - {1.0}  # white background and the strongest tile share 1.0
    assert len(values) + 1 == 10


def test_a_zero_kernel_renders_mid_gray():
    grid = plots.kernel_grid(np.zeros((3, 3, 3, 4), np.float32), zoom=1, )
    tiles = grid[1:4, 1:4]  # the first tile, inside the 1-pixel gap
    assert np.allclose(tiles, 0.5)
    assert np.allclose(plots.symmetric_scale(np.zeros((2, 3, 3)), per_tile=False), 0.5)


def test_sobel_x_in_a_first_layer_renders_dark_left_and_light_right():
    inputs = keras.Input((16, 16, 3))
    conv = keras.layers.Conv2D(2, 3, name="first")
    model = keras.Model(inputs, conv(inputs))
    weights = np.zeros((3, 3, 3, 2), np.float32)
    weights[..., 0] = SOBEL_X[..., None]
    conv.set_weights([weights, np.zeros(2, np.float32)])
    grid = plots.kernel_grid(plots.layer_kernel(plots.find_conv_layer(model)), zoom=1)
    tile = grid[1:4, 1:4]  # filter 0
    assert np.all(tile[:, 0] < 0.5) and np.allclose(tile[:, 1], 0.5) and np.all(tile[:, 2] > 0.5)
    assert tile[1, 0].mean() < tile[0, 0].mean()  # the -2 in the middle row is the darkest


def test_one_by_one_heat_map_is_c_out_by_c_in():
    inputs = keras.Input((8, 8, 6))
    conv = keras.layers.Conv2D(4, 1, name="mix")
    model = keras.Model(inputs, conv(inputs))
    matrix = plots.mixing_matrix(model.get_layer("mix"))
    assert matrix.shape == (4, 6)
    assert np.array_equal(matrix, np.asarray(conv.kernel)[0, 0].T)
    fig = plots.plot_mixing_matrix(model.get_layer("mix"), "m")
    assert fig.axes[0].images[0].get_array().shape == (4, 6)


def test_depthwise_kernels_get_one_tile_per_channel(tmp_path):
    model = build_model(config.resolve([], ["model.name=separable", "data.image_size=[32,32]",
                                            "model.separable.depth_multiplier=2"]), 2)
    layer = plots.find_conv_layer(model, "stage1_block1_depthwise")
    fig = plots.plot_kernels(layer, "sep")
    assert "one tile per channel (64 shown)" in fig.axes[0].get_title()  # 32 channels x 2


@pytest.mark.parametrize("backbone, layer, shape", [("vgg16", "block1_conv1", (3, 3, 3, 64)),
                                                     ("resnet50", "conv1_conv", (7, 7, 3, 64))])
def test_famous_first_layers_render_out_of_the_box(backbone, layer, shape, tmp_path):
    cfg = config.resolve([str(REPO / f"configs/cats_vs_dogs_{backbone}.yaml")],
                         ["model.transfer.weights=null", "data.image_size=[64,64]"])
    model = build_model(cfg, 2)
    first = plots.find_conv_layer(model)
    assert first.name == layer and plots.layer_kernel(first).shape == shape
    image = np.random.default_rng(0).uniform(0, 255, (64, 64, 3)).astype("float32")
    written = write_filter_figures(model, backbone, tmp_path, image=image)
    names = sorted(p.split("/")[-1] for p in written)
    assert names == [f"{layer}_{n}.png" for n in ("classic_filters", "feature_maps", "kernels", "kernels_by_channel")]


def test_most_similar_filter_finds_a_planted_sobel():
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 0.05, (3, 3, 3, 16)).astype(np.float32)
    kernel[..., 11] = -SOBEL_X[..., None]  # an inverted Sobel x
    best, cos = plots.most_similar_filters(kernel)["Sobel x"]
    assert best == 11 and cos < -0.95


def test_feature_maps_of_a_mixed_precision_model_are_drawn_as_float32_not_flat():
    cfg = config.resolve([str(REPO / "configs" / "smoke.yaml")], [])
    set_precision("mixed_bfloat16")
    try:
        model = build_model(cfg, 2)
    finally:
        set_precision("float32")
    image = np.random.default_rng(0).uniform(0, 255, (32, 32, 3)).astype(np.float32)
    fig = plots.plot_feature_maps(model, plots.find_conv_layer(model), image, "m")
    maps = [im.get_array() for ax in fig.axes[1:] for im in ax.images]
    assert len(maps) == 8 and all(m.dtype == np.float32 and float(np.std(m)) > 0 for m in maps)


def test_kernel_structure_tells_colour_blobs_edges_and_noise_apart():
    rng = np.random.default_rng(0)
    kernel = rng.normal(0, 1, (7, 7, 3, 6))                      # filters 4, 5: random
    kernel[..., 0] = 0
    kernel[..., 0, 0] = 1                                         # a red blob
    ramp = np.arange(7) - 3.0
    kernel[..., 1] = ramp[None, :, None]                          # brightness rising left to right: 0 degrees
    kernel[..., 2] = ramp[:, None, None] * [1.0, -1.0, 0.0]       # red up, green down, top to bottom: 90 degrees
    kernel[..., 3] = np.sign(ramp)[None, :, None] + 0.2 * rng.normal(size=(7, 7, 3))  # a noisy step edge
    found = plots.kernel_structure(kernel)
    assert [f.kind for f in found] == ["colour blob", "oriented edge", "oriented edge", "oriented edge", "other",
                                       "other"]
    assert found[0].blob > 0.99 and found[1].edge > 0.99
    assert found[1].angle == pytest.approx(0, abs=1e-6) and found[2].angle == pytest.approx(90, abs=1e-6)
    assert found[3].angle == pytest.approx(0, abs=10)
    assert all(f.blob < 0.2 and f.edge < 0.2 for f in found[4:])  # random filters: ~2% and ~4% expected
    assert plots.structure_summary(kernel).startswith("1 colour blobs, 3 oriented edges (ramps at 0, 0, 90 degrees)")


def test_a_larger_learned_edge_matches_its_classic_filter_resampled_not_zero_padded():
    # A 7x7 layer learns a smooth left-to-right ramp, not a 3x3 Sobel surrounded by zeros.
    rng = np.random.default_rng(1)
    kernel = rng.normal(0, 0.1, (7, 7, 3, 8)).astype(np.float32)
    ramp = np.tile(np.linspace(-1, 1, 7), (7, 1))
    kernel[..., 5] = ramp[..., None] + rng.normal(0, 0.05, (7, 7, 3))
    best, cos = plots.most_similar_filters(kernel)["Sobel x"]
    assert best == 5 and cos > 0.95
    padded = np.pad(SOBEL_X, 2).reshape(-1)  # what a zero-padded Sobel would score against the same filter
    learned = kernel[..., 5].mean(axis=2).reshape(-1)
    assert padded @ learned / (np.linalg.norm(padded) * np.linalg.norm(learned)) < 0.7


def test_cli_on_the_trained_smoke_run_writes_figures_says_where_and_finds_structure(tmp_path, capsys):
    from cnnlab import config
    from cnnlab.training import train

    train(config.resolve([str(REPO / "configs/smoke.yaml")], [f"run.dir={tmp_path}", "run.name=r"]), [])
    proc = run_cli("visualize_filters.py", "--run", str(tmp_path / "r"), "--svg", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = [line.removeprefix("Wrote ") for line in proc.stdout.splitlines() if line.startswith("Wrote ")]
    expected = {"kernels", "kernels_by_channel", "feature_maps", "classic_filters", "before_after"}
    assert {p.split("stage1_block1_conv_")[1].rsplit(".", 1)[0] for p in written} == expected
    assert all((tmp_path / "r" / "figures").joinpath(p.split("/")[-1]).stat().st_size > 1000 for p in written)
    assert any(p.endswith(".svg") for p in written)
    assert "stage1_block1_conv: " in proc.stdout and " of 8 filters" in proc.stdout  # smoke's first layer: 8
    # The try-it-now config ends with first-layer kernels a person can read: blobs or edges by the project's count.
    blobs, edges = map(int, re.search(r"(\d+) colour blobs, (\d+) oriented edges", proc.stdout).groups())
    assert blobs + edges >= 1 and edges >= 1, proc.stdout
    assert_user_error(run_cli_in_process(capsys, "visualize_filters.py", "--run", str(tmp_path / "r"), "--layer",
                                         "nope"), "--layer", "stage1_block1_conv", "Received: 'nope'")
    assert_user_error(run_cli_in_process(capsys, "visualize_filters.py", "--checkpoint",
                                         str(tmp_path / "missing.keras")), "no such file")


def test_a_first_layer_held_fixed_gets_no_before_after_figure(tmp_path):
    from cnnlab import config
    from cnnlab.modeling import build_model
    from cnnlab.visualize import write_filter_figures

    names = {}
    for trainable in (True, False):
        cfg = config.resolve([str(REPO / "configs/smoke.yaml")], [f"model.first_conv_trainable={str(trainable).lower()}"])
        model = build_model(cfg, 2)
        written = write_filter_figures(model, "m", tmp_path / str(trainable), initial=build_model(cfg, 2))
        names[trainable] = {p.split("stage1_block1_conv_")[1].rsplit(".", 1)[0] for p in written}
    assert names[True] == {"kernels", "kernels_by_channel", "before_after"}
    assert names[False] == {"kernels", "kernels_by_channel"}


def test_before_after_shows_the_learned_change_as_a_third_panel():
    rng = np.random.default_rng(0)
    before = rng.normal(0, 1, (3, 3, 3, 4)).astype(np.float32)
    after = before.copy()
    after[..., 2] += SOBEL_X[..., None]  # training "added" a Sobel-x to filter 2
    fig = plots.plot_before_after(before, after, "t")
    change = fig.axes[2].images[0].get_array()
    assert np.allclose(change, plots.kernel_grid(after - before))
    assert "learned change" in fig.axes[2].get_title()
    row, col = divmod(2, 2)  # 4 tiles lay out 2 x 2; each tile is 3 x 8 = 24 pixels with a 1-pixel gap
    tile = change[1 + row * 25: 1 + row * 25 + 24, 1 + col * 25: 1 + col * 25 + 24]
    assert tile[:, :8].mean() < 0.5 < tile[:, 16:].mean()  # dark left column, light right column
