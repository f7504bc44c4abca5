"""Training: the optimizer recipe, the loss, fit with its callbacks, and exact resume.

The loss is the reference's: cross-entropy from logits averaged over the
batch's real tokens (``[PAD]`` labels masked), and every figure logged
(``loss``, ``val_loss``, the curve) is a mean over real tokens too.

Resume rule: a checkpoint holds the weights, the optimizer's state and the
position (epoch, step). ``--resume`` rebuilds the optimizer recipe (learning
rate and schedule, weight decay, clipping) from the current config at the
checkpoint's step, so raising ``train.epochs`` stretches the cosine as
planned anew. Keys that would change what the checkpoint's position means
(the model, the vocabulary, the data and its windows, the seed, the steps
per epoch, the precision, the gradient accumulation) are refused.

Gradient accumulation (``train.grad_accum_steps`` = N > 1) is Keras'
optimizer option: ``data.batch_size`` stays the micro-batch, and the
gradients of N micro-batches are averaged into one update (the effective
batch is N × ``data.batch_size``; clipping applies to the average). Steps
still count micro-batches everywhere (the progress bar, ``steps_per_epoch``,
checkpoints, ``warmup_steps`` and the schedule's length), as Keras' schedules
do: the update made at micro-step k uses the learning rate of step k. The
accumulators are optimizer variables, saved in every checkpoint, so a resume
in the middle of a cycle goes on exactly; a cycle still open when training
ends is never applied.
"""

from __future__ import annotations

import copy
import signal
import tempfile
import warnings
from dataclasses import asdict
from pathlib import Path

import keras
import keras_hub
from rich.console import Console

from minigpt_cli import backend, checkpoints, distribute, flops, optimizers
from minigpt_cli import callbacks as cb
from minigpt_cli.config import DEFAULT_WEIGHT_DECAY, Config, TrainConfig, dumps, load_config
from minigpt_cli.errors import MinigptError
from minigpt_cli.model import MiniGPTCausalLM, build_model, load_model
from minigpt_cli.runs import RunDir, WriteError, write_text
from minigpt_cli.vocab import read_vocabulary, write_vocabulary
from minigpt_cli.windows import prepare_data

#: Config keys a resume must not change: they fix what the checkpoint's weights and position mean.
FIXED_ON_RESUME = (
    "seed", "data", "vocab", "model", "train.steps_per_epoch", "train.precision", "train.grad_accum_steps",
    "train.validation_steps",  # the best model and early stopping compare val_loss across epochs
)  # fmt: skip
#: The value a fixed key had in checkpoints written before it was recorded.
KEYS_BEFORE_THEY_EXISTED = {"train.grad_accum_steps": 1}
#: Keys inside those sections that do not change what a checkpoint means.
FREE_ON_RESUME = ("data.tokenize_workers",)


class Interrupted(MinigptError):
    """Training stopped by a signal after writing a checkpoint."""

    exit_code = 130


def make_optimizer(cfg: TrainConfig, total_steps: int) -> keras.optimizers.Optimizer:
    """Adam (the reference) or AdamW, with optional warmup + cosine decay, global-norm clipping and gradient
    accumulation; they keep the gradient norm for TensorBoard (``minigpt_cli.optimizers``)."""
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
    accumulate = cfg.grad_accum_steps if cfg.grad_accum_steps > 1 else None
    if cfg.optimizer == "adamw":
        decay = DEFAULT_WEIGHT_DECAY if cfg.weight_decay is None else cfg.weight_decay
        optimizer = optimizers.AdamW(
            learning_rate=lr, weight_decay=decay, global_clipnorm=clip, gradient_accumulation_steps=accumulate
        )
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
        return optimizer
    return optimizers.Adam(learning_rate=lr, global_clipnorm=clip, gradient_accumulation_steps=accumulate)


def compile_model(model: MiniGPTCausalLM, cfg: Config, total_steps: int) -> None:
    """The reference's loss and metric: cross-entropy from logits over real tokens, perplexity masking [PAD]."""
    model.compile(
        optimizer=make_optimizer(cfg.train, total_steps),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="mean_with_sample_weight"),
        weighted_metrics=[],
        metrics=[keras_hub.metrics.Perplexity(from_logits=True, mask_token_id=0, name="perplexity")],
        sampler="top_k",
    )


def _slot_key(variable) -> str:
    return variable.path.split("/", 1)[-1]  # without the optimizer's own name ("adam/", "adam_w_1/")


def _carried(variable) -> bool:
    """Whether a resume copies this optimizer variable: not the learning rate (the recipe's), nor the last
    gradient norm (a record, absent from checkpoints written before it was kept)."""
    return variable.path.rsplit("/", 1)[-1] not in ("learning_rate", optimizers.GRAD_NORM)


def recompile_with_state(model: MiniGPTCausalLM, cfg: Config, total_steps: int) -> None:
    """Compile ``model`` (loaded with its optimizer) with the current recipe, keeping the optimizer's state.

    The step count and the moment estimates carry over; the learning rate,
    its schedule, weight decay and clipping come from ``cfg``.
    """
    saved = [v for v in model.optimizer.variables if _carried(v)]
    norm = optimizers.grad_norm(model.optimizer)  # None in a checkpoint from before it was kept
    compile_model(model, cfg, total_steps)
    model.optimizer.build(model.trainable_variables)
    fresh = [v for v in model.optimizer.variables if _carried(v)]
    if [_slot_key(v) for v in saved] != [_slot_key(v) for v in fresh]:
        raise MinigptError("the checkpoint's optimizer state does not fit this model; train again without --resume")
    for new, old in zip(fresh, saved, strict=True):
        new.assign(old)
    if norm is not None:
        optimizers.set_grad_norm(model.optimizer, norm)


def _flat(cfg: Config) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in asdict(cfg).items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            out[key] = value
    return out


def fixed_keys(cfg: Config) -> dict[str, object]:
    """The values of the keys in ``FIXED_ON_RESUME`` (and, with dropout, ``train.jit_compile``)."""
    fixed = FIXED_ON_RESUME + (("train.jit_compile",) if cfg.model.dropout > 0 else ())
    return {
        k: v for k, v in _flat(cfg).items()
        if any(k == f or k.startswith(f + ".") for f in fixed) and k not in FREE_ON_RESUME
    }  # fmt: skip


def resume_conflicts(trained: Config | dict, now: Config) -> list[str]:
    """The fixed keys whose value differs between what a checkpoint was trained with and ``now``."""
    old = fixed_keys(trained) if isinstance(trained, Config) else {**KEYS_BEFORE_THEY_EXISTED, **trained}
    new = fixed_keys(now)
    return [
        f"{key}: {old[key]!r} -> {new.get(key)!r}" for key in old if key != "vocab_sha256" and old[key] != new.get(key)
    ]


def step_jit(setting: str, strategy=None) -> bool:
    """``model.jit_compile`` from ``train.jit_compile``. ``auto``: XLA on TensorFlow (not under a strategy,
    unless asked for) and on JAX, where every step is jitted; on PyTorch "true" is torch.compile, off unless
    asked for."""
    auto = {"tensorflow": strategy is None, "jax": True}.get(keras.config.backend(), False)
    return {"true": True, "false": False}.get(setting, auto)


def compilation(jit_compile: bool) -> str:
    """How the training step is compiled, in words."""
    if keras.config.backend() == "torch":
        return f"torch.compile {'on' if jit_compile else 'off'}"
    return f"XLA {'on' if jit_compile else 'off'}"


def _lost_worker(error: Exception) -> bool:
    """Whether ``error`` is TensorFlow's word that a peer of a multi-worker job is gone."""
    try:
        import tensorflow as tf
    except ImportError:
        return False

    return isinstance(error, (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError))


def train(
    cfg: Config,
    run: RunDir,
    console: Console | None = None,
    resume: bool = False,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> list[dict]:
    """Train the mini-GPT on the run's vocabulary (or resume it); returns the per-epoch history.

    Writes ``config.toml`` (the config really used) once the checks pass.
    ``callbacks`` are extra Keras callbacks, run after minigpt's own. With
    ``train.init_from`` (see ``finetune.prepare``) a new run starts from that
    model's weights, with a fresh optimizer.
    """
    console = console or Console(stderr=True)
    parent = None
    if cfg.train.init_from and not resume:
        from minigpt_cli import finetune

        parent = finetune.find_parent(Path(cfg.train.init_from))
        finetune.check_run(parent, run.root)
        cfg = finetune.adopt(cfg, parent, explicit=dict.fromkeys(parent.settings(), "the config"))
        vocab = parent.vocab  # written to the run with config.toml, once every check has passed
    else:
        vocab = read_vocabulary(run.require_vocab(), cfg.vocab)
    vocab.check_config(cfg.vocab)
    if cfg.train.sample_each_epoch:  # the epoch's sample settings, checked now rather than after an epoch
        from minigpt_cli.samplers import sampler_spec

        sampler_spec(cfg.generate, seed=0).check(vocab_size=len(vocab))
    position = checkpoints.latest(run.root) if resume else None
    if resume and position is None:
        raise MinigptError(f"nothing to resume in {run.root}: no checkpoint; run 'minigpt train' without --resume")
    if position is not None:
        trained = position.trained_with or (load_config(run.config) if run.config.is_file() else cfg)
        if position.trained_with.get("vocab_sha256", vocab.digest()) != vocab.digest():
            raise MinigptError(
                f"vocab.txt in {run.root} changed since the checkpoint was made ('minigpt vocab' ran again); "
                "train again without --resume"
            )
        conflicts = resume_conflicts(trained, cfg)
        if conflicts:
            raise MinigptError(
                f"--resume cannot change {'; '.join(conflicts)} (the checkpoint was trained with the old values); "
                "resume with the run's own config, or train a new run"
            )
        cb.repair_best_model(run, cb.read_history(run, position.epoch), position)  # before any refusal below
    if position is not None and run.config.is_file():  # the run's record of its parent stays
        old = load_config(run.config).train
        cfg = copy.deepcopy(cfg)
        cfg.train.init_from, cfg.train.init_sha256 = old.init_from, old.init_sha256
    # First, before anything starts TensorFlow's runtime: the CPU can only be split into devices until then.
    dist = distribute.setup(cfg.train.distribution, cfg.train.devices, cfg.train.worker_timeout)
    distribute.set_precision(cfg.train.precision)
    keras.utils.set_random_seed(cfg.seed)
    if cfg.train.grad_accum_steps > 1 and dist.strategy is not None:
        raise MinigptError(
            f"train.grad_accum_steps = {cfg.train.grad_accum_steps} needs train.distribution = \"none\" (got "
            f"{dist.kind}): Keras' gradient accumulation does not run under tf.distribute; set "
            "train.distribution=none, or raise data.batch_size instead"
        )
    if cfg.data.batch_size % dist.replicas:
        raise MinigptError(
            f"data.batch_size {cfg.data.batch_size} does not split over {dist.replicas} replicas; "
            f"use a multiple of {dist.replicas}"
        )
    parent_weights = parent.weights() if parent is not None else None  # a bad parent fails before tokenizing
    data = prepare_data(cfg, run, vocab, console)
    steps_per_epoch = cfg.train.steps_per_epoch or data.train.per_pass
    epochs = cfg.train.epochs
    if position is not None:
        if position.steps_per_epoch != steps_per_epoch:
            raise MinigptError(
                f"the checkpoint was made with {position.steps_per_epoch} steps per epoch but the config now "
                f"gives {steps_per_epoch}; resume with the run's own config"
            )
        if position.epoch >= epochs:
            raise MinigptError(
                f"{run.root} has already trained {position.epoch} epochs; to train more, resume with "
                f"--set train.epochs={position.epoch + 1} or more (the schedule is stretched to the new total)"
            )
        patience = cfg.train.early_stop_patience
        best_row, since = cb.best_epoch(cb.read_history(run, position.epoch))
        if patience and since >= patience:
            raise MinigptError(
                f"{run.root} has stopped early: {cb.stall(best_row, since)} (train.early_stop_patience = {patience}); "
                f"to train on, resume with --set train.early_stop_patience={since + 1} or more (0: never stop early)"
            )
    # Only the chief writes the run's artifacts; other workers write theirs to a scratch folder.
    out = run if dist.is_chief else RunDir(Path(tempfile.mkdtemp(prefix="minigpt-worker-")))
    if dist.is_chief:
        if parent is not None:
            write_vocabulary(vocab, run.vocab)
        write_text(run.config, dumps(cfg))
    with dist.scope():
        if position is not None:
            model = load_model(checkpoints.path_of(run.root, position), len(vocab), compile=True)
            recompile_with_state(model, cfg, epochs * steps_per_epoch)
        else:
            model = build_model(len(vocab), cfg.model)
            if parent_weights is not None:
                from minigpt_cli.finetune import copy_weights

                copy_weights(model, parent_weights)
            compile_model(model, cfg, epochs * steps_per_epoch)
    if position is not None:
        history = cb.read_history(run, position.epoch)
        steps = cb.read_steps(run, position.global_step)
        samples = cb.read_samples(run, position.epoch)
    else:
        history, steps, samples = [], [], ""
    if dist.is_chief:
        write_text(out.samples, samples)
    # XLA made the reference model's steps 1.18x faster on a 2-core CPU (benchmarks/train.py); it stays
    # off under a distribution strategy unless asked for.
    model.jit_compile = step_jit(cfg.train.jit_compile, dist.strategy)
    model.multi_worker_logs = dist.kind == "multi_worker" and dist.strategy is not None  # tf.distribute's
    if keras.config.backend() == "jax" and dist.replicas > 1:
        # keras.distribution splits every batch evenly over the devices: the validation's last, partial batch is
        # padded with [PAD] rows (weight 0); with several processes each feeds its own rows of the global batch.
        import jax

        data.valid.pad_to = dist.replicas
        data.train.shard = data.valid.shard = (jax.process_index(), jax.process_count())
    start_epoch, start_step = (position.epoch, position.step) if position else (0, 0)
    console.print(
        f"model: {model.count_params():,} parameters, vocabulary {len(vocab):,} tokens, window {cfg.model.seq_len}; "
        f"{len(data.train.windows):,} {data.windows} windows{' (from the cache)' if data.cached else ''}, "
        f"{steps_per_epoch:,} steps per epoch, {epochs} epochs"
        + (f"; resuming at epoch {start_epoch + 1}, step {start_step}" if position else "")
    )
    if parent is not None:
        from minigpt_cli.finetune import HIGH_UNKNOWN_SHARE, unknown_share

        share = unknown_share(data.train.windows, vocab.tokens)
        console.print(
            f"fine-tuning from {parent.path} ({parent.kind}, sha256 {parent.sha256[:12]}): "
            f"[UNK] share of the new training windows under its vocabulary {share:.3%}"
        )
        if share > HIGH_UNKNOWN_SHARE:
            console.print(
                f"warning: {share:.1%} of the new text's tokens are [UNK] under the parent's vocabulary: the model "
                "cannot read or write those words; fine-tune on text closer to the parent's or train from scratch"
            )
    role = "" if dist.is_chief else f" (not the chief: its artifacts go to {out.root})"
    accumulate = cfg.train.grad_accum_steps
    update = f", × {accumulate} accumulated = {cfg.data.batch_size * accumulate} per update" if accumulate > 1 else ""
    console.print(
        f"distribution: {dist.kind}, {dist.replicas} replica(s) on {dist.workers} worker(s){role}; "
        f"global batch {cfg.data.batch_size}, {cfg.data.batch_size // dist.replicas} per replica{update}; "
        f"precision {cfg.train.precision}; {compilation(model.jit_compile)}; backend {backend.describe()}"
    )
    if accumulate > 1 and (epochs * steps_per_epoch) % accumulate:
        console.print(
            f"note: {epochs * steps_per_epoch:,} steps are not a multiple of train.grad_accum_steps = {accumulate}: "
            f"the gradients of the last {(epochs * steps_per_epoch) % accumulate} are never applied"
        )
    plan = flops.Plan(
        flops.Shape.of(len(vocab), cfg.model), cfg.data.batch_size, accumulate, cfg.train.precision,
        flops.machine_peak(cfg.train.precision, note=console.print), bool(model.jit_compile), epochs,
        devices=flops.devices(dist.replicas, dist.workers), steps_per_epoch=steps_per_epoch,
        valid_steps=min(cfg.train.validation_steps or data.valid.per_pass, data.valid.per_pass),
    )  # fmt: skip
    for line in plan.summary():
        console.print(line)

    stop = cb.StopFlag(dist.strategy, collective=dist.kind == "multi_worker")
    clock = cb.Clock(steps_per_epoch)
    tokens_per_step = cfg.data.batch_size * cfg.model.seq_len
    checkpointer = cb.Checkpointer(clock, out, cfg.train.checkpoint_every, stop, steps)
    checkpointer.trained_with = {**fixed_keys(cfg), "vocab_sha256": vocab.digest()}
    # The epoch's history row and sample are written before its checkpoint: a resume reads them up to the
    # checkpoint's epoch, so they must never lag behind it.
    own: list[keras.callbacks.Callback] = [clock]
    if cfg.model.dropout > 0:
        own.append(cb.DropoutSeeds(clock, cfg.seed))
    own += [
        cb.StepLosses(clock, data.train.tokens, steps),
        cb.HistoryWriter(clock, out, history, steps, tokens_per_step, epochs, console, mfu_of=plan.mfu),
    ]
    if cfg.train.sample_each_epoch and dist.is_chief:
        from minigpt_cli.generate import Generator
        from minigpt_cli.samplers import SEED_LIMIT, sampler_spec

        own.append(
            cb.EpochSample(
                clock, out, Generator(model, vocab.tokenizer()),
                lambda epoch: sampler_spec(cfg.generate, seed=(cfg.seed + epoch) % SEED_LIMIT),
                cfg.generate.max_tokens, console,
            )
        )  # fmt: skip
    board = None
    if dist.is_chief and not cb.tensorboard_installed():
        console.print("note: no TensorBoard logs: the tensorboard package is missing (pip install tensorboard)")
    elif dist.is_chief and not backend.tensorflow_available():
        console.print("note: no TensorBoard logs: they are written by TensorFlow's tf.summary, which is not installed")
    elif dist.is_chief:  # TensorBoard: after the history row and the sample it logs, before the checkpoint
        cb.trim_events(out.root / "logs", position.global_step if position else 0)
        sample = next((c for c in own if isinstance(c, cb.EpochSample)), None)
        every = cfg.train.log_every or cb.tensorboard_every(steps_per_epoch, plan.step_seconds)
        board = cb.TensorBoardLogs(clock, out.root / "logs", every, tokens_per_step, history, plan.mfu, sample)
        own.append(board)
    progress = cb.ProgressBar(clock, tokens_per_step, epochs, console, mfu_of=plan.mfu)
    # After the checkpoint: model.best.keras is a copy of the epoch's model.keras, and an early stop comes last.
    best = cb.BestModel(clock, out, history, cfg.train.early_stop_patience, epochs, console)
    if dist.is_chief:
        best.restore(position)
    own += [checkpointer, best, progress]
    valid_steps = min(cfg.train.validation_steps or data.valid.per_pass, data.valid.per_pass)
    # Keras warns at the end of every validation pass over a dataset of unknown length.
    warnings.filterwarnings("ignore", message="Your input ran out of data")

    def fit(first_epoch: int, last_epoch: int, skip: int) -> None:
        clock.offset = skip
        clock.epoch = first_epoch
        model.fit(
            data.train.feed(first_epoch * steps_per_epoch + skip, last_epoch * steps_per_epoch),
            validation_data=data.valid.feed(0, valid_steps),
            initial_epoch=first_epoch,
            epochs=last_epoch,
            steps_per_epoch=steps_per_epoch - skip,
            callbacks=[*own, *(callbacks or [])],
            verbose=0,
            shuffle=False,
        )

    try:
        with stop.installed():
            if start_step:
                fit(start_epoch, start_epoch + 1, start_step)
                start_epoch += 1
            if start_epoch < epochs and stop.signal is None and not best.stopped:
                fit(start_epoch, epochs, 0)
    except cb.StopTraining:
        pass  # the stop's checkpoint is written; said below
    except WriteError as e:  # disk full or the like: say how to go on from the last whole checkpoint
        saved = checkpointer.last or position
        then = f"resume with: minigpt train --resume --run-dir {run.root}" if saved else "train again"
        raise WriteError(e.path, e.error, then=then) from None
    except Exception as e:
        if dist.kind != "multi_worker" or not _lost_worker(e):
            raise
        saved = checkpointer.last or position
        then = f"start every worker again with: minigpt train --resume --run-dir {run.root}" if saved else "retry"
        raise MinigptError(f"a worker of the cluster stopped answering ({type(e).__name__}); {then}") from None
    finally:
        progress.stop()
        if board is not None:
            board.close()
        if not dist.is_chief:  # its scratch folder goes, however training ended
            import shutil

            shutil.rmtree(out.root, ignore_errors=True)
    last = checkpointer.last
    finished = last is not None and last.epoch >= epochs
    if stop.signal is not None and not finished and not best.stopped:
        name = signal.Signals(stop.signal).name
        where = f"epoch {last.epoch + 1}, step {last.step}" if last else "the start"
        raise Interrupted(
            f"stopped by {name} at {where}; checkpoint saved. Resume with: minigpt train --resume --run-dir {run.root}"
        )
    if stop.received is not None:
        console.print(f"note: {signal.Signals(stop.received).name} came after the last step; the run is complete")
    return history
