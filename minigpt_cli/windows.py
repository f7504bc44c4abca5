"""Tokenize once: training windows cached in the run directory, batched in a seeded order.

Two ways to cut text into windows of ``seq_len + 1`` token ids (features are
the first ``seq_len``, labels the last ``seq_len``), named by ``data.windows``:

- ``reference``: each line longer than ``min_string_len`` bytes becomes
  ``[BOS]`` + its first ``seq_len`` tokens, padded, as the KerasHub example does.
- ``packed``: every line, a ``[BOS]`` before each, tokenized into one stream
  and cut into windows that overlap by one token (window ``i`` starts at
  ``i * seq_len``), so every token but the stream's first is a label exactly
  once: none is lost to truncation, none to a window's edge, and no step is
  spent on padding.

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

from minigpt_cli.runs import atomic_path, file_digest

#: Bumped when the way windows are cut changes, so old caches are not reused.
CUT_VERSION = 2


def cache_key(
    vocab: list[str], files: list[Path], windows: str, seq_len: int, min_string_len: int, lowercase: bool
) -> str:
    """A digest of everything the windows depend on."""
    h = hashlib.sha256()
    h.update("\n".join(vocab).encode())
    settings = {"windows": windows, "seq_len": seq_len, "lowercase": lowercase, "version": CUT_VERSION}
    if windows == "reference":
        settings["min_string_len"] = min_string_len
    h.update(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        h.update(file_digest(f)[1].encode())
    return h.hexdigest()[:20]


def cut_windows(files: list[Path], tokenizer, windows: str, seq_len: int, min_string_len: int) -> np.ndarray:
    """Tokenize ``files`` and cut them into windows of ``seq_len + 1`` ids (see the module's docstring)."""
    import tensorflow as tf

    from minigpt_cli.model import MiniGPTCausalLMPreprocessor

    bos = tokenizer.token_to_id("[BOS]")
    lines = tf.data.TextLineDataset([str(f) for f in files])
    if windows == "reference":
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
    return packed_windows(ids, seq_len)


def packed_windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Windows of ``seq_len + 1`` ids starting every ``seq_len``: each token but the first is a label once."""
    n = max(len(ids) - 1, 0) // seq_len
    if n == 0:
        return np.zeros((0, seq_len + 1), np.int32)
    return np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)[::seq_len][:n].copy()


def _read_cached_windows(path: Path, seq_len: int, vocab_size: int) -> np.ndarray | None:
    """The windows cached at ``path`` when they are whole and exactly what their sidecar records, else None."""
    import io

    try:
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        data = path.read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("size") != len(data):
        return None
    if meta.get("sha256") != hashlib.sha256(data).hexdigest():
        return None
    try:
        windows = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:  # whatever numpy makes of a file that is not its own
        return None
    if windows.dtype.kind not in "iu" or windows.ndim != 2 or windows.shape[1] != seq_len + 1:
        return None
    if [*windows.shape] != meta.get("shape") or str(windows.dtype) != meta.get("dtype"):
        return None
    if windows.size and (windows.min() < 0 or windows.max() >= vocab_size):
        return None
    return windows.astype(np.int32)


def _write_cached_windows(path: Path, windows: np.ndarray) -> None:
    """The ``.npy``, then a sidecar ``.json`` with its shape, dtype, size and sha256: the cache is only
    trusted when both agree."""
    import io

    from minigpt_cli.runs import write_text

    buf = io.BytesIO()
    np.save(buf, windows, allow_pickle=False)
    data = buf.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    meta = {
        "shape": [*windows.shape],
        "dtype": str(windows.dtype),
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    write_text(path.with_suffix(".json"), json.dumps(meta) + "\n")


def load_windows(
    cache_dir: Path,
    vocab: list[str],
    tokenizer,
    files: list[Path],
    windows: str,
    seq_len: int,
    min_string_len: int,
    lowercase: bool,
) -> tuple[np.ndarray, bool]:
    """Windows from the cache, or cut and cached now; also says whether the cache served them.

    A cached file that is truncated, replaced or not what its sidecar records is never used: the windows
    are cut again and the cache rewritten.
    """
    key = cache_key(vocab, files, windows, seq_len, min_string_len, lowercase)
    path = cache_dir / f"windows-{windows}-{key}.npy"
    cached = _read_cached_windows(path, seq_len, len(vocab)) if path.is_file() else None
    if cached is not None:
        return cached, True
    cut = cut_windows(files, tokenizer, windows, seq_len, min_string_len)
    dtype = np.uint16 if len(vocab) <= np.iinfo(np.uint16).max else np.int32
    _write_cached_windows(path, cut.astype(dtype))
    return cut, False


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

    def tokens(self, step: int) -> int:
        """Real (non-[PAD]) labels in batch ``step``: what its loss is averaged over."""
        return int(self.batch(step)[2].sum())

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


@dataclass
class Data:
    """A run's training and validation batches, and how they were made."""

    train: Batches
    valid: Batches
    windows: str
    cached: bool


def prepare_data(cfg, run, vocab) -> Data:
    """Check the run's text, cut (or read back) its windows, and batch them: what ``train`` fits on.

    ``cfg`` is a ``Config``, ``run`` a ``RunDir``, ``vocab`` the run's ``Vocabulary``.
    """
    from minigpt_cli.data import check_text, line_threshold, text_files
    from minigpt_cli.errors import MinigptError

    tokenizer = vocab.tokenizer()
    windows = cfg.data.windows

    def split(name: str) -> tuple[np.ndarray, bool]:
        files = text_files(cfg.data, name)
        check_text(files, line_threshold(windows, cfg.data.min_string_len), f"data.{name}")
        return load_windows(
            run.root / "cache", vocab.tokens, tokenizer, files, windows, cfg.model.seq_len,
            cfg.data.min_string_len, vocab.lowercase,
        )  # fmt: skip

    train_windows, cached = split("train")
    valid_windows, _ = split("valid")
    if len(train_windows) < cfg.data.batch_size:
        raise MinigptError(
            f"the training text gives {len(train_windows)} windows of {cfg.model.seq_len + 1} tokens, fewer than "
            f"one batch of {cfg.data.batch_size}; use more text or lower data.batch_size"
        )
    if len(valid_windows) == 0:
        raise MinigptError(f"the validation text gives no window of {cfg.model.seq_len + 1} tokens; use more text")
    return Data(
        train=Batches(train_windows, cfg.data.batch_size, seed=cfg.seed, shuffle=True),
        valid=Batches(valid_windows, cfg.data.batch_size, shuffle=False),
        windows=windows,
        cached=cached,
    )
