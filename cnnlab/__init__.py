"""cnnlab: train, compare and see inside convolutional image classifiers (cats vs dogs first)."""

import os

# TensorFlow's C++ INFO and WARNING lines (oneDNN notices, CUDA probing on CPU machines) drown the progress output.
# Users can still ask for them by setting the variable themselves.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
