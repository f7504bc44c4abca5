"""Training: cached windows, fit with progress and samples, history, checkpoints and resume."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import signal
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import keras_hub
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from minigpt_cli import checkpoints, distribute
from minigpt_cli.config import Config, TrainConfig
from minigpt_cli.data import check_text, line_threshold, text_files
from minigpt_cli.errors import MinigptError
from minigpt_cli.generate import Generator
from minigpt_cli.model import MiniGPTCausalLM, build_model
from minigpt_cli.plots import draw_training_curve
from minigpt_cli.runs import RunDir, atomic_path, write_text
from minigpt_cli.samplers import SamplerSpec
from minigpt_cli.vocab import MiniGPTTokenizer, load_vocabulary, make_tokenizer
from minigpt_cli.windows import Batches, load_windows

HISTORY_FIELDS = (
    "epoch", "steps", "global_step", "loss", "perplexity", "val_loss", "val_perplexity", "seconds",
    "tokens_per_second", "learning_rate",
)  # fmt: skip


class Interrupted(MinigptError):
    """Training stopped by a signal after writing a checkpoint."""

    exit_code = 130


def make_optimizer(cfg: TrainConfig, total_steps: int) -> keras.optimizers.Optimizer:
    """Adam (the reference) or AdamW, with optional warmup + cosine decay and global-norm clipping."""
    lr = cfg.learning_rate
    if cfg.lr_schedule == "cosine" or cfg.warmup_steps:
        alpha = cfg.min_lr_ratio if cfg.lr_schedule == "cosine" else 1.0  # alpha 1: constant after warmup
        warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else cfg.learning_rate,
            decay_steps=max(total_steps - warmup, 1),
            alpha=alpha,
            warmup_target=cfg.learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    clip = cfg.clip_norm or None
    if cfg.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=lr, weight_decay=cfg.weight_decay, global_clipnorm=clip)
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        return optimizer
    return keras.optimizers.Adam(learning_rate=lr, global_clipnorm=clip)


def compile_model(model: MiniGPTCausalLM, cfg: Config, total_steps: int) -> None:
    """The reference's loss and metric: cross-entropy from logits, perplexity masking [PAD]."""
    model.compile(
        optimizer=make_optimizer(cfg.train, total_steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        metrics=[keras_hub.metrics.Perplexity(from_logits=True, mask_token_id=0, name="perplexity")],
        sampler="top_k",
    )


@dataclass
class Data:
    train: Batches
    valid: Batches
    mode: str
    cached: bool


def windows_mode(cfg: Config) -> str:
    return "packed" if cfg.data.packing else "reference"


def load_split(cfg: Config, run: RunDir, vocab: list[str], tokenizer, split: str, mode: str):
    """Windows of one split, checked and cut (or read back from the run's cache)."""
    files = text_files(cfg.data, split)
    check_text(files, line_threshold(mode == "packed", cfg.data.min_string_len), f"data.{split}")
    return load_windows(
        run.root / "cache", vocab, tokenizer, files, mode, cfg.model.seq_len, cfg.data.min_string_len,
        cfg.vocab.lowercase,
    )  # fmt: skip


def prepare_data(cfg: Config, run: RunDir, vocab: list[str], tokenizer: MiniGPTTokenizer) -> Data:
    mode = windows_mode(cfg)
    train_windows, train_cached = load_split(cfg, run, vocab, tokenizer, "train", mode)
    valid_windows, _ = load_split(cfg, run, vocab, tokenizer, "valid", mode)
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
        mode=mode,
        cached=train_cached,
    )


def write_history(run: RunDir, history: list[dict]) -> None:
    write_text(run.history_json, json.dumps(history, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_text(run.history_csv, buf.getvalue())


def write_steps(run: RunDir, steps: list[tuple[int, float]]) -> None:
    write_text(run.steps_csv, "global_step,loss\n" + "".join(f"{s},{loss:.6f}\n" for s, loss in steps))


def read_steps(run: RunDir, upto: int) -> list[tuple[int, float]]:
    if not run.steps_csv.is_file():
        return []
    rows = list(csv.DictReader(run.steps_csv.open(encoding="utf-8")))
    return [(int(r["global_step"]), float(r["loss"])) for r in rows if int(r["global_step"]) <= upto]


class StopFlag:
    """Set by SIGINT/SIGTERM while fitting; the monitor checkpoints and stops at the next step."""

    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signal = signum

    @contextlib.contextmanager
    def installed(self):
        previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class Monitor(keras.callbacks.Callback):
    """Progress while training; per-step losses; at every epoch's end history, model, sample, curve and
    checkpoint; a checkpoint every ``train.checkpoint_every`` steps; a clean stop on SIGINT/SIGTERM."""

    def __init__(self, cfg: Config, run: RunDir, generator: Generator | None, steps_per_epoch: int, console: Console,
                 history: list[dict], steps: list[tuple[int, float]], stop: StopFlag):  # fmt: skip
        super().__init__()
        self.cfg, self.run, self.generator, self.console, self.stop = cfg, run, generator, console, stop
        self.steps_per_epoch = steps_per_epoch
        self.history, self.steps = history, steps
        self.step_offset = 0  # steps of the current epoch done before this fit (a mid-epoch resume)
        self.tokens_per_step = cfg.data.batch_size * cfg.model.seq_len
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )

    def position(self, epoch: int, step: int) -> checkpoints.Position:
        if step >= self.steps_per_epoch:
            epoch, step = epoch + 1, 0
        return checkpoints.Position(epoch, step, epoch * self.steps_per_epoch + step, self.steps_per_epoch)

    def on_train_begin(self, logs=None):
        self.progress.start()

    def on_train_end(self, logs=None):
        self.progress.stop()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()
        self.done, self.running_sum = 0, 0.0
        self.task = self.progress.add_task(
            "train", total=self.steps_per_epoch, completed=self.step_offset,
            epoch=f"{epoch + 1}/{self.cfg.train.epochs}", loss=float("nan"), tps=0.0,
        )  # fmt: skip
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.done = batch + 1
        mean = float((logs or {}).get("loss", float("nan")))
        # Keras reports the running mean over the epoch; recover this batch's own loss.
        batch_loss = self.done * mean - self.running_sum
        self.running_sum = self.done * mean
        step = self.step_offset + self.done
        self.steps.append((self.epoch * self.steps_per_epoch + step, batch_loss))
        elapsed = time.perf_counter() - self.epoch_start
        tps = self.done * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        self.progress.update(self.task, completed=step, loss=mean, tps=tps)
        every = self.cfg.train.checkpoint_every
        global_step = self.epoch * self.steps_per_epoch + step
        if self.stop.signal is not None:
            self.checkpoint(self.position(self.epoch, step))
            self.model.stop_training = True
        elif every and global_step % every == 0 and step < self.steps_per_epoch:
            self.checkpoint(self.position(self.epoch, step))

    def checkpoint(self, position: checkpoints.Position) -> Path:
        path = checkpoints.save(self.run.root, self.model, position)
        write_steps(self.run, self.steps)
        return path

    def on_epoch_end(self, epoch, logs=None):
        self.progress.remove_task(self.task)
        if self.stop.signal is not None and self.step_offset + self.done < self.steps_per_epoch:
            return  # stopped mid-epoch: the checkpoint is all there is to write
        logs = logs or {}
        seconds = time.perf_counter() - self.epoch_start
        optimizer = self.model.optimizer
        row = {
            "epoch": epoch + 1,
            "steps": self.step_offset + self.done,
            "global_step": (epoch + 1) * self.steps_per_epoch,
            "loss": float(logs.get("loss", float("nan"))),
            "perplexity": float(logs.get("perplexity", float("nan"))),
            "val_loss": float(logs.get("val_loss", float("nan"))),
            "val_perplexity": float(logs.get("val_perplexity", float("nan"))),
            "seconds": round(seconds, 3),
            "tokens_per_second": round(self.done * self.tokens_per_step / seconds, 1) if seconds else 0.0,
            "learning_rate": float(keras.ops.convert_to_numpy(optimizer.learning_rate)),
        }
        self.history.append(row)
        self.step_offset = 0
        write_history(self.run, self.history)
        # The epoch-end checkpoint is the model as model.keras holds it: copy it rather than serialize twice.
        saved = self.checkpoint(self.position(epoch + 1, 0))
        with atomic_path(self.run.model) as tmp:
            shutil.copyfile(saved, tmp)
        draw_training_curve(self.steps, self.history, self.run.curve)
        self.console.print(
            f"epoch {row['epoch']}/{self.cfg.train.epochs}: loss {row['loss']:.4f}  "
            f"perplexity {row['perplexity']:.2f}  val_loss {row['val_loss']:.4f}  "
            f"val_perplexity {row['val_perplexity']:.2f}  {seconds:.1f}s  {row['tokens_per_second']:,.0f} tok/s"
        )
        if self.cfg.train.sample_each_epoch and self.generator is not None:
            spec = SamplerSpec("topk", k=10, seed=self.cfg.seed + epoch)
            sample = self.generator.run([""], spec, self.cfg.generate.max_tokens)[0]
            with open(self.run.samples, "a", encoding="utf-8") as f:
                f.write(f"epoch {epoch + 1} (top-k, k=10): {sample.text}\n")
            self.console.print(f"[dim]sample (top-k, k=10):[/dim] {sample.text}", highlight=False, markup=True)


def _load_checkpoint(run: RunDir, position: checkpoints.Position, vocab_size: int) -> MiniGPTCausalLM:
    path = checkpoints.path_of(run.root, position)
    try:
        model = keras.saving.load_model(path)
    except Exception as e:
        raise MinigptError(f"cannot load checkpoint {path} ({str(e)[:200]}); train again without --resume") from None
    if not isinstance(model, MiniGPTCausalLM) or model.backbone.vocabulary_size != vocab_size:
        raise MinigptError(f"checkpoint {path} does not match vocab.txt; train again without --resume")
    return model


def train(
    cfg: Config,
    run: RunDir,
    console: Console | None = None,
    resume: bool = False,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> list[dict]:
    """Train the mini-GPT on the run's vocabulary (or resume it); returns the per-epoch history.

    ``callbacks`` are extra Keras callbacks, run after minigpt's own.
    """
    console = console or Console(stderr=True)
    vocab = load_vocabulary(run.require_vocab())
    position = checkpoints.latest(run.root) if resume else None
    if resume and position is None:
        raise MinigptError(f"nothing to resume in {run.root}: no checkpoint; run 'minigpt train' without --resume")
    # First, before anything starts TensorFlow's runtime: the CPU can only be split into devices until then.
    dist = distribute.setup(cfg.train.distribution, cfg.train.devices, cfg.train.worker_timeout)
    distribute.set_precision(cfg.train.precision)
    keras.utils.set_random_seed(cfg.seed)
    tokenizer = make_tokenizer(vocab, lowercase=cfg.vocab.lowercase)
    if cfg.data.batch_size % dist.replicas:
        raise MinigptError(
            f"data.batch_size {cfg.data.batch_size} does not split over {dist.replicas} replicas; "
            f"use a multiple of {dist.replicas}"
        )
    # Only the chief writes the run's artifacts; other workers write theirs to a scratch folder.
    out = run if dist.is_chief else RunDir(Path(tempfile.mkdtemp(prefix="minigpt-worker-")))
    data = prepare_data(cfg, run, vocab, tokenizer)
    steps_per_epoch = cfg.train.steps_per_epoch or data.train.per_pass
    epochs = cfg.train.epochs
    if position is not None:
        if position.steps_per_epoch != steps_per_epoch:
            raise MinigptError(
                f"the checkpoint was made with {position.steps_per_epoch} steps per epoch but the config now "
                f"gives {steps_per_epoch}; resume with the run's own config"
            )
        if position.epoch >= epochs:
            raise MinigptError(f"{run.root} has already trained {position.epoch} epochs; raise train.epochs")
        with dist.scope():
            model = _load_checkpoint(run, position, len(vocab))
        history = [r for r in _read_history(run) if r["epoch"] <= position.epoch]
        steps = read_steps(run, position.global_step)
    else:
        with dist.scope():
            model = build_model(len(vocab), cfg.model)
            compile_model(model, cfg, epochs * steps_per_epoch)
        history, steps = [], []
        out.samples.unlink(missing_ok=True)
        out.steps_csv.unlink(missing_ok=True)
    # XLA made the reference model's steps 1.18x faster on a 2-core CPU (benchmarks/train.py); it stays
    # off under a distribution strategy unless asked for.
    model.jit_compile = {"true": True, "false": False}.get(cfg.train.jit_compile, dist.strategy is None)
    model.multi_worker_logs = dist.kind == "multi_worker"
    start_epoch, start_step = (position.epoch, position.step) if position else (0, 0)
    windows = len(data.train.windows)
    console.print(
        f"model: {model.count_params():,} parameters, vocabulary {len(vocab):,} tokens, window {cfg.model.seq_len}; "
        f"{windows:,} {data.mode} windows{' (from the cache)' if data.cached else ''}, "
        f"{steps_per_epoch:,} steps per epoch, {epochs} epochs"
        + (f"; resuming at epoch {start_epoch + 1}, step {start_step}" if position else "")
    )
    role = "" if dist.is_chief else f" (not the chief: its artifacts go to {out.root})"
    console.print(
        f"distribution: {dist.kind}, {dist.replicas} replica(s) on {dist.workers} worker(s){role}; "
        f"global batch {cfg.data.batch_size}, {cfg.data.batch_size // dist.replicas} per replica; "
        f"precision {cfg.train.precision}; XLA {'on' if model.jit_compile else 'off'}"
    )
    stop = StopFlag()
    generator = Generator(model, tokenizer) if dist.is_chief else None
    monitor = Monitor(cfg, out, generator, steps_per_epoch, console, history, steps, stop)
    valid_steps = min(cfg.train.validation_steps or data.valid.per_pass, data.valid.per_pass)
    # Keras warns at the end of every validation pass over a dataset of unknown length.
    warnings.filterwarnings("ignore", message="Your input ran out of data")

    def fit(first_epoch: int, last_epoch: int, skip: int) -> None:
        monitor.step_offset = skip
        start = first_epoch * steps_per_epoch + skip
        model.fit(
            data.train.dataset(start, last_epoch * steps_per_epoch),
            validation_data=data.valid.dataset(0, valid_steps),
            initial_epoch=first_epoch,
            epochs=last_epoch,
            steps_per_epoch=steps_per_epoch - skip,
            callbacks=[monitor, *(callbacks or [])],
            verbose=0,
            shuffle=False,
        )

    with stop.installed():
        if start_step:
            fit(start_epoch, start_epoch + 1, start_step)
            start_epoch += 1
        if start_epoch < epochs and stop.signal is None:
            fit(start_epoch, epochs, 0)
    if not dist.is_chief:
        shutil.rmtree(out.root, ignore_errors=True)
    if stop.signal is not None:
        name = signal.Signals(stop.signal).name
        latest = checkpoints.latest(out.root)
        raise Interrupted(
            f"stopped by {name} at epoch {latest.epoch + 1}, step {latest.step}; checkpoint saved. "
            f"Resume with: minigpt train --resume --run-dir {run.root}"
        )
    return history


def _read_history(run: RunDir) -> list[dict]:
    if not run.history_json.is_file():
        return []
    return json.loads(run.history_json.read_text(encoding="utf-8"))
