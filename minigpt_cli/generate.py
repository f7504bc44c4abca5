"""Samplers and text generation from a trained mini-GPT.

Generation runs the model's KerasHub ``generate_step`` (one loop over a
key/value cache) inside one ``tf.function``; XLA is used where it pays off.

>>> gen = Generator(model, tokenizer)                          # doctest: +SKIP
>>> gen.run(["the king"], SamplerSpec("topp", p=0.5), max_tokens=40)  # doctest: +SKIP
"""

from __future__ import annotations

import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from minigpt_cli.errors import MinigptError
from minigpt_cli.model import MiniGPTCausalLM
from minigpt_cli.samplers import SamplerSpec
from minigpt_cli.vocab import BOS, PAD, MiniGPTTokenizer


@dataclass
class Sample:
    """One generated text, with what it took to make it."""

    prompt: str
    text: str
    token_ids: list[int]
    sampler: str
    settings: dict
    tokens_per_second: float
    seconds: float
    compile_seconds: float
    raw_text: str = ""
    stats: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def tidy(text: str) -> str:
    """Undo WordPiece's spacing around punctuation: ``i ' m here , " he said`` -> ``i'm here," he said``."""
    parts = text.split('"')
    out = parts[0]
    for i, part in enumerate(parts[1:], 1):
        out = out + '"' + part.lstrip(" ") if i % 2 else out.rstrip(" ") + '"' + part
    out = re.sub(r"(\w) (['’]) (\w)", r"\1\2\3", out)
    out = re.sub(r"([“‘]) ", r"\1", out)
    out = re.sub(r" ([”])", r"\1", out)
    out = re.sub(r" ([.,;:!?)\]])", r"\1", out)
    out = re.sub(r"([(\[]) ", r"\1", out)
    out = re.sub(r"- -", "--", out)
    return re.sub(r"\s+", " ", out).strip()


def repetition(ids: list[int]) -> dict:
    """Share of repeated 4-grams and share of distinct bigrams in a token sequence."""

    def ngrams(n):
        return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]

    four, two = ngrams(4), ngrams(2)
    return {
        "repeated_4grams": 1 - len(set(four)) / len(four) if four else 0.0,
        "distinct_bigrams": len(set(two)) / len(two) if two else 0.0,
    }


def load_model(path: Path, vocab_size: int) -> MiniGPTCausalLM:
    """Load ``model.keras`` and check that it matches the vocabulary."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optimizer state is not needed to generate
            model = keras.saving.load_model(path, compile=False)
    except Exception as e:  # a corrupt zip, a foreign file, a missing class...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MinigptError(f"cannot load {path} ({first[:200]}); train again with 'minigpt train'") from None
    if not isinstance(model, MiniGPTCausalLM):
        raise MinigptError(f"{path} is not a minigpt model; train one with 'minigpt train'")
    if model.backbone.vocabulary_size != vocab_size:
        raise MinigptError(
            f"the model in {path} was trained with {model.backbone.vocabulary_size} tokens but vocab.txt "
            f"has {vocab_size}; run 'minigpt train' again after 'minigpt vocab'"
        )
    return model


def reference_next(model: MiniGPTCausalLM):
    """The reference example's uncached ``next``: the whole window through the model per token."""

    def next(prompt, cache, index):
        mask = keras.ops.cast(keras.ops.not_equal(prompt, 0), "int32")
        logits = model({"token_ids": prompt, "padding_mask": mask})[:, index - 1, :]
        return logits, None, cache

    return next


def use_xla(jit_compile: str, total_new_tokens: int) -> bool:
    """XLA compiles for seconds and then runs several times faster: worth it for long jobs only."""
    if jit_compile in ("true", "false"):
        return jit_compile == "true"
    return total_new_tokens >= 1500


class Generator:
    """Turns prompts into text with a trained model and its tokenizer."""

    def __init__(self, model: MiniGPTCausalLM, tokenizer: MiniGPTTokenizer, jit_compile: str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.jit_compile = jit_compile
        self.bos = tokenizer.token_to_id(BOS)
        self.strip_ids = {tokenizer.token_to_id(PAD), self.bos}

    @property
    def seq_len(self) -> int:
        return self.model.backbone.sequence_length

    def encode(self, prompt: str) -> list[int]:
        return [self.bos] + [int(i) for i in np.asarray(self.tokenizer(prompt)).reshape(-1)]

    def fit_lengths(self, prompts: list[str], max_tokens: int) -> tuple[list[list[int]], int]:
        """Token ids of each prompt and the number of new tokens that fit the window."""
        encoded = [self.encode(p) for p in prompts]
        longest = max(len(e) for e in encoded)
        if longest >= self.seq_len:
            raise MinigptError(
                f"the prompt is {longest - 1} tokens but the model's window is {self.seq_len} tokens "
                f"(room for {self.seq_len - 2} prompt tokens); shorten it"
            )
        return encoded, min(max_tokens, self.seq_len - longest)

    def _function(self, sampler, xla: bool):
        self.model.sampler = sampler
        spec = {
            "token_ids": tf.TensorSpec([None, None], tf.int32),
            "padding_mask": tf.TensorSpec([None, None], tf.bool),
        }
        # generate_step has no Python control flow on tensors: skipping autograph halves the trace.
        return tf.function(
            lambda x: self.model.generate_step(x)["token_ids"], jit_compile=xla, input_signature=[spec], autograph=False
        )

    def run(self, prompts: list[str], spec: SamplerSpec, max_tokens: int) -> list[Sample]:
        """One batched generation call for ``prompts`` (one sample each)."""
        spec.check()
        encoded, new_tokens = self.fit_lengths(prompts, max_tokens)
        longest = max(len(e) for e in encoded)
        length = longest + new_tokens
        token_ids = np.zeros((len(encoded), length), dtype="int32")
        prompt_mask = np.zeros((len(encoded), length), dtype=bool)
        for row, ids in enumerate(encoded):
            token_ids[row, : len(ids)] = ids
            prompt_mask[row, : len(ids)] = True
        inputs = {"token_ids": tf.constant(token_ids), "padding_mask": tf.constant(prompt_mask)}

        beams = spec.num_beams if spec.name == "beam" else 1
        xla = use_xla(self.jit_compile, len(prompts) * new_tokens * beams)
        fn = self._function(spec.build(), xla)
        t0 = time.perf_counter()
        if xla:
            fn(inputs)  # XLA compiles for these exact shapes
        else:
            short = {k: v[:, : longest + 1] for k, v in inputs.items()}
            fn(short)  # trace once; the graph serves every length
        compile_seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = fn(inputs).numpy()
        seconds = time.perf_counter() - t0
        if xla:
            compile_seconds = max(0.0, compile_seconds - seconds)
        samples = []
        for row, ids in enumerate(encoded):
            new = [int(i) for i in out[row, len(ids) : len(ids) + new_tokens]]
            raw = self.detokenize(new)
            samples.append(
                Sample(
                    prompt=prompts[row],
                    text=tidy(raw),
                    token_ids=new,
                    sampler=spec.name,
                    settings=spec.settings(),
                    tokens_per_second=len(prompts) * new_tokens / seconds if seconds > 0 else float("inf"),
                    seconds=seconds,
                    compile_seconds=compile_seconds,
                    raw_text=raw,
                    stats=repetition(new),
                )
            )
        return samples

    def detokenize(self, ids: list[int]) -> str:
        kept = [i for i in ids if i not in self.strip_ids]
        if not kept:
            return ""
        text = self.tokenizer.detokenize(np.asarray(kept, dtype="int32"))
        return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
