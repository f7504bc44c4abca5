"""Tokenize once: training windows cached in the run directory, batched in a seeded order.

Two ways to cut text into windows of ``seq_len + 1`` token ids (features are
the first ``seq_len``, labels the last ``seq_len``):

- ``reference``: each line longer than ``min_string_len`` bytes becomes
  ``[BOS]`` + its first ``seq_len`` tokens, padded, as the KerasHub example does.
- ``packed``: every line, a ``[BOS]`` before each, tokenized into one stream
  and cut into back-to-back windows, so no token is lost to truncation and no
  step is spent on padding.

Windows are cached as ``.npy`` under ``<run>/cache/``, keyed by the vocabulary,
the way of cutting, and the text files' contents, and read back by later runs.
The order of batches is a function of (seed, epoch, step) alone, so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minigpt_cli.runs import atomic_path

MODES = ("reference", "packed")


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(
    vocab: list[str], files: list[Path], mode: str, seq_len: int, min_string_len: int, lowercase: bool
) -> str:
    """A digest of everything the windows depend on."""
    h = hashlib.sha256()
    h.update("\n".join(vocab).encode())
    settings = {"mode": mode, "seq_len": seq_len, "lowercase": lowercase}
    if mode == "reference":
        settings["min_string_len"] = min_string_len
    h.update(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        h.update(_file_digest(f).encode())
    return h.hexdigest()[:20]


def cut_windows(files: list[Path], tokenizer, mode: str, seq_len: int, min_string_len: int) -> np.ndarray:
    """Tokenize ``files`` and cut them into windows of ``seq_len + 1`` ids."""
    import tensorflow as tf

    from minigpt_cli.model import MiniGPTCausalLMPreprocessor

    bos = tokenizer.token_to_id("[BOS]")
    lines = tf.data.TextLineDataset([str(f) for f in files])
    if mode == "reference":
        preprocessor = MiniGPTCausalLMPreprocessor(tokenizer, sequence_length=seq_len)
        lines = lines.filter(lambda x: tf.strings.length(x) > min_string_len).batch(256)

        def pack(batch):
            x, y, _ = preprocessor(batch)
            return tf.concat([x["token_ids"][:, :1], y], axis=1)

        parts = [w.numpy() for w in lines.map(pack, num_parallel_calls=tf.data.AUTOTUNE)]
        return np.concatenate(parts).astype(np.int32) if parts else np.zeros((0, seq_len + 1), np.int32)

    lines = lines.filter(lambda x: tf.strings.length(tf.strings.strip(x)) > 0).batch(256)

    def stream(batch):
        ids = tokenizer(batch)
        starts = tf.fill([ids.nrows(), 1], tf.cast(bos, ids.dtype))
        return tf.concat([tf.RaggedTensor.from_tensor(starts), ids], axis=1).flat_values

    flat = [s.numpy() for s in lines.map(stream, num_parallel_calls=tf.data.AUTOTUNE)]
    ids = np.concatenate(flat).astype(np.int32) if flat else np.zeros(0, np.int32)
    n = len(ids) // (seq_len + 1)
    return ids[: n * (seq_len + 1)].reshape(n, seq_len + 1)


def load_windows(
    cache_dir: Path,
    vocab: list[str],
    tokenizer,
    files: list[Path],
    mode: str,
    seq_len: int,
    min_string_len: int,
    lowercase: bool,
) -> tuple[np.ndarray, bool]:
    """Windows from the cache, or cut and cached now; also says whether the cache served them."""
    key = cache_key(vocab, files, mode, seq_len, min_string_len, lowercase)
    path = cache_dir / f"windows-{mode}-{key}.npy"
    if path.is_file():
        return np.load(path).astype(np.int32), True
    windows = cut_windows(files, tokenizer, mode, seq_len, min_string_len)
    dtype = np.uint16 if len(vocab) <= np.iinfo(np.uint16).max else np.int32
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, windows.astype(dtype))
    return windows, False


@dataclass
class Batches:
    """Seeded batches of windows: ``(x, y, sample_weight)`` with ``x = {token_ids, padding_mask}``."""

    windows: np.ndarray
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    _memo: tuple[int, np.ndarray] | None = field(default=None, init=False, repr=False)

    @property
    def per_pass(self) -> int:
        """Batches in one pass over the windows (the last partial one is dropped when shuffling)."""
        n = len(self.windows)
        return n // self.batch_size if self.shuffle else -(-n // self.batch_size)

    def _order(self, data_pass: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.windows))
        if self._memo is None or self._memo[0] != data_pass:
            self._memo = (data_pass, np.random.default_rng([self.seed, data_pass]).permutation(len(self.windows)))
        return self._memo[1]

    def batch(self, step: int) -> tuple[dict, np.ndarray, np.ndarray]:
        """Batch number ``step`` of the endless stream of passes over the windows."""
        data_pass, i = divmod(step, self.per_pass)
        w = self.windows[self._order(data_pass)[i * self.batch_size : (i + 1) * self.batch_size]]
        x, y = w[:, :-1], w[:, 1:]
        return {"token_ids": x, "padding_mask": (x != 0).astype("int32")}, y, (y != 0).astype("float32")

    def iterate(self, start: int, stop: int | None) -> Iterator[tuple[dict, np.ndarray, np.ndarray]]:
        step = start
        while stop is None or step < stop:
            yield self.batch(step)
            step += 1

    def dataset(self, start: int = 0, stop: int | None = None):
        """A prefetched ``tf.data.Dataset`` of batches ``start`` to ``stop`` (endless if None)."""
        import tensorflow as tf

        length = self.windows.shape[1] - 1
        spec = (
            {
                "token_ids": tf.TensorSpec([None, length], tf.int32),
                "padding_mask": tf.TensorSpec([None, length], tf.int32),
            },
            tf.TensorSpec([None, length], tf.int32),
            tf.TensorSpec([None, length], tf.float32),
        )
        return tf.data.Dataset.from_generator(lambda: self.iterate(start, stop), output_signature=spec).prefetch(
            tf.data.AUTOTUNE
        )
