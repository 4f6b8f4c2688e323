"""Depthwise-separable CNNs (MobileNet / Xception style): a KxK depthwise conv filters each channel on its own,
then a 1x1 pointwise conv mixes channels.

Splitting spatial filtering from channel mixing costs K·K·C_in·M + C_in·M·C_out weights instead of
K·K·C_in·C_out, about 1/C_out + M/K² of a standard conv's parameters and MACs.
"""

from __future__ import annotations

import keras
from keras import layers

from models import register
from models.blocks import (check_common, conv_bn_act, dense_head, expand_stages, norm_act, regularizer,
                           shortcut, stage_end, stem)


@register("separable")
def separable(
    input_shape,
    num_classes: int,
    head_dropout: float = 0.0,
    *,
    stem_filters=32,
    stem_kernel_size=3,
    stem_strides=2,
    filters=(64, 128, 256),
    blocks=1,
    kernel_size=3,
    depth_multiplier=1,
    depthwise_activation=True,
    strides=1,
    activation="relu",
    batch_norm=True,
    pooling="max",
    dropout=0.0,
    residual=False,
    kernel_initializer="he_normal",
    weight_decay=0.0,
    bn_momentum=0.99,
) -> keras.Model:
    """A standard KxK stem, then stages of depthwise-KxK + pointwise-1x1 blocks, then a Dense classifier.

    Args:
        input_shape: `(height, width, channels)`; pixels in [0, 255], rescaled inside the model.
        num_classes: number of classes; 2 gives one sigmoid unit.
        head_dropout: dropout before the classifier.
        stem_filters: channels of the standard KxK stem conv (as MobileNet starts), or a list with the channels of
            each of several stem convs (Xception's entry flow has two).
        stem_kernel_size: K of the stem convs (one value, or one per stem conv).
        stem_strides: stride of the stem convs (one value, or one per stem conv).
        filters: pointwise output channels of each stage; its length sets the number of stages.
        blocks: separable blocks per stage (per stage).
        kernel_size: K of the depthwise kernels (per stage).
        depth_multiplier: depthwise kernels per input channel (per stage).
        depthwise_activation: batch norm and activation between the depthwise and the pointwise conv, as
            MobileNet has them; False feeds the depthwise output straight into the pointwise conv, as Xception
            (and Keras' `SeparableConv2D`) does.
        strides: stride of a stage's first depthwise conv (per stage).
        activation: Keras activation name (per stage).
        batch_norm: batch norm after the pointwise conv, and after the depthwise one when
            `depthwise_activation` is True (per stage).
        pooling: `"max"`, `"avg"` or `"none"` closing each stage (per stage).
        dropout: spatial dropout closing each stage (per stage).
        residual: shortcut around each block (projected when the shape changes).
        kernel_initializer: Keras initializer name for kernels.
        weight_decay: L2 penalty on kernels.
        bn_momentum: momentum of the batch-norm moving statistics; lower follows fast-changing weights sooner
            (short runs, few steps per epoch).

    Returns:
        An uncompiled `keras.Model` named "separable".

    Example:

        >>> model = separable((64, 64, 3), 2, filters=[32, 64], depth_multiplier=2)
        >>> model.get_layer("stage2_block1_depthwise").depthwise_kernel.shape   # 32 channels x 2 kernels each
        (3, 3, 32, 2)
    """
    check_common(input_shape, num_classes)
    stages = expand_stages(filters, blocks=blocks, kernel_size=kernel_size, depth_multiplier=depth_multiplier,
                           strides=strides, activation=activation, batch_norm=batch_norm, pooling=pooling,
                           dropout=dropout)
    common = dict(kernel_initializer=kernel_initializer, weight_decay=weight_decay, bn_momentum=bn_momentum)
    inputs, x = stem(input_shape, stem_filters, stem_kernel_size, stem_strides, stages[0], **common)
    for i, st in enumerate(stages, start=1):
        act, bn = st["activation"], st["batch_norm"]
        for b in range(1, st["blocks"] + 1):
            name = f"stage{i}_block{b}"
            block_in = x
            x = layers.DepthwiseConv2D(
                st["kernel_size"], strides=st["strides"] if b == 1 else 1, padding="same",
                depth_multiplier=st["depth_multiplier"], use_bias=not bn, depthwise_initializer=kernel_initializer,
                depthwise_regularizer=regularizer(weight_decay), name=f"{name}_depthwise",
            )(x)
            # With nothing between them, depthwise + pointwise is one factorised linear conv: Xception found that
            # trains faster and better, and on a CPU it also skips a memory-bound batch norm pass.
            if depthwise_activation:
                x = norm_act(x, bn, act, name=f"{name}_depthwise", bn_momentum=bn_momentum)
            x = conv_bn_act(x, st["filters"], 1, activation=None if residual else act, batch_norm=bn,
                            name=f"{name}_pointwise", **common)
            if residual:
                x = shortcut(block_in, x, batch_norm=bn, name=name, **common)
                x = layers.Activation(act, name=f"{name}_out")(x)
        x = stage_end(x, st["pooling"], st["dropout"], name=f"stage{i}")
    outputs = dense_head(x, num_classes, head_dropout, weight_decay)
    return keras.Model(inputs, outputs, name="separable")
