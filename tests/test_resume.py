"""Exact resume with the recipe we recommend: AdamW + warmup + cosine + clipping, dropout, and signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import tomllib

import keras
import numpy as np
import pytest
from conftest import CORPUS, TINY

from minigpt_cli.config import load_config
from minigpt_cli.errors import MinigptError
from minigpt_cli.model import load_model
from minigpt_cli.runs import RunDir
from minigpt_cli.train import Interrupted, make_optimizer, resume_conflicts, train
from minigpt_cli.vocab import build_vocabulary, load_vocabulary

# The packed recipe, with a strong weight decay and tight clipping so that losing either shows in the weights.
RECIPE = (
    "train.optimizer=adamw", "train.learning_rate=5e-3", "train.lr_schedule=cosine", "train.warmup_steps=2",
    "train.min_lr_ratio=0.1", "train.clip_norm=0.5", "train.weight_decay=0.1", "train.steps_per_epoch=4",
    "train.jit_compile=false",  # XLA's compile costs more than these tiny runs; the CLI resume test uses it
)  # fmt: skip


def _cfg(*extra: str):
    sets = [f"data.train={CORPUS / 'train.txt'}", f"data.valid={CORPUS / 'valid.txt'}", *TINY,
            "train.sample_each_epoch=false", *RECIPE, *extra]  # fmt: skip
    return load_config(None, sets)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    run = RunDir(tmp_path_factory.mktemp("resume-vocab")).create()
    build_vocabulary(_cfg(), run)
    return run.root


def _run(tmp_path, vocab_dir, name: str) -> RunDir:
    run = RunDir(tmp_path / name).create()
    for f in ("vocab.txt", "vocab.json"):
        shutil.copy(vocab_dir / f, run.root / f)
    return run


def _state(run: RunDir) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
    """Weights and optimizer slots (moments and step count) of the run's model.keras."""
    model = load_model(run.model, len(load_vocabulary(run.vocab)), compile=True)
    slots = {v.path.split("/", 1)[1]: np.asarray(v) for v in model.optimizer.variables}
    return [np.asarray(w) for w in model.get_weights()], slots


def _assert_same_state(a: RunDir, b: RunDir) -> None:
    (wa, sa), (wb, sb) = _state(a), _state(b)
    for x, y in zip(wa, wb, strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert sa.keys() == sb.keys() and len(sa) > 2
    for key in sa:
        np.testing.assert_allclose(sa[key], sb[key], rtol=1e-5, atol=1e-7, err_msg=key)


class _SignalAt(keras.callbacks.Callback):
    """Sends SIGTERM to this process after training step ``step`` (counted over this fit)."""

    def __init__(self, step: int):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class _SignalInValidation(keras.callbacks.Callback):
    """Sends SIGTERM while epoch ``epoch`` (0-based) is being validated."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch, self.current = epoch, -1

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_test_begin(self, logs=None):
        if self.current == self.epoch:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("windows", ["reference", "packed"])
def test_stop_at_an_epoch_end_then_resume_equals_straight(tmp_path, vocab_dir, windows):
    """2 epochs straight == epoch 1, stopped by SIGTERM during its validation, + resume: weights and slots."""
    cfg = _cfg("train.epochs=2", f"data.windows={windows}")
    straight = _run(tmp_path, vocab_dir, "straight")
    train(cfg, straight)
    split = _run(tmp_path, vocab_dir, "split")
    with pytest.raises(Interrupted, match="at epoch 2, step 0"):
        train(cfg, split, callbacks=[_SignalInValidation(0)])
    history = train(cfg, split, resume=True)
    assert [r["epoch"] for r in history] == [1, 2]
    _assert_same_state(straight, split)


def test_sigterm_mid_epoch_then_resume_equals_straight(tmp_path, vocab_dir):
    cfg = _cfg("train.epochs=3", "data.windows=packed", "train.checkpoint_every=3")
    straight = _run(tmp_path, vocab_dir, "straight")
    train(cfg, straight)
    stopped = _run(tmp_path, vocab_dir, "stopped")
    validations = _Validations()
    with pytest.raises(Interrupted, match="Resume with: minigpt train --resume"):
        train(cfg, stopped, callbacks=[_SignalAt(6), validations])
    assert validations.count == 1, "a stop mid-epoch must not run a validation pass first"
    position = (stopped.root / "checkpoints" / "latest.json").read_text()
    assert '"epoch": 1' in position and '"step": 3' in position  # the step after the signal
    train(cfg, stopped, resume=True)
    _assert_same_state(straight, stopped)
    # The same record: every step's loss, and each epoch's row, the resumed epoch's included.
    steps = [np.loadtxt(run.steps_csv, delimiter=",", skiprows=1) for run in (straight, stopped)]
    assert steps[0].shape == (12, 3)
    np.testing.assert_allclose(steps[0], steps[1], rtol=1e-5)
    figures = ("epoch", "steps", "global_step", "loss", "perplexity", "val_loss", "val_perplexity", "learning_rate")
    rows = [[{k: r[k] for k in figures} for r in json.loads(run.history_json.read_text())]
            for run in (straight, stopped)]  # fmt: skip
    assert len(rows[0]) == 3
    for a, b in zip(*rows, strict=True):
        assert a == pytest.approx(b, rel=1e-5)


class _Validations(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.count = 0

    def on_test_begin(self, logs=None):
        self.count += 1


def test_dropout_masks_repeat_on_resume(tmp_path, vocab_dir):
    """With dropout the resumed run draws the masks the uninterrupted one drew (they follow seed and step)."""
    cfg = _cfg("train.epochs=2", "data.windows=packed", "model.dropout=0.3")
    straight = _run(tmp_path, vocab_dir, "straight")
    train(cfg, straight)
    stopped = _run(tmp_path, vocab_dir, "stopped")
    with pytest.raises(Interrupted):
        train(cfg, stopped, callbacks=[_SignalAt(3)])
    train(cfg, stopped, resume=True)
    _assert_same_state(straight, stopped)


class _LearningRates(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.rates: list[float] = []

    def on_train_batch_begin(self, batch, logs=None):
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))


def test_raising_epochs_on_resume_stretches_the_schedule(tmp_path, vocab_dir):
    run = _run(tmp_path, vocab_dir, "run")
    train(_cfg("train.epochs=1"), run)
    more = _cfg("train.epochs=2")
    rates = _LearningRates()
    train(more, run, resume=True, callbacks=[rates])
    schedule = keras.optimizers.schedules.deserialize(make_optimizer(more.train, 8).get_config()["learning_rate"])
    expected = [float(schedule(step)) for step in range(4, 8)]
    assert rates.rates == pytest.approx(expected, rel=1e-5)
    assert expected[0] > 2 * 5e-3 * 0.1  # mid-cosine, well above the old plan's floor
    assert tomllib.loads(run.config.read_text())["train"]["epochs"] == 2  # config.toml says what was used


def test_resume_refuses_keys_that_change_the_checkpoint(tmp_path, vocab_dir):
    run = _run(tmp_path, vocab_dir, "run")
    train(_cfg("train.epochs=1"), run)
    before = run.config.read_text()
    with pytest.raises(MinigptError, match=r"data\.batch_size: 16 -> 8; model\.embed_dim: 16 -> 32"):
        train(_cfg("train.epochs=2", "model.embed_dim=32", "data.batch_size=8"), run, resume=True)
    assert run.config.read_text() == before
    assert resume_conflicts(_cfg(), _cfg("train.learning_rate=1e-2", "train.epochs=9", "generate.k=3")) == []
    # The checkpoint records what it was trained with: a config.toml rewritten since (a fresh `train` killed
    # before its first checkpoint) does not make a resume take the new shape.
    run.config.write_text(before.replace("embed_dim = 16", "embed_dim = 32"))
    with pytest.raises(MinigptError, match=r"model\.embed_dim: 16 -> 32"):
        train(_cfg("train.epochs=2", "model.embed_dim=32"), run, resume=True)
    # Nor does a vocabulary learned again.
    vocab = run.vocab.read_text()
    run.vocab.write_text(vocab.replace("\nthe\n", "\nthe_\n"))
    (run.root / "vocab.json").unlink()
    with pytest.raises(MinigptError, match="vocab.txt in .* changed since the checkpoint"):
        train(_cfg("train.epochs=2"), run, resume=True)


def test_epoch_sample_settings_are_checked_before_training(tmp_path, vocab_dir):
    run = _run(tmp_path, vocab_dir, "run")
    with pytest.raises(MinigptError, match="--k is 1000 but the vocabulary has only"):
        train(_cfg("train.epochs=1", "train.sample_each_epoch=true", "generate.k=1000"), run)
    assert not run.history_json.exists() and not run.config.exists()


def test_signal_during_the_last_validation_finishes_the_run(tmp_path, vocab_dir):
    run = _run(tmp_path, vocab_dir, "run")
    history = train(_cfg("train.epochs=2"), run, callbacks=[_SignalInValidation(1)])
    assert [r["epoch"] for r in history] == [1, 2]
    with pytest.raises(MinigptError, match="already trained 2 epochs"):
        train(_cfg("train.epochs=2"), run, resume=True)
