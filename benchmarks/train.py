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

import keras  # noqa: E402


class StepTimes(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def on_train_batch_end(self, batch, logs=None):
        self.times.append(time.perf_counter())


def reference_variant(train_file: Path, vocab: list[str]):
    """The KerasHub example's pipeline and model, verbatim but for the file and the vocabulary."""
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
    from minigpt_cli.config import load_config
    from minigpt_cli.model import build_model
    from minigpt_cli.train import compile_model
    from minigpt_cli.vocab import make_tokenizer
    from minigpt_cli.windows import Batches, load_windows

    cfg = load_config(None, [])
    windows, _ = load_windows(cache, vocab, make_tokenizer(vocab), [train_file], "reference", 128, 512, True)
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(precision)
    model = build_model(len(vocab), cfg.model)
    compile_model(model, cfg, 10_000)
    keras.mixed_precision.set_global_policy("float32")
    model.jit_compile = xla
    return model, Batches(windows, 64, seed=0).dataset(0, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help="training text (SimpleBooks' raw layout)")
    parser.add_argument("--vocab", type=Path, required=True, help="a vocab.txt made by 'minigpt vocab'")
    parser.add_argument("--steps", type=int, default=20, help="steps per variant per round")
    parser.add_argument("--rounds", type=int, default=4, help="rounds; variants take turns within each")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench-train-cache"))
    parser.add_argument("--all", action="store_true", help="also time minigpt with XLA and with mixed bf16")
    args = parser.parse_args()

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
            times = StepTimes()
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


if __name__ == "__main__":
    main()
