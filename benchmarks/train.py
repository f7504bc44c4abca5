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

Tokens/s counts ``batch x window`` per step and leaves out the first
``--warmup`` steps (tracing). It prints what it measured and on what.
"""

from __future__ import annotations

import argparse
import os
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


def reference_run(train_file: Path, vocab: list[str], steps: int):
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
    times = StepTimes()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[times])
    return model.count_params(), times.times, float(model.history.history["loss"][-1])


def minigpt_run(train_file: Path, vocab: list[str], steps: int, cache: Path):
    from minigpt_cli.config import load_config
    from minigpt_cli.model import build_model
    from minigpt_cli.train import compile_model
    from minigpt_cli.vocab import make_tokenizer
    from minigpt_cli.windows import Batches, load_windows

    cfg = load_config(None, [])
    windows, _ = load_windows(cache, vocab, make_tokenizer(vocab), [train_file], "reference", 128, 512, True)
    keras.utils.set_random_seed(0)
    model = build_model(len(vocab), cfg.model)
    compile_model(model, cfg, steps)
    times = StepTimes()
    ds = Batches(windows, 64, seed=0).dataset(0, None)
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[times])
    return model.count_params(), times.times, float(model.history.history["loss"][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=Path, required=True, help="training text (SimpleBooks' raw layout)")
    parser.add_argument("--vocab", type=Path, required=True, help="a vocab.txt made by 'minigpt vocab'")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the timing")
    parser.add_argument("--cache", type=Path, default=Path("runs/bench-train-cache"))
    args = parser.parse_args()

    from generate import machine

    from minigpt_cli.vocab import load_vocabulary

    vocab = load_vocabulary(args.vocab)
    print(f"machine: {machine()}")
    print(f"data: {args.train}, vocabulary {len(vocab)} tokens; batch 64 x window 128; {args.steps} steps each")
    results = {}
    for name, fn in (("reference", lambda: reference_run(args.train, vocab, args.steps)),
                     ("minigpt", lambda: minigpt_run(args.train, vocab, args.steps, args.cache))):  # fmt: skip
        start = time.perf_counter()
        params, times, loss = fn()
        timed = times[args.warmup :]
        seconds = timed[-1] - timed[0]
        tps = (len(timed) - 1) * 64 * 128 / seconds
        results[name] = tps
        print(
            f"{name:9s}: {params:,} parameters, {seconds / (len(timed) - 1):.3f} s/step, {tps:,.0f} tokens/s, "
            f"last loss {loss:.3f}, {time.perf_counter() - start:.1f}s in all"
        )
    print(f"minigpt / reference tokens/s: {results['minigpt'] / results['reference']:.2f}x")


if __name__ == "__main__":
    main()
