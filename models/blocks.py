"""Building blocks shared by the model families: per-stage arguments, conv-BN-activation, shortcuts, heads."""

from __future__ import annotations

from typing import Any

import keras
from keras import layers


def per_stage(name: str, value: Any, num_stages: int, unit: str = "stage") -> list:
    """Expands a per-stage argument: one value for every stage, or a list with one value per stage."""
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ValueError(
                f"`{name}` must have one value per {unit} ({num_stages} {unit}s), or be a single value. "
                f"Received: {list(value)!r}"
            )
        return list(value)
    return [value] * num_stages


def expand_stages(filters, **per_stage_args) -> list[dict]:
    """One dict of arguments per stage: `filters` sets the number of stages, every other argument is spread over
    them with `per_stage`.

    Example:

        >>> expand_stages([8, 16], kernel_size=[5, 3], pooling="max")
        [{'filters': 8, 'kernel_size': 5, 'pooling': 'max'}, {'filters': 16, 'kernel_size': 3, 'pooling': 'max'}]
    """
    filters = list(filters) if isinstance(filters, (list, tuple)) else [filters]
    columns = {name: per_stage(name, value, len(filters)) for name, value in per_stage_args.items()}
    return [{"filters": f, **{name: column[i] for name, column in columns.items()}} for i, f in enumerate(filters)]


def rescaled_input(input_shape):
    """The image input (pixels in [0, 255]) and its rescaling to [0, 1], where the from-scratch families start."""
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    return inputs, layers.Rescaling(1.0 / 255, name="rescale")(inputs)


def regularizer(weight_decay: float):
    """An L2 kernel regularizer, or None when weight decay is off."""
    return keras.regularizers.L2(weight_decay) if weight_decay else None


def stem(input_shape, filters, kernel_size, strides, first_stage: dict, **common):
    """The image input, its rescaling, and one or more KxK conv-BN-activation layers with the first stage's
    activation and batch norm.

    The pointwise and separable families start this way: their stages cannot see neighbouring pixels on their own
    (1x1) or mix channels in their first layer (depthwise), so standard convs come first. `filters` is one number
    for one conv (MobileNet), or a list for several (Xception's entry flow has two); `kernel_size` and `strides` then
    take one value for all of them or a list with one per conv. The first conv is named "stem", the next "stem2", ...
    """
    filters = list(filters) if isinstance(filters, (list, tuple)) else [filters]
    kernel_sizes = per_stage("stem_kernel_size", kernel_size, len(filters), unit="stem conv")
    strides = per_stage("stem_strides", strides, len(filters), unit="stem conv")
    inputs, x = rescaled_input(input_shape)
    for i, (f, k, s) in enumerate(zip(filters, kernel_sizes, strides), start=1):
        x = conv_bn_act(x, f, k, strides=s, activation=first_stage["activation"],
                        batch_norm=first_stage["batch_norm"], name="stem" if i == 1 else f"stem{i}", **common)
    return inputs, x


def norm_act(x, batch_norm: bool, activation: str, name: str, bn_momentum: float = 0.99):
    """Batch norm (optional) then the activation."""
    if batch_norm:
        x = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_bn")(x)
    if activation and activation != "linear":
        x = layers.Activation(activation, name=f"{name}_act")(x)
    return x


def conv_bn_act(x, filters, kernel_size, *, strides=1, padding="same", dilation_rate=1, activation="relu",
                batch_norm=True, kernel_initializer="he_normal", weight_decay=0.0, bn_momentum=0.99, name: str):
    """A KxK Conv2D, batch norm and activation; the conv has no bias when batch norm follows it."""
    x = layers.Conv2D(
        filters, kernel_size, strides=strides, padding=padding, dilation_rate=dilation_rate,
        use_bias=not batch_norm, kernel_initializer=kernel_initializer,
        kernel_regularizer=regularizer(weight_decay), name=f"{name}_conv",
    )(x)
    return norm_act(x, batch_norm, activation, name, bn_momentum)


def shortcut(inputs, outputs, *, batch_norm=True, kernel_initializer="he_normal", weight_decay=0.0, bn_momentum=0.99,
             name: str):
    """Adds a residual shortcut from `inputs` to `outputs`, projecting with a strided 1x1 conv when shapes differ."""
    in_shape, out_shape = inputs.shape, outputs.shape
    if in_shape[1] is not None and out_shape[1] is not None and in_shape[1] % out_shape[1] != 0:
        raise ValueError(
            "A residual connection needs the stage's output size to divide its input size; use padding 'same'. "
            f"Received: input {tuple(in_shape[1:3])}, output {tuple(out_shape[1:3])}"
        )
    if tuple(in_shape[1:]) != tuple(out_shape[1:]):
        stride = in_shape[1] // out_shape[1] if in_shape[1] else 1
        inputs = layers.Conv2D(
            out_shape[-1], 1, strides=stride, use_bias=not batch_norm, kernel_initializer=kernel_initializer,
            kernel_regularizer=regularizer(weight_decay), name=f"{name}_proj_conv",
        )(inputs)
        if batch_norm:
            inputs = layers.BatchNormalization(momentum=bn_momentum, name=f"{name}_proj_bn")(inputs)
    return layers.Add(name=f"{name}_add")([outputs, inputs])


def stage_end(x, pooling: str, dropout: float, name: str):
    """2x2 pooling (max/avg/none) then spatial dropout, closing a stage."""
    if pooling == "max":
        x = layers.MaxPooling2D(2, name=f"{name}_maxpool")(x)
    elif pooling == "avg":
        x = layers.AveragePooling2D(2, name=f"{name}_avgpool")(x)
    if dropout:
        x = layers.SpatialDropout2D(dropout, name=f"{name}_dropout")(x)
    return x


def output_layer(x, num_classes: int, name: str = "predictions"):
    """The probability output, computed in float32 so mixed precision stays numerically safe."""
    activation = "sigmoid" if num_classes == 2 else "softmax"
    return layers.Activation(activation, dtype="float32", name=name)(x)


def dense_head(x, num_classes: int, dropout: float, weight_decay: float = 0.0):
    """Global average pooling, dropout and a Dense classifier (one unit for two classes)."""
    x = layers.GlobalAveragePooling2D(name="head_pool")(x)
    if dropout:
        x = layers.Dropout(dropout, name="head_dropout")(x)
    units = 1 if num_classes == 2 else num_classes
    x = layers.Dense(units, kernel_regularizer=regularizer(weight_decay), name="head_dense")(x)
    return output_layer(x, num_classes)


def check_common(input_shape, num_classes: int) -> None:
    if len(input_shape) != 3:
        raise ValueError(f"`input_shape` must be (height, width, channels). Received: {input_shape!r}")
    if num_classes < 2:
        raise ValueError(f"`num_classes` must be at least 2. Received: {num_classes!r}")
