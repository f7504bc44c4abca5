"""Decoding controls as a logits processor, run inside the compiled generation loop.

``logits_processor(controls, temperature, vocab_size, exempt)`` gives a
function ``process(logits, tokens, index)`` for the loop: ``tokens`` is the
``(batch, length)`` buffer (the prompt and the text so far, ``[PAD]`` = 0
after it) and ``index`` the position whose token is being chosen.

>>> from minigpt_cli.samplers import Controls
>>> process = logits_processor(Controls(no_repeat_ngram=2), 1.0, 8, exempt=(0,))
>>> tokens = ops.convert_to_tensor([[2, 5, 6, 5, 0]])
>>> bool(process(ops.zeros((1, 8)), tokens, 4)[0, 6] < -1e8)   # "5 6" again is banned
True
"""

from __future__ import annotations

import math
from collections.abc import Callable

from keras import ops

from minigpt_cli.samplers import Controls

#: A banned token's logit: its probability is exactly 0 after softmax at any temperature.
BANNED = -1e9


def _seen(tokens, vocab_size: int):
    """``(batch, vocab)``: which tokens occur in each row."""
    return ops.max(ops.one_hot(tokens, vocab_size, dtype="float32"), axis=1) > 0


def ngram_bans(tokens, index, n: int, vocab_size: int):
    """``(batch, vocab)``: tokens that would complete an ``n``-gram already among ``tokens[:, :index]``."""
    tokens = ops.pad(tokens, [[0, 0], [0, n]])  # room for n-grams longer than the buffer (none match)
    length = ops.shape(tokens)[1]
    starts = length - n + 1  # n-grams start at 0 .. length - n
    match = ops.arange(starts)[None, :] < index - n + 1  # the n-gram ends before index
    for k in range(n - 1):
        window = ops.slice(tokens, [0, k], [ops.shape(tokens)[0], starts])
        current = ops.take(tokens, ops.maximum(index - n + 1 + k, 0), axis=1)  # the text's last n - 1 tokens
        match = ops.logical_and(match, ops.equal(window, current[:, None]))
    completions = ops.slice(tokens, [0, n - 1], [ops.shape(tokens)[0], starts])
    hits = ops.one_hot(completions, vocab_size, dtype="float32") * ops.cast(match, "float32")[:, :, None]
    return ops.max(hits, axis=1) > 0


def logits_processor(
    controls: Controls, temperature: float, vocab_size: int, exempt: tuple[int, ...]
) -> Callable | None:
    """The function that applies ``controls`` to a step's logits, or ``None`` when none shapes them.

    ``exempt`` token ids (``[PAD]``, ``[BOS]``) are never penalized or banned as repeats.
    """
    if not controls.shapes_logits:
        return None
    penalty, n, min_p = controls.repetition_penalty, controls.no_repeat_ngram, controls.min_p
    exempt_mask = ops.convert_to_tensor([i not in exempt for i in range(vocab_size)])

    def process(logits, tokens, index):
        logits = ops.cast(logits, "float32")
        if penalty != 1:
            seen = ops.logical_and(_seen(tokens, vocab_size), exempt_mask[None, :])
            penalized = ops.where(logits > 0, logits / penalty, logits * penalty)
            logits = ops.where(seen, penalized, logits)
        if n > 0:
            bans = ops.logical_and(ngram_bans(tokens, index, n, vocab_size), exempt_mask[None, :])
            logits = ops.where(bans, BANNED, logits)
        if min_p > 0:
            # p_i >= min_p * p_max  <=>  logit_i / T >= max / T + ln(min_p)
            floor = ops.max(logits, axis=-1, keepdims=True) + temperature * math.log(min_p)
            logits = ops.where(logits < floor, BANNED, logits)
        return logits

    return process

