"""Loss, perplexity and bits per character of a trained run on any text."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
from keras import ops

from minigpt_cli.backend import compiled
from minigpt_cli.config import VocabConfig
from minigpt_cli.data import check_text, expand_paths, line_threshold
from minigpt_cli.errors import MinigptError
from minigpt_cli.model import load_model
from minigpt_cli.runs import RunDir
from minigpt_cli.vocab import read_vocabulary
from minigpt_cli.windows import Batches, cut_windows, part_lines, text_parts


@dataclass(frozen=True)
class Evaluation:
    windows: str
    loss: float
    perplexity: float
    bits_per_character: float
    tokens: int
    characters: int
    files: int


def evaluate(run: RunDir, data: str, windows: str, min_string_len: int, vocab_config: VocabConfig | None = None,
             batch_size: int = 64, model_file: Path | None = None) -> Evaluation:  # fmt: skip
    """Mean cross-entropy over every scored token of ``data`` cut into ``windows`` windows.

    Bits per character are the scored tokens' total bits over the characters
    of the text those tokens cover (reference windows score only the first
    ``seq_len`` tokens of each long line), so runs with different
    vocabularies compare on the same footing. ``model_file``: a model of
    the run other than ``model.keras`` (``model.best.keras``).
    """
    vocab = read_vocabulary(run.require_vocab(), vocab_config or VocabConfig())
    model = load_model(model_file or run.require_model(), len(vocab))
    tokenizer = vocab.tokenizer()
    files = expand_paths(data, "--data")
    check_text(files, line_threshold(windows, min_string_len), "--data")
    seq_len = model.backbone.sequence_length
    cut = cut_windows(files, tokenizer, windows, seq_len, min_string_len)
    if len(cut) == 0:
        raise MinigptError(f"--data gives no window of {seq_len + 1} tokens; use more text")
    batches = Batches(cut, batch_size, shuffle=False)

    def score(x, y, w):
        logits = model(x, training=False)
        ce = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
        return ops.sum(ce * w), ops.sum(w)

    scored = compiled(score, model, [], xla=False)
    total = count = 0.0
    for step in range(batches.per_pass):
        x, y, w = batches.batch(step)
        s, n = scored(x, y, w)
        total += float(ops.convert_to_numpy(s))
        count += float(ops.convert_to_numpy(n))
    characters = scored_characters(files, tokenizer, windows, seq_len, min_string_len)
    return Evaluation(
        windows=windows,
        loss=total / count,
        perplexity=math.exp(total / count),
        bits_per_character=total / math.log(2) / characters,
        tokens=int(count),
        characters=characters,
        files=len(files),
    )


def _lines(files: list[Path]) -> list[str]:
    """The lines as ``cut_windows`` reads them (as ``tf.data.TextLineDataset`` does)."""
    return [line.decode("utf-8") for part in text_parts(files) for line in part_lines(part)]


def _token_counts(texts: list[str], tokenizer) -> list[int]:
    if not texts:
        return []
    if hasattr(tokenizer, "tokenize_batch"):  # FastWordPieceTokenizer: no TensorFlow
        return [len(ids) for ids in tokenizer.tokenize_batch(texts)]
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(texts).batch(512).map(lambda t: tokenizer(t).row_lengths())
    return [int(n) for lengths in ds for n in np.asarray(lengths)]


def _prefix_characters(cuts: list[tuple[str, int]], tokenizer) -> list[float]:
    """Characters of each line's text that holds its first ``n`` tokens, for ``(line, n)`` pairs.

    WordPiece never joins across whitespace, so whole words are counted
    exactly; a word cut inside is counted by the share of its pieces scored.
    """
    words = [[(m.start(), m.end()) for m in re.finditer(r"\S+", line)] for line, _ in cuts]
    pieces = [line[a:b] for (line, _), spans in zip(cuts, words, strict=True) for a, b in spans]
    counts = iter(_token_counts(pieces, tokenizer))
    result = []
    for (_, n), spans in zip(cuts, words, strict=True):
        chars, seen = 0.0, 0
        for (a, b), c in zip(spans, [next(counts) for _ in spans], strict=True):
            if seen < n and c:
                chars = a + (b - a) * min(1.0, (n - seen) / c)
            seen += c
        result.append(chars)
    return result


def scored_characters(files: list[Path], tokenizer, windows: str, seq_len: int, min_string_len: int) -> int:
    """Characters of the text whose tokens ``cut_windows`` makes labels of."""
    lines = _lines(files)
    if windows == "reference":
        kept = [line for line in lines if len(line.encode()) > min_string_len]
        counts = _token_counts(kept, tokenizer)
        whole = sum(len(line) for line, c in zip(kept, counts, strict=True) if c <= seq_len)
        cut = [(line, seq_len) for line, c in zip(kept, counts, strict=True) if c > seq_len]
        return round(whole + sum(_prefix_characters(cut, tokenizer)))
    kept = [line for line in lines if line.strip(" \t\n\r\f\v")]  # tf.strings.strip: ASCII whitespace
    counts = _token_counts(kept, tokenizer)
    labels = (sum(counts) + len(counts) - 1) // seq_len * seq_len  # stream positions 1..labels are scored
    chars, start = 0.0, 0  # start: the stream position of the line's [BOS]
    for line, c in zip(kept, counts, strict=True):
        if start + c <= labels:
            chars += len(line)
        elif start < labels:
            chars += _prefix_characters([(line, labels - start)], tokenizer)[0]
        start += 1 + c
    return round(chars)
