"""From a config to a Keras model: augmentation layers in front of a registered model family.

Augmentation is part of the model (Keras preprocessing layers, active only while training), so a saved checkpoint
takes raw [0, 255] pixels and needs nothing else to predict.
"""

from __future__ import annotations

import keras
from keras import layers

from cnnlab.config import as_size
from cnnlab.errors import UserError
from models import create_model
from models.augmentation import RandomResizedCrop


def augmentation_layers(augment_cfg: dict, seed: int) -> list[layers.Layer]:
    """The augmentation layers an `augment` config section asks for, in order."""
    out: list[layers.Layer] = []
    if augment_cfg["crop"] is not None:
        out.append(RandomResizedCrop(*as_size(augment_cfg["crop"]), scale=augment_cfg["crop_scale"],
                                     ratio=augment_cfg["crop_ratio"], seed=seed,
                                     test_crop_fraction=augment_cfg["test_crop_fraction"], name="aug_crop"))
    if augment_cfg["flip"] != "none":
        out.append(layers.RandomFlip(augment_cfg["flip"], seed=seed, name="aug_flip"))
    if augment_cfg["rotation"]:
        out.append(layers.RandomRotation(augment_cfg["rotation"], fill_mode="reflect", seed=seed, name="aug_rotation"))
    if augment_cfg["zoom"]:
        out.append(layers.RandomZoom(augment_cfg["zoom"], fill_mode="reflect", seed=seed, name="aug_zoom"))
    if augment_cfg["contrast"]:
        # RandomContrast needs to know pixels are in [0, 255] to clip correctly.
        out.append(layers.RandomContrast(augment_cfg["contrast"], value_range=(0, 255), seed=seed,
                                         name="aug_contrast"))
    # Colour jitter. Each key is "at most this much change"; Keras's layers each scale their factor differently.
    if augment_cfg["brightness"]:
        out.append(layers.RandomBrightness(augment_cfg["brightness"], value_range=(0, 255), seed=seed,
                                           name="aug_brightness"))
    if augment_cfg["saturation"]:
        # RandomSaturation multiplies saturation by f / (1 - f) for f drawn in its factor range.
        s = augment_cfg["saturation"]
        out.append(layers.RandomSaturation(((1 - s) / (2 - s), (1 + s) / (2 + s)), value_range=(0, 255),
                                           seed=seed, name="aug_saturation"))
    if augment_cfg["hue"]:
        # RandomHue shifts hue by up to half its factor of the colour wheel, either way.
        out.append(layers.RandomHue(2 * augment_cfg["hue"], value_range=(0, 255), seed=seed, name="aug_hue"))
    if augment_cfg["erasing"]:
        # A single-number factor would be an upper bound on a probability drawn per image; a pair pins it.
        p = augment_cfg["erasing"]
        out.append(layers.RandomErasing((p, p), scale=tuple(augment_cfg["erasing_scale"]),
                                        value_range=(0, 255), seed=seed, name="aug_erasing"))
    return out


def model_input_size(cfg: dict) -> tuple[int, int]:
    """The size the family network sees: the crop size when cropping, else the image size."""
    crop = cfg["augment"]["crop"]
    return as_size(crop) if crop is not None else as_size(cfg["data"]["image_size"])


def stage_image_size(cfg: dict, size) -> tuple[int, int]:
    """What images are resized to for a progressive-resizing stage whose network input is `size`.

    The resize keeps the field of view: a `size` crop of the resized image shows what an `augment.crop` crop of
    the full image shows (without cropping, the image is resized to `size` itself).
    """
    (h, w), (fh, fw) = as_size(size), model_input_size(cfg)
    ih, iw = as_size(cfg["data"]["image_size"])
    return round(ih * h / fh), round(iw * w / fw)


def build_model(cfg: dict, num_classes: int, size=None, seed: int | None = None) -> keras.Model:
    """The whole model of a config: `image -> augmentation -> family network -> probabilities`.

    Args:
        cfg: a resolved config.
        num_classes: the number of classes the data reports.
        size: the network input size of a progressive-resizing stage (`training.progressive`): the model then
            resizes each image first (see `stage_image_size`) and crops `size`. None: the config's own size.
        seed: seed of the augmentation layers; None: `run.seed`.

    Returns:
        An uncompiled `keras.Model`. Without augmentation it is the family network itself.
    """
    model_cfg = cfg["model"]
    name = model_cfg["name"]
    h, w = model_input_size(cfg) if size is None else as_size(size)
    try:
        net = create_model(name, input_shape=(h, w, 3), num_classes=num_classes,
                           head_dropout=model_cfg["head_dropout"], **model_cfg[name])
    except ValueError as e:  # builders validate their arguments; report it against the config section
        raise UserError(f"model.{name}: {e}") from None
    if not model_cfg["first_conv_trainable"]:
        first_conv(net).trainable = False
    augment_cfg = cfg["augment"] if size is None or cfg["augment"]["crop"] is None else {
        **cfg["augment"], "crop": [h, w]}
    augment = augmentation_layers(augment_cfg, cfg["run"]["seed"] if seed is None else seed)
    if size is not None and (h, w) != model_input_size(cfg):
        augment.insert(0, layers.Resizing(*stage_image_size(cfg, (h, w)), name="stage_resize"))
    if not augment:
        return net
    inputs = keras.Input(shape=(*as_size(cfg["data"]["image_size"]), 3), name="image")
    x = inputs
    for layer in augment:
        x = layer(x)
    return keras.Model(inputs, net(x), name=f"{name}_with_augmentation")


def without_pretrained_weights(cfg: dict) -> dict:
    """The config with a transfer backbone's weights set to random, for reports of size and cost that must not
    download or read weights (they do not depend on them); the config itself when it has no pretrained weights."""
    if cfg["model"]["name"] != "transfer" or cfg["model"]["transfer"]["weights"] is None:
        return cfg
    model_cfg = {**cfg["model"], "transfer": {**cfg["model"]["transfer"], "weights": None}}
    return {**cfg, "model": model_cfg}


def family_network(model: keras.Model) -> keras.Model:
    """The family network inside a model built by `build_model` (the model itself when it has no augmentation)."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return nested[-1] if nested else model


def all_layers(model: keras.Model):
    """Every layer of `model` but nested models themselves, whose layers come in their place: input side first."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)
        else:
            yield layer


def first_conv(model: keras.Model) -> layers.Conv2D:
    """The first standard convolution of the family network inside `model`: the stem of every from-scratch
    family (depthwise and separable convolutions are not `Conv2D`s)."""
    for layer in all_layers(family_network(model)):
        if type(layer) is layers.Conv2D:
            return layer
    raise ValueError(f"the model {model.name!r} has no Conv2D layer")


def network_input_size(model: keras.Model) -> tuple[int, int]:
    """The (height, width) the family network inside `model` takes."""
    return tuple(family_network(model).input_shape[1:3])


def resize_model(model: keras.Model, cfg: dict, num_classes: int, size=None, seed: int | None = None) -> keras.Model:
    """The model of `cfg` at another network input size (see `build_model`), with `model`'s weights.

    Convolutions and the pooled head have weights whose shapes do not depend on the image size, so the family
    network's weights (batch-norm statistics included) carry over as they are.
    """
    resized = build_model(cfg, num_classes, size=size, seed=seed)
    family_network(resized).set_weights(family_network(model).get_weights())
    return resized
