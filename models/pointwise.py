"""1x1 (pointwise) CNNs: bottleneck blocks in which 1x1 convolutions squeeze and expand channels around a KxK conv.

A 1x1 convolution is a per-pixel linear map across channels: it mixes channels without looking at neighbours, for
C_in·C_out weights. Squeezing channels before the KxK conv (ResNet's bottleneck, Inception's reductions) makes the
expensive spatial conv work on fewer channels; a 1x1-conv classifier (Network in Network) replaces the Dense head.
"""

from __future__ import annotations

import keras
from keras import layers

from models import register
from models.blocks import (check_common, conv_bn_act, dense_head, expand_stages, output_layer, regularizer,
                           shortcut, stage_end, stem)


@register("pointwise")
def pointwise(
    input_shape,
    num_classes: int,
    head_dropout: float = 0.0,
    *,
    stem_filters=32,
    stem_kernel_size=3,
    stem_strides=1,
    filters=(64, 128, 256),
    blocks=1,
    bottleneck_ratio=0.25,
    kernel_size=3,
    strides=1,
    activation="relu",
    batch_norm=True,
    pooling="max",
    dropout=0.0,
    residual=True,
    head="dense",
    kernel_initializer="he_normal",
    weight_decay=0.0,
    bn_momentum=0.99,
) -> keras.Model:
    """A KxK stem, then stages of 1x1-squeeze / KxK / 1x1-expand bottleneck blocks, then a classifier.

    Args:
        input_shape: `(height, width, channels)`; pixels in [0, 255], rescaled inside the model.
        num_classes: number of classes; 2 gives one sigmoid unit.
        head_dropout: dropout before the classifier.
        stem_filters: channels of the KxK stem conv (the first layer must look at neighbours), or a list with the
            channels of each of several stem convs.
        stem_kernel_size: K of the stem convs (one value, or one per stem conv).
        stem_strides: stride of the stem convs (one value, or one per stem conv).
        filters: output channels of each stage; its length sets the number of stages.
        blocks: bottleneck blocks per stage (per stage).
        bottleneck_ratio: the squeezed width as a fraction of the stage's filters (per stage).
        kernel_size: K of the spatial conv inside each block (per stage).
        strides: stride of a stage's first block (per stage).
        activation: Keras activation name (per stage).
        batch_norm: batch norm after each conv (per stage).
        pooling: `"max"`, `"avg"` or `"none"` closing each stage (per stage).
        dropout: spatial dropout closing each stage (per stage).
        residual: shortcut around each block (projected by a 1x1 conv when the shape changes).
        head: `"dense"` (global pooling then Dense) or `"conv"` (a 1x1 conv to class scores, then global pooling).
        kernel_initializer: Keras initializer name for conv kernels.
        weight_decay: L2 penalty on kernels.
        bn_momentum: momentum of the batch-norm moving statistics; lower follows fast-changing weights sooner
            (short runs, few steps per epoch).

    Returns:
        An uncompiled `keras.Model` named "pointwise".

    Example:

        >>> model = pointwise((64, 64, 3), 2, filters=[32, 64], bottleneck_ratio=0.25)
        >>> model.get_layer("stage2_block1_squeeze_conv").kernel.shape   # 1x1, 32 channels in, 16 out
        (1, 1, 32, 16)
    """
    check_common(input_shape, num_classes)
    if head not in ("dense", "conv"):
        raise ValueError(f"`head` must be 'dense' or 'conv'. Received: {head!r}")
    stages = expand_stages(filters, blocks=blocks, bottleneck_ratio=bottleneck_ratio, kernel_size=kernel_size,
                           strides=strides, activation=activation, batch_norm=batch_norm, pooling=pooling,
                           dropout=dropout)
    common = dict(kernel_initializer=kernel_initializer, weight_decay=weight_decay, bn_momentum=bn_momentum)
    inputs, x = stem(input_shape, stem_filters, stem_kernel_size, stem_strides, stages[0], **common)
    for i, st in enumerate(stages, start=1):
        squeezed = max(1, int(round(st["filters"] * st["bottleneck_ratio"])))
        act, bn = st["activation"], st["batch_norm"]
        for b in range(1, st["blocks"] + 1):
            name = f"stage{i}_block{b}"
            block_in = x
            x = conv_bn_act(x, squeezed, 1, activation=act, batch_norm=bn, name=f"{name}_squeeze", **common)
            x = conv_bn_act(x, squeezed, st["kernel_size"], strides=st["strides"] if b == 1 else 1, activation=act,
                            batch_norm=bn, name=f"{name}_spatial", **common)
            x = conv_bn_act(x, st["filters"], 1, activation=None if residual else act, batch_norm=bn,
                            name=f"{name}_expand", **common)
            if residual:
                x = shortcut(block_in, x, batch_norm=bn, name=name, **common)
                x = layers.Activation(act, name=f"{name}_out")(x)
        x = stage_end(x, st["pooling"], st["dropout"], name=f"stage{i}")
    if head == "dense":
        outputs = dense_head(x, num_classes, head_dropout, weight_decay)
    else:
        if head_dropout:
            x = layers.Dropout(head_dropout, name="head_dropout")(x)
        units = 1 if num_classes == 2 else num_classes
        x = layers.Conv2D(units, 1, kernel_regularizer=regularizer(weight_decay), name="head_conv")(x)
        x = layers.GlobalAveragePooling2D(name="head_pool")(x)
        outputs = output_layer(x, num_classes)
    return keras.Model(inputs, outputs, name="pointwise")
