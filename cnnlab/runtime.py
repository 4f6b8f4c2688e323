"""Where and how the computation runs: seeds and numeric precision."""

from __future__ import annotations

import keras


def set_seed(seed: int) -> None:
    """Seeds Python's `random`, NumPy and TensorFlow, so the same seed gives the same run on CPU."""
    keras.utils.set_random_seed(seed)


def set_precision(precision: str) -> None:
    """Sets the global Keras dtype policy: `float32`, `mixed_float16` or `mixed_bfloat16`.

    Under a mixed policy layers compute in 16 bits and keep float32 variables; the models' output layers are
    float32 whatever the policy, so losses and probabilities stay float32.
    """
    keras.mixed_precision.set_global_policy(precision)
