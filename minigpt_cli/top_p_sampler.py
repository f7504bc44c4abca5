"""A top-p sampler that sorts only the likeliest candidates when that is certainly exact."""

from __future__ import annotations

import keras_hub
from keras import ops

from minigpt_cli.random_sampler import LEVELS, draw_sorted, inverse_cdf, uniform


class CandidateTopPSampler(keras_hub.samplers.TopPSampler):
    """Top-p that sorts only the top ``k`` candidates, and all of them when needed.

    Sorting a 5000-token vocabulary at every step is what makes top-p slow on
    a CPU. Top-p keeps the likeliest tokens through the one whose cumulative
    probability passes ``p``; when the ``k`` candidates hold more than ``p``
    by a margin larger than float32's rounding of their sum, that token is
    among them and the kept set is the full sort's. Otherwise this sampler
    sorts the whole vocabulary. ``p >= 1`` samples the whole softmax: the
    float32 sums of a softmax pass 1.0 before its last tokens often enough
    that a cumulative test would drop the tail.

    Draws are by inverse CDF from one uniform number per sequence and step
    (see ``random_sampler``), the same under XLA and without it.
    """

    def __init__(self, p: float = 0.1, k: int | None = None, seed=None, **kwargs):
        super().__init__(p=p, k=k, seed=seed, **kwargs)

    def get_next_token(self, probabilities):
        u = uniform(self.seed_generator, ops.shape(probabilities)[0])  # one draw per step, whatever the branch
        if self.p >= 1:
            return inverse_cdf(probabilities, u)
        vocab_size = probabilities.shape[-1]
        if vocab_size is None:
            return self._nucleus(*ops.top_k(probabilities, k=ops.shape(probabilities)[-1], sorted=True), u)
        if self.k is None or self.k >= vocab_size:
            return self._nucleus(*ops.top_k(probabilities, k=vocab_size, sorted=True), u)
        top, indices = ops.top_k(probabilities, k=self.k, sorted=True)
        # Summing k float32 numbers of total <= 1 errs by at most (k - 1) / 2**24; the margin covers this sum
        # and the full sort's own cumulative sum.
        covered = ops.all(ops.sum(top, axis=-1) > self.p + self.k / LEVELS)
        return ops.cond(
            covered,
            lambda: self._nucleus(top, indices, u),
            lambda: self._nucleus(*ops.top_k(probabilities, k=vocab_size, sorted=True), u),
        )

    def _nucleus(self, sorted_probs, indices, u):
        """Draw from the sorted tokens through the first whose cumulative probability passes ``p``."""
        cumulative = ops.cumsum(sorted_probs, axis=-1)
        keep = ops.concatenate([ops.ones_like(cumulative[:, :1], dtype="bool"), cumulative[:, :-1] <= self.p], axis=-1)
        return draw_sorted(ops.where(keep, sorted_probs, ops.zeros_like(sorted_probs)), indices, u)
