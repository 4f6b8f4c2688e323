"""Standard CNNs: stacks of KxK Conv2D blocks, the family every other one is compared against."""

from __future__ import annotations

import keras
from models import register
from models.blocks import check_common, conv_bn_act, dense_head, expand_stages, rescaled_input, shortcut, stage_end


@register("standard")
def standard(
    input_shape,
    num_classes: int,
    head_dropout: float = 0.0,
    *,
    filters=(32, 64, 128),
    blocks=1,
    kernel_size=3,
    strides=1,
    padding="same",
    dilation_rate=1,
    activation="relu",
    batch_norm=True,
    pooling="max",
    dropout=0.0,
    residual=False,
    kernel_initializer="he_normal",
    weight_decay=0.0,
    bn_momentum=0.99,
) -> keras.Model:
    """A plain CNN: stages of KxK conv blocks, each stage closed by pooling, then a global-pooling classifier.

    Every per-stage argument takes one value for all stages or a list with one value per stage.

    Args:
        input_shape: `(height, width, channels)`; pixels in [0, 255], rescaled to [0, 1] inside the model.
        num_classes: number of classes; 2 gives one sigmoid unit.
        head_dropout: dropout before the classifier.
        filters: output channels of each stage; its length sets the number of stages.
        blocks: conv blocks per stage (per stage).
        kernel_size: K of the KxK kernels (per stage).
        strides: stride of a stage's first conv (per stage).
        padding: `"same"` or `"valid"` (per stage).
        dilation_rate: kernel dilation (per stage).
        activation: any Keras activation name (per stage).
        batch_norm: batch norm after each conv (per stage).
        pooling: `"max"`, `"avg"` or `"none"` 2x2 pooling closing each stage (per stage).
        dropout: spatial dropout closing each stage (per stage).
        residual: add a shortcut around each stage's conv blocks (projected when shapes change).
        kernel_initializer: Keras initializer for conv kernels, a name or a serialized initializer (per stage).
        weight_decay: L2 penalty on conv and dense kernels.
        bn_momentum: momentum of the batch-norm moving statistics; lower follows fast-changing weights sooner
            (short runs, few steps per epoch).

    Returns:
        An uncompiled `keras.Model` named "standard".

    Example:

        >>> model = standard((64, 64, 3), 2, filters=[8, 16], kernel_size=[5, 3])
        >>> model.get_layer("stage1_block1_conv").kernel.shape
        (5, 5, 3, 8)
    """
    check_common(input_shape, num_classes)
    stages = expand_stages(filters, blocks=blocks, kernel_size=kernel_size, strides=strides, padding=padding,
                           dilation_rate=dilation_rate, activation=activation, batch_norm=batch_norm,
                           pooling=pooling, dropout=dropout, kernel_initializer=kernel_initializer)
    inputs, x = rescaled_input(input_shape)
    for i, st in enumerate(stages, start=1):
        stage_in = x
        for b in range(1, st["blocks"] + 1):
            x = conv_bn_act(
                x, st["filters"], st["kernel_size"], strides=st["strides"] if b == 1 else 1, padding=st["padding"],
                dilation_rate=st["dilation_rate"], activation=st["activation"], batch_norm=st["batch_norm"],
                kernel_initializer=st["kernel_initializer"], weight_decay=weight_decay, bn_momentum=bn_momentum,
                name=f"stage{i}_block{b}",
            )
        if residual:
            x = shortcut(stage_in, x, batch_norm=st["batch_norm"], kernel_initializer=st["kernel_initializer"],
                         weight_decay=weight_decay, bn_momentum=bn_momentum, name=f"stage{i}")
        x = stage_end(x, st["pooling"], st["dropout"], name=f"stage{i}")
    outputs = dense_head(x, num_classes, head_dropout, weight_decay)
    return keras.Model(inputs, outputs, name="standard")
