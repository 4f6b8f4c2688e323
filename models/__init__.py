"""Model families, registered by name and built with one call.

Each family lives in its own module and registers a builder whose keyword arguments are exactly the keys of its
section in the config (`model.<name>` in configs/defaults.yaml). Builders know nothing of YAML, data or training.

Example:

    >>> from models import create_model
    >>> model = create_model("standard", input_shape=(64, 64, 3), num_classes=2, filters=[8, 16])
    >>> model.output_shape
    (None, 1)
"""

from __future__ import annotations

import inspect
from typing import Callable

import keras

_REGISTRY: dict[str, Callable[..., keras.Model]] = {}


def register(name: str) -> Callable:
    """Decorator that registers a model builder under `name`."""

    def wrap(builder: Callable[..., keras.Model]) -> Callable[..., keras.Model]:
        if name in _REGISTRY:
            raise ValueError(f"A model family is already registered under this name. Received: {name!r}")
        _REGISTRY[name] = builder
        return builder

    return wrap


def list_models() -> list[str]:
    """The registered family names, sorted."""
    return sorted(_REGISTRY)


def builder_arguments(name: str) -> list[str]:
    """The family-specific keyword arguments of a builder (its config keys)."""
    params = inspect.signature(_REGISTRY[name]).parameters
    return [p for p in params if p not in ("input_shape", "num_classes", "head_dropout")]


def create_model(
    name: str, input_shape: tuple[int, int, int], num_classes: int, head_dropout: float = 0.0, **kwargs
) -> keras.Model:
    """Builds a registered model family.

    Args:
        name: the family, one of `list_models()`.
        input_shape: `(height, width, channels)` of the images, pixel values in [0, 255].
        num_classes: 2 gives one sigmoid unit; more give a softmax over the classes.
        head_dropout: dropout rate before the classifier.
        **kwargs: the family's own arguments (see its builder).

    Returns:
        An uncompiled `keras.Model` whose output is float32 probabilities.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown model family; expected one of {list_models()}. Received: {name!r}")
    return _REGISTRY[name](input_shape=input_shape, num_classes=num_classes, head_dropout=head_dropout, **kwargs)


# Importing the family modules registers them.
from models import augmentation, pointwise, separable, standard, transfer  # noqa: E402,F401
