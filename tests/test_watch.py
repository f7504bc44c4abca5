"""Training you can watch: TensorBoard logs, MFU, gradient accumulation, and ``config --size``."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import minigpt, tiny_sets

from minigpt_cli import flops

# The TensorBoard run: AdamW, warmup + cosine, clipping, 2 micro-batches per update, a point every step.
BOARD = (
    "data.windows=packed", "train.jit_compile=false", "train.epochs=2", "train.steps_per_epoch=6",
    "train.log_every=1", "train.checkpoint_every=3", "train.optimizer=adamw", "train.learning_rate=5e-3",
    "train.lr_schedule=cosine", "train.warmup_steps=3", "train.clip_norm=0.5", "train.grad_accum_steps=2",
    "data.batch_size=8",
)  # fmt: skip
# A model large enough that its steps are arithmetic more than overhead on a CPU, small enough for seconds.
MEDIUM = (
    "data.windows=packed", "train.jit_compile=false", "model.seq_len=64", "model.embed_dim=128",
    "model.feed_forward_dim=256", "model.num_heads=4", "model.num_layers=2", "train.epochs=1",
    "train.validation_steps=1", "train.sample_each_epoch=false", "train.log_every=1",
)  # fmt: skip

# Runs train() in a child process and kills it (as kill -9 would: no checkpoint, no clean-up) after a step.
KILL_AFTER = """
import os, sys
from pathlib import Path
import keras
from minigpt_cli.config import load_config
from minigpt_cli.runs import RunDir
from minigpt_cli.train import train

class Kill(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == int(sys.argv[2]):
            os._exit(9)

train(load_config(None, sys.argv[3:]), RunDir(Path(sys.argv[1])), callbacks=[Kill()])
"""


def _overrides(sets: list[str]) -> list[str]:
    return [s for s in sets if s != "--set"]


def read_events(run: Path) -> dict[str, dict[str, list[tuple[int, object]]]]:
    """``{"train"|"validation": {tag: [(step, value), ...]}}`` from the run's TensorBoard event files."""
    import tensorflow as tf
    from tensorflow.python.framework import tensor_util

    out: dict[str, dict[str, list]] = {}
    for path in sorted((run / "logs").glob("*/events.out.tfevents.*")):
        tags = out.setdefault(path.parent.name, {})
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                array = tensor_util.MakeNdarray(value.tensor)
                item = array.item() if array.size == 1 else array
                tags.setdefault(value.tag, []).append((event.step, item.decode() if isinstance(item, bytes) else item))
    return out


def _copy_vocab(vocab_run: Path, run: Path) -> Path:
    run.mkdir()
    for name in ("vocab.txt", "vocab.json"):
        shutil.copy(vocab_run / name, run / name)
    return run


@pytest.fixture(scope="module", autouse=True)
def peak_cache(tmp_path_factory):
    """This module's own machine cache: its first train measures the peak, the rest read it."""
    path = tmp_path_factory.mktemp("watch-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def vocab_run(tmp_path_factory) -> Path:
    from minigpt_cli.config import load_config
    from minigpt_cli.runs import RunDir
    from minigpt_cli.vocab import build_vocabulary

    run = RunDir(tmp_path_factory.mktemp("watch") / "vocab").create()
    build_vocabulary(load_config(None, _overrides(tiny_sets())), run)
    return run.root


@pytest.fixture(scope="module")
def board(vocab_run, tmp_path_factory):
    """Killed after step 5 (its last checkpoint at step 3, mid-way through an accumulation), then resumed."""
    run = _copy_vocab(vocab_run, tmp_path_factory.mktemp("board") / "run")
    sets = tiny_sets(*BOARD)
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER, str(run), "5", *_overrides(sets)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert killed.returncode == 9, killed.stderr
    assert "measuring this machine's peak FLOP/s (once; kept in" in killed.stderr  # the module's first train
    before = read_events(run)
    resumed = minigpt("train", "--resume", "--run-dir", run, *sets)
    assert resumed.returncode == 0, resumed.stderr
    return run, before, resumed


def _by_step(points):
    return dict(points)


def test_tensorboard_logs_every_step_once_across_a_kill_and_a_resume(board):
    run, before, _ = board
    # The killed run logged steps its checkpoint (step 3) did not cover.
    assert [s for s, _ in before["train"]["batch_loss"]] == [1, 2, 3, 4, 5]
    logs = read_events(run)
    train = logs["train"]
    # The resume dropped steps 4 and 5 and logged them again: every step once, on the global step axis.
    for tag in ("batch_loss", "batch_learning_rate", "batch_grad_norm"):
        assert [s for s, _ in train[tag]] == list(range(1, 13)), tag
    losses = _by_step(train["batch_loss"])
    steps = np.loadtxt(run / "steps.csv", delimiter=",", skiprows=1)
    assert [int(s) for s in steps[:, 0]] == list(range(1, 13))
    for step, loss, _ in steps:
        assert losses[int(step)] == pytest.approx(loss, abs=2e-6)
    # Resuming mid-way through an accumulation (step 3 of a cycle of 2) is exact: steps 4 and 5, recomputed
    # from the checkpoint and its accumulators, have the losses the killed run had.
    killed = _by_step(before["train"]["batch_loss"])
    assert [losses[s] for s in (4, 5)] == pytest.approx([killed[4], killed[5]], rel=1e-6)
    killed, norms = _by_step(before["train"]["batch_grad_norm"]), _by_step(train["batch_grad_norm"])
    assert [norms[s] for s in (4, 5)] == pytest.approx([killed[4], killed[5]], rel=1e-5)  # the update at step 4


def test_tensorboard_learning_rate_and_gradient_norm(board):
    import keras

    from minigpt_cli.config import load_config
    from minigpt_cli.train import make_optimizer

    run, _, _ = board
    train = read_events(run)["train"]
    cfg = load_config(run / "config.toml", [])
    schedule = keras.optimizers.schedules.deserialize(make_optimizer(cfg.train, 12).get_config()["learning_rate"])
    rates = _by_step(train["batch_learning_rate"])
    # Steps count micro-batches, as Keras' schedules do: step s uses the rate at s - 1, warmup and cosine.
    assert [rates[s] for s in range(1, 13)] == pytest.approx([float(schedule(s)) for s in range(12)], rel=1e-5)
    assert rates[4] == pytest.approx(5e-3, rel=1e-5)
    norms = _by_step(train["batch_grad_norm"])
    assert norms[1] == 0.0  # no update yet: the first accumulates
    for s in range(2, 13, 2):  # each update's norm, held until the next update
        assert norms[s] > 0 and norms[s + 1 if s < 12 else s] == norms[s]
    assert max(norms.values()) > 0.5  # before clipping (clip_norm 0.5)


def test_tensorboard_epochs_match_the_history_and_samples(board):
    run, _, resumed = board
    logs = read_events(run)
    history = json.loads((run / "history.json").read_text())
    assert [r["global_step"] for r in history] == [6, 12]
    train, valid = logs["train"], logs["validation"]
    assert [s for s, _ in train["epoch_loss"]] == [6, 12]
    assert [v for _, v in train["epoch_loss"]] == pytest.approx([r["loss"] for r in history], rel=1e-6)
    assert [v for _, v in valid["epoch_loss"]] == pytest.approx([r["val_loss"] for r in history], rel=1e-6)
    assert [v for _, v in valid["epoch_perplexity"]] == pytest.approx([r["val_perplexity"] for r in history], 1e-6)
    assert [v for _, v in train["epoch_mfu"]] == pytest.approx([r["mfu"] for r in history], rel=1e-5)
    samples = (run / "samples.txt").read_text().splitlines()
    assert train["sample"] == [(6, samples[0]), (12, samples[1])]
    assert "evaluation_loss_vs_iterations" not in valid  # Keras' own counts updates, not steps


def test_mfu_in_history_tensorboard_and_console(board, peak_cache):
    run, _, resumed = board
    peak = json.loads((peak_cache / "minigpt" / "peak.json").read_text())
    key = next(k for k in peak if k.startswith("tensorflow|float32|"))
    entry = peak[key]
    assert entry["flops"] > 1e8 and entry["source"] == "measured"
    vocab = len((run / "vocab.txt").read_text().splitlines())
    from minigpt_cli.config import load_config

    per_token = flops.train_flops_per_token(flops.Shape.of(vocab, load_config(run / "config.toml", []).model))
    rows = list(csv.DictReader((run / "history.csv").open()))
    assert [float(r["mfu"]) for r in rows] == pytest.approx(
        [float(r["tokens_per_second"]) * per_token / entry["flops"] for r in rows], rel=1e-3, abs=2e-6
    )
    train = read_events(run)["train"]
    speeds, mfus = _by_step(train["batch_tokens_per_second"]), _by_step(train["batch_mfu"])
    assert speeds.keys() == mfus.keys() and len(speeds) >= 8  # not the first step of an epoch or of a fit
    for step, speed in speeds.items():
        assert mfus[step] == pytest.approx(speed * per_token / entry["flops"], rel=1e-4)
    assert re.search(r"epoch 2/2: .* tok/s  MFU [0-9.]+%", resumed.stderr)
    assert "size: " in resumed.stderr and "estimate: " in resumed.stderr
    assert "× 2 accumulated = 16 per update" in resumed.stderr
    assert "measuring this machine's peak" not in resumed.stderr  # measured by the killed run, then cached


def test_progress_bar_shows_mfu():
    from rich.console import Console

    from minigpt_cli.callbacks import Clock, ProgressBar

    out = io.StringIO()
    clock = Clock(10)
    bar = ProgressBar(clock, 1000, 1, Console(file=out, force_terminal=True, width=200),
                      mfu_of=lambda tps: tps / 4e5)  # fmt: skip
    bar.on_train_begin()
    clock.on_epoch_begin(0)
    bar.on_epoch_begin(0)
    clock.epoch_start -= 1.0  # one second in, two steps done: 2,000 tok/s
    clock.on_train_batch_end(1)
    bar.on_train_batch_end(1, {"loss": 3.0})
    bar.progress.refresh()
    bar.stop()
    assert re.search(r"\b[12],\d{3} tok/s MFU 0\.[45]\d*%", out.getvalue()), out.getvalue()


# --- FLOPs, parameters, memory, peak ------------------------------------------------------------------------


def test_flops_per_token_by_hand():
    # TINY-like: V 300, window 32, d 16, ff 16, 2 heads, 1 layer; attention width a = 2 × (16 // 2) = 16.
    # matmul weights: q, k, v, o 4 × 16 × 16 = 1,024; feed-forward 16 × 16 + 16 × 16 = 512; output 16 × 300 = 4,800
    #   -> 6,336, × 2 FLOPs = 12,672.
    # attention: (scores + weighted sum) 2 × 2 FLOPs × 32 positions × 16 wide × 1 layer = 2,048.
    # forward 14,720; training 3 × 14,720 = 44,160.
    tiny = flops.Shape(vocab=300, seq_len=32, d=16, ff=16, heads=2, layers=1)
    assert flops.forward_flops_per_token(tiny) == 14_720
    assert flops.train_flops_per_token(tiny) == 44_160
    # The reference: V 5000, window 128, d 256, ff 128, 3 heads (a = 3 × 85 = 255), 2 layers.
    # per layer 4 × 256 × 255 = 261,120 + 2 × 256 × 128 = 65,536 -> 326,656; × 2 layers = 653,312;
    # output 256 × 5,000 = 1,280,000 -> 1,933,312 weights, × 2 = 3,866,624 FLOPs.
    # attention 2 × 2 × 128 × 255 × 2 layers = 261,120. Forward 4,127,744; training 12,383,232.
    reference = flops.Shape(vocab=5000, seq_len=128, d=256, ff=128, heads=3, layers=2)
    assert flops.forward_flops_per_token(reference) == 4_127_744
    assert flops.train_flops_per_token(reference) == 12_383_232


@pytest.mark.parametrize(
    "vocab,seq_len,d,ff,heads,layers",
    [(5000, 128, 256, 128, 3, 2), (300, 32, 16, 16, 2, 1), (1000, 64, 96, 384, 6, 3)],
)
def test_parameter_count_from_the_config(vocab, seq_len, d, ff, heads, layers):
    from minigpt_cli.config import ModelConfig
    from minigpt_cli.model import build_model

    model_cfg = ModelConfig(seq_len=seq_len, embed_dim=d, feed_forward_dim=ff, num_heads=heads, num_layers=layers)
    expected = build_model(vocab, model_cfg).count_params()
    assert flops.param_count(flops.Shape.of(vocab, model_cfg)) == expected
    if vocab == 5000:
        assert expected == 3_255_938  # the reference's


def test_batch_memory_counts():
    s = flops.Shape(vocab=300, seq_len=32, d=16, ff=16, heads=2, layers=1)
    p = flops.param_count(s)
    one = flops.batch_memory(s, 16)
    assert (one.weights, one.gradients, one.optimizer, one.accumulators) == (4 * p, 4 * p, 8 * p, 0)
    assert flops.batch_memory(s, 32).activations == 2 * one.activations
    assert flops.batch_memory(s, 16, accum_steps=2).accumulators == 4 * p
    # Per token: (6·16 + 4·16 + 2·16 + 2·2·32 + 16) float32 values = 336 × 4 bytes, and logits 2 × 300 × 4.
    assert one.activations == 16 * 32 * (336 * 4 + 2400)
    assert flops.batch_memory(s, 16, precision="mixed_bfloat16").activations == 16 * 32 * (336 * 2 + 2400)


def test_known_gpu_peaks():
    assert flops.gpu_peak("NVIDIA H200", "float32") == 494.5e12  # TF32, on by default
    assert flops.gpu_peak("NVIDIA H200", "float32", tf32=False) == 67e12
    assert flops.gpu_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989.5e12
    assert flops.gpu_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert flops.gpu_peak("NVIDIA A100-SXM4-80GB", "bfloat16") == 312e12
    assert flops.gpu_peak("NVIDIA L4", "bfloat16") == 121e12
    assert flops.gpu_peak("NVIDIA L40S", "bfloat16") == 362e12
    assert flops.gpu_peak("Tesla T4", "bfloat16") is None  # no bf16 units: measured instead
    assert flops.gpu_peak("Some Future GPU", "float32") is None


# --- gradient accumulation and config --size ---------------------------------------------------------------


@pytest.fixture(scope="module")
def medium(vocab_run, tmp_path_factory):
    """6 updates of 64 windows, and 6 of 2 accumulated micro-batches of 32, over the same windows; with
    ``config --size`` before and after."""
    root = tmp_path_factory.mktemp("medium")
    big = _copy_vocab(vocab_run, root / "big")
    micro = _copy_vocab(vocab_run, root / "micro")
    big_sets = tiny_sets(*MEDIUM, "data.batch_size=64", "train.steps_per_epoch=6")
    micro_sets = tiny_sets(*MEDIUM, "data.batch_size=32", "train.grad_accum_steps=2", "train.steps_per_epoch=12")
    with pytest.MonkeyPatch.context() as mp:  # the peak measured now, just before the run it estimates
        mp.setenv("XDG_CACHE_HOME", str(root / "cache"))
        busy = [_cpu_busy()]  # other programs on this machine's CPUs, while this one waits
        before = flops.machine_peak().flops
        size = minigpt("config", "--size", "--run-dir", big, *big_sets)
        assert size.returncode == 0, size.stderr
        results = [minigpt("train", "--run-dir", big, *big_sets)]
        busy.append(_cpu_busy())
        speeds = (before, flops.probe(), max(busy))  # and again just after it
        results.append(minigpt("train", "--run-dir", micro, *micro_sets))
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
        again = minigpt("config", "--size", "--run-dir", big, *big_sets)
        assert again.returncode == 0, again.stderr
    return big, micro, size, results, again, speeds


def test_two_accumulated_micro_batches_of_32_equal_one_batch_of_64(medium, vocab_run):
    from minigpt_cli.model import load_model

    big, micro, _, results, _, _ = medium
    assert "global batch 32, 32 per replica, × 2 accumulated = 64 per update" in results[1].stderr
    vocab = len((vocab_run / "vocab.txt").read_text().splitlines())
    a, b = (load_model(run / "model.keras", vocab) for run in (big, micro))
    moved = 0.0
    for x, y, start in zip(a.get_weights(), b.get_weights(), _initial(vocab), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-6)
        moved = max(moved, float(np.abs(x - start).max()))
    assert moved > 3e-3  # 6 updates of Adam at 1e-3 moved the weights well beyond the tolerance
    # The micro-batch run logs each micro-batch: 12 steps.
    assert len((micro / "steps.csv").read_text().splitlines()) == 13


def _initial(vocab: int):
    """The weights both runs started from (seed 42)."""
    import keras

    from minigpt_cli.config import load_config
    from minigpt_cli.model import build_model

    keras.utils.set_random_seed(42)
    return build_model(vocab, load_config(None, _overrides(tiny_sets(*MEDIUM))).model).get_weights()


def _cpu_busy(seconds: float = 1.0) -> float:
    """The share of the machine's CPU time that was not idle over ``seconds`` (from /proc/stat); 0 elsewhere."""
    import time

    def times() -> list[int]:
        try:
            return [int(n) for n in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except OSError:
            return []

    first = times()
    time.sleep(seconds)
    second = times()
    if not first or not second:
        return 0.0
    delta = [b - a for a, b in zip(first, second, strict=True)]
    idle = delta[3] + delta[4]  # idle, iowait
    return 1 - idle / max(sum(delta), 1)


def _seconds(text: str) -> float:
    value, unit = re.search(r"time: ([0-9.]+) (ms|s) per step", text).groups()
    return float(value) / (1000 if unit == "ms" else 1)


def test_config_size_agrees_with_a_real_run(medium):
    big, _, size, results, again, (before, after, busy) = medium
    lines = size.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["parameters", "FLOPs per token", "memory", "peak", "time"]
    model_line = next(line for line in results[0].stderr.splitlines() if line.startswith("model: "))
    assert f"parameters: {model_line.split()[1]}" in size.stdout  # count_params() == the config's count
    assert "(measured earlier: matmul probe)" in size.stdout and "(measured earlier: matmul probe)" in again.stdout
    assert "estimated from the text at" in size.stdout and "6 steps per epoch" in size.stdout
    # The same windows as the run counted, once it has tokenized them.
    windows = re.search(r"([0-9,]+) packed windows", model_line).group(1)
    assert f"{windows} packed training windows (token cache)" in again.stdout
    # Seconds per step: the estimate and the run's fastest step (from TensorBoard's tokens/s; the peak is the
    # probe's fastest round too, so neither counts the other programs this machine runs) agree within 2x.
    speeds = [v for _, v in read_events(big)["train"]["batch_tokens_per_second"]]
    assert len(speeds) == 5  # steps 2-6: the first has no step before it
    measured = 64 * 64 / max(speeds)
    estimated = _seconds(size.stdout)
    # Other programs on the CPU slow small steps more than the probe's big matmuls: no estimate holds then.
    if busy > 0.25 or not 2 / 3 < before / after < 3 / 2:
        pytest.skip(f"this machine is shared ({busy:.0%} of its CPU busy with other programs; the matmul probe gave "
                    f"{before / 1e9:.0f} and then {after / 1e9:.0f} GFLOP/s)")  # fmt: skip
    assert 0.5 < estimated / measured < 2, (estimated, measured, before, after)
    assert _seconds(again.stdout) == estimated


def test_config_size_before_a_vocabulary(tmp_path):
    result = minigpt("config", "--size", "--run-dir", tmp_path / "new", *tiny_sets("data.windows=reference"))
    assert result.returncode == 0, result.stderr
    assert "vocabulary of 300 as asked" in result.stdout
    # Reference windows are counted exactly from the text: one per line longer than min_string_len.
    long_lines = sum(len(line.rstrip(b"\r\n")) > 64 for line in (Path(__file__).parent / "fixtures" / "corpus" /
                                                               "train.txt").read_bytes().splitlines())  # fmt: skip
    assert f"{long_lines:,} reference training windows" in result.stdout
    assert not (tmp_path / "new").exists()  # --size writes nothing


def test_grad_accum_steps_is_fixed_on_resume():
    from minigpt_cli.config import load_config
    from minigpt_cli.train import resume_conflicts

    assert resume_conflicts(load_config(None, ["train.grad_accum_steps=2"]), load_config(None, [])) == [
        "train.grad_accum_steps: 2 -> 1"
    ]
    # A checkpoint from before the key was recorded was trained without accumulation.
    assert resume_conflicts({"seed": 42}, load_config(None, ["train.grad_accum_steps=2", "seed=42"])) == [
        "train.grad_accum_steps: 1 -> 2"
    ]


def test_accumulation_under_a_strategy_is_one_line(vocab_run, tmp_path):
    """Keras' accumulation cannot run under tf.distribute: refused before tokenizing, not a traceback."""
    from conftest import assert_user_error

    run = tmp_path / "run"
    shutil.copytree(vocab_run, run)
    result = minigpt(
        "train", "--run-dir", run,
        *tiny_sets("train.grad_accum_steps=2", "train.distribution=mirrored", 'train.devices=["/cpu:0", "/cpu:1"]'),
    )  # fmt: skip
    assert_user_error(result, "train.grad_accum_steps", "mirrored")
    assert not (run / "cache").exists()


def test_checkpoints_from_before_the_gradient_norm_still_resume(tmp_path, vocab_run, monkeypatch):
    """A checkpoint whose optimizer is Keras' own Adam (no ``grad_norm``) resumes with the recorded state."""
    import keras

    from minigpt_cli import train as training
    from minigpt_cli.config import load_config
    from minigpt_cli.model import load_model
    from minigpt_cli.runs import RunDir

    run = RunDir(_copy_vocab(vocab_run, tmp_path / "run"))
    sets = _overrides(tiny_sets("train.jit_compile=false", "train.sample_each_epoch=false", "train.steps_per_epoch=3"))
    with monkeypatch.context() as m:
        m.setattr(training, "make_optimizer", lambda cfg, total: keras.optimizers.Adam(cfg.learning_rate))
        training.train(load_config(None, [*sets, "train.epochs=1"]), run)
    old = load_model(run.model, len((vocab_run / "vocab.txt").read_text().splitlines()), compile=True)
    assert type(old.optimizer) is keras.optimizers.Adam and int(old.optimizer.iterations) == 3
    history = training.train(load_config(None, [*sets, "train.epochs=2"]), run, resume=True)
    assert [r["epoch"] for r in history] == [1, 2]
    new = load_model(run.model, len((vocab_run / "vocab.txt").read_text().splitlines()), compile=True)
    assert int(new.optimizer.iterations) == 6 and new.optimizer._grad_norm.numpy() > 0
