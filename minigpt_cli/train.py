"""Training: datasets, fit with progress and samples, history and model on disk."""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import keras
import keras_hub
import tensorflow as tf
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from minigpt_cli.config import Config
from minigpt_cli.data import TextStats, check_text, raw_text_dataset, text_files
from minigpt_cli.generate import Generator
from minigpt_cli.model import MiniGPTCausalLM, MiniGPTCausalLMPreprocessor, build_model
from minigpt_cli.runs import RunDir, atomic_path, write_text
from minigpt_cli.samplers import SamplerSpec
from minigpt_cli.vocab import MiniGPTTokenizer, load_vocabulary, make_tokenizer

HISTORY_FIELDS = (
    "epoch",
    "steps",
    "loss",
    "perplexity",
    "val_loss",
    "val_perplexity",
    "seconds",
    "tokens_per_second",
)


@dataclass
class Corpus:
    """Training and validation text, checked, with its statistics."""

    train_files: list[Path]
    valid_files: list[Path]
    train_stats: TextStats
    valid_stats: TextStats


def load_corpus(cfg: Config) -> Corpus:
    train_files = text_files(cfg.data, "train")
    valid_files = text_files(cfg.data, "valid")
    return Corpus(
        train_files,
        valid_files,
        check_text(train_files, cfg.data.min_string_len, "data.train"),
        check_text(valid_files, cfg.data.min_string_len, "data.valid"),
    )


def make_datasets(cfg: Config, corpus: Corpus, tokenizer: MiniGPTTokenizer):
    """(train, valid) datasets of ``({"token_ids", "padding_mask"}, labels, sample_weight)``."""
    preprocessor = MiniGPTCausalLMPreprocessor(tokenizer, sequence_length=cfg.model.seq_len)
    autotune = tf.data.AUTOTUNE
    train = raw_text_dataset(corpus.train_files, cfg.data, shuffle=True, seed=cfg.seed)
    train = train.map(preprocessor, num_parallel_calls=autotune)
    if cfg.train.steps_per_epoch:
        train = train.repeat()
    valid = raw_text_dataset(corpus.valid_files, cfg.data, shuffle=False, seed=cfg.seed)
    valid = valid.map(preprocessor, num_parallel_calls=autotune)
    if cfg.train.validation_steps:
        valid = valid.take(cfg.train.validation_steps)
    return train.prefetch(autotune), valid.prefetch(autotune)


def compile_model(model: MiniGPTCausalLM, cfg: Config) -> None:
    """The reference's loss, metric and optimizer."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=cfg.train.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        metrics=[keras_hub.metrics.Perplexity(from_logits=True, mask_token_id=0, name="perplexity")],
        sampler="top_k",
    )


def write_history(run: RunDir, history: list[dict]) -> None:
    write_text(run.history_json, json.dumps(history, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_text(run.history_csv, buf.getvalue())


def save_model(model: keras.Model, path: Path) -> None:
    with atomic_path(path) as tmp:
        model.save(tmp)


class EpochEnd(keras.callbacks.Callback):
    """Rich progress while training; at each epoch's end history, model and a sample on disk."""

    def __init__(self, cfg: Config, run: RunDir, generator: Generator, steps: int | None, console: Console):
        super().__init__()
        self.cfg, self.run, self.generator, self.console = cfg, run, generator, console
        self.steps = steps
        self.history: list[dict] = []
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
            disable=not console.is_terminal and console.quiet,
        )

    def on_train_begin(self, logs=None):
        self.progress.start()

    def on_train_end(self, logs=None):
        self.progress.stop()

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.perf_counter()
        self.step = 0
        epochs = self.cfg.train.epochs
        self.task = self.progress.add_task(
            "train", total=self.steps, epoch=f"{epoch + 1}/{epochs}", loss=float("nan"), tps=0.0
        )

    def on_train_batch_end(self, batch, logs=None):
        self.step = batch + 1
        elapsed = time.perf_counter() - self.epoch_start
        tps = self.step * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        loss = float((logs or {}).get("loss", float("nan")))
        self.progress.update(self.task, completed=self.step, loss=loss, tps=tps)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        seconds = time.perf_counter() - self.epoch_start
        self.progress.remove_task(self.task)
        row = {
            "epoch": epoch + 1,
            "steps": self.step,
            "loss": float(logs.get("loss", float("nan"))),
            "perplexity": float(logs.get("perplexity", float("nan"))),
            "val_loss": float(logs.get("val_loss", float("nan"))),
            "val_perplexity": float(logs.get("val_perplexity", float("nan"))),
            "seconds": round(seconds, 3),
            "tokens_per_second": round(self.step * self.tokens_per_step / seconds, 1) if seconds else 0.0,
        }
        self.history.append(row)
        write_history(self.run, self.history)
        save_model(self.model, self.run.model)
        self.console.print(
            f"epoch {row['epoch']}/{self.cfg.train.epochs}: loss {row['loss']:.4f}  "
            f"perplexity {row['perplexity']:.2f}  val_loss {row['val_loss']:.4f}  "
            f"val_perplexity {row['val_perplexity']:.2f}  {seconds:.1f}s  {row['tokens_per_second']:,.0f} tok/s"
        )
        if self.cfg.train.sample_each_epoch:
            spec = SamplerSpec("topk", k=10, seed=self.cfg.seed + epoch)
            sample = self.generator.run([""], spec, self.cfg.generate.max_tokens)[0]
            with open(self.run.samples, "a", encoding="utf-8") as f:
                f.write(f"epoch {epoch + 1} (top-k, k=10): {sample.text}\n")
            self.console.print(f"[dim]sample (top-k, k=10):[/dim] {sample.text}", highlight=False, markup=True)


def train(cfg: Config, run: RunDir, console: Console | None = None) -> list[dict]:
    """Train a fresh mini-GPT on the run's vocabulary; returns the per-epoch history."""
    console = console or Console(stderr=True)
    vocab = load_vocabulary(run.require_vocab())
    tokenizer = make_tokenizer(vocab, lowercase=cfg.vocab.lowercase)
    corpus = load_corpus(cfg)
    keras.utils.set_random_seed(cfg.seed)
    train_ds, valid_ds = make_datasets(cfg, corpus, tokenizer)
    model = build_model(len(vocab), cfg.model)
    compile_model(model, cfg)
    steps = cfg.train.steps_per_epoch or math.ceil(corpus.train_stats.kept_lines / cfg.data.batch_size)
    console.print(
        f"model: {model.count_params():,} parameters, vocabulary {len(vocab):,} tokens, "
        f"window {cfg.model.seq_len}; training on {corpus.train_stats.kept_lines:,} of "
        f"{corpus.train_stats.lines:,} lines, {steps:,} steps per epoch, {cfg.train.epochs} epochs"
    )
    callback = EpochEnd(cfg, run, Generator(model, tokenizer), steps, console)
    # Keras warns at the end of every validation pass over a dataset of unknown length.
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    model.fit(
        train_ds,
        validation_data=valid_ds,
        epochs=cfg.train.epochs,
        steps_per_epoch=cfg.train.steps_per_epoch,
        callbacks=[callback],
        verbose=0,
        shuffle=False,
    )
    return callback.history
