"""The token cache at scale: text read in parts, tokenized in processes, resumed, memory-mapped back."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import tensorflow as tf
from conftest import CORPUS

from minigpt_cli.vocab import load_vocabulary, make_tokenizer
from minigpt_cli.windows import (
    Batches,
    TokenizingInterrupted,
    load_windows,
    packed_windows,
    part_lines,
    text_parts,
)


@pytest.fixture(scope="module")
def vocab(trained_run):
    return load_vocabulary(trained_run / "vocab.txt")


def _lines_as_tf_reads_them(files) -> list[bytes]:
    return [line.numpy() for line in tf.data.TextLineDataset([str(f) for f in files])]


def _one_pass(files, tokenizer, windows: str, seq_len: int, min_string_len: int) -> np.ndarray:
    """The oracle: the whole text through ``tf.data.TextLineDataset`` in one pass, as the reference reads it."""
    from minigpt_cli.model import MiniGPTCausalLMPreprocessor

    lines = tf.data.TextLineDataset([str(f) for f in files])
    if windows == "reference":
        pre = MiniGPTCausalLMPreprocessor(tokenizer, sequence_length=seq_len)
        batches = lines.filter(lambda x: tf.strings.length(x) > min_string_len).batch(64)
        out = []
        for batch in batches:
            x, y, _ = pre(batch)
            out.append(np.concatenate([x["token_ids"][:, :1], y], axis=1))
        return np.concatenate(out)
    stream = []
    for line in lines.filter(lambda x: tf.strings.length(tf.strings.strip(x)) > 0):
        stream += [tokenizer.token_to_id("[BOS]"), *np.asarray(tokenizer(line)).tolist()]
    return packed_windows(np.asarray(stream, np.int32), seq_len)


def _awkward_text(tmp_path):
    """Windows and old-Mac line ends, blank and blank-looking lines, long lines, no final newline."""
    body = CORPUS.joinpath("valid.txt").read_text(encoding="utf-8")
    text = (
        "First line\r\nSecond\rline with a carriage return inside\n\n   \n\t\n"
        + body
        + "\r\n\r\n"
        + "Ünïcödé, façade — naïve café.\n"
        + "The last line has no newline"
    )
    path = tmp_path / "awkward.txt"
    path.write_bytes(text.encode("utf-8"))
    return path


def test_parts_read_the_lines_tf_data_reads(tmp_path):
    path = _awkward_text(tmp_path)
    other = tmp_path / "other.txt"
    other.write_text("one\ntwo\n", encoding="utf-8")
    files = [path, other]
    expected = _lines_as_tf_reads_them(files)
    for part_bytes in (1, 7, 100, 4096, 1 << 30):
        parts = text_parts(files, part_bytes)
        assert sum(p.size for p in parts) == sum(f.stat().st_size for f in files)
        if part_bytes < 4096:
            assert len(parts) > 5
        lines = [line for p in parts for line in part_lines(p)]
        assert lines == expected, part_bytes


@pytest.mark.parametrize("windows", ["packed", "reference"])
def test_cache_equals_one_pass_over_the_text(tmp_path, vocab, windows):
    """Tokenized in small parts (here in this process), joined and memory-mapped: the one-pass windows."""
    tokenizer = make_tokenizer(vocab)
    files = [_awkward_text(tmp_path), CORPUS / "train.txt"]
    expected = _one_pass(files, tokenizer, windows, 24, 64)
    got = load_windows(tmp_path / "cache", vocab, tokenizer, files, windows, 24, 64, True, part_bytes=9000)
    assert not got.cached
    np.testing.assert_array_equal(got.windows, expected)
    again = load_windows(tmp_path / "cache", vocab, tokenizer, files, windows, 24, 64, True, part_bytes=9000)
    assert again.cached
    np.testing.assert_array_equal(again.windows, expected)
    assert not list((tmp_path / "cache").glob("*.parts")), "the parts are removed once joined"


def test_processes_tokenize_the_parts(tmp_path, vocab):
    """Two spawned processes: the same windows as one pass, and the progress reaches the text's size."""
    tokenizer = make_tokenizer(vocab)
    files = [CORPUS / "train.txt"]
    seen = []
    got = load_windows(
        tmp_path / "cache", vocab, tokenizer, files, "packed", 32, 64, True, workers=2,
        progress=lambda done, total, reused: seen.append((done, total)), part_bytes=20_000,
    )  # fmt: skip
    np.testing.assert_array_equal(got.windows, _one_pass(files, tokenizer, "packed", 32, 64))
    size = files[0].stat().st_size
    assert seen[0] == (0, size) and seen[-1] == (size, size) and len(seen) == len(text_parts(files, 20_000)) + 1


def test_interrupted_tokenizing_resumes_without_redoing_parts(tmp_path, vocab):
    """A real SIGINT after three parts: they are kept; the next run tokenizes only the rest (a damaged part
    and a stray temporary file are not used) and gives the one-pass windows."""
    tokenizer = make_tokenizer(vocab)
    files = [CORPUS / "train.txt"]
    cache = tmp_path / "cache"
    n = len(text_parts(files, 12_000))
    assert n >= 8

    def stop_after_three(done, total, reused):
        if len(list(cache.glob("*.parts/part-*.npy"))) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TokenizingInterrupted, match="3 of .* parts are saved"):
        load_windows(cache, vocab, tokenizer, files, "packed", 32, 64, True, progress=stop_after_three,
                     part_bytes=12_000)  # fmt: skip
    [folder] = cache.glob("*.parts")
    kept = sorted(folder.glob("part-*.npy"))
    assert len(kept) == 3
    assert not list(cache.glob("*.bin")), "no cache file from an interrupted run"
    kept[1].write_bytes(kept[1].read_bytes()[:100])  # damaged: must be tokenized again
    (folder / ".part-00005.npy.dead.tmp.npy").write_bytes(b"half a part")  # what a killed write leaves
    seen = []
    got = load_windows(cache, vocab, tokenizer, files, "packed", 32, 64, True,
                       progress=lambda d, t, reused: seen.append(reused), part_bytes=12_000)  # fmt: skip
    assert seen[0] == 2, "the two whole parts are reused, the damaged one is not"
    np.testing.assert_array_equal(got.windows, _one_pass(files, tokenizer, "packed", 32, 64))
    assert not folder.exists()


def test_batches_from_the_memory_map(tmp_path, vocab):
    """The seeded batches over the memory-mapped cache, pages let go or not, are those over the same windows in
    memory."""
    tokenizer = make_tokenizer(vocab)
    got = load_windows(tmp_path / "cache", vocab, tokenizer, [CORPUS / "train.txt"], "packed", 16, 64, True)
    assert not got.windows.flags.writeable and got.windows.dtype == np.uint16
    mapped = Batches(got.windows, 8, seed=3, release=got.release)
    memory = Batches(np.array(got.windows, dtype=np.int32), 8, seed=3)
    for step in [0, 1, 255, 256, 257, mapped.per_pass - 1, mapped.per_pass, 3 * mapped.per_pass + 5]:
        a, b = mapped.batch(step), memory.batch(step)
        assert a[0]["token_ids"].dtype == np.int32
        np.testing.assert_array_equal(a[0]["token_ids"], b[0]["token_ids"])
        np.testing.assert_array_equal(a[1], b[1])


def test_one_packed_cache_serves_every_window_length(tmp_path, vocab):
    """The packed cache is the token stream: a run with another seq_len reads it back and cuts its own windows."""
    tokenizer = make_tokenizer(vocab)
    files = [CORPUS / "train.txt"]
    first = load_windows(tmp_path / "cache", vocab, tokenizer, files, "packed", 16, 64, True)
    second = load_windows(tmp_path / "cache", vocab, tokenizer, files, "packed", 32, 64, True)
    assert not first.cached and second.cached
    np.testing.assert_array_equal(second.windows, _one_pass(files, tokenizer, "packed", 32, 64))
    assert len(list((tmp_path / "cache").glob("*.bin"))) == 1
