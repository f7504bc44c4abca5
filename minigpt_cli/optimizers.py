"""Adam and AdamW that keep the global norm of the gradients they apply, and apply sparse gradients as Adam means.

Keras computes that norm only to clip, and keeps it nowhere. ``GradNorm``
wraps ``_clip_gradients``, which Keras calls once per update on the gradients
about to be applied (with ``gradient_accumulation_steps``: on the average of
the accumulated micro-batch gradients, at update steps only), and stores
their global norm, before clipping, in the optimizer variable ``grad_norm``
that the TensorBoard callback reads. It is written with ``keras.ops``, so it
works on any backend. Under a tf.distribute strategy Keras clips each
replica's gradients before they are summed, so the norm is the first
replica's share.

It also makes the gradients dense first. On TensorFlow the token
embedding's gradient is a ``tf.IndexedSlices`` with one slice per token of
the batch, and Keras squares those slices one by one (``ops.square`` keeps
them apart), so a token seen k times got the sum of k squares in Adam's
second moment (and in the clipping norm) instead of the square of its
summed gradient: its steps were up to √k times too long. Dense, every token's
gradient is summed first, as Adam (and an accumulated gradient, which Keras
keeps dense) has it: a batch of 64 and two accumulated micro-batches of 32
then make the same update.

``grad_norm`` is saved in checkpoints with the other optimizer variables,
and left out when a resume copies the optimizer's state
(``train.recompile_with_state``), so checkpoints written before it existed
still resume.
"""

from __future__ import annotations

import keras
from keras import ops

#: The name of the optimizer variable that holds the last update's gradient norm.
GRAD_NORM = "grad_norm"


class GradNorm:
    """Mixin for a Keras optimizer: ``grad_norm`` is the global norm of the last update's gradients."""

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self._grad_norm = self.add_variable(
            shape=(), initializer="zeros", dtype="float32", aggregation="only_first_replica", name=GRAD_NORM
        )

    def _clip_gradients(self, grads):
        grads = [_dense(g) for g in grads]
        squares = [ops.sum(ops.square(ops.cast(g, "float32"))) for g in grads if g is not None]
        if squares:
            self._grad_norm.assign(ops.sqrt(ops.sum(ops.stack(squares))))
        return super()._clip_gradients(grads)


def _dense(gradient):
    """A TensorFlow ``IndexedSlices`` gradient as a dense tensor, its slices of one row summed; others as they are."""
    if type(gradient).__name__ != "IndexedSlices":
        return gradient
    import tensorflow as tf

    return tf.convert_to_tensor(gradient)


@keras.saving.register_keras_serializable(package="minigpt")
class Adam(GradNorm, keras.optimizers.Adam):
    """``keras.optimizers.Adam`` that keeps ``grad_norm``."""


@keras.saving.register_keras_serializable(package="minigpt")
class AdamW(GradNorm, keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` that keeps ``grad_norm``."""


def grad_norm(optimizer) -> float | None:
    """The last update's gradient norm, or None for an optimizer that does not keep it."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer under mixed_float16
    variable = getattr(inner, "_grad_norm", None)
    return None if variable is None else float(ops.convert_to_numpy(variable))


def set_grad_norm(optimizer, value: float) -> None:
    """Set the recorded gradient norm (a resume carries it over, when the checkpoint has it)."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if getattr(inner, "_grad_norm", None) is not None:
        inner._grad_norm.assign(value)
