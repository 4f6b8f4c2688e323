"""Transfer learning: pretrained VGG16 or ResNet50 filters (`keras.applications`, no top) under a new head.

Training runs in two phases (see `cnnlab.training`): feature extraction with the backbone frozen, then fine-tuning
with the top of the backbone unfrozen (`unfreeze`) at a lower learning rate. The backbone is always called with
`training=False`, so its BatchNorm layers keep their ImageNet statistics in both phases.
"""

from __future__ import annotations

import os

import keras
from keras import layers

from models import register
from models.blocks import check_common, output_layer

BACKBONES = {
    "vgg16": keras.applications.VGG16,
    "resnet50": keras.applications.ResNet50,
}


@keras.saving.register_keras_serializable(package="cnnlab")
class ImageNetPreprocess(layers.Layer):
    """The input scaling an ImageNet backbone was trained with, as a serializable layer.

    `"caffe"` (VGG16, ResNet50): RGB to BGR, then the ImageNet mean pixel subtracted, no scaling; the same as
    `keras.applications.vgg16.preprocess_input`.

    Args:
        mode: `"caffe"`, `"tf"` (scale to [-1, 1]) or `"torch"` (scale to [0, 1], then ImageNet mean and std).
    """

    MEAN_BGR = (103.939, 116.779, 123.68)

    def __init__(self, mode: str = "caffe", **kwargs):
        super().__init__(**kwargs)
        if mode not in ("caffe", "tf", "torch"):
            raise ValueError(f"`mode` must be 'caffe', 'tf' or 'torch'. Received: {mode!r}")
        self.mode = mode

    def call(self, inputs):
        x = keras.ops.cast(inputs, self.compute_dtype)
        if self.mode == "caffe":
            x = keras.ops.flip(x, axis=-1)  # RGB -> BGR
            return x - keras.ops.convert_to_tensor(self.MEAN_BGR, dtype=self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        mean = keras.ops.convert_to_tensor((0.485, 0.456, 0.406), dtype=self.compute_dtype)
        std = keras.ops.convert_to_tensor((0.229, 0.224, 0.225), dtype=self.compute_dtype)
        return (x / 255.0 - mean) / std

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def build_backbone(backbone: str, input_shape, weights: str | None) -> keras.Model:
    """A `keras.applications` backbone without its top, with ImageNet weights, weights from a file, or random.

    Args:
        backbone: `"vgg16"` or `"resnet50"`.
        input_shape: `(height, width, 3)`, at least 32x32.
        weights: `"imagenet"` (downloaded once by Keras to ~/.keras/models), the path of a weights file for the
            backbone without top (`.weights.h5`, or Keras' `*_notop.h5`), or None for random initialisation.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"`backbone` must be one of {sorted(BACKBONES)}. Received: {backbone!r}")
    build = BACKBONES[backbone]
    if weights == "imagenet":
        try:
            return build(include_top=False, weights="imagenet", input_shape=tuple(input_shape))
        except Exception as e:  # an offline download fails as URLError, HTTPError or a generic Exception
            raise ValueError(
                f"Could not get the ImageNet weights of {backbone} ({type(e).__name__}); offline, download "
                f"{backbone}_weights_tf_dim_ordering_tf_kernels_notop.h5 elsewhere and pass its path as "
                f"model.transfer.weights. Received: 'imagenet'"
            ) from None
    model = build(include_top=False, weights=None, input_shape=tuple(input_shape))
    if weights is not None:
        if not os.path.isfile(weights):
            raise ValueError(f"`weights` must be 'imagenet', null or an existing weights file. Received: {weights!r}")
        model.load_weights(weights)
    return model


@register("transfer")
def transfer(
    input_shape,
    num_classes: int,
    head_dropout: float = 0.0,
    *,
    backbone="vgg16",
    weights="imagenet",
    pooling="avg",
    head_units=0,
) -> keras.Model:
    """A frozen pretrained backbone and a new classifier head.

    Args:
        input_shape: `(height, width, 3)`; pixels in [0, 255], preprocessed inside the model the backbone's way.
        num_classes: number of classes; 2 gives one sigmoid unit.
        head_dropout: dropout before the classifier.
        backbone: `"vgg16"` or `"resnet50"`.
        weights: `"imagenet"`, a local weights file, or None (random).
        pooling: `"avg"` or `"max"` global pooling of the backbone's feature map.
        head_units: width of a hidden Dense layer in the head; 0 for none.

    Returns:
        An uncompiled `keras.Model` named "transfer_<backbone>"; the backbone is the nested model named `backbone`,
        frozen.

    Example:

        >>> model = transfer((64, 64, 3), 2, backbone="vgg16", weights=None)
        >>> model.get_layer("vgg16").trainable
        False
    """
    check_common(input_shape, num_classes)
    if pooling not in ("avg", "max"):
        raise ValueError(f"`pooling` must be 'avg' or 'max'. Received: {pooling!r}")
    base = build_backbone(backbone, input_shape, weights)
    base.trainable = False
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = ImageNetPreprocess("caffe", name="preprocess")(inputs)
    # training=False keeps BatchNorm in inference mode even when the backbone is later unfrozen for fine-tuning.
    x = base(x, training=False)
    pool = layers.GlobalAveragePooling2D if pooling == "avg" else layers.GlobalMaxPooling2D
    x = pool(name="head_pool")(x)
    if head_units:
        x = layers.Dense(head_units, activation="relu", name="head_hidden")(x)
    if head_dropout:
        x = layers.Dropout(head_dropout, name="head_dropout")(x)
    x = layers.Dense(1 if num_classes == 2 else num_classes, name="head_dense")(x)
    return keras.Model(inputs, output_layer(x, num_classes), name=f"transfer_{backbone}")


def find_backbone(model: keras.Model) -> keras.Model | None:
    """The pretrained backbone inside a model (searching nested models), or None."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if layer.name in BACKBONES:
                return layer
            found = find_backbone(layer)
            if found is not None:
                return found
    return None


def unfreeze(model: keras.Model, unfreeze: int | str) -> list[str]:
    """Unfreezes the top of the backbone for fine-tuning; BatchNorm layers stay frozen.

    Args:
        model: a model holding a backbone (see `find_backbone`).
        unfreeze: how many of the backbone's top layers with weights to unfreeze (an int), or the name of the
            first layer to unfreeze (everything from it to the top).

    Returns:
        The names of the layers now trainable.
    """
    base = find_backbone(model)
    if base is None:
        raise ValueError("Fine-tuning needs a model with a pretrained backbone (model.name: transfer).")
    weighted = [layer for layer in base.layers if layer.weights]
    if isinstance(unfreeze, str):
        names = [layer.name for layer in weighted]
        if unfreeze not in names:
            raise ValueError(f"`unfreeze` names no layer with weights in {base.name}. Received: {unfreeze!r}")
        chosen = weighted[names.index(unfreeze):]
    else:
        if unfreeze < 0:
            raise ValueError(f"`unfreeze` must be >= 0. Received: {unfreeze}")
        chosen = weighted[len(weighted) - unfreeze:] if unfreeze else []
    base.trainable = True
    chosen_ids = {id(layer) for layer in chosen}
    unfrozen = []
    for layer in base.layers:
        layer.trainable = id(layer) in chosen_ids and not isinstance(layer, layers.BatchNormalization)
        if layer.trainable and layer.weights:
            unfrozen.append(layer.name)
    return unfrozen
