"""A top-p sampler that sorts only the likeliest candidates when that is exact."""

from __future__ import annotations

import keras
import keras_hub


class CandidateTopPSampler(keras_hub.samplers.TopPSampler):
    """Top-p that sorts only the top ``k`` candidates, and all of them when needed.

    Sorting a 5000-token vocabulary at every step is what makes top-p slow on
    a CPU. When the ``k`` most likely tokens hold at least ``p`` of the
    probability, the kept set is the same as with a full sort; otherwise this
    sampler falls back to the full sort, so the distribution sampled from is
    always exactly top-p's.
    """

    def __init__(self, p: float = 0.1, k: int | None = None, seed=None, **kwargs):
        super().__init__(p=p, k=k, seed=seed, **kwargs)
        self.full = keras_hub.samplers.TopPSampler(p=p, seed=seed)

    def get_next_token(self, probabilities):
        vocab_size = probabilities.shape[-1]
        if self.k is None or (vocab_size is not None and self.k >= vocab_size):
            return self.full.get_next_token(probabilities)
        top, _ = keras.ops.top_k(probabilities, k=self.k, sorted=False)
        covered = keras.ops.all(keras.ops.sum(top, axis=-1) >= self.p)
        return keras.ops.cond(
            covered,
            lambda: super(CandidateTopPSampler, self).get_next_token(probabilities),
            lambda: self.full.get_next_token(probabilities),
        )
