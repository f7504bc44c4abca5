"""Sampler choice, decoding controls and their settings, checked before any TensorFlow is loaded.

``sampler_spec`` and ``controls`` are the one place where the config's
``[generate]`` section and command-line flags become a checked ``SamplerSpec``
and ``Controls``.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

from minigpt_cli.config import SAMPLERS, GenerateConfig
from minigpt_cli.errors import MinigptError

#: Seeds are 32-bit: every seed in [0, 2**32) gives its own random numbers.
SEED_LIMIT = 2**32


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler by name with its settings; ``build()`` gives the KerasHub sampler."""

    name: str
    k: int = 10
    p: float = 0.5
    num_beams: int = 10
    temperature: float = 1.0
    seed: int | None = None

    def check(self, vocab_size: int | None = None) -> SamplerSpec:
        """Refuse bad settings with one line; with ``vocab_size``, also a top-k ``k`` above it."""
        if self.name not in SAMPLERS:
            raise MinigptError(f"unknown sampler '{self.name}'; choose one of {', '.join(SAMPLERS)} or all")
        if self.name == "topk" and self.k < 1:
            raise MinigptError(f"--k must be at least 1, got {self.k}")
        if self.name == "topk" and vocab_size is not None and self.k > vocab_size:
            raise MinigptError(
                f"--k is {self.k} but the vocabulary has only {vocab_size} tokens; use at most {vocab_size}"
            )
        if self.name == "topp" and not 0 < self.p <= 1:
            raise MinigptError(f"--p must be in (0, 1], got {self.p}")
        if self.name == "beam" and self.num_beams < 1:
            raise MinigptError(f"--num-beams must be at least 1, got {self.num_beams}")
        if not 0 < self.temperature < math.inf:
            raise MinigptError(f"--temperature must be above 0 and finite, got {self.temperature}")
        if self.seed is not None and not 0 <= self.seed < SEED_LIMIT:
            raise MinigptError(f"--seed must be in [0, {SEED_LIMIT - 1}] (a 32-bit number), got {self.seed}")
        return self

    def settings(self) -> dict:
        """The settings that matter for this sampler (for display and --json)."""
        s: dict = {"temperature": self.temperature}
        if self.name == "topk":
            s["k"] = self.k
        elif self.name == "topp":
            s["p"] = self.p
        elif self.name == "beam":
            s["num_beams"] = self.num_beams
        if self.name in ("random", "topk", "topp"):
            s["seed"] = self.seed
        return s

    def build(self):
        """The KerasHub sampler (top-p: the sort-free exact one on TensorFlow, a sorting one elsewhere)."""
        import keras
        import keras_hub

        from minigpt_cli.random_sampler import InverseCDFRandomSampler, InverseCDFTopKSampler, SortedTopPSampler

        t, seed = self.temperature, self.seed
        if seed is not None and keras.config.backend() == "torch":
            # Keras keeps a seed in int32 on PyTorch and seeds its generator with seed + counter, so seeds
            # 7 and 8 would draw one stream shifted by a step: a hash spreads them apart.
            seed = int.from_bytes(hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=4).digest(), "little")
            seed &= 0x7FFFFFFF
        if self.name == "greedy":
            return keras_hub.samplers.GreedySampler(temperature=t)
        if self.name == "beam":
            return keras_hub.samplers.BeamSampler(num_beams=self.num_beams, temperature=t)
        if self.name == "random":
            return InverseCDFRandomSampler(seed=seed, temperature=t)
        if self.name == "topk":
            return InverseCDFTopKSampler(k=self.k, seed=seed, temperature=t)
        if keras.config.backend() != "tensorflow":
            return SortedTopPSampler(p=self.p, seed=seed, temperature=t)
        from minigpt_cli.top_p_sampler import ExactTopPSampler

        return ExactTopPSampler(p=self.p, seed=self.seed, temperature=t)


def sampler_spec(
    gen: GenerateConfig,
    name: str | None = None,
    *,
    k: int | None = None,
    p: float | None = None,
    num_beams: int | None = None,
    temperature: float | None = None,
    seed: int | None = None,
) -> SamplerSpec:
    """The checked sampler settings: the config's ``[generate]`` section, overridden by any value given.

    ``name`` defaults to ``generate.sampler``. Without a ``seed`` a fresh one
    is drawn and kept in the spec (so ``settings()`` and ``--json`` show it and
    the text can be made again).
    """
    return SamplerSpec(
        gen.sampler if name is None else name,
        k=gen.k if k is None else k,
        p=gen.p if p is None else p,
        num_beams=gen.num_beams if num_beams is None else num_beams,
        temperature=gen.temperature if temperature is None else temperature,
        seed=random.SystemRandom().randrange(SEED_LIMIT) if seed is None else seed,
    ).check()


@dataclass(frozen=True)
class Controls:
    """What shapes the logits before any sampler sees them, and where a text ends.

    - ``repetition_penalty``: logits of tokens already in the prompt or the
      text so far are divided by it when positive and multiplied by it when
      negative (CTRL's rule; 1 is off, above 1 discourages repeats).
    - ``no_repeat_ngram``: ``n`` > 0 bans every token that would complete an
      ``n``-gram already in the prompt or text (0 is off).
    - ``min_p``: keeps the tokens whose probability (after temperature) is
      at least ``min_p`` times the likeliest's (0 is off).
    - ``stop``: the text ends before the first of these strings it contains.
    - ``end_at_paragraph``: the text ends at the first ``[BOS]`` the model
      writes (packed training puts one between paragraphs).
    """

    stop: tuple[str, ...] = ()
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0
    min_p: float = 0.0
    end_at_paragraph: bool = False

    def check(self) -> Controls:
        if any(not text for text in self.stop):
            raise MinigptError("--stop needs a non-empty text")
        if not self.repetition_penalty > 0:
            raise MinigptError(f"--repetition-penalty must be above 0 (1 is off), got {self.repetition_penalty}")
        if self.no_repeat_ngram < 0:
            raise MinigptError(f"--no-repeat-ngram must be 0 (off) or more, got {self.no_repeat_ngram}")
        if not 0 <= self.min_p <= 1:
            raise MinigptError(f"--min-p must be in [0, 1] (0 is off), got {self.min_p}")
        return self

    @property
    def shapes_logits(self) -> bool:
        return self.repetition_penalty != 1 or self.no_repeat_ngram > 0 or self.min_p > 0

    def settings(self) -> dict:
        """The controls that are on (for display and --json)."""
        s: dict = {}
        if self.stop:
            s["stop"] = list(self.stop)
        if self.repetition_penalty != 1:
            s["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram:
            s["no_repeat_ngram"] = self.no_repeat_ngram
        if self.min_p:
            s["min_p"] = self.min_p
        if self.end_at_paragraph:
            s["end_at_paragraph"] = True
        return s


def controls(
    gen: GenerateConfig,
    *,
    stop: list[str] | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram: int | None = None,
    min_p: float | None = None,
    end_at_paragraph: bool | None = None,
) -> Controls:
    """The checked decoding controls: the config's ``[generate]`` section, overridden by any value given."""
    return Controls(
        stop=tuple(gen.stop if not stop else stop),
        repetition_penalty=gen.repetition_penalty if repetition_penalty is None else repetition_penalty,
        no_repeat_ngram=gen.no_repeat_ngram if no_repeat_ngram is None else no_repeat_ngram,
        min_p=gen.min_p if min_p is None else min_p,
        end_at_paragraph=gen.end_at_paragraph if end_at_paragraph is None else end_at_paragraph,
    ).check()
