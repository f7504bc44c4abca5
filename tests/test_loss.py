"""The numbers training and evaluation report: the loss over real tokens, perplexity, bits per character."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest

from minigpt_cli.config import ModelConfig, load_config
from minigpt_cli.evaluate import evaluate
from minigpt_cli.model import build_model, load_model
from minigpt_cli.runs import RunDir
from minigpt_cli.train import compile_model
from minigpt_cli.vocab import load_vocabulary, make_tokenizer, read_vocabulary
from minigpt_cli.windows import cut_windows


def _cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[label], by hand in float64."""
    z = logits.astype("float64")
    z = z - z.max(axis=-1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return -np.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


def _padded_batch(seed: int = 0):
    """Six windows of very different real lengths: [BOS] + tokens, then [PAD]."""
    rng = np.random.default_rng(seed)
    x = rng.integers(3, 30, (6, 8)).astype("int32")
    x[:, 0] = 2
    for row, length in enumerate([8, 2, 5, 3, 8, 6]):
        x[row, length:] = 0
    y = np.zeros_like(x)
    y[:, :-1] = x[:, 1:]
    y[:, -1] = rng.integers(3, 30, 6) * (x[:, -1] != 0)
    return {"token_ids": x, "padding_mask": (x != 0).astype("int32")}, y, (y != 0).astype("float32")


def test_loss_is_the_mean_over_real_tokens():
    keras.utils.set_random_seed(0)
    model = build_model(30, ModelConfig(seq_len=8, embed_dim=8, feed_forward_dim=8, num_heads=2, num_layers=1))
    compile_model(model, load_config(None, []), total_steps=10)
    x, y, w = _padded_batch()
    ce = _cross_entropy(np.asarray(model(x)), y)
    assert 0.2 < w.mean() < 0.9, "the batch must hold padding for this test to mean something"

    # One batch: what the gradient is taken of.
    loss = float(model.compute_loss(x, y, model(x), w))
    assert loss == pytest.approx((ce * w).sum() / w.sum(), rel=1e-5)
    assert loss > (ce * w).sum() / w.size * 1.2  # a mean over every position, [PAD] counted, reads far lower

    # Two batches of 3 with different numbers of real tokens: the logged loss is the mean over all real tokens,
    # not the mean of the two batches' means, and it is the log of the perplexity.
    result = model.evaluate(x, y, sample_weight=w, batch_size=3, verbose=0, return_dict=True)
    assert result["loss"] == pytest.approx((ce * w).sum() / w.sum(), rel=1e-5)
    halves = [(ce[i : i + 3] * w[i : i + 3]).sum() / w[i : i + 3].sum() for i in (0, 3)]
    assert abs(np.mean(halves) - result["loss"]) > 1e-3
    assert result["loss"] == pytest.approx(math.log(result["perplexity"]), rel=1e-5)

    # A training step reports its own batch's loss (steps.csv), taken before the update.
    logs = model.train_on_batch(x, y, sample_weight=w, return_dict=True)
    assert logs["batch_loss"] == pytest.approx((ce * w).sum() / w.sum(), rel=1e-5)


def test_validation_loss_is_the_log_of_validation_perplexity(tmp_path, trained_run):
    """On windows with much padding, val_loss (Keras' loss, per real token) = ln(val_perplexity) (KerasHub's)."""
    from conftest import CORPUS, TINY

    from minigpt_cli.train import train
    from minigpt_cli.windows import prepare_data

    run = RunDir(tmp_path / "run").create()
    for name in ("vocab.txt", "vocab.json"):
        (run.root / name).write_bytes((trained_run / name).read_bytes())
    sets = [
        f"data.train={CORPUS / 'train.txt'}",
        f"data.valid={CORPUS / 'valid.txt'}",
        *TINY,
        "model.seq_len=96",
        "train.steps_per_epoch=3",
        "train.sample_each_epoch=false",
        "train.jit_compile=false",
    ]
    cfg = load_config(None, [s for s in sets if not s.startswith("train.validation_steps")])
    valid = prepare_data(cfg, run, read_vocabulary(run.vocab, cfg.vocab)).valid.windows
    assert (valid[:, 1:] == 0).mean() > 0.1, "the scored validation windows must hold padding"
    [row] = train(cfg, run)
    assert row["val_loss"] == pytest.approx(math.log(row["val_perplexity"]), rel=1e-5)


def _whole_tokens(tokenizer, words: list[str]) -> None:
    for word in words:
        assert len(np.asarray(tokenizer(word)).reshape(-1)) == 1, f"{word!r} must be one token for this test"


@pytest.mark.parametrize("windows", ["reference", "packed"])
def test_bits_per_character_by_hand(tmp_path, trained_run, windows):
    """Bits over the scored tokens, divided by the characters of the text those tokens cover."""
    vocab = load_vocabulary(trained_run / "vocab.txt")
    tokenizer = make_tokenizer(vocab)
    long_words = ["the", "old", "river"] * 20  # 60 one-token words: reference windows score the first 32
    short_words = "the old king and the miller went across the river and the baker sang".split()
    _whole_tokens(tokenizer, sorted(set(long_words + short_words)))
    long_line, short_line = " ".join(long_words), " ".join(short_words)
    text = tmp_path / "text.txt"
    text.write_text(f"{long_line}\n{short_line}\n", encoding="utf-8")
    seq_len = 32
    if windows == "reference":
        # The long line: its first 32 words; the short one (14 tokens, over 64 bytes): all of it.
        chars = len(" ".join(long_words[:seq_len])) + len(short_line)
    else:
        # One stream: [BOS] 60 words [BOS] 14 words = 76 tokens; two windows score positions 1..64:
        # all of the long line, its paragraph's end ([BOS], no characters) and the short line's first 3 words.
        chars = len(long_line) + len(" ".join(short_words[:3]))
    assert len(short_line.encode()) > 64

    model = load_model(trained_run / "model.keras", len(vocab))
    cut = cut_windows([text], tokenizer, windows, seq_len, 64)
    x, y = cut[:, :-1], cut[:, 1:]
    w = (y != 0).astype("float64")
    nats = (_cross_entropy(np.asarray(model({"token_ids": x, "padding_mask": (x != 0).astype("int32")})), y) * w).sum()

    result = evaluate(RunDir(trained_run), str(text), windows, 64)
    assert result.characters == chars
    assert result.tokens == int(w.sum())
    assert result.bits_per_character == pytest.approx(nats / math.log(2) / chars, rel=1e-4)
    assert result.loss == pytest.approx(nats / w.sum(), rel=1e-4)


def test_step_losses_and_the_epochs_mean_over_real_tokens():
    """steps.csv holds each step's own loss and real tokens; an epoch's loss weighs its steps by their tokens."""
    from minigpt_cli.callbacks import Clock, StepLosses, epoch_loss

    batch_losses = [5.0, 3.0, 4.5, 2.0, 6.25]
    tokens = [100, 7, 64, 1, 33]
    clock = Clock(steps_per_epoch=5)
    steps: list = []
    recorder = StepLosses(clock, lambda step: tokens[step], steps)
    clock.on_epoch_begin(0)
    for batch, loss in enumerate(batch_losses):
        clock.on_train_batch_begin(batch)
        clock.on_train_batch_end(batch)
        recorder.on_train_batch_end(batch, {"batch_loss": np.float32(loss), "loss": np.float32(0.0)})
    assert steps == [(1, 5.0, 100), (2, 3.0, 7), (3, 4.5, 64), (4, 2.0, 1), (5, 6.25, 33)]
    assert epoch_loss(steps, 1, 5) == pytest.approx(np.dot(batch_losses, tokens) / sum(tokens))
    assert epoch_loss(steps, 2, 3) == pytest.approx((3.0 * 7 + 4.5 * 64) / 71)
