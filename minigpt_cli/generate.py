"""Samplers and text generation from a trained mini-GPT.

Generation runs the model's KerasHub ``generate_step`` (one loop over a
key/value cache) inside one ``tf.function``; XLA is used where it pays off.

>>> gen = Generator(model, tokenizer)                          # doctest: +SKIP
>>> gen.run(["the king"], SamplerSpec("topp", p=0.5), max_tokens=40)  # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

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


#: Punctuation written against the word before it / the word after it.
CLOSERS = frozenset([".", ",", ";", ":", "!", "?", ")", "]", "”"])
OPENERS = frozenset(["(", "[", "“", "‘"])
APOSTROPHES = frozenset(["'", "’"])
#: What follows the apostrophe of a contraction: i'm, don't, it's, we're, i've, you'll, he'd.
CONTRACTIONS = frozenset(["s", "t", "m", "d", "re", "ve", "ll"])


def _word(token: str) -> bool:
    return bool(token) and token[0].isalnum() and token[-1].isalnum()


def tidy(text: str) -> str:
    """Undo WordPiece's spaces around punctuation: ``" i ' m here , " he said`` -> ``"i'm here," he said``.

    ``.,;:!?)]`` join the word before, ``([`` the word after. Double quotes
    pair up in order (opening, closing); a last unpaired one opens when text
    follows it and closes otherwise. An apostrophe between a word and a
    contraction's ending joins both (``don't``); otherwise it closes an open
    single quote, makes a plural possessive after a word ending in ``s``
    (``dogs' bones``), or opens a quote before a word (``said 'yes' and``).
    A single ``-`` between words joins them (``well-known``), ``- -`` is ``--``.
    Each rule only removes the space next to the mark it is about.
    """
    words = text.split()
    glued = [False] * (len(words) + 1)  # glued[i]: no space before words[i]
    double_open = single_open = False
    for i, w in enumerate(words):
        prev = words[i - 1] if i else ""
        nxt = words[i + 1] if i + 1 < len(words) else ""
        left = right = False  # join to the word before / after
        if w in CLOSERS:
            left = True
        elif w in OPENERS:
            right = True
            single_open = single_open or w == "‘"
        elif w == '"':
            if double_open or not nxt:
                left, double_open = True, False
            else:
                right, double_open = True, True
        elif w in APOSTROPHES:
            if _word(prev) and (nxt in CONTRACTIONS or (prev == "o" and nxt == "clock")):
                left = right = True
            elif single_open:
                left, single_open = True, False
            elif _word(prev) and prev.endswith("s") and _word(nxt):
                left = True
            elif _word(nxt):
                right, single_open = True, True
            else:
                left = True
        elif w == "-":
            if prev == "-":
                left = True
            elif _word(prev) and _word(nxt):
                left = right = True
        glued[i] = glued[i] or left
        glued[i + 1] = glued[i + 1] or right
    return "".join(w if i == 0 or glued[i] else " " + w for i, w in enumerate(words))


def repetition(ids: list[int]) -> dict:
    """Share of repeated 4-grams and share of distinct bigrams in a token sequence."""

    def ngrams(n):
        return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]

    four, two = ngrams(4), ngrams(2)
    return {
        "repeated_4grams": 1 - len(set(four)) / len(four) if four else 0.0,
        "distinct_bigrams": len(set(two)) / len(two) if two else 0.0,
    }


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
        """One sample per prompt, made in one batched call (beam search: one per prompt length).

        Beam search runs once per group of prompts of equal length: KerasHub's
        ``BeamSampler`` starts every row where the shortest prompt ends and
        would score beams on the prompt tokens of longer ones (and run
        shorter ones for more steps, which can change their best beam), so
        each group gets exactly what its prompts would get alone.
        """
        spec.check(vocab_size=self.model.backbone.vocabulary_size)
        encoded, new_tokens = self.fit_lengths(prompts, max_tokens)
        beams = spec.num_beams if spec.name == "beam" else 1
        xla = use_xla(self.jit_compile, len(prompts) * new_tokens * beams)
        sampler = spec.build()
        fn = self._function(sampler, xla)
        if spec.name == "beam":
            groups: dict[int, list[int]] = {}
            for row, ids in enumerate(encoded):
                groups.setdefault(len(ids), []).append(row)
            batches = list(groups.values())
        else:
            batches = [list(range(len(encoded)))]
        new: list[list[int]] = [[] for _ in encoded]
        seconds = compile_seconds = 0.0
        for rows in batches:
            out, took, compiling = self._generate(fn, sampler, [encoded[r] for r in rows], new_tokens, xla)
            seconds += took
            compile_seconds += compiling
            for row, ids in zip(rows, out, strict=True):
                new[row] = ids
        samples = []
        for row, ids in enumerate(new):
            raw = self.detokenize(ids)
            samples.append(
                Sample(
                    prompt=prompts[row],
                    text=tidy(raw),
                    token_ids=ids,
                    sampler=spec.name,
                    settings=spec.settings(),
                    tokens_per_second=len(prompts) * new_tokens / seconds if seconds > 0 else float("inf"),
                    seconds=seconds,
                    compile_seconds=compile_seconds,
                    raw_text=raw,
                    stats=repetition(ids),
                )
            )
        return samples

    def _generate(
        self, fn, sampler, encoded: list[list[int]], new_tokens: int, xla: bool
    ) -> tuple[list[list[int]], float, float]:
        """The new tokens of each prompt, the seconds they took, and the seconds spent compiling first.

        The compile (or trace) runs the sampler once; its random state is put
        back before the timed call, so the tokens do not depend on whether or
        how the loop was compiled.
        """
        longest = max(len(e) for e in encoded)
        length = longest + new_tokens
        token_ids = np.zeros((len(encoded), length), dtype="int32")
        prompt_mask = np.zeros((len(encoded), length), dtype=bool)
        for row, ids in enumerate(encoded):
            token_ids[row, : len(ids)] = ids
            prompt_mask[row, : len(ids)] = True
        inputs = {"token_ids": tf.constant(token_ids), "padding_mask": tf.constant(prompt_mask)}

        state = [v.numpy() for v in sampler.variables]
        t0 = time.perf_counter()
        if xla:
            fn(inputs)  # XLA compiles for these exact shapes
        else:
            fn({k: v[:, : longest + 1] for k, v in inputs.items()})  # trace once; the graph serves every length
        compile_seconds = time.perf_counter() - t0
        for variable, value in zip(sampler.variables, state, strict=True):
            variable.assign(value)
        t0 = time.perf_counter()
        out = fn(inputs).numpy()
        seconds = time.perf_counter() - t0
        if xla:
            compile_seconds = max(0.0, compile_seconds - seconds)
        new = [[int(i) for i in out[row, len(ids) : len(ids) + new_tokens]] for row, ids in enumerate(encoded)]
        return new, seconds, compile_seconds

    def detokenize(self, ids: list[int]) -> str:
        kept = [i for i in ids if i not in self.strip_ids]
        if not kept:
            return ""
        text = self.tokenizer.detokenize(np.asarray(kept, dtype="int32"))
        return text.decode("utf-8", errors="replace") if isinstance(text, bytes) else str(text)
