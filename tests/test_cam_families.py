"""Grad-CAM on the other families, each trained for a few seconds on the quadrant task of test_cam.py: the map of a
pointwise, a separable and a transfer net (through its nested backbone) points at the evidence. A file of its own
because these nets take a minute or two to train here, and the test runner shares whole files between its workers."""

import pytest

from tests.test_cam import assert_points_at_the_evidence, trained_on_quadrants


@pytest.mark.parametrize("family, sets, learning_rate, layer", [
    ("pointwise", ["model.pointwise.stem_filters=16", "model.pointwise.filters=[16,32,32]"], 0.003,
     "stage3_block1_out"),
    ("separable", ["model.separable.stem_filters=16", "model.separable.stem_strides=1",
                   "model.separable.filters=[16,32,32]"], 0.01, "stage3_block1_pointwise_act"),
])
def test_pointwise_and_separable_nets_look_at_the_evidence_too(family, sets, learning_rate, layer):
    model = trained_on_quadrants(f"model.name={family}", *sets, learning_rate=learning_rate)
    assert_points_at_the_evidence(model, layer, accuracy=0.9)


def test_a_transfer_net_looks_at_the_evidence_through_its_nested_backbone():
    # ResNet50 with random weights, frozen, at 64x64: its last feature map (inside the nested backbone) is 2x2, one
    # cell per quadrant, and the head learns the task on it in 4 epochs (92-100% over seeds 0-2; the map's peak in
    # the right quadrant for 59-64 of 100 images). Unfreezing conv5 costs 40 ms an image a step here, 8x the rest.
    model = trained_on_quadrants("model.name=transfer", "model.transfer.backbone=resnet50",
                                 "model.transfer.weights=null")
    assert_points_at_the_evidence(model, "resnet50/conv5_block3_out", accuracy=0.85)
