"""Sampler choice and settings, checked before any TensorFlow is loaded."""

from __future__ import annotations

from dataclasses import dataclass

from minigpt_cli.config import SAMPLERS
from minigpt_cli.errors import MinigptError


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler by name with its settings; ``build()`` gives the KerasHub sampler."""

    name: str
    k: int = 10
    p: float = 0.5
    num_beams: int = 10
    temperature: float = 1.0
    seed: int | None = None
    top_p_candidates: int = 128

    def check(self) -> SamplerSpec:
        if self.name not in SAMPLERS:
            raise MinigptError(f"unknown sampler '{self.name}'; choose one of {', '.join(SAMPLERS)} or all")
        if self.name == "topk" and self.k < 1:
            raise MinigptError(f"--k must be at least 1, got {self.k}")
        if self.name == "topp" and not 0 < self.p <= 1:
            raise MinigptError(f"--p must be in (0, 1], got {self.p}")
        if self.name == "beam" and self.num_beams < 1:
            raise MinigptError(f"--num-beams must be at least 1, got {self.num_beams}")
        if not self.temperature > 0:
            raise MinigptError(f"--temperature must be above 0, got {self.temperature}")
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
        """The KerasHub sampler (imports TensorFlow)."""
        import keras_hub

        from minigpt_cli.random_sampler import InverseCDFRandomSampler
        from minigpt_cli.top_p_sampler import CandidateTopPSampler

        t = self.temperature
        if self.name == "greedy":
            return keras_hub.samplers.GreedySampler(temperature=t)
        if self.name == "beam":
            return keras_hub.samplers.BeamSampler(num_beams=self.num_beams, temperature=t)
        if self.name == "random":
            return InverseCDFRandomSampler(seed=self.seed, temperature=t)
        if self.name == "topk":
            return keras_hub.samplers.TopKSampler(k=self.k, seed=self.seed, temperature=t)
        return CandidateTopPSampler(p=self.p, k=self.top_p_candidates, seed=self.seed, temperature=t)
