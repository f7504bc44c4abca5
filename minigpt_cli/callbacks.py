"""The Keras callbacks of ``minigpt train``, one job each.

``Clock`` keeps the training position (epoch, step, global step) that the
others read; it must come first in the callback list. Then ``DropoutSeeds``
makes dropout a function of (seed, step), ``StepLosses`` records each step's
loss, ``Checkpointer`` writes checkpoints and ``model.keras`` and stops on a
signal, ``BestModel`` keeps ``model.best.keras`` and stops early,
``HistoryWriter`` writes the per-epoch history and curve, ``EpochSample``
writes a sample, ``TensorBoardLogs`` writes TensorBoard's logs (after those
two, whose figures and sample it logs), and ``ProgressBar`` draws progress.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import shutil
import signal
import time
import zlib
from pathlib import Path

import keras
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from minigpt_cli import checkpoints
from minigpt_cli.flops import format_mfu
from minigpt_cli.runs import RunDir, atomic_path, file_digest, fsync_file, write_text

HISTORY_FIELDS = (
    "epoch", "steps", "global_step", "loss", "perplexity", "val_loss", "val_perplexity", "seconds",
    "tokens_per_second", "mfu", "learning_rate",
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
        self.last_step_end = time.perf_counter()

    @property
    def training_seconds(self) -> float:
        """Seconds from the epoch's start to its last training step (its validation pass left out)."""
        return max(getattr(self, "last_step_end", self.epoch_start) - self.epoch_start, 0.0)


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
            crc = zlib.crc32(f"{self.seed}/{i}".encode())
            if np.dtype(v.dtype) == np.int32:  # PyTorch keeps seed states in int32
                crc &= 0x7FFFFFFF
            v.assign(np.array([crc, step], dtype=v.dtype))


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


def best_epoch(history: list[dict]) -> tuple[dict | None, int]:
    """The row whose val_loss is lower than every earlier row's (NaN never counts), and the rows after it.

    ``(None, len(history))`` when no row has a finite val_loss.
    """
    best, since = None, 0
    for row in history:
        loss = float(row.get("val_loss", math.nan))
        if math.isfinite(loss) and (best is None or loss < best["val_loss"]):
            best, since = row, 0
        else:
            since += 1
    return best, since


def stall(best: dict | None, since: int) -> str:
    """What ``best_epoch`` found, in words: why a run stops early."""
    epochs = f"{since} epoch{'' if since == 1 else 's'}"
    if best is None:
        return f"no finite val_loss in {epochs}"
    return f"no val_loss below epoch {best['epoch']}'s {best['val_loss']:.4f} in the {epochs} after it"


def repair_best_model(run: RunDir, history: list[dict], position: checkpoints.Position) -> None:
    """When the checkpoint at ``position`` ends the best epoch, make ``model.best.keras`` its copy (a crash between
    the checkpoint and the copy leaves the file one epoch behind). Called before any refusal to resume, so a run
    whose last epoch was its best is repaired too."""
    best, _ = best_epoch(history)
    if best is None or position.step != 0 or best["epoch"] != position.epoch:
        return
    path = run.best_model
    source = checkpoints.path_of(run.root, position)  # at an epoch's end, a copy of its model.keras
    recorded = (position.size, position.sha256) if position.sha256 else file_digest(source)
    if not path.is_file() or file_digest(path) != recorded:
        with atomic_path(path) as tmp:
            shutil.copyfile(source, tmp)


class BestModel(keras.callbacks.Callback):
    """``model.best.keras`` (the epoch with the lowest val_loss so far) and the early stop, after ``Checkpointer``.

    Both are decided from the history rows alone (``best_epoch``), so a resumed run decides as an uninterrupted
    one. The copy of the epoch's ``model.keras`` is made after the epoch's checkpoint: a crash leaves it at most
    that one epoch behind, which ``restore`` repairs from the checkpoint. The early stop comes last, with the
    epoch's history and checkpoint written.
    """

    def __init__(self, clock: Clock, run: RunDir, history: list[dict], patience: int, epochs: int,
                 console: Console):  # fmt: skip
        super().__init__()
        self.clock, self.run, self.history, self.patience = clock, run, history, patience
        self.epochs, self.console = epochs, console
        self.stopped = False  # stopped early
        self.saved = False  # model.best.keras holds the best row's model

    def restore(self, position: checkpoints.Position | None) -> None:
        """Make ``model.best.keras`` agree with the history read back for ``position`` (None: a new run)."""
        best, _ = best_epoch(self.history)
        path = self.run.best_model
        if best is None:
            path.unlink(missing_ok=True)  # an earlier training's: this one has no best yet
        elif position is not None:
            repair_best_model(self.run, self.history, position)
        self.saved = best is not None and path.is_file()
        if best is not None and not self.saved:
            self.console.print(
                f"note: {path} is missing, so the best model so far (epoch {best['epoch']}, val_loss "
                f"{best['val_loss']:.4f}) is lost; it is written again at the next epoch with a lower val_loss"
            )

    def on_epoch_end(self, epoch, logs=None):
        if not self.clock.epoch_finished:
            return
        best, since = best_epoch(self.history)
        if best is not None and since == 0:
            with atomic_path(self.run.best_model) as tmp:
                shutil.copyfile(self.run.model, tmp)
            self.saved = True
        if self.patience and since >= self.patience and epoch + 1 < self.epochs:
            self.model.stop_training = True
            self.stopped = True
            kept = f"the best model is {self.run.best_model}" if self.saved else "no best model is saved"
            self.console.print(
                f"stopping early after epoch {epoch + 1}/{self.epochs}: {stall(best, since)} "
                f"(train.early_stop_patience = {self.patience}); {kept}"
            )


class HistoryWriter(keras.callbacks.Callback):
    """At each epoch's end: a row in ``history.json`` / ``history.csv``, the curve, and a line on the console."""

    def __init__(self, clock: Clock, run: RunDir, history: list[dict], steps: list[Step],
                 tokens_per_step: int, epochs: int, console: Console, mfu_of=None):  # fmt: skip
        super().__init__()
        self.clock, self.run, self.history, self.steps = clock, run, history, steps
        self.tokens_per_step, self.epochs, self.console = tokens_per_step, epochs, console
        self.mfu_of = mfu_of  # tokens/s -> model FLOPs utilization (see ``flops.Plan.mfu``)

    def on_epoch_end(self, epoch, logs=None):
        if not self.clock.epoch_finished:
            return
        from minigpt_cli.plots import draw_training_curve

        logs = logs or {}
        seconds = time.perf_counter() - self.clock.epoch_start
        train_seconds = self.clock.training_seconds
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
            # Training steps only: the validation pass is not training throughput.
            "tokens_per_second": round(self.clock.done * self.tokens_per_step / train_seconds, 1)
            if train_seconds else 0.0,
            "learning_rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
        }
        if self.mfu_of is not None:
            row["mfu"] = round(self.mfu_of(row["tokens_per_second"]), 6)
        self.history.append(row)
        write_history(self.run, self.history)
        draw_training_curve(self.steps, self.history, self.run.curve)
        self.console.print(
            f"epoch {row['epoch']}/{self.epochs}: loss {row['loss']:.4f}  perplexity {row['perplexity']:.2f}  "
            f"val_loss {row['val_loss']:.4f}  val_perplexity {row['val_perplexity']:.2f}  {seconds:.1f}s  "
            f"{row['tokens_per_second']:,.0f} tok/s" + (f"  MFU {format_mfu(row['mfu'])}" if "mfu" in row else "")
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
        self.latest: tuple[int, str] | None = None  # (epoch, line): the last sample, for TensorBoard

    def on_epoch_end(self, epoch, logs=None):
        if not self.clock.epoch_finished:
            return
        spec = self.spec_of_epoch(epoch)
        shown = {k: v for k, v in spec.settings().items() if k != "seed" and not (k == "temperature" and v == 1)}
        settings = "".join(f", {k}={v}" for k, v in shown.items())
        sample = self.generator.run([""], spec, self.max_tokens)[0]
        line = f"epoch {epoch + 1} ({spec.name}{settings}): {sample.text}\n"
        write_text(self.run.samples, read_samples(self.run, epoch) + line)
        self.latest = (epoch, line.strip())
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
    """A rich progress bar: step, running loss, tokens/s, MFU (with ``mfu_of``) and time left."""

    def __init__(self, clock: Clock, tokens_per_step: int, epochs: int, console: Console, mfu_of=None):
        super().__init__()
        self.clock, self.tokens_per_step, self.epochs = clock, tokens_per_step, epochs
        self.mfu_of = mfu_of  # tokens/s -> model FLOPs utilization
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TextColumn("{task.fields[mfu]}"),
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
            epoch=f"{epoch + 1}/{self.epochs}", loss=float("nan"), tps=0.0, mfu="",
        )  # fmt: skip

    def on_train_batch_end(self, batch, logs=None):
        elapsed = time.perf_counter() - self.clock.epoch_start
        tps = self.clock.done * self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        loss = float((logs or {}).get("loss", float("nan")))
        mfu = f"MFU {format_mfu(self.mfu_of(tps))}" if self.mfu_of is not None else ""
        self.progress.update(self.task, completed=self.clock.step, loss=loss, tps=tps, mfu=mfu)

    def on_epoch_end(self, epoch, logs=None):
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None


#: Seconds one logged step costs on a 2-core AMD EPYC under load (one graph call writing five scalars, and one
#: reading the learning rate); eager ``tf.summary.scalar`` calls cost about 5 ms for the same.
LOG_SECONDS = 0.002


def tensorboard_installed() -> bool:
    """Whether ``tf.summary`` can write scalars and text: they live in the ``tensorboard`` package."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def tensorboard_every(steps_per_epoch: int, step_seconds: float) -> int:
    """Steps between TensorBoard points: every step unless logging would cost over 2% of a step (estimated),
    and at most 200 points an epoch; at least one an epoch."""
    every = max(1, -(-steps_per_epoch // 200), math.ceil(LOG_SECONDS / (0.02 * max(step_seconds, 1e-6))))
    return min(every, steps_per_epoch)


#: The per-step scalars, ``batch_<name>`` in ``train/``.
BATCH_SCALARS = ("loss", "learning_rate", "grad_norm", "tokens_per_second", "mfu")


class TensorBoardLogs(keras.callbacks.TensorBoard):
    """TensorBoard logs in ``<run>/logs/`` (``train/`` and ``validation/``), against the global step.

    Keras' own callback writes each epoch's row of ``history.json`` at the
    epoch's end: ``epoch_loss`` and ``epoch_perplexity`` (in ``train/`` and
    ``validation/``), ``epoch_learning_rate``, ``epoch_tokens_per_second``,
    ``epoch_mfu``. Every ``every`` steps, one TensorFlow graph call writes
    ``batch_loss`` (the step's own loss, as in ``steps.csv``),
    ``batch_learning_rate`` (the rate the step used), ``batch_grad_norm``
    (the last update's gradient norm, before clipping), and
    ``batch_tokens_per_second`` and ``batch_mfu`` (since the previous point
    of the epoch). Each epoch's sample is logged as text (``sample``). The x
    axis is the global step everywhere, so a resumed run continues the same
    curves; ``trim_events`` drops what a killed run logged past its last
    checkpoint, before the resume logs those steps again.
    """

    def __init__(self, clock: Clock, log_dir: Path, every: int, tokens_per_step: int, history: list[dict],
                 mfu_of=None, sample: EpochSample | None = None):  # fmt: skip
        super().__init__(log_dir=str(log_dir), update_freq="epoch", write_graph=False, profile_batch=0)
        self.clock, self.every, self.tokens_per_step = clock, every, tokens_per_step
        self.history, self.mfu_of, self.sample = history, mfu_of, sample
        self._rate = None
        self._mark: tuple[float, int] | None = None  # (time, global step) that tokens/s is measured from
        self._read_rate = self._write = None  # TensorFlow graph functions, made in the fit they serve

    def _make_writer(self):
        """One graph call that writes a step's scalars (the optimizer is built by the end of the first step)."""
        import tensorflow as tf

        from minigpt_cli.optimizers import GRAD_NORM

        optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
        norm = next((v for v in optimizer.variables if v.path.endswith("/" + GRAD_NORM)), None)
        writer = self._train_writer

        def write(step, host, rate, speed: bool):
            values = {"loss": host[0], "learning_rate": rate, "tokens_per_second": host[1], "mfu": host[2]}
            if norm is not None:
                values["grad_norm"] = norm.value if graph else keras.ops.convert_to_numpy(norm.value)
            with writer.as_default(step=step), tf.summary.record_if(True):
                for name in BATCH_SCALARS:
                    if name in values and (speed or name not in ("tokens_per_second", "mfu")):
                        tf.summary.scalar(f"batch_{name}", tf.cast(values[name], tf.float32))

        # On TensorFlow one graph call; on JAX and PyTorch the values come to the host and tf.summary runs eagerly.
        graph = keras.config.backend() == "tensorflow"
        return tf.function(write) if graph else write

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._read_rate = self._write = None  # a new fit may hold a new optimizer

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._mark = None  # tokens/s within an epoch: not across validation, nor a fit's compiling

    def on_train_batch_begin(self, batch, logs=None):
        if (self.clock.next_global_step + 1) % self.every == 0:
            if self._read_rate is None:
                import tensorflow as tf

                if keras.config.backend() == "tensorflow":
                    self._read_rate = tf.function(lambda: tf.cast(self.model.optimizer.learning_rate, tf.float32))
                else:
                    self._read_rate = lambda: np.float32(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            self._rate = self._read_rate()  # the rate this step uses, left on the device

    def on_train_batch_end(self, batch, logs=None):
        import numpy as np

        now, step = time.perf_counter(), self.clock.global_step
        mark, self._mark = self._mark, (now, step)
        if step % self.every:
            self._mark = mark or self._mark
            return
        speed = mark is not None and step > mark[1] and now > mark[0]
        tps = (step - mark[1]) * self.tokens_per_step / (now - mark[0]) if speed else 0.0
        mfu = self.mfu_of(tps) if speed and self.mfu_of is not None else 0.0
        loss = float((logs or {}).get("batch_loss", float("nan")))
        host = np.array([loss, tps, mfu], dtype=np.float32)
        if self._write is None:
            self._write = self._make_writer()
        _ = self.model  # on JAX, Keras writes the step's optimizer state back to the variables when asked for it
        self._write(np.array(step, dtype=np.int64), host, self._rate, speed=speed)
        self._train_writer.flush()  # a checkpoint at this step then covers what is on disk (~30 µs)

    def on_test_end(self, logs=None):
        pass  # Keras' "evaluation_*_vs_iterations" would count updates, not steps

    def on_epoch_end(self, epoch, logs=None):
        if not self.clock.epoch_finished:
            return
        step = (epoch + 1) * self.clock.steps_per_epoch
        row = next((r for r in reversed(self.history) if r["epoch"] == epoch + 1), None)
        if row is not None:
            names = ("loss", "perplexity", "val_loss", "val_perplexity", "tokens_per_second", "mfu")
            self._log_epoch_metrics(step, {k: row[k] for k in names if k in row and math.isfinite(row[k])})
        if self.sample is not None and self.sample.latest is not None and self.sample.latest[0] == epoch:
            with self._train_writer.as_default(), self.summary.record_if(True):
                self.summary.text("sample", self.sample.latest[1], step=step)
        self.flush()  # the epoch's checkpoint comes next: what it covers is on disk

    def flush(self) -> None:
        for writer in self._writers.values():
            writer.flush()

    def close(self) -> None:
        """Flush and close the writers, however training ended."""
        self._close_writers()


def trim_events(log_dir: Path, upto: int) -> None:
    """Drop the summaries past global step ``upto`` from the event files under ``log_dir``.

    A run killed after its last checkpoint may have logged steps that its
    resume logs again; without this, TensorBoard would show them twice. A
    file whose last record was cut short is rewritten whole; files left with
    no summary are removed (``upto`` 0: a new run starts new curves).
    """
    if not log_dir.is_dir():
        return
    import tensorflow as tf

    for stale in log_dir.rglob(".trim-*"):  # what a kill during an earlier trim left
        stale.unlink(missing_ok=True)
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        kept, changed = [], False
        try:
            for record in tf.data.TFRecordDataset(str(path)):
                raw = record.numpy()
                event = tf.compat.v1.Event.FromString(raw)
                if event.HasField("summary") and event.step > upto:
                    changed = True
                else:
                    kept.append((raw, event.HasField("summary")))
        except tf.errors.DataLossError:  # cut short by a kill
            changed = True
        if not changed:
            continue
        if not any(has_summary for _, has_summary in kept):
            path.unlink()
            continue
        # Under a name without "tfevents" (TensorBoard reads every such file), then renamed over the original.
        tmp = path.parent / f".trim-{path.name[len('events.out.'):]}"
        with tf.io.TFRecordWriter(str(tmp)) as writer:
            for raw, _ in kept:
                writer.write(raw)
        fsync_file(tmp)
        os.replace(tmp, path)
