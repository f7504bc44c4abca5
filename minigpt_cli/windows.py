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

The cache lives under ``<run>/cache/``, keyed by the vocabulary, the way of
cutting and the text files' contents: the packed token stream (any
``seq_len`` cuts its windows) or the reference windows, as a raw file with a
JSON sidecar (dtype, shape, size, sha256) that must agree before the file is
used. It is read back memory-mapped, so memory does not grow with the corpus.

Tokenizing splits the text into parts of about ``PART_BYTES`` at line
boundaries; processes (``data.tokenize_workers``, one per core up to 8 by default)
tokenize them into ``<cache>/<name>.parts/part-NNNNN.npy``, each written under
a temporary name and renamed when whole. An interrupted run keeps the parts
it finished and the next run tokenizes only the rest; the parts are joined
into the cache file and removed. A damaged part is tokenized again, never used.

The order of batches is a function of (seed, epoch, step) alone, so a resumed
run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from minigpt_cli.errors import MinigptError
from minigpt_cli.runs import atomic_path, file_digest, write_text

#: Bumped when the cache's layout or the way windows are cut changes, so old caches are not reused.
CUT_VERSION = 3
#: Text per part: what one process tokenizes at a time, and the grain of progress and of resuming.
PART_BYTES = 8 << 20
#: The most tokenizing processes ``data.tokenize_workers = 0`` starts (each holds its own TensorFlow).
MAX_DEFAULT_WORKERS = 8
#: Lines tokenized per call.
LINES_PER_CALL = 1024
#: Batches between letting go of the memory map's pages (they stay in the page cache; RSS stays bounded).
RELEASE_EVERY = 256


class TokenizingInterrupted(MinigptError):
    """Tokenizing stopped by a signal; the finished parts are kept."""

    exit_code = 130


def cache_key(
    vocab: list[str], files: list[Path], windows: str, seq_len: int, min_string_len: int, lowercase: bool
) -> str:
    """A digest of everything the cache depends on (a packed stream does not depend on ``seq_len``)."""
    h = hashlib.sha256()
    h.update("\n".join(vocab).encode())
    settings = {"windows": windows, "lowercase": lowercase, "version": CUT_VERSION}
    if windows == "reference":
        settings.update(seq_len=seq_len, min_string_len=min_string_len)
    h.update(json.dumps(settings, sort_keys=True).encode())
    for f in files:
        h.update(file_digest(f)[1].encode())
    return h.hexdigest()[:20]


# ---------------------------------------------------------------- reading text in parts


@dataclass(frozen=True)
class Part:
    """Bytes ``start`` to ``end`` of ``file``: whole lines."""

    file: Path
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def text_parts(files: list[Path], part_bytes: int = PART_BYTES) -> list[Part]:
    """``files`` cut into parts of about ``part_bytes`` each, at line boundaries."""
    parts = []
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            start = 0
            while start < size:
                end = start + part_bytes
                if end < size:
                    fh.seek(end)
                    fh.readline()  # on to the end of the line the cut fell in
                    end = fh.tell()
                parts.append(Part(f, start, min(end, size)))
                start = min(end, size)
    return parts


def part_lines(part: Part) -> list[bytes]:
    """The lines of ``part`` as ``tf.data.TextLineDataset`` reads them: split at ``\\n``, every ``\\r`` dropped."""
    with open(part.file, "rb") as f:
        f.seek(part.start)
        data = f.read(part.size)
    lines = data.split(b"\n")
    if lines[-1] == b"":  # the part ends with a newline: no line after it
        lines.pop()
    return [line.replace(b"\r", b"") for line in lines]


class Cutter:
    """Tokenizes lines into a packed stream (1-D ids) or reference windows (rows of ``seq_len + 1`` ids)."""

    def __init__(self, tokenizer, windows: str, seq_len: int, min_string_len: int):
        self.windows, self.seq_len, self.min_string_len = windows, seq_len, min_string_len
        if hasattr(tokenizer, "tokenize_batch"):  # FastWordPieceTokenizer: no TensorFlow
            self._cut = self._numpy_cutter(tokenizer)
            return
        import tensorflow as tf

        from minigpt_cli.model import MiniGPTCausalLMPreprocessor

        spec = [tf.TensorSpec([None], tf.string)]
        if windows == "reference":
            preprocessor = MiniGPTCausalLMPreprocessor(tokenizer, sequence_length=seq_len)

            @tf.function(input_signature=spec)
            def cut(lines):
                x, y, _ = preprocessor(lines)
                return tf.concat([x["token_ids"][:, :1], y], axis=1)

        else:
            bos = tokenizer.token_to_id("[BOS]")

            @tf.function(input_signature=spec)
            def cut(lines):
                ids = tokenizer(lines)
                starts = tf.fill([ids.nrows(), 1], tf.cast(bos, ids.dtype))
                return tf.concat([tf.RaggedTensor.from_tensor(starts), ids], axis=1).flat_values

        self._cut = cut

    def _numpy_cutter(self, tokenizer):
        """The TensorFlow graphs' cuts with a TensorFlow-free tokenizer: reference windows are ``[BOS]`` and
        the line's ids cut to ``seq_len + 1`` and padded with ``[PAD]`` (as the KerasHub preprocessor packs)."""
        bos, width = tokenizer.token_to_id("[BOS]"), self.seq_len + 1

        def cut(lines: list[bytes]):
            ids = tokenizer.tokenize_batch([line.decode("utf-8", errors="replace") for line in lines])
            if self.windows == "reference":
                rows = np.zeros((len(ids), width), np.int32)
                for row, line_ids in zip(rows, ids, strict=True):
                    row[0] = bos
                    row[1 : 1 + min(len(line_ids), width - 1)] = line_ids[: width - 1]
                return rows
            return np.concatenate([np.concatenate([[bos], i]) for i in ids]).astype(np.int32)

        return cut

    def keep(self, line: bytes) -> bool:
        """Whether the line is cut at all (as ``tf.strings.length`` and ``tf.strings.strip`` would judge)."""
        return len(line) > self.min_string_len if self.windows == "reference" else bool(line.strip())

    def __call__(self, lines: list[bytes]) -> np.ndarray:
        lines = [line for line in lines if self.keep(line)]
        out = [np.asarray(self._cut(lines[i : i + LINES_PER_CALL])) for i in range(0, len(lines), LINES_PER_CALL)]
        if out:
            return np.concatenate(out).astype(np.int32)
        return np.zeros((0, self.seq_len + 1) if self.windows == "reference" else 0, np.int32)


def cut_windows(files: list[Path], tokenizer, windows: str, seq_len: int, min_string_len: int) -> np.ndarray:
    """Tokenize ``files`` in this process and cut them into windows of ``seq_len + 1`` ids (in memory)."""
    cutter = Cutter(tokenizer, windows, seq_len, min_string_len)
    out = [cutter(part_lines(p)) for p in text_parts(files)]
    ids = np.concatenate(out) if out else np.zeros(0, np.int32)
    return ids if windows == "reference" else packed_windows(ids, seq_len)


def packed_windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Windows of ``seq_len + 1`` ids starting every ``seq_len``: each token but the first is a label once.

    A read-only view of ``ids`` (no copy), so a memory-mapped stream stays on disk.
    """
    n = max(len(ids) - 1, 0) // seq_len
    if n == 0:
        return np.zeros((0, seq_len + 1), ids.dtype)
    return np.lib.stride_tricks.as_strided(
        ids, shape=(n, seq_len + 1), strides=(seq_len * ids.itemsize, ids.itemsize), writeable=False
    )


# ---------------------------------------------------------------- tokenizing into parts, in processes

_cutter: Cutter | None = None
_failed: BaseException | None = None


def _start_worker(vocab: list[str], lowercase: bool, windows: str, seq_len: int, min_string_len: int) -> None:
    """A tokenizing process. Ctrl-C is the parent's to handle. A failure here is kept and raised by the first
    part (a pool whose initializer raises starts new processes forever)."""
    global _cutter, _failed
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        from minigpt_cli.native import quiet_native_stderr

        with quiet_native_stderr():  # TensorFlow's start-up lines, once per process
            from minigpt_cli.vocab import make_tokenizer

            tokenizer = make_tokenizer(vocab, lowercase)
        _cutter = Cutter(tokenizer, windows, seq_len, min_string_len)
    except BaseException as e:  # noqa: BLE001
        _failed = e


def _write_part(path: Path, ids: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, ids, allow_pickle=False)


def _tokenize_part(job: tuple[int, Part, Path, str]) -> tuple[int, int]:
    index, part, path, dtype = job
    if _cutter is None:
        raise MinigptError(f"a tokenizing process could not start: {_failed}")
    try:
        _write_part(path, _cutter(part_lines(part)).astype(dtype))
    except Exception as e:  # sent back as a plain error: the parent must be able to unpickle it
        raise MinigptError(str(e)) from None
    return index, part.size


def _read_part(path: Path, windows: str, seq_len: int, vocab_size: int) -> np.ndarray | None:
    """A finished part, or None when it is missing or not what a part must be."""
    try:
        ids = np.load(path, allow_pickle=False)
    except Exception:  # missing, truncated, or not numpy's
        return None
    shape_ok = ids.ndim == 1 if windows == "packed" else ids.ndim == 2 and ids.shape[1] == seq_len + 1
    if ids.dtype.kind not in "iu" or not shape_ok:
        return None
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        return None
    return ids


@contextlib.contextmanager
def _one_thread_each() -> Iterator[None]:
    """Processes started inside get one TensorFlow thread each (the processes are the parallelism), no GPU."""
    values = {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1", "CUDA_VISIBLE_DEVICES": "-1"}
    saved = {n: os.environ.get(n) for n in values}
    os.environ.update(values)  # one thread each, and no GPU: tokenizing is CPU work
    try:
        yield
    finally:
        for n, v in saved.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM stops tokenizing like Ctrl-C does (in the main thread; elsewhere it is left alone)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


#: ``progress(done_bytes, total_bytes, reused_parts)``: called before the first part and after each.
Progress = Callable[[int, int, int], None]


def tokenize_parts(
    parts: list[Part], folder: Path, tokenizer, vocab: list[str], lowercase: bool, windows: str, seq_len: int,
    min_string_len: int, dtype: str, workers: int = 1, progress: Progress | None = None,
) -> list[Path]:  # fmt: skip
    """Tokenize every part not already finished in ``folder``; returns the parts' files in order.

    With one worker (or one part to do) ``tokenizer`` does it in this process; otherwise ``workers`` spawned
    processes each build their own from ``vocab`` and ``lowercase``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    plan = json.dumps({"parts": [[str(p.file), p.start, p.end] for p in parts], "dtype": dtype})
    try:
        same_plan = (folder / "plan.json").read_bytes() == plan.encode()
    except OSError:
        same_plan = False
    if not same_plan:
        shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_text(folder / "plan.json", plan)
    paths = [folder / f"part-{i:05d}.npy" for i in range(len(parts))]
    for stray in set(folder.iterdir()) - {*paths, folder / "plan.json"}:  # temporary files of a killed write
        shutil.rmtree(stray) if stray.is_dir() and not stray.is_symlink() else stray.unlink(missing_ok=True)
    todo = [i for i, p in enumerate(paths) if _read_part(p, windows, seq_len, len(vocab)) is None]
    total = sum(p.size for p in parts)
    done = total - sum(parts[i].size for i in todo)
    if progress:
        progress(done, total, len(parts) - len(todo))
    jobs = [(i, parts[i], paths[i], dtype) for i in todo]
    args = (vocab, lowercase, windows, seq_len, min_string_len)
    finished = len(parts) - len(todo)
    try:
        with _sigterm_interrupts():
            if workers <= 1 or len(jobs) <= 1:
                cutter = Cutter(tokenizer, windows, seq_len, min_string_len) if jobs else None
                for _, part, path, _ in jobs:
                    _write_part(path, cutter(part_lines(part)).astype(dtype))
                    done, finished = done + part.size, finished + 1
                    if progress:
                        progress(done, total, len(parts) - len(todo))
            else:
                import multiprocessing
                from concurrent.futures import ProcessPoolExecutor, as_completed
                from concurrent.futures.process import BrokenProcessPool

                context = multiprocessing.get_context("spawn")  # TensorFlow's threads do not survive a fork
                with _one_thread_each():
                    pool = ProcessPoolExecutor(
                        min(workers, len(jobs)), mp_context=context, initializer=_start_worker, initargs=args
                    )
                try:
                    for future in as_completed([pool.submit(_tokenize_part, job) for job in jobs]):
                        _, size = future.result()
                        done, finished = done + size, finished + 1
                        if progress:
                            progress(done, total, len(parts) - len(todo))
                except BrokenProcessPool:
                    raise MinigptError(
                        f"a tokenizing process died (out of memory?); {finished} of {len(parts)} parts are saved "
                        f"in {folder}; run the same command again, with fewer data.tokenize_workers if it recurs"
                    ) from None
                finally:
                    for process in list(getattr(pool, "_processes", {}).values()):  # no public way before 3.14
                        process.terminate()
                    pool.shutdown(wait=True, cancel_futures=True)
    except KeyboardInterrupt:
        raise TokenizingInterrupted(
            f"tokenizing stopped: {finished} of {len(parts)} parts are saved in {folder}; "
            "run the same command again to tokenize only the rest"
        ) from None
    return paths


# ---------------------------------------------------------------- the cache file, memory-mapped


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _join(paths: list[Path], out: Path, dtype: str, windows: str, seq_len: int) -> None:
    """The parts, in order, as one raw file; then its sidecar (shape, dtype, size, sha256)."""
    h, count, size = hashlib.sha256(), 0, 0
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        for p in paths:
            ids = np.load(p, allow_pickle=False)
            data = ids.astype(dtype).tobytes()
            f.write(data)
            h.update(data)
            count, size = count + len(ids), size + len(data)
    shape = [count] if windows == "packed" else [count, seq_len + 1]
    meta = {"windows": windows, "shape": shape, "dtype": dtype, "size": size, "sha256": h.hexdigest()}
    write_text(_sidecar(out), json.dumps(meta) + "\n")


@dataclass
class Mapped:
    """A cache file's ids, memory-mapped read-only; ``release`` lets go of the pages read so far."""

    ids: np.ndarray
    _map: mmap.mmap | None = field(default=None, repr=False)

    def release(self) -> None:
        if self._map is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._map.madvise(mmap.MADV_DONTNEED)  # a read-only file mapping: pages refault from the page cache


def _open_cache(path: Path, windows: str, seq_len: int, vocab_size: int) -> Mapped | None:
    """The cache file at ``path`` when it is whole and exactly what its sidecar records, else None."""
    try:
        meta = json.loads(_sidecar(path).read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        shape = tuple(int(n) for n in meta["shape"])
        size, digest = int(meta["size"]), str(meta["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    width = 1 if windows == "packed" else seq_len + 1
    if meta.get("windows") != windows or dtype not in (np.uint16, np.int32) or len(shape) != (1 if width == 1 else 2):
        return None
    if width > 1 and shape[1] != width:
        return None
    if size != shape[0] * width * dtype.itemsize:
        return None
    h, top, low = hashlib.sha256(), -1, 0
    try:
        with open(path, "rb") as f:  # read, not mapped: checking the file does not grow the process
            if os.fstat(f.fileno()).st_size != size:
                return None
            for block in iter(lambda: f.read(16 << 20), b""):
                h.update(block)
                ids = np.frombuffer(block[: len(block) - len(block) % dtype.itemsize], dtype)
                if ids.size:
                    top, low = max(top, int(ids.max())), min(low, int(ids.min()))
            if h.hexdigest() != digest or top >= vocab_size or low < 0:
                return None
            if size == 0:
                return Mapped(np.zeros(shape, dtype))
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the file just checked
    except OSError:
        return None
    return Mapped(np.frombuffer(mapped, dtype).reshape(shape), mapped)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (waiting for it): one process builds a cache, the others then read it."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@dataclass
class TokenWindows:
    """Windows from the cache: a read-only view over the memory-mapped file, and whether the cache served them."""

    windows: np.ndarray
    cached: bool
    release: Callable[[], None]
    tokens: int  # ids in the cache file


def load_windows(
    cache_dir: Path,
    vocab: list[str],
    tokenizer,
    files: list[Path],
    windows: str,
    seq_len: int,
    min_string_len: int,
    lowercase: bool,
    workers: int = 1,
    progress: Progress | None = None,
    part_bytes: int = PART_BYTES,
) -> TokenWindows:
    """Windows from the cache, or tokenized (in ``workers`` processes), cached and then read from it.

    A cache file that is truncated, replaced or not what its sidecar records is never used: the text is
    tokenized again and the cache rewritten.
    """
    key = cache_key(vocab, files, windows, seq_len, min_string_len, lowercase)
    name = f"tokens-packed-{key}" if windows == "packed" else f"windows-reference-{key}"
    path = cache_dir / f"{name}.bin"
    mapped = _open_cache(path, windows, seq_len, len(vocab)) if path.is_file() else None
    cached = mapped is not None
    if mapped is None:
        with _locked(cache_dir / f"{name}.lock"):  # the workers of a multi-worker job share the cache
            mapped = _open_cache(path, windows, seq_len, len(vocab)) if path.is_file() else None
            cached = mapped is not None
            for leftover in cache_dir.glob(f".{name}.*"):  # temporary files of a join that was killed
                leftover.unlink(missing_ok=True)
            if mapped is None:
                dtype = "uint16" if len(vocab) <= np.iinfo(np.uint16).max + 1 else "int32"
                folder = cache_dir / f"{name}.parts"
                paths = tokenize_parts(
                    text_parts(files, part_bytes), folder, tokenizer, vocab, lowercase, windows, seq_len,
                    min_string_len, dtype, workers, progress,
                )  # fmt: skip
                _join(paths, path, dtype, windows, seq_len)
                shutil.rmtree(folder, ignore_errors=True)
                mapped = _open_cache(path, windows, seq_len, len(vocab))
        if mapped is None:
            raise MinigptError(f"the token cache {path} changed while it was being written; run the command again")
    view = packed_windows(mapped.ids, seq_len) if windows == "packed" else mapped.ids
    return TokenWindows(view, cached, mapped.release, int(mapped.ids.size))


@dataclass
class Batches:
    """Seeded batches of windows: ``(x, y, sample_weight)`` with ``x = {token_ids, padding_mask}``.

    ``release`` (a memory map's) is called every ``RELEASE_EVERY`` batches, so reading a large cache does not
    grow the process.
    """

    windows: np.ndarray
    batch_size: int
    seed: int = 0
    shuffle: bool = True
    release: Callable[[], None] | None = None
    #: Rows of [PAD] added to make a batch's rows a multiple of this (JAX splits a batch evenly over devices).
    pad_to: int = 1
    #: ``(process, processes)``: the rows of each batch that this process feeds (``feed``), under jax.distributed.
    shard: tuple[int, int] = (0, 1)
    _memo: tuple[int, np.ndarray] | None = field(default=None, init=False, repr=False)

    @property
    def per_pass(self) -> int:
        """Batches in one pass over the windows (the last partial one is dropped when shuffling)."""
        n = len(self.windows)
        return n // self.batch_size if self.shuffle else -(-n // self.batch_size)

    def _order(self, data_pass: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.windows))
        memo = self._memo  # read once: the input pipeline's thread and the main thread both ask
        if memo is None or memo[0] != data_pass:
            memo = (data_pass, np.random.default_rng([self.seed, data_pass]).permutation(len(self.windows)))
            self._memo = memo
        return memo[1]

    def batch(self, step: int) -> tuple[dict, np.ndarray, np.ndarray]:
        """Batch number ``step`` of the endless stream of passes over the windows."""
        data_pass, i = divmod(step, self.per_pass)
        if self.release is not None and step % RELEASE_EVERY == 0:
            self.release()
        w = self.windows[self._order(data_pass)[i * self.batch_size : (i + 1) * self.batch_size]].astype(np.int32)
        if len(w) % self.pad_to:
            w = np.concatenate([w, np.zeros((self.pad_to - len(w) % self.pad_to, w.shape[1]), np.int32)])
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

    def feed(self, start: int = 0, stop: int | None = None):
        """Batches ``start`` to ``stop`` for ``fit``/``evaluate``: a ``tf.data`` pipeline on TensorFlow, a
        ``keras.utils.PyDataset`` of NumPy batches on JAX and PyTorch (no TensorFlow tensor in their step)."""
        import keras

        if keras.config.backend() == "tensorflow":
            return self.dataset(start, stop)
        return _batch_sequence()(self, start, stop)


def _batch_sequence():
    """``BatchSequence``: a ``PyDataset`` over ``Batches``, made when first asked for (it needs Keras)."""
    import keras

    global _BatchSequence
    if _BatchSequence is None:

        class BatchSequence(keras.utils.PyDataset):
            def __init__(self, batches: Batches, start: int, stop: int | None):
                super().__init__(workers=1, use_multiprocessing=False)
                self.batches, self.start, self.stop = batches, start, stop

            @property
            def num_batches(self) -> int | None:
                return None if self.stop is None else self.stop - self.start

            def __getitem__(self, index: int):
                x, y, w = self.batches.batch(self.start + index)
                process, processes = self.batches.shard
                if processes == 1:
                    return x, y, w
                rows = len(y) // processes
                part = slice(process * rows, (process + 1) * rows)
                return {k: v[part] for k, v in x.items()}, y[part], w[part]

        _BatchSequence = BatchSequence
    return _BatchSequence


_BatchSequence = None


@dataclass
class Data:
    """A run's training and validation batches, and how they were made."""

    train: Batches
    valid: Batches
    windows: str
    cached: bool


def tokenize_workers(asked: int) -> int:
    """``data.tokenize_workers``, 0 meaning one per core this process may use, at most ``MAX_DEFAULT_WORKERS``."""
    if asked:
        return asked
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, MAX_DEFAULT_WORKERS)


@contextlib.contextmanager
def _progress_bar(console, what: str) -> Iterator[Progress | None]:
    """A transient bar with MB done, MB/s and time left; then one line saying what was tokenized."""
    if console is None:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    bar = Progress(
        TextColumn(f"tokenizing {what}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=console, transient=True,
    )  # fmt: skip
    state: dict = {}

    def update(done: int, total: int, reused: int) -> None:
        if "task" not in state:
            state.update(task=bar.add_task(what, total=total, completed=done), start=time.perf_counter(), first=done)
            state["reused"] = reused
            bar.start()
        bar.update(state["task"], completed=done)
        state["done"], state["total"] = done, total

    try:
        yield update
    finally:
        if "task" in state:
            bar.stop()
    if "task" in state:
        seconds = time.perf_counter() - state["start"]
        megabytes = (state["done"] - state["first"]) / 1e6
        reused = f", {state['reused']} parts reused from an interrupted run" if state["reused"] else ""
        console.print(
            f"tokenized {what}: {megabytes:,.1f} MB in {seconds:.1f}s ({megabytes / max(seconds, 1e-9):.1f} MB/s)"
            + reused
        )


def prepare_data(cfg, run, vocab, console=None) -> Data:
    """Check the run's text, tokenize it (or read the cache back), and batch it: what ``train`` fits on.

    ``cfg`` is a ``Config``, ``run`` a ``RunDir``, ``vocab`` the run's ``Vocabulary``; ``console`` (rich)
    shows tokenizing's progress.
    """
    from minigpt_cli.data import check_text, line_threshold, text_files

    tokenizer = vocab.tokenizer()
    windows = cfg.data.windows
    workers = tokenize_workers(cfg.data.tokenize_workers)

    def split(name: str) -> TokenWindows:
        files = text_files(cfg.data, name)
        check_text(files, line_threshold(windows, cfg.data.min_string_len), f"data.{name}")
        with _progress_bar(console, f"data.{name}") as progress:
            return load_windows(
                run.root / "cache", vocab.tokens, tokenizer, files, windows, cfg.model.seq_len,
                cfg.data.min_string_len, vocab.lowercase, workers, progress,
            )  # fmt: skip

    train = split("train")
    valid = split("valid")
    if len(train.windows) < cfg.data.batch_size:
        raise MinigptError(
            f"the training text gives {len(train.windows)} windows of {cfg.model.seq_len + 1} tokens, fewer than "
            f"one batch of {cfg.data.batch_size}; use more text or lower data.batch_size"
        )
    if len(valid.windows) == 0:
        raise MinigptError(f"the validation text gives no window of {cfg.model.seq_len + 1} tokens; use more text")
    return Data(
        train=Batches(train.windows, cfg.data.batch_size, seed=cfg.seed, shuffle=True, release=train.release),
        valid=Batches(valid.windows, cfg.data.batch_size, shuffle=False, release=valid.release),
        windows=windows,
        cached=train.cached,
    )
