"""Loss, perplexity and bits per character of a trained run on any text."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from minigpt_cli.data import check_text, expand_paths, line_threshold
from minigpt_cli.errors import MinigptError
from minigpt_cli.generate import load_model
from minigpt_cli.runs import RunDir
from minigpt_cli.vocab import load_vocabulary, make_tokenizer
from minigpt_cli.windows import MODES, Batches, cut_windows


@dataclass(frozen=True)
class Evaluation:
    windows: str
    loss: float
    perplexity: float
    bits_per_character: float
    tokens: int
    characters: int
    files: int


def evaluate(run: RunDir, data: str, windows: str, min_string_len: int, lowercase: bool = True,
             batch_size: int = 64) -> Evaluation:  # fmt: skip
    """Mean cross-entropy over every scored token of ``data`` cut into ``windows`` windows.

    Bits per character are bits per scored token times the text's tokens per
    character, so runs with different vocabularies compare on the same footing.
    """
    assert windows in MODES
    vocab = load_vocabulary(run.require_vocab())
    model = load_model(run.require_model(), len(vocab))
    tokenizer = make_tokenizer(vocab, lowercase)
    files = expand_paths(data, "--data")
    stats = check_text(files, line_threshold(windows == "packed", min_string_len), "--data")
    seq_len = model.backbone.sequence_length
    cut = cut_windows(files, tokenizer, windows, seq_len, min_string_len)
    if len(cut) == 0:
        raise MinigptError(f"--data gives no window of {seq_len + 1} tokens; use more text")
    batches = Batches(cut, batch_size, shuffle=False)

    @tf.function(autograph=False)
    def scored(x, y, w):
        logits = model(x, training=False)
        ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        return tf.reduce_sum(ce * w), tf.reduce_sum(w)

    total = count = 0.0
    for step in range(batches.per_pass):
        x, y, w = batches.batch(step)
        s, n = scored(x, y, w)
        total += float(s)
        count += float(n)
    loss = total / count
    all_tokens = sum(len(t) for t in _token_lengths(files, tokenizer))
    tokens_per_char = all_tokens / stats.characters
    return Evaluation(
        windows=windows,
        loss=loss,
        perplexity=math.exp(loss),
        bits_per_character=loss / math.log(2) * tokens_per_char,
        tokens=int(count),
        characters=stats.characters,
        files=len(files),
    )


def _token_lengths(files: list[Path], tokenizer):
    ds = tf.data.TextLineDataset([str(f) for f in files]).batch(512).map(tokenizer)
    for ids in ds:
        yield np.asarray(ids.flat_values)
