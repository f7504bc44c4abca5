"""Text generation from a trained mini-GPT: batched, streamed, and made readable.

Every sampler but beam search runs one compiled loop over the model's
key/value cache (see ``Generator``); XLA is used where it pays off.

>>> gen = Generator(model, tokenizer)                          # doctest: +SKIP
>>> gen.run(["the king"], SamplerSpec("topp", p=0.5), max_tokens=40)  # doctest: +SKIP
>>> for piece in gen.stream("the king", SamplerSpec("topk", seed=1), 40):  # doctest: +SKIP
...     print(piece.text, end="", flush=True)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace

import keras
import numpy as np
from keras import ops

from minigpt_cli.backend import compiled
from minigpt_cli.errors import MinigptError
from minigpt_cli.model import MiniGPTCausalLM
from minigpt_cli.samplers import Controls, SamplerSpec
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
    #: Each new token's probability when it was chosen (the sampler's softmax at its temperature).
    probabilities: list[float] = field(default_factory=list)
    #: Why the text ended: "length", "stop" (a stop text) or "paragraph" (a [BOS]).
    stopped: str = "length"

    def to_dict(self) -> dict:
        """Plain data for JSON: no NaN or infinity (an instant run's tokens/s is null)."""
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(self).items()}


#: Punctuation written against the word before it / the word after it.
CLOSERS = frozenset([".", ",", ";", ":", "!", "?", ")", "]", "”"])
OPENERS = frozenset(["(", "[", "“", "‘"])
APOSTROPHES = frozenset(["'", "’"])
#: What follows the apostrophe of a contraction: i'm, don't, it's, we're, i've, you'll, he'd.
CONTRACTIONS = frozenset(["s", "t", "m", "d", "re", "ve", "ll"])
#: Words ending in "s" that are not plurals: an apostrophe after them opens or closes a quote.
NOT_PLURAL = frozenset(["is", "was", "as", "has", "his", "this", "its", "us", "yes", "says", "does", "goes", "thus",
                        "always", "perhaps", "towards", "upwards", "besides", "unless", "whereas"])  # fmt: skip


def _word(token: str) -> bool:
    return bool(token) and token[0].isalnum() and token[-1].isalnum()


def glue(words: list[str]) -> list[bool]:
    """For each word, whether it is written without a space before it (see ``tidy``).

    Word ``i``'s answer depends only on words ``i - 1``, ``i`` and ``i + 1``
    and on the quotes opened before it, so it is final once word ``i + 1``
    is: a stream can print all but its last two words.
    """
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
            elif _word(prev) and prev.endswith("s") and prev not in NOT_PLURAL and _word(nxt):
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
    glued[0] = True
    return glued[: len(words)]


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
    return "".join(w if g else " " + w for w, g in zip(words, glue(words), strict=True))


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


@dataclass
class Piece:
    """A stretch of streamed text.

    ``parts`` splits it by token, with the probability each had (None: a
    space); ``probabilities`` are those of the tokens that end in this piece.
    """

    text: str
    parts: list[tuple[str, float | None]]
    probabilities: list[float] = field(default_factory=list)


class Rendered:
    """Token ids as readable text, knowing which characters each token wrote.

    The text is the tokenizer's detokenization (pieces joined by spaces,
    ``##`` pieces joined to the word before, ``[PAD]``/``[BOS]`` left out)
    made readable by ``tidy``.
    """

    def __init__(self, ids: list[int], vocabulary: list[str], skip: set[int]):
        words: list[str] = []
        where: list[tuple[int, int, int] | None] = []  # per token: word, offset in it, length
        for i in ids:
            if i in skip:
                where.append(None)
                continue
            piece = vocabulary[i] if 0 <= i < len(vocabulary) else "[UNK]"
            if piece.startswith("##") and words:
                where.append((len(words) - 1, len(words[-1]), len(piece) - 2))
                words[-1] += piece[2:]
            else:
                where.append((len(words), 0, len(piece)))
                words.append(piece)
        self.words = words
        self.raw = " ".join(words)
        text, starts, segments = "", [], []  # segments: where each word's text begins, with its space
        for w, glued in zip(words, glue(words), strict=True):
            segments.append(len(text))
            text += w if glued else " " + w
            starts.append(len(text) - len(w))
        self.text = text
        self.segments = segments
        self.spans = [None if w is None else (starts[w[0]] + w[1], starts[w[0]] + w[1] + w[2]) for w in where]

    def settled(self) -> int:
        """Characters that no later token can change: all but the last two words."""
        return self.segments[-2] if len(self.words) >= 2 else 0

    def ending(self, start: int, end: int, probabilities: list[float]) -> list[float]:
        """Probabilities of the tokens whose text ends in ``text[start:end]`` (each token in one piece only)."""
        return [p for span, p in zip(self.spans, probabilities, strict=False) if span and start < span[1] <= end]

    def parts(self, start: int, end: int, probabilities: list[float]) -> list[tuple[str, float | None]]:
        """``text[start:end]`` split by token, each part with its token's probability (None between tokens)."""
        parts, at = [], start
        for span, p in zip(self.spans, probabilities, strict=False):
            if span is None or span[1] <= start or span[0] >= end:
                continue
            a, b = max(span[0], start), min(span[1], end)
            if a > at:
                parts.append((self.text[at:a], None))
            parts.append((self.text[a:b], p))
            at = b
        if at < end:
            parts.append((self.text[at:end], None))
        return parts


def first_stop(
    ids: list[int], stops: tuple[str, ...], vocabulary: list[str], skip: set[int], start: int = 0, final: bool = True
):
    """``(tokens, characters)`` to keep when the text of ``ids[:m]`` first holds a stop text, else None.

    ``m`` is the first token count (after ``start``) whose settled text (see
    ``Rendered.settled``; all of it for the whole of ``ids`` when ``final``)
    contains one of ``stops``; the text is kept up to where that stop begins.
    Settled text never changes, so a stop is never found in spacing that a
    later word would undo (a quote that turns out to open, not close).
    """
    if not stops:
        return None
    for m in range(start + 1, len(ids) + 1):
        rendered = Rendered(ids[:m], vocabulary, skip)
        text = rendered.text if final and m == len(ids) else rendered.text[: rendered.settled()]
        found = [text.find(s) for s in stops if s in text]
        if found:
            return m, min(found)
    return None


NO_CONTROLS = Controls()


def _int(value: int):
    """An int32 scalar tensor: the compiled loops take the position and step count as tensors, not constants."""
    return ops.convert_to_tensor(np.int32(value))


class Generator:
    """Turns prompts into text with a trained model and its tokenizer.

    Every sampler but beam search runs the same compiled loop: ``prefill``
    fills the key/value cache from the prompt, ``chunk`` makes ``steps``
    tokens (a ``while_loop`` over the model's cached ``next_logits``, the
    decoding controls and the KerasHub sampler's ``compute_probabilities`` and
    ``get_next_token``). ``run`` makes all tokens in one chunk; ``stream``
    in growing chunks, yielding text as it comes; the same seed gives the
    same tokens both ways. Beam search runs KerasHub's ``BeamSampler`` loop
    through ``MiniGPTCausalLM.generate_step``.
    """

    #: Chunk sizes of a stream: a first token at once, then longer compiled runs.
    CHUNKS = (1, 2, 4, 8, 16)

    def __init__(self, model: MiniGPTCausalLM, tokenizer: MiniGPTTokenizer, jit_compile: str = "auto"):
        self.model = model
        self.tokenizer = tokenizer
        self.jit_compile = jit_compile
        self.vocabulary = [str(t) for t in tokenizer.get_vocabulary()]
        self.bos = tokenizer.token_to_id(BOS)
        self.pad = tokenizer.token_to_id(PAD)
        self.strip_ids = {self.pad, self.bos}
        self._loops: dict = {}

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

    def render(self, ids: list[int]) -> Rendered:
        return Rendered(ids, self.vocabulary, self.strip_ids)

    def detokenize(self, ids: list[int]) -> str:
        return self.render(ids).raw

    # --- compiled functions ---------------------------------------------------------------------------

    def _processor(self, spec: SamplerSpec, controls: Controls):
        from minigpt_cli.logits import logits_processor

        vocab_size = self.model.backbone.vocabulary_size
        return logits_processor(controls, spec.temperature, vocab_size, exempt=(self.pad, self.bos))

    def _function(self, sampler, xla: bool, process=None):
        """KerasHub's sampler loop (``generate_step``) compiled in one function: used for beam search."""
        self.model.sampler = sampler
        self.model.logits_processor = process
        signature = None
        if keras.config.backend() == "tensorflow":
            import tensorflow as tf

            signature = [{"token_ids": tf.TensorSpec([None, None], tf.int32),
                          "padding_mask": tf.TensorSpec([None, None], tf.bool)}]  # fmt: skip
        # generate_step has no Python control flow on tensors: skipping autograph halves the trace.
        return compiled(
            lambda x: self.model.generate_step(x)["token_ids"], self.model, sampler.variables, xla=xla,
            tf_signature=signature,
        )  # fmt: skip

    def _loop(self, spec: SamplerSpec, controls: Controls, xla: bool):
        """``(sampler, prefill, chunk)`` for these settings, made once and kept (the seed is set per use)."""
        key = (replace(spec, seed=None), replace(controls, stop=()), xla)
        if key in self._loops:
            return self._loops[key]
        model, sampler, process = self.model, spec.build(), self._processor(spec, controls)
        bos, end_at_bos = self.bos, controls.end_at_paragraph

        def prefill(token_ids):
            return model._build_cache(token_ids)[1]

        def chunk(token_ids, cache, index, mask, probs, steps):
            def cond(token_ids, cache, index, probs):
                if not end_at_bos:
                    return ops.convert_to_tensor(True)
                ended = ops.any(ops.logical_and(ops.equal(token_ids, bos), ops.logical_not(mask)), axis=-1)
                return ops.logical_not(ops.all(ended))

            def body(token_ids, cache, index, probs):
                logits, _, cache = model.next_logits(token_ids, cache, index, process)
                dist = sampler.compute_probabilities(logits)
                token = ops.cast(sampler.get_next_token(dist), "int32")
                token = ops.where(ops.take(mask, index, axis=1), ops.take(token_ids, index, axis=1), token)[:, None]
                chosen = ops.cast(ops.take_along_axis(dist, token, axis=1), "float32")
                token_ids = ops.slice_update(token_ids, [0, index], token)
                probs = ops.slice_update(probs, [0, index], chosen)
                return token_ids, cache, index + 1, probs

            # KerasHub's loop: on JAX it carries the sampler's seed state (and the weights) through the steps.
            return sampler.run_loop(
                cond, body, model=model, loop_vars=(token_ids, cache, index, probs), maximum_iterations=steps
            )

        prefill_signature = chunk_signature = None
        if keras.config.backend() == "tensorflow":
            import tensorflow as tf

            ids = tf.TensorSpec([None, None], tf.int32)
            prefill_signature = [ids]
            chunk_signature = [ids, tf.TensorSpec([None, None], model.compute_dtype), tf.TensorSpec([], tf.int32),
                               tf.TensorSpec([None, None], tf.bool), tf.TensorSpec([None, None], tf.float32),
                               tf.TensorSpec([], tf.int32)]  # fmt: skip
        self._loops[key] = (
            sampler,
            compiled(prefill, model, [], xla=xla, tf_signature=prefill_signature),
            compiled(chunk, model, sampler.variables, xla=xla, tf_signature=chunk_signature),
        )
        return self._loops[key]

    @staticmethod
    def _seed(sampler, spec: SamplerSpec) -> None:
        """Put the sampler's random state where a fresh sampler with ``spec.seed`` starts."""
        if sampler.variables:
            for variable, value in zip(sampler.variables, spec.build().variables, strict=True):
                variable.assign(ops.convert_to_numpy(value))

    # --- generation -----------------------------------------------------------------------------------

    def run(
        self, prompts: list[str], spec: SamplerSpec, max_tokens: int, controls: Controls = NO_CONTROLS
    ) -> list[Sample]:
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
        made = self._beam if spec.name == "beam" else self._sample
        new, probs, seconds, compile_seconds, tokens = made(encoded, spec, controls, new_tokens, xla)
        rate = tokens / seconds if seconds > 0 else float("inf")
        return [
            self._finish(prompts[row], ids, p, spec, controls, rate, seconds, compile_seconds)
            for row, (ids, p) in enumerate(zip(new, probs, strict=True))
        ]

    def _finish(self, prompt, ids, probs, spec, controls, rate, seconds, compile_seconds) -> Sample:
        """The sample of these new tokens, ended where the controls end it."""
        stopped = "length"
        if controls.end_at_paragraph and self.bos in ids:
            cut = ids.index(self.bos)
            ids, probs, stopped = ids[:cut], probs[:cut], "paragraph"
        rendered = self.render(ids)
        text = rendered.text
        hit = first_stop(ids, controls.stop, self.vocabulary, self.strip_ids)
        if hit:
            m, chars = hit
            ids, probs, stopped = ids[:m], probs[:m], "stop"
            rendered = self.render(ids)
            text = rendered.text[:chars]
        return Sample(
            prompt=prompt,
            text=text,
            token_ids=ids,
            sampler=spec.name,
            settings={**spec.settings(), **controls.settings()},
            tokens_per_second=rate,
            seconds=seconds,
            compile_seconds=compile_seconds,
            raw_text=rendered.raw,
            stats=repetition(ids),
            probabilities=probs,
            stopped=stopped,
        )

    def _buffers(self, encoded: list[list[int]], length: int):
        token_ids = np.zeros((len(encoded), length), dtype="int32")
        mask = np.zeros((len(encoded), length), dtype=bool)
        for row, ids in enumerate(encoded):
            token_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = True
        return (
            ops.convert_to_tensor(token_ids), ops.convert_to_tensor(mask),
            ops.zeros((len(encoded), length), "float32"),
        )  # fmt: skip

    def _sample(self, encoded, spec, controls, new_tokens, xla):
        """New tokens and their probabilities per prompt, the seconds they took, the compile's, and tokens made."""
        sampler, prefill, chunk = self._loop(spec, controls, xla)
        token_ids, mask, probs = self._buffers(encoded, max(len(e) for e in encoded) + new_tokens)
        start = min(len(e) for e in encoded)
        steps = token_ids.shape[1] - start
        t0 = time.perf_counter()
        chunk(token_ids, prefill(token_ids), _int(start), mask, probs, _int(0))  # trace or compile; runs no step
        warm = time.perf_counter() - t0
        self._seed(sampler, spec)
        t0 = time.perf_counter()
        out, _, end, p = chunk(token_ids, prefill(token_ids), _int(start), mask, probs, _int(steps))
        out, p = ops.convert_to_numpy(out), ops.convert_to_numpy(p)
        seconds = time.perf_counter() - t0
        made = len(encoded) * (int(end) - start)  # fewer than asked when every row ended at a [BOS]
        new = [[int(i) for i in out[row, len(e) : len(e) + new_tokens]] for row, e in enumerate(encoded)]
        chosen = [[float(x) for x in p[row, len(e) : len(e) + new_tokens]] for row, e in enumerate(encoded)]
        return new, chosen, seconds, warm, made

    def _beam(self, encoded, spec, controls, new_tokens, xla):
        sampler = spec.build()
        fn = self._function(sampler, xla, self._processor(spec, controls))
        groups: dict[int, list[int]] = {}
        for row, ids in enumerate(encoded):
            groups.setdefault(len(ids), []).append(row)
        new: list[list[int]] = [[] for _ in encoded]
        seconds = compile_seconds = 0.0
        try:
            for rows in groups.values():
                out, took, compiling = self._generate(fn, sampler, [encoded[r] for r in rows], new_tokens, xla)
                seconds += took
                compile_seconds += compiling
                for row, ids in zip(rows, out, strict=True):
                    new[row] = ids
        finally:
            self.model.logits_processor = None
        return new, [[None] * len(ids) for ids in new], seconds, compile_seconds, len(encoded) * new_tokens

    def _generate(
        self, fn, sampler, encoded: list[list[int]], new_tokens: int, xla: bool
    ) -> tuple[list[list[int]], float, float]:
        """The new tokens of each prompt (KerasHub's loop), the seconds they took, and the seconds compiling first.

        The compile (or trace) runs the sampler once; its random state is put
        back before the timed call, so the tokens do not depend on whether or
        how the loop was compiled.
        """
        longest = max(len(e) for e in encoded)
        token_ids, prompt_mask, _ = self._buffers(encoded, longest + new_tokens)
        inputs = {"token_ids": token_ids, "padding_mask": prompt_mask}
        state = [ops.convert_to_numpy(v) for v in sampler.variables]
        xla = xla or keras.config.backend() == "jax"  # JAX compiles per shape: warm up on the very shapes
        t0 = time.perf_counter()
        if xla:
            fn(inputs)  # XLA compiles for these exact shapes
        else:
            fn({k: v[:, : longest + 1] for k, v in inputs.items()})  # trace once; the graph serves every length
        compile_seconds = time.perf_counter() - t0
        for variable, value in zip(sampler.variables, state, strict=True):
            variable.assign(value)
        t0 = time.perf_counter()
        out = ops.convert_to_numpy(fn(inputs))
        seconds = time.perf_counter() - t0
        if xla:
            compile_seconds = max(0.0, compile_seconds - seconds)
        new = [[int(i) for i in out[row, len(ids) : len(ids) + new_tokens]] for row, ids in enumerate(encoded)]
        return new, seconds, compile_seconds

    def stream(
        self,
        prompt: str,
        spec: SamplerSpec,
        max_tokens: int,
        controls: Controls = NO_CONTROLS,
        length: int | None = None,
    ) -> Stream:
        """Text as it is made, a piece per compiled chunk (see ``Stream``); beam search is refused."""
        return Stream(self, prompt, spec, max_tokens, controls, length)


class Stream:
    """Iterating gives ``Piece``s of text as the tokens come; ``sample`` holds the whole ``Sample`` at the end.

    Tokens come in compiled chunks of ``Generator.CHUNKS`` tokens (the last
    size repeats). A piece holds only text no later token can change (all
    but the last two words, and nothing a stop text could still begin in),
    so the pieces add up to exactly the text ``Generator.run`` gives.
    ``length`` sets the token buffer's length (default: prompt + new tokens);
    a fixed one (the model's window) lets XLA compile once for every prompt.
    Streams with the same sampler settings share one compiled loop and its
    random state: iterate one to its end before starting the next.

    >>> for piece in gen.stream("the king", SamplerSpec("topk", seed=1), 40):  # doctest: +SKIP
    ...     print(piece.text, end="", flush=True)
    """

    def __init__(self, gen: Generator, prompt: str, spec: SamplerSpec, max_tokens: int, controls: Controls,
                 length: int | None = None):  # fmt: skip
        if spec.name == "beam":
            raise MinigptError("beam search cannot stream (its best beam changes until the end); drop --stream")
        spec.check(vocab_size=gen.model.backbone.vocabulary_size)
        self.gen, self.prompt, self.spec, self.controls = gen, prompt, spec, controls
        (self.encoded,), self.new_tokens = gen.fit_lengths([prompt], max_tokens)
        self.length = max(length or 0, len(self.encoded) + self.new_tokens)
        self.sample: Sample | None = None
        self.first_token_seconds = float("nan")

    def __iter__(self):
        gen, spec, controls, start = self.gen, self.spec, self.controls, len(self.encoded)
        xla = use_xla(gen.jit_compile, self.new_tokens)
        t0 = time.perf_counter()
        sampler, prefill, chunk = gen._loop(spec, controls, xla)
        gen._seed(sampler, spec)
        token_ids, mask, probs = gen._buffers([self.encoded], self.length)
        cache = prefill(token_ids)
        index, sizes, size = start, iter(Generator.CHUNKS), Generator.CHUNKS[0]
        settled = SettledText(gen, controls)
        while index < start + self.new_tokens:
            size = next(sizes, size)
            steps = min(size, start + self.new_tokens - index)
            token_ids, cache, end, probs = chunk(token_ids, cache, _int(index), mask, probs, _int(steps))
            end = int(ops.convert_to_numpy(end))
            row, p = ops.convert_to_numpy(token_ids[0, index:end]), ops.convert_to_numpy(probs[0, index:end])
            if index == start:
                self.first_token_seconds = time.perf_counter() - t0
            index = end
            final = index >= start + self.new_tokens or steps == 0
            piece = settled.add([int(i) for i in row], [float(x) for x in p], final)
            if piece is not None:
                yield piece
            if settled.done:
                break
        seconds = time.perf_counter() - t0
        ids, chosen = settled.ids, settled.chosen
        rate = len(ids) / seconds if seconds > 0 else float("inf")
        self.sample = gen._finish(self.prompt, ids, chosen, spec, replace(controls, stop=()), rate, seconds, 0.0)
        self.sample.text, self.sample.stopped = settled.text, settled.stopped
        self.sample.settings = {**spec.settings(), **controls.settings()}


class SettledText:
    """One row's new tokens as text that no later token can change, fed a chunk at a time.

    ``Stream`` runs one per stream; a batch (``minigpt serve``) one per row.
    ``add`` takes the row's next tokens and their probabilities and returns
    the ``Piece`` of text they settled (or None): all but the last two words,
    and nothing a stop text could still begin in; with ``final`` (no more
    tokens will come), all of it. A ``[BOS]`` (with ``end_at_paragraph``) or a
    stop text ends the row early: ``done`` turns true, the tokens after the
    end are dropped, and ``stopped`` says why. The pieces add up to exactly
    the text ``Generator.run`` gives for the same tokens.
    """

    def __init__(self, gen: Generator, controls: Controls):
        self.gen, self.controls = gen, controls
        self.ids: list[int] = []
        self.chosen: list[float] = []
        self.emitted = 0  # characters of text handed out
        self.checked = 0  # tokens searched for stop texts
        self.stopped = "length"
        self.done = False
        self.longest_stop = max((len(s) for s in controls.stop), default=0)
        self._text = ""

    @property
    def text(self) -> str:
        """The text handed out so far (all of it once ``done``)."""
        return self._text[: self.emitted]

    def add(self, ids: list[int], probabilities: list[float], final: bool) -> Piece | None:
        gen, controls = self.gen, self.controls
        self.ids += ids
        self.chosen += probabilities
        keep = None
        if controls.end_at_paragraph and gen.bos in self.ids:
            cut = self.ids.index(gen.bos)
            self.ids, self.chosen, final, self.stopped = self.ids[:cut], self.chosen[:cut], True, "paragraph"
        hit = first_stop(self.ids, controls.stop, gen.vocabulary, gen.strip_ids, start=self.checked, final=final)
        self.checked = len(self.ids)
        if hit:
            (m, keep), final, self.stopped = hit, True, "stop"
            self.ids, self.chosen = self.ids[:m], self.chosen[:m]
        rendered = gen.render(self.ids)
        self._text = rendered.text
        if final:
            limit = len(rendered.text) if keep is None else keep
        else:
            limit = max(self.emitted, rendered.settled() - max(self.longest_stop - 1, 0))
        self.done = final
        if limit <= self.emitted:
            return None
        start, self.emitted = self.emitted, limit
        return Piece(rendered.text[start:limit], rendered.parts(start, limit, self.chosen),
                     rendered.ending(start, limit, self.chosen))  # fmt: skip
