"""minigpt: train small GPT language models from scratch and generate text."""

import os

# Quiet TensorFlow's C++ start-up chatter, and make TensorFlow Keras' default backend (over ~/.keras/keras.json),
# before either is imported anywhere in the package. The backend the user named, if any, is kept apart: it wins
# over the config's ``backend`` key (``minigpt_cli.backend.choose``).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
USER_BACKEND = os.environ.get("KERAS_BACKEND", "").strip()
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"
