"""minigpt: train small GPT language models from scratch and generate text."""

import os

# Quiet TensorFlow's C++ start-up chatter and pin Keras to TensorFlow before
# either is imported anywhere in the package.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"
