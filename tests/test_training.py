"""Training beyond the reference: packing, the token cache, the recipe, checkpoints and resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import CORPUS, minigpt, tiny_sets

from minigpt_cli.config import TrainConfig
from minigpt_cli.model import MiniGPTCausalLMPreprocessor
from minigpt_cli.train import make_optimizer
from minigpt_cli.vocab import load_vocabulary, make_tokenizer
from minigpt_cli.windows import Batches, cache_key, cut_windows

FILES = [CORPUS / "train.txt"]


@pytest.fixture(scope="module")
def vocab(trained_run):
    return load_vocabulary(trained_run / "vocab.txt")


def test_packed_windows_use_every_token(vocab):
    tokenizer = make_tokenizer(vocab)
    windows = cut_windows(FILES, tokenizer, "packed", 32, 64)
    lines = [line for line in FILES[0].read_text(encoding="utf-8").splitlines() if line.strip()]
    stream = []
    for line in lines:
        stream += [2, *np.asarray(tokenizer(line)).tolist()]
    n = (len(stream) - 1) // 32
    assert windows.shape == (n, 33)
    # Windows overlap by one token: a window's last token is the next one's first, so every token of the
    # stream but the very first is a label exactly once (bar the tail that fills no window).
    labels = windows[:, 1:].reshape(-1)
    np.testing.assert_array_equal(labels, stream[1 : 1 + n * 32])
    np.testing.assert_array_equal(windows[1:, 0], windows[:-1, -1])
    assert windows[0, 0] == 2 and (windows != 0).all(), "packed windows hold no padding"
    assert len(stream) - 1 - labels.size < 32


def test_reference_windows_are_the_reference_packing(vocab):
    tokenizer = make_tokenizer(vocab)
    windows = cut_windows(FILES, tokenizer, "reference", 32, 64)
    lines = [line for line in FILES[0].read_text(encoding="utf-8").splitlines() if len(line.encode()) > 64]
    assert len(windows) == len(lines)
    x, y, sw = MiniGPTCausalLMPreprocessor(tokenizer, sequence_length=32)(lines[:5])
    np.testing.assert_array_equal(windows[:5, :-1], np.asarray(x["token_ids"]))
    np.testing.assert_array_equal(windows[:5, 1:], np.asarray(y))
    assert (windows[:, 0] == 2).all()
    first = np.asarray(tokenizer(lines[0])).tolist()[:32]
    assert windows[0, 1:].tolist()[: len(first)] == first


def test_batches_are_a_function_of_seed_and_step(vocab):
    windows = np.arange(50 * 5).reshape(50, 5)
    a, b = Batches(windows, 8, seed=1), Batches(windows, 8, seed=1)
    assert a.per_pass == 6
    for step in (0, 5, 6, 13):
        np.testing.assert_array_equal(a.batch(step)[1], b.batch(step)[1])
    first_pass = np.concatenate([a.batch(s)[0]["token_ids"][:, 0] for s in range(6)])
    assert len(set(first_pass.tolist())) == 48  # no window twice in a pass
    assert not np.array_equal(a.batch(0)[1], a.batch(6)[1])  # a new order every pass
    assert not np.array_equal(a.batch(0)[1], Batches(windows, 8, seed=2).batch(0)[1])


def test_cache_key_follows_contents_and_vocab(tmp_path, vocab):
    f = tmp_path / "t.txt"
    f.write_text("one line of text\n")
    key = cache_key(vocab, [f], "packed", 32, 64, True)
    assert key == cache_key(vocab, [f], "packed", 32, 64, True)
    assert key != cache_key(vocab + ["extra"], [f], "packed", 32, 64, True)
    assert key != cache_key(vocab, [f], "reference", 32, 64, True)
    # The packed cache is the token stream: any seq_len cuts its windows, so it is shared.
    assert key == cache_key(vocab, [f], "packed", 16, 64, True)
    assert key != cache_key(vocab, [f], "packed", 32, 64, False)  # lowercase
    reference = cache_key(vocab, [f], "reference", 32, 64, True)
    assert reference != cache_key(vocab, [f], "reference", 32, 128, True)  # min_string_len drops reference lines
    assert reference != cache_key(vocab, [f], "reference", 16, 64, True)
    assert reference != cache_key(vocab, [f], "reference", 32, 64, False)
    f.write_text("one line of other text\n")
    assert key != cache_key(vocab, [f], "packed", 32, 64, True)


def test_optimizer_recipe():
    cfg = TrainConfig(optimizer="adamw", learning_rate=2e-3, lr_schedule="cosine", warmup_steps=10,
                      min_lr_ratio=0.1, clip_norm=1.0, weight_decay=0.01)  # fmt: skip
    opt = make_optimizer(cfg, total_steps=110)
    assert isinstance(opt, keras.optimizers.AdamW)
    assert opt.global_clipnorm == 1.0 and opt.weight_decay == 0.01
    schedule = keras.optimizers.schedules.deserialize(opt.get_config()["learning_rate"])
    assert float(schedule(0)) == pytest.approx(0.0, abs=1e-9)
    assert float(schedule(5)) == pytest.approx(1e-3, rel=1e-5)  # linear warmup
    assert float(schedule(10)) == pytest.approx(2e-3, rel=1e-5)
    assert float(schedule(60)) == pytest.approx(2e-4 + 0.5 * 1.8e-3, rel=1e-4)  # half way down the cosine
    assert float(schedule(110)) == pytest.approx(2e-4, rel=1e-4)
    plain = make_optimizer(TrainConfig(), total_steps=100)
    assert isinstance(plain, keras.optimizers.Adam) and not isinstance(plain, keras.optimizers.AdamW)
    assert float(plain.learning_rate) == pytest.approx(1e-3)


def test_cli_ctrl_c_then_kill_then_resume(tmp_path):
    run = tmp_path / "run"
    sets = tiny_sets("train.epochs=40", "train.steps_per_epoch=3", "train.sample_each_epoch=false")
    assert minigpt("vocab", "--run-dir", run, *sets).returncode == 0
    pointer = run / "checkpoints" / "latest.json"

    def start():
        return subprocess.Popen(
            [sys.executable, "-m", "minigpt_cli", "train", "--run-dir", str(run), *sets],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

    def wait_for_checkpoint(proc, after: float):
        deadline = time.time() + 120
        while time.time() < deadline:
            if pointer.exists() and pointer.stat().st_mtime > after:
                return
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        raise AssertionError("no checkpoint in 120 s")

    proc = start()
    wait_for_checkpoint(proc, 0)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Resume with: minigpt train --resume" in err and "Traceback" not in err
    stopped_at = json.loads(pointer.read_text())

    resumed = subprocess.Popen(
        [sys.executable, "-m", "minigpt_cli", "train", "--resume", "--run-dir", str(run)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_for_checkpoint(resumed, pointer.stat().st_mtime)
    resumed.kill()  # SIGKILL: no chance to clean up
    resumed.communicate(timeout=60)
    position = json.loads(pointer.read_text())
    assert position["global_step"] > stopped_at["global_step"]
    keras.saving.load_model(run / "checkpoints" / position["file"], compile=False)  # whole, whenever the kill came
    keras.saving.load_model(run / "model.keras", compile=False)
    assert load_vocabulary(run / "vocab.txt")

    final = minigpt("train", "--resume", "--run-dir", run, timeout=600)
    assert final.returncode == 0, final.stderr
    history = json.loads((run / "history.json").read_text())
    assert [r["epoch"] for r in history] == list(range(1, 41))
    assert len((run / "steps.csv").read_text().splitlines()) == 1 + 40 * 3


def test_second_run_reads_the_token_cache(tmp_path):
    run = tmp_path / "run"
    sets = tiny_sets("data.windows=packed", "train.sample_each_epoch=false")
    assert minigpt("vocab", "--run-dir", run, *sets).returncode == 0
    first = minigpt("train", "--run-dir", run, *sets)
    assert first.returncode == 0, first.stderr
    assert "packed windows," in first.stderr and "(from the cache)" not in first.stderr
    second = minigpt("train", "--run-dir", run, *sets)
    assert "(from the cache)" in second.stderr
    assert "tokenized data.train" in first.stderr and "tokenized data.train" not in second.stderr
    assert len(list((run / "cache").glob("tokens-packed-*.bin"))) == 2  # train and valid
    png = (run / "training_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_resume_without_checkpoint(tmp_path):
    run = tmp_path / "run"
    assert minigpt("vocab", "--run-dir", run, *tiny_sets()).returncode == 0
    result = minigpt("train", "--resume", "--run-dir", run)
    assert result.returncode == 2 and "nothing to resume" in result.stderr


def test_evaluate_scores_the_windows_the_run_was_trained_on(trained_run):
    valid = CORPUS / "valid.txt"
    result = minigpt("evaluate", "--run-dir", trained_run, "--data", valid, "--json")
    assert result.returncode == 0, result.stderr
    ref = json.loads(result.stdout)
    assert ref["windows"] == "reference"
    vocab = load_vocabulary(trained_run / "vocab.txt")
    windows = cut_windows([valid], make_tokenizer(vocab), "reference", 32, 64)
    assert ref["tokens"] == int((windows[:, 1:] != 0).sum())
    packed = json.loads(minigpt("evaluate", "--run-dir", trained_run, "--data", valid, "--json",
                                "--windows", "packed").stdout)  # fmt: skip
    assert packed["windows"] == "packed" and packed["tokens"] > ref["tokens"]
    bad = minigpt("evaluate", "--run-dir", trained_run, "--data", valid, "--windows", "sliding")
    assert bad.returncode == 2 and "sliding" in bad.stderr


def test_packing_takes_short_lines(tmp_path):
    """With packing every line counts: text of short lines trains without lowering min_string_len."""
    short = tmp_path / "short.txt"
    sentences = " ".join(CORPUS.joinpath("train.txt").read_text(encoding="utf-8").split()[:3000]).split(". ")
    short.write_text(".\n".join(sentences) + "\n", encoding="utf-8")
    assert max(len(line.encode()) for line in short.read_text().splitlines()) <= 512
    sets = tiny_sets("data.windows=packed", "data.min_string_len=512", "train.sample_each_epoch=false",
                     train=short, valid=short)  # fmt: skip
    run = tmp_path / "run"
    assert minigpt("vocab", "--run-dir", run, *sets).returncode == 0
    result = minigpt("train", "--run-dir", run, *sets)
    assert result.returncode == 0, result.stderr
    refused = minigpt("vocab", "--run-dir", tmp_path / "ref", *tiny_sets("data.min_string_len=512", train=short))
    assert refused.returncode == 2 and "min_string_len" in refused.stderr
