"""Random and top-k sampling by inverse CDF, with the same draws under XLA and without it.

Every sampling sampler here (and top-p in ``top_p_sampler``) turns one uniform
number per sequence and step into a token through the cumulative distribution.
TensorFlow's float random numbers and ``categorical`` draws differ between XLA
and plain graphs on a CPU (and ``top_k(sorted=False)`` returns a different
order); its integer random numbers do not. So the uniform number is made from
integer random bits, and candidates are always sorted: the same seed gives the
same draws whichever way the loop is compiled.
"""

from __future__ import annotations

import keras
import keras_hub
from keras import ops

#: Uniform numbers are ``(i + 1/2) / 2**23`` for ``i < 2**23``: exact in float32, never 0 or 1.
LEVELS = 2**23


def uniform(seed_generator, batch_size):
    """One number in (0, 1) per row from ``seed_generator`` (advancing it by one), exact under XLA too.

    On TensorFlow the generator's int64 state ``[seed, counter]`` goes to
    TensorFlow's stateless op as it is: for values below 2**32
    (``SamplerSpec.check`` keeps seeds there) XLA and plain graphs draw the
    same bits, and every seed its own (Keras's cast to int32 folds seeds
    modulo 2**31 - 2, so 0 and 2**31 - 2 would draw the same numbers). On JAX
    and PyTorch, Keras' own integer draw from the generator.
    """
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        bits = tf.random.stateless_uniform(
            ops.reshape(batch_size, [1]), seed=seed_generator.next(), minval=0, maxval=LEVELS, dtype=tf.int32
        )
    else:
        bits = keras.random.randint((batch_size,), 0, LEVELS, dtype="int32", seed=seed_generator)
    return (ops.cast(bits, "float32") + 0.5) * (1.0 / LEVELS)


def inverse_cdf(weights, u):
    """Index drawn from each row of ``weights`` (non-negative, any total) with the uniform numbers ``u``.

    A zero weight is never drawn: the result is the first index whose
    cumulative weight reaches ``u`` times the row's total.
    """
    cdf = ops.cumsum(weights, axis=-1)
    below = ops.cast(cdf < ops.expand_dims(u, -1) * cdf[:, -1:], "int32")
    return ops.minimum(ops.sum(below, axis=-1), ops.shape(weights)[-1] - 1)


def draw_sorted(sorted_weights, indices, u):
    """Draw from candidates sorted by probability; return the tokens' ids from ``indices``."""
    choice = inverse_cdf(sorted_weights, u)
    return ops.squeeze(ops.take_along_axis(indices, ops.expand_dims(choice, -1), axis=-1), axis=-1)


class InverseCDFRandomSampler(keras_hub.samplers.RandomSampler):
    """KerasHub's ``RandomSampler`` drawing by inverse CDF instead of ``categorical``.

    Same distribution (the softmax of the logits), but one uniform number per
    sequence and step instead of one per vocabulary entry: XLA's random bits
    are slow on a CPU, and this made random sampling 8x faster there.
    """

    def get_next_token(self, probabilities):
        return inverse_cdf(probabilities, uniform(self.seed_generator, ops.shape(probabilities)[0]))


class InverseCDFTopKSampler(keras_hub.samplers.TopKSampler):
    """KerasHub's ``TopKSampler`` (same distribution: the ``k`` likeliest tokens), drawn by inverse CDF."""

    def get_next_token(self, probabilities):
        u = uniform(self.seed_generator, ops.shape(probabilities)[0])
        top, indices = ops.top_k(probabilities, k=self.k, sorted=True)
        return draw_sorted(top, indices, u)


class SortedTopPSampler(keras_hub.samplers.TopPSampler):
    """KerasHub's ``TopPSampler`` (the fewest likeliest tokens whose probabilities reach ``p``), drawn by
    inverse CDF: top-p on JAX and PyTorch, where the sort-free ``ExactTopPSampler`` (TensorFlow) does not run.
    """

    def __init__(self, p: float = 0.1, k: int | None = None, seed=None, **kwargs):
        super().__init__(p=p, k=None, seed=seed, **kwargs)

    def get_next_token(self, probabilities):
        u = uniform(self.seed_generator, ops.shape(probabilities)[0])
        top, indices = ops.top_k(probabilities, k=ops.shape(probabilities)[-1], sorted=True)
        if self.p >= 1:
            return draw_sorted(top, indices, u)
        # KerasHub's rule: the likeliest token, and each next one while the sum before it is at most p.
        before = ops.cumsum(top, axis=-1) - top
        keep = ops.concatenate([ops.ones_like(before[:, :1], "bool"), (before <= self.p)[:, 1:]], axis=-1)
        return draw_sorted(ops.where(keep, top, ops.zeros_like(top)), indices, u)
