"""Training speed: the reference's fit loop against minigpt's, side by side in one run.

    python benchmarks/train.py --train books/train.txt --vocab runs/books/vocab.txt

Both train the reference architecture (same parameter count) with Adam 1e-3,
batch 64, window 128, on the same text, for the same number of steps:

- reference: the KerasHub example as written: a functional model with
  ``mask_zero``, and ``TextLineDataset -> filter -> batch -> shuffle ->
  map(tokenize + pack)`` feeding ``fit``, so WordPiece shares the cores with
  training at every step;
- minigpt: ``MiniGPTCausalLM`` fed from windows tokenized once (the run's
  cache), in a seeded order.

Each variant is built once; then they take turns, ``--steps`` steps each per
round, so the machine's drift hits all of them alike; the first round
(tracing) is left out and the median round counts. Tokens/s counts
``batch x window`` per step. It prints what it measured and on what.

With ``--backend`` it compares Keras backends instead, on the minigpt variant:

    python benchmarks/train.py --train books/train.txt --vocab runs/books/vocab.txt --backend tensorflow jax torch

Each backend trains in a process of its own (``KERAS_BACKEND`` is fixed per
process) with the same config, the same NumPy-drawn initial weights, the same
batches and steps, fed and compiled as ``minigpt train`` does it (``tf.data``
and XLA on TensorFlow, NumPy batches and ``jax.jit`` on JAX, NumPy batches
and eager steps on PyTorch; ``--jit`` overrides). The processes take turns
round by round, one working at a time, so drift hits all alike; round 0 is
one step (compiling), left out, its time beyond a median step shown as the
compile time. The last loss should agree across backends.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parent))

import backends  # noqa: E402


def step_times():
    """A Keras callback that records when each training batch ends (in ``.times``)."""
    import keras

    class StepTimes(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times: list[float] = []

        def on_train_batch_end(self, batch, logs=None):
            self.times.append(time.perf_counter())

    return StepTimes()


def reference_variant(train_file: Path, vocab: list[str]):
    """The KerasHub example's pipeline and model, verbatim but for the file and the vocabulary."""
    import keras
    import keras_hub
    import tensorflow as tf

    tokenizer = keras_hub.tokenizers.WordPieceTokenizer(vocabulary=vocab, sequence_length=128, lowercase=True)
    packer = keras_hub.layers.StartEndPacker(sequence_length=128, start_value=tokenizer.token_to_id("[BOS]"))

    def preprocess(inputs):
        outputs = tokenizer(inputs)
        return packer(outputs), outputs

    ds = (
        tf.data.TextLineDataset(str(train_file))
        .filter(lambda x: tf.strings.length(x) > 512)
        .batch(64)
        .shuffle(buffer_size=256)
        .map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
        .repeat()
    )
    keras.utils.set_random_seed(0)
    inputs = keras.layers.Input(shape=(None,), dtype="int32")
    x = keras_hub.layers.TokenAndPositionEmbedding(
        vocabulary_size=len(vocab), sequence_length=128, embedding_dim=256, mask_zero=True
    )(inputs)
    for _ in range(2):
        x = keras_hub.layers.TransformerDecoder(num_heads=3, intermediate_dim=128)(x)
    model = keras.Model(inputs=inputs, outputs=keras.layers.Dense(len(vocab))(x))
    perplexity = keras_hub.metrics.Perplexity(from_logits=True, mask_token_id=0)
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[perplexity],
    )
    return model, ds


def minigpt_variant(train_file: Path, vocab: list[str], cache: Path, xla: bool = False, precision: str = "float32"):
    import keras

    from minigpt_cli.config import load_config
    from minigpt_cli.model import build_model
    from minigpt_cli.train import compile_model
    from minigpt_cli.vocab import make_tokenizer
    from minigpt_cli.windows import Batches, load_windows

    cfg = load_config(None, [])
    windows = load_windows(cache, vocab, make_tokenizer(vocab), [train_file], "reference", 128, 512, True).windows
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(precision)
    model = build_model(len(vocab), cfg.model)
    compile_model(model, cfg, 10_000)
    keras.mixed_precision.set_global_policy("float32")
    model.jit_compile = xla
    return model, Batches(windows, 64, seed=0).feed(0, None)


def in_process(args) -> None:
    """The reference against minigpt (and, with ``--all``, its XLA and bf16 variants) on the current backend."""
    from generate import machine

    from minigpt_cli.vocab import load_vocabulary

    vocab = load_vocabulary(args.vocab)
    print(f"machine: {machine()}")
    print(
        f"data: {args.train}, vocabulary {len(vocab)} tokens; batch 64 x window 128; "
        f"{args.rounds} rounds of {args.steps} steps per variant, variants taking turns; "
        "round 0 (tracing, warm-up) is left out"
    )
    builders = {
        "reference": lambda: reference_variant(args.train, vocab),
        "minigpt": lambda: minigpt_variant(args.train, vocab, args.cache),
    }
    if args.all:
        builders["minigpt + XLA"] = lambda: minigpt_variant(args.train, vocab, args.cache, xla=True)
        builders["minigpt + bf16"] = lambda: minigpt_variant(args.train, vocab, args.cache, precision="mixed_bfloat16")
    variants = {name: build() for name, build in builders.items()}
    per_step: dict[str, list[float]] = {name: [] for name in variants}
    for round_ in range(args.rounds + 1):
        for name, (model, ds) in variants.items():
            times = step_times()
            start = time.perf_counter()
            model.fit(ds, steps_per_epoch=args.steps, epochs=1, verbose=0, callbacks=[times])
            if round_:
                per_step[name].append((times.times[-1] - start) / args.steps)
    base = statistics.median(per_step["reference"])
    for name, values in per_step.items():
        s = statistics.median(values)
        model = variants[name][0]
        print(
            f"{name:15s}: {model.count_params():,} parameters, median {s:.3f} s/step "
            f"(rounds: {', '.join(f'{v:.3f}' for v in values)}), {64 * 128 / s:,.0f} tokens/s, "
            f"{base / s:.2f}x the reference, last loss {float(model.history.history['loss'][-1]):.3f}"
        )


# ---------------------------------------------------------------- backends side by side


class Trainer:
    """A child's side: the minigpt variant on this process's backend, trained ``steps`` at a time."""

    def __init__(self, args):
        self.args = args
        self.model = self.batches = None
        self.position = 0

    def build(self, request: dict) -> dict:
        import keras

        from minigpt_cli.config import load_config
        from minigpt_cli.model import build_model
        from minigpt_cli.train import compilation, compile_model
        from minigpt_cli.vocab import load_vocabulary, make_tokenizer
        from minigpt_cli.windows import Batches, load_windows

        args = self.args
        vocab = load_vocabulary(args.vocab)
        cfg = load_config(None, [])
        windows = load_windows(
            args.cache, vocab, make_tokenizer(vocab), [args.train], "reference", cfg.model.seq_len,
            cfg.data.min_string_len, True,
        )  # fmt: skip
        keras.utils.set_random_seed(0)
        keras.mixed_precision.set_global_policy(args.precision)
        model = build_model(len(vocab), cfg.model)
        compile_model(model, cfg, 10_000)
        keras.mixed_precision.set_global_policy("float32")
        backends.same_weights(model, seed=0)
        model.jit_compile = backends.train_jit(args.jit)
        self.model, self.batches = model, Batches(windows.windows, cfg.data.batch_size, seed=0)
        return {
            **backends.describe(),
            "parameters": model.count_params(),
            "compiled": compilation(model.jit_compile),
            "batch": cfg.data.batch_size,
            "window": cfg.model.seq_len,
        }

    def train(self, request: dict) -> dict:
        steps = request["steps"]
        seconds, loss = backends.timed(lambda: backends.fit_steps(self.model, self.batches, self.position, steps))
        self.position += steps
        return {"seconds": seconds, "loss": loss}


def side_by_side(args) -> None:
    """The minigpt variant on each of ``args.backend``, in child processes taking turns; one table."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    child_args = ["--train", str(args.train), "--vocab", str(args.vocab), "--cache", str(args.cache),
                  "--precision", args.precision, "--jit", args.jit]  # fmt: skip
    children = backends.start(Path(__file__), args.backend, child_args, build={})
    try:
        info, first = backends.built_on(children, console)
        console.print(
            f"data: {args.train}, minigpt variant ({first.get('parameters', 0):,} parameters), batch "
            f"{first.get('batch', '?')} x window {first.get('window', '?')}, precision {args.precision}, "
            f"same initial weights on every backend; {args.rounds} rounds of {args.steps} steps per backend, "
            "backends taking turns (the order rotating), one at a time; a first round of one step (compiling) is "
            "left out, its time beyond a median step shown as compile s"
        )
        # Round 0 is one step: the compile, and the step it runs.
        steps = [{"do": "train", "steps": args.steps}]
        runs = backends.take_turns(children, args.rounds + 1, lambda r: steps if r else [{"do": "train", "steps": 1}])
    finally:
        for child in children:
            child.close()
    table = Table()
    for col in ("backend", "compiled", "compile s", "s/step (median)", "best", "rounds s/step", "tokens/s",
                "vs tensorflow", "last loss"):  # fmt: skip
        table.add_column(col, justify="right")
    medians = {}
    for child in children:
        rounds = [r[0] for r in runs[child.backend]]
        if child.failed or len(rounds) < 2:
            continue
        per_step = [r["seconds"] / args.steps for r in rounds[1:]]
        medians[child.backend] = statistics.median(per_step)
    base = medians.get("tensorflow")
    for child in children:
        if child.backend not in medians:
            table.add_row(child.backend, "failed", *[""] * 7)
            continue
        rounds = [r[0] for r in runs[child.backend]]
        s = medians[child.backend]
        compile_s = max(0.0, rounds[0]["seconds"] - s)
        table.add_row(
            child.backend,
            info[child.backend]["compiled"],
            f"{compile_s:.1f}",
            f"{s:.3f}",
            f"{min(r['seconds'] for r in rounds[1:]) / args.steps:.3f}",
            ", ".join(f"{r['seconds'] / args.steps:.3f}" for r in rounds[1:]),
            f"{info[child.backend]['batch'] * info[child.backend]['window'] / s:,.0f}",
            f"{base / s:.2f}x" if base else "",
            f"{rounds[-1]['loss']:.4f}",
        )
    console.print(table)
    failed = [child for child in children if child.failed]
    for child in failed:
        console.print(f"{child.backend} failed: {child.failed}")
    if failed:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help="training text (SimpleBooks' raw layout)")
    parser.add_argument("--vocab", type=Path, required=True, help="a vocab.txt made by 'minigpt vocab'")
    parser.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds; variants take turns within each")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench-train-cache"))
    parser.add_argument("--all", action="store_true", help="also time minigpt with XLA and with mixed bf16")
    backends.add_argument(parser)
    parser.add_argument(
        "--precision", default="float32", choices=["float32", "mixed_bfloat16"], help="with --backend: the policy"
    )
    parser.add_argument(
        "--jit", default="auto", choices=["auto", "true", "false"],
        help="with --backend: model.jit_compile as train.jit_compile sets it (auto: XLA on TensorFlow and JAX, "
        "eager PyTorch; true on PyTorch is torch.compile)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.child:
        trainer = Trainer(args)
        backends.serve({"build": trainer.build, "train": trainer.train})
    elif args.backend:
        side_by_side(args)
    else:
        in_process(args)


if __name__ == "__main__":
    main()
