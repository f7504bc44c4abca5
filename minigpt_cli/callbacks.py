"""The Keras callbacks of ``minigpt train``, one job each.

``Clock`` keeps the training position (epoch, step, global step) that the
others read; it must come first in the callback list. Then ``DropoutSeeds``
makes dropout a function of (seed, step), ``StepLosses`` records each step's
loss, ``Checkpointer`` writes checkpoints and ``model.keras`` and stops on a
signal, ``HistoryWriter`` writes the per-epoch history and curve,
``EpochSample`` writes a sample, and ``ProgressBar`` draws progress.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import signal
import time
import zlib
from pathlib import Path

import keras
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from minigpt_cli import checkpoints
from minigpt_cli.runs import RunDir, atomic_path, write_text

HISTORY_FIELDS = (
    "epoch", "steps", "global_step", "loss", "perplexity", "val_loss", "val_perplexity", "seconds",
    "tokens_per_second", "learning_rate",
)  # fmt: skip


class Clock(keras.callbacks.Callback):
    """Where training stands. ``offset`` is the steps of the first epoch done before this fit (a resume)."""

    def __init__(self, steps_per_epoch: int, offset: int = 0):
        super().__init__()
        self.steps_per_epoch = steps_per_epoch
        self.offset = offset
        self.epoch = 0
        self.step = offset  # steps of the current epoch done
        self.done = 0  # steps of the current epoch done by this fit
        self.epoch_start = time.perf_counter()

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.step

    @property
    def epoch_finished(self) -> bool:
        return self.step >= self.steps_per_epoch

    def position(self) -> checkpoints.Position:
        epoch, step = (self.epoch + 1, 0) if self.epoch_finished else (self.epoch, self.step)
        return checkpoints.Position(epoch, step, epoch * self.steps_per_epoch + step, self.steps_per_epoch)

    def on_epoch_begin(self, epoch, logs=None):
        if epoch != self.epoch:
            self.offset = 0  # only the first epoch of a fit can start mid-way
        self.epoch, self.step, self.done = epoch, self.offset, 0
        self.epoch_start = time.perf_counter()

    def on_train_batch_begin(self, batch, logs=None):
        self.next_global_step = self.epoch * self.steps_per_epoch + self.offset + batch

    def on_train_batch_end(self, batch, logs=None):
        self.done = batch + 1
        self.step = self.offset + self.done


class DropoutSeeds(keras.callbacks.Callback):
    """Seeds every dropout layer from (seed, layer, global step) before each step.

    Keras does not save the dropout layers' random state with a model, so a
    resumed run would draw other masks; seeding each step from the position
    makes the masks the same whether or not the run was stopped and resumed.
    """

    def __init__(self, clock: Clock, seed: int):
        super().__init__()
        self.clock, self.seed = clock, seed

    def on_train_begin(self, logs=None):
        self.states = [v for v in self.model.non_trainable_variables if v.path.endswith("seed_generator_state")]

    def on_train_batch_begin(self, batch, logs=None):
        step = self.clock.next_global_step
        for i, v in enumerate(self.states):  # in layer order; the names differ between a built and a loaded model
            v.assign(np.array([zlib.crc32(f"{self.seed}/{i}".encode()), step], dtype=v.dtype))


#: One training step: (global step, its loss, its real tokens).
Step = tuple[int, float, int]


class StepLosses(keras.callbacks.Callback):
    """Each step's loss (the mean over its real tokens, as the model reports it) and its real tokens."""

    def __init__(self, clock: Clock, tokens_of_step, steps: list[Step]):
        super().__init__()
        self.clock, self.tokens_of_step, self.steps = clock, tokens_of_step, steps

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("batch_loss", float("nan")))
        step = self.clock.global_step
        self.steps.append((step, loss, self.tokens_of_step(step - 1)))


def epoch_loss(steps: list[Step], first: int, last: int) -> float:
    """The mean loss over the real tokens of global steps ``first`` to ``last`` (both included)."""
    picked = [(loss, tokens) for step, loss, tokens in steps if first <= step <= last]
    tokens = sum(t for _, t in picked)
    return sum(loss * t for loss, t in picked) / tokens if tokens else float("nan")


def write_steps(run: RunDir, steps: list[Step]) -> None:
    rows = "".join(f"{s},{loss:.6f},{tokens}\n" for s, loss, tokens in steps)
    write_text(run.steps_csv, "global_step,loss,tokens\n" + rows)


def read_steps(run: RunDir, upto: int) -> list[Step]:
    if not run.steps_csv.is_file():
        return []
    rows = list(csv.DictReader(run.steps_csv.open(encoding="utf-8")))
    return [(int(r["global_step"]), float(r["loss"]), int(r.get("tokens") or 1)) for r in rows
            if int(r["global_step"]) <= upto]  # fmt: skip


class StopFlag:
    """Set by SIGINT/SIGTERM while fitting; training checkpoints and stops at the next step.

    ``received`` is the signal this process got; ``signal`` is the one training
    stops for. Alone they are the same. Under a multi-worker strategy ``signal``
    is set only by ``agree``, which every worker calls at the same steps: then
    every worker learns whether any worker was signalled, and all stop at the
    same step (a signal that comes after the last ``agree`` stops nothing).
    """

    def __init__(self, strategy=None, collective: bool = False):
        self.signal: int | None = None
        self.received: int | None = None
        self.strategy = strategy if collective else None

    def __call__(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.received = signum
        if self.strategy is None:
            self.signal = signum

    def agree(self) -> bool:
        """Whether to stop now (any worker signalled, under a multi-worker strategy)."""
        if self.strategy is None:
            return self.signal is not None
        import tensorflow as tf

        # tf.distribute reduces by SUM or MEAN only: each worker votes in the slot of its signal.
        votes = np.zeros(signal.NSIG, dtype="float32")
        if self.received is not None:
            votes[self.received] = 1.0
        got = self.strategy.reduce("SUM", self.strategy.run(lambda: tf.constant(votes)), axis=None)
        voted = np.flatnonzero(np.asarray(got) > 0)
        if voted.size:
            self.signal = self.received or int(voted.max())
        return self.signal is not None

    @contextlib.contextmanager
    def installed(self):
        from minigpt_cli import distribute

        previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        held, before = distribute.take_held()  # a signal that came while a multi-worker job was starting
        previous.update(before)
        if held is not None:
            self(held, None)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class StopTraining(Exception):
    """Raised out of ``fit`` by ``Checkpointer`` once a stop's checkpoint is written."""


class Checkpointer(keras.callbacks.Callback):
    """A checkpoint every ``every`` steps, at each epoch's end (with ``model.keras``), and on a stop signal."""

    def __init__(self, clock: Clock, run: RunDir, every: int, stop: StopFlag, steps: list[Step]):
        super().__init__()
        self.clock, self.run, self.every, self.stop, self.steps = clock, run, every, stop, steps
        self.last: checkpoints.Position | None = None
        self.trained_with: dict = {}  # recorded in every checkpoint (see ``checkpoints.Position``)

    def save(self, copy_of: Path | None = None) -> checkpoints.Position:
        """Write a checkpoint at the clock's position; returns the position with its file name.

        ``steps.csv`` first: a resume reads it up to the checkpoint's step, so it must never lag behind.
        """
        write_steps(self.run, self.steps)
        position = dataclasses.replace(self.clock.position(), trained_with=self.trained_with)
        path = checkpoints.save(self.run.root, self.model, position, copy_of=copy_of)
        self.last = dataclasses.replace(position, file=path.name)
        return self.last

    def on_train_batch_end(self, batch, logs=None):
        if self.clock.epoch_finished:
            return  # the epoch's end writes this one, after validation
        if self.stop.agree():
            self.save()
            raise StopTraining  # at once: Keras would otherwise run a whole validation pass first
        elif self.every and self.clock.global_step % self.every == 0:
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        if not self.clock.epoch_finished:
            return  # stopped mid-epoch: its checkpoint is written
        # model.keras first, then the checkpoint as its copy (one serialization): once the checkpoint says an
        # epoch is done, model.keras holds it.
        with atomic_path(self.run.model) as tmp:
            self.model.save(tmp)
        self.save(copy_of=self.run.model)
        if self.stop.agree():  # a signal during validation: the epoch is whole, stop before the next
            self.model.stop_training = True


class HistoryWriter(keras.callbacks.Callback):
    """At each epoch's end: a row in ``history.json`` / ``history.csv``, the curve, and a line on the console."""

    def __init__(self, clock: Clock, run: RunDir, history: list[dict], steps: list[Step],
                 tokens_per_step: int, epochs: int, console: Console):  # fmt: skip
        super().__init__()
        self.clock, self.run, self.history, self.steps = clock, run, history, steps
        self.tokens_per_step, self.epochs, self.console = tokens_per_step, epochs, console

    def on_epoch_end(self, epoch, logs=None):
        if not self.clock.epoch_finished:
            return
        from minigpt_cli.plots import draw_training_curve

        logs = logs or {}
        seconds = time.perf_counter() - self.clock.epoch_start
        spe = self.clock.steps_per_epoch
        loss = epoch_loss(self.steps, epoch * spe + 1, (epoch + 1) * spe)
        row = {
            "epoch": epoch + 1,
            "steps": self.clock.step,
            "global_step": (epoch + 1) * self.clock.steps_per_epoch,
            # From the steps, so that an epoch resumed mid-way counts the steps before the stop too.
            "loss": loss,
            "perplexity": math.exp(loss) if loss == loss else float("nan"),
            "val_loss": float(logs.get("val_loss", float("nan"))),
            "val_perplexity": float(logs.get("val_perplexity", float("nan"))),
            "seconds": round(seconds, 3),
            "tokens_per_second": round(self.clock.done * self.tokens_per_step / seconds, 1) if seconds else 0.0,
            "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
        }
        self.history.append(row)
        write_history(self.run, self.history)
        draw_training_curve(self.steps, self.history, self.run.curve)
        self.console.print(
            f"epoch {row['epoch']}/{self.epochs}: loss {row['loss']:.4f}  perplexity {row['perplexity']:.2f}  "
            f"val_loss {row['val_loss']:.4f}  val_perplexity {row['val_perplexity']:.2f}  {seconds:.1f}s  "
            f"{row['tokens_per_second']:,.0f} tok/s"
        )


def write_history(run: RunDir, history: list[dict]) -> None:
    write_text(run.history_json, json.dumps(history, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_text(run.history_csv, buf.getvalue())


def read_history(run: RunDir, upto_epoch: int) -> list[dict]:
    if not run.history_json.is_file():
        return []
    return [r for r in json.loads(run.history_json.read_text(encoding="utf-8")) if r["epoch"] <= upto_epoch]


class EpochSample(keras.callbacks.Callback):
    """After each epoch, a sample with the config's ``[generate]`` sampler, printed and added to ``samples.txt``."""

    def __init__(self, clock: Clock, run: RunDir, generator, spec_of_epoch, max_tokens: int, console: Console):
        super().__init__()
        self.clock, self.run, self.generator, self.spec_of_epoch = clock, run, generator, spec_of_epoch
        self.max_tokens, self.console = max_tokens, console

    def on_epoch_end(self, epoch, logs=None):
        if not self.clock.epoch_finished:
            return
        spec = self.spec_of_epoch(epoch)
        shown = {k: v for k, v in spec.settings().items() if k != "seed" and not (k == "temperature" and v == 1)}
        settings = "".join(f", {k}={v}" for k, v in shown.items())
        sample = self.generator.run([""], spec, self.max_tokens)[0]
        line = f"epoch {epoch + 1} ({spec.name}{settings}): {sample.text}\n"
        write_text(self.run.samples, read_samples(self.run, epoch) + line)
        self.console.print(f"[dim]sample ({spec.name}{settings}):[/dim] {sample.text}", highlight=False)


def read_samples(run: RunDir, upto_epoch: int) -> str:
    """``samples.txt`` up to epoch ``upto_epoch`` (1-based), as text."""
    if not run.samples.is_file():
        return ""
    kept = []
    for line in run.samples.read_text(encoding="utf-8").splitlines(keepends=True):
        head = line.split(" ", 2)
        if len(head) > 1 and head[0] == "epoch" and head[1].isdigit() and int(head[1]) <= upto_epoch:
            kept.append(line)
    return "".join(kept)


class ProgressBar(keras.callbacks.Callback):
    """A rich progress bar: step, running loss, tokens/s and time left."""

    def __init__(self, clock: Clock, tokens_per_step: int, epochs: int, console: Console):
        super().__init__()
        self.clock, self.tokens_per_step, self.epochs = clock, tokens_per_step, epochs
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
        self.task = None

    def on_train_begin(self, logs=None):
        self.progress.start()

    def on_train_end(self, logs=None):
        self.stop()

    def stop(self) -> None:
        self.progress.stop()

    def on_epoch_begin(self, epoch, logs=None):
        self.task = self.progress.add_task(
            "train", total=self.clock.steps_per_epoch, completed=self.clock.step,
            epoch=f"{epoch + 1}/{self.epochs}", loss=float("nan"), tps=0.0,
        )  # fmt: skip

    def on_train_batch_end(self, batch, logs=None):
        elapsed = time.perf_counter() - self.clock.epoch_start
        tps = self.clock.done * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        loss = float((logs or {}).get("loss", float("nan")))
        self.progress.update(self.task, completed=self.clock.step, loss=loss, tps=tps)

    def on_epoch_end(self, epoch, logs=None):
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None
