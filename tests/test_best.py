"""model.best.keras, early stopping and --best: through the real CLI, and exact across stops and crashes."""

from __future__ import annotations

import io
import json
import math
import shutil

import numpy as np
import pytest
from conftest import CORPUS, TINY, assert_user_error, minigpt
from rich.console import Console
from test_resume import _SignalAt

from minigpt_cli import callbacks as cb
from minigpt_cli import checkpoints
from minigpt_cli.config import load_config
from minigpt_cli.errors import MinigptError
from minigpt_cli.evaluate import evaluate
from minigpt_cli.model import load_model
from minigpt_cli.runs import RunDir, file_digest
from minigpt_cli.train import Interrupted, train
from minigpt_cli.vocab import build_vocabulary, load_vocabulary

# Trained on one line over and over, the model first learns what all text shares, then learns that line by
# heart: the validation loss falls for a few epochs, then rises (by 0.1 to 0.3 an epoch), whatever the seed.
# The vocabulary is the corpus's. The whole validation text, so that `evaluate` scores what val_loss does.
# XLA off: compiling costs more than these epochs.
RECIPE = [
    f"data.valid={CORPUS / 'valid.txt'}", *TINY, "train.sample_each_epoch=false", "train.jit_compile=false",
    "train.learning_rate=0.01", "train.steps_per_epoch=3", "train.validation_steps=100", "train.epochs=10",
    "train.early_stop_patience=2",
]  # fmt: skip
PATIENCE = 2


@pytest.fixture(scope="module")
def one_line(tmp_path_factory):
    path = tmp_path_factory.mktemp("one-line") / "train.txt"
    path.write_text(((CORPUS / "train.txt").read_text().splitlines()[0] + "\n") * 64, encoding="utf-8")
    return path


def _cfg(one_line, *extra: str):
    return load_config(None, [*RECIPE, f"data.train={one_line}", *extra])


def _cli_sets(one_line, *extra: str) -> list[str]:
    return [a for s in [*RECIPE, f"data.train={one_line}", *extra] for a in ("--set", s)]


def _run(tmp_path, vocab_dir, name: str) -> RunDir:
    run = RunDir(tmp_path / name).create()
    for f in ("vocab.txt", "vocab.json"):
        shutil.copy(vocab_dir / f, run.root / f)
    return run


def _history(run: RunDir) -> list[dict]:
    return json.loads(run.history_json.read_text())


def _weights(path) -> list[np.ndarray]:
    model = load_model(path, len(load_vocabulary(path.parent / "vocab.txt")))
    return [np.asarray(w) for w in model.get_weights()]


def _assert_same_weights(a, b) -> None:
    for x, y in zip(_weights(a), _weights(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def _expected_stop(val_losses: list[float], patience: int) -> tuple[int, int]:
    """(best epoch, epoch it stops after), 1-based, by the rule written out: a new best is strictly lower."""
    best, best_epoch = math.inf, 0
    for epoch, loss in enumerate(val_losses, 1):
        if loss < best:
            best, best_epoch = loss, epoch
        elif epoch - best_epoch >= patience:
            return best_epoch, epoch
    return best_epoch, len(val_losses)


@pytest.fixture(scope="module")
def vocab_dir(tmp_path_factory):
    run = RunDir(tmp_path_factory.mktemp("best-vocab")).create()
    build_vocabulary(_cfg(CORPUS / "train.txt"), run)
    return run.root


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, vocab_dir, one_line):
    """One uninterrupted `minigpt train` that stops early; tests read it or copy it."""
    run = _run(tmp_path_factory.mktemp("best"), vocab_dir, "run")
    result = minigpt("train", "--run-dir", run.root, *_cli_sets(one_line))
    assert result.returncode == 0, result.stderr
    return run, result


def test_early_stop_through_the_cli(stopped):
    run, result = stopped
    history = _history(run)
    best_epoch, stop_epoch = _expected_stop([r["val_loss"] for r in history], PATIENCE)
    assert 1 < best_epoch < stop_epoch < 10  # the config does what the test needs: a best in the middle, a stop
    assert len(history) == stop_epoch
    best = history[best_epoch - 1]
    lines = [line for line in result.stderr.splitlines() if "stopping early" in line]
    assert lines == [
        f"stopping early after epoch {stop_epoch}/10: no val_loss below epoch {best_epoch}'s {best['val_loss']:.4f} "
        f"in the 2 epochs after it (train.early_stop_patience = 2); the best model is {run.best_model}"
    ]
    # The stop comes after the epoch's checkpoint.
    assert checkpoints.latest(run.root).epoch == stop_epoch
    assert f"trained {stop_epoch} epochs" in result.stdout


def test_evaluate_best_scores_the_best_epochs_val_loss(stopped):
    """evaluate scores every validation window as training's val_loss does: --best gives the best epoch's."""
    run, _ = stopped
    history = _history(run)
    best = min(history, key=lambda r: r["val_loss"])
    result = minigpt("evaluate", "--run-dir", run.root, "--data", CORPUS / "valid.txt", "--best", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["loss"] == pytest.approx(best["val_loss"], abs=1e-4)
    # Without --best: model.keras, the last epoch, worse.
    last = evaluate(run, str(CORPUS / "valid.txt"), "reference", 64, load_config(None, RECIPE).vocab, 16)
    assert last.loss == pytest.approx(history[-1]["val_loss"], abs=1e-4)
    assert last.loss > best["val_loss"] + 0.01


def test_resume_after_an_early_stop(stopped, one_line, tmp_path):
    """The same settings: it says it stopped early. Patience 0 (never stop): trains on to train.epochs."""
    run = RunDir(tmp_path / "run")
    shutil.copytree(stopped[0].root, run.root)
    stop_epoch = len(_history(run))
    with pytest.raises(MinigptError) as refused:
        train(_cfg(one_line), run, Console(quiet=True), resume=True)
    assert str(refused.value).startswith(f"{run.root} has stopped early: no val_loss below epoch ")
    assert "in the 2 epochs after it" in str(refused.value)
    assert str(refused.value).endswith("resume with --set train.early_stop_patience=3 or more (0: never stop early)")
    best_bytes = run.best_model.read_bytes()
    train(_cfg(one_line, "train.early_stop_patience=0", f"train.epochs={stop_epoch + 2}"), run, Console(quiet=True),
          resume=True)  # fmt: skip
    history = _history(run)
    assert len(history) == stop_epoch + 2
    best_epoch = _expected_stop([r["val_loss"] for r in history], 100)[0]
    assert best_epoch == stop_epoch - PATIENCE, "the epochs after the stop are worse still"
    assert run.best_model.read_bytes() == best_bytes


class _Crash(Exception):
    pass


def test_crash_and_stops_leave_the_best_and_the_stop_of_a_straight_run(stopped, vocab_dir, one_line, tmp_path,
                                                                      monkeypatch):  # fmt: skip
    """A crash between a best epoch's checkpoint and its copy, then a SIGTERM mid-epoch after it; two resumes."""
    straight, _ = stopped
    history = _history(straight)
    best_epoch, stop_epoch = _expected_stop([r["val_loss"] for r in history], PATIENCE)
    run = _run(tmp_path, vocab_dir, "run")
    quiet = Console(quiet=True)
    copy_best = cb.BestModel.on_epoch_end

    def crash_at_best(self, epoch, logs=None):
        if epoch + 1 == best_epoch:
            raise _Crash
        copy_best(self, epoch, logs)

    monkeypatch.setattr(cb.BestModel, "on_epoch_end", crash_at_best)
    with pytest.raises(_Crash):
        train(_cfg(one_line), run, quiet)
    monkeypatch.undo()
    assert checkpoints.latest(run.root).epoch == best_epoch
    assert run.best_model.read_bytes() != run.model.read_bytes()  # an older best: the crash came before the copy
    # Resume from that epoch's end; SIGTERM after the next epoch's 3 steps and 1 step of the one after.
    with pytest.raises(Interrupted):
        train(_cfg(one_line), run, quiet, resume=True, callbacks=[_SignalAt(4)])
    position = checkpoints.latest(run.root)
    assert (position.epoch, position.step) == (best_epoch + 1, 2)  # 0-based epoch: mid-way in a patience epoch
    train(_cfg(one_line), run, quiet, resume=True)
    assert len(_history(run)) == stop_epoch
    _assert_same_weights(run.best_model, straight.best_model)
    for a, b in zip(_history(run), history, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-5)


def test_best_epoch_rule():
    rows = [{"epoch": i, "val_loss": v} for i, v in enumerate([math.nan, 5.0, 5.0, 4.0, math.nan, 4.5, math.inf], 1)]
    assert cb.best_epoch(rows) == (rows[3], 3)  # strictly lower; NaN and inf never count
    assert cb.best_epoch(rows[:1]) == (None, 1)
    assert cb.best_epoch(rows[1:3]) == (rows[1], 1)
    assert cb.best_epoch([]) == (None, 0)


def _restore(run: RunDir, history: list[dict], position) -> tuple[bool, str]:
    text = io.StringIO()
    best = cb.BestModel(cb.Clock(3), run, history, 0, 10, Console(file=text, width=300))
    best.restore(position)
    return best.saved, text.getvalue()


def test_restore_makes_the_best_file_agree_with_the_history(tmp_path):
    run = RunDir(tmp_path).create()
    rows = [{"epoch": 1, "val_loss": 5.0}, {"epoch": 2, "val_loss": 4.0}]
    (run.root / "checkpoints").mkdir()
    (run.root / "checkpoints" / "ckpt-6.keras").write_bytes(b"epoch 2")
    size, sha256 = file_digest(run.root / "checkpoints" / "ckpt-6.keras")
    at_epoch_end = checkpoints.Position(2, 0, 6, 3, file="ckpt-6.keras", size=size, sha256=sha256)
    # A new run (or no finite val_loss yet): an earlier training's file goes.
    run.best_model.write_bytes(b"old run")
    assert _restore(run, [], None) == (False, "")
    assert not run.best_model.exists()
    # Resumed at the end of the best epoch: its checkpoint is that epoch's model.
    run.best_model.write_bytes(b"epoch 1")
    assert _restore(run, rows, at_epoch_end)[0]
    assert run.best_model.read_bytes() == b"epoch 2"
    inode = run.best_model.stat().st_ino  # already right: left alone (nothing written, nothing to fail)
    assert _restore(run, rows, at_epoch_end)[0]
    assert run.best_model.stat().st_ino == inode
    # Later, mid-epoch: the copy was made before that checkpoint, and is kept.
    assert _restore(run, rows, checkpoints.Position(2, 1, 7, 3, file="ckpt-7.keras"))[0]
    assert run.best_model.read_bytes() == b"epoch 2"
    # Missing (deleted by hand): no best is claimed, and a note says so.
    run.best_model.unlink()
    saved, note = _restore(run, [*rows, {"epoch": 3, "val_loss": 4.5}], checkpoints.Position(3, 0, 9, 3))
    assert not saved and "best model so far (epoch 2, val_loss 4.0000) is lost" in note


@pytest.mark.parametrize(
    "command", [["generate"], ["evaluate", "--data", str(CORPUS / "valid.txt")], ["chat"], ["serve", "--port", "0"]]
)
def test_best_without_the_file_is_one_line(stopped, tmp_path, command):
    run = tmp_path / "run"
    shutil.copytree(stopped[0].root, run)
    (run / "model.best.keras").unlink()
    result = minigpt(*command, "--run-dir", run, "--best")
    assert_user_error(result, f"no model.best.keras in {run}: it is written at the end of each epoch")


def test_generate_best_loads_model_best_keras(stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped[0].root, run)
    (run / "model.best.keras").write_bytes(b"not a model")
    assert_user_error(minigpt("generate", "--run-dir", run, "--best"), f"cannot load {run / 'model.best.keras'}")
