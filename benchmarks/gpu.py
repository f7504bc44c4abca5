"""Training and generation speed of the reference mini-GPT on a GPU, on JAX, without TensorFlow (issue 12).

    python benchmarks/gpu.py --cache DIR/windows-reference-KEY.bin --vocab DIR/vocab.txt [--json FILE]
    python benchmarks/gpu.py --run-dir runs/simplebooks        # its vocab.txt and its largest cache file
    python benchmarks/gpu.py --quick [--cache ... --vocab ...]  # a CPU smoke run: tiny model, few steps

HOW TO RUN IT ON THE DEVICE (an H200 with Python 3.12, JAX (CUDA) and PyTorch, no TensorFlow; nothing
can be downloaded there). Here, once, in the repository root:

  1. Wheels of what the device lacks: keras, keras-hub and their dependencies that are not there
     (namex, pure Python; optree, a cp312 binary). The rest (numpy, absl-py, h5py, ml-dtypes, packaging,
     regex, rich, tokenizers, typer) is there. `.whl/` is in .gitignore.

       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
         -d .whl keras==3.15.1 keras-hub==0.32.0 namex==0.1.0 optree==0.20.0

  2. The token cache (made here, where TensorFlow tokenizes) and its vocabulary, in an ignored folder:

       echo /.devdata/ >> .git/info/exclude; mkdir -p .devdata
       minigpt vocab -c configs/simplebooks.toml -r runs/gpu-bench --set data.train=books/train.txt \
         --set data.valid=books/valid.txt --set vocab.learner=tokenizers
       minigpt train -r runs/gpu-bench --set train.epochs=1 --set train.steps_per_epoch=1 \
         --set train.validation_steps=1      # tokenizes into cache/ first (about 2 minutes on 2 cores)
       cp runs/gpu-bench/vocab.txt runs/gpu-bench/cache/windows-reference-*.bin \
         runs/gpu-bench/cache/windows-reference-*.json .devdata/   # the larger .bin is the training text's

     (books/ = /work/shared/data/books, 12 MB: 6,642 windows, 1.7 MB. SimpleBooks-92's cache, where there is
     one, works the same; the speed per step does not depend on the text.)

  3. One device call (carry [".whl", ".devdata"], timeout_s 480; it ends in under 6 minutes on an H200):

       python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site
         .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 &&
         python3 benchmarks/gpu.py --cache "$(ls -S .devdata/*.bin | head -1)" --vocab .devdata/vocab.txt
         --json $OUT/gpu.json 2>&1 | tee $OUT/gpu.log

What it measures, for the reference config (``configs/simplebooks.toml``'s shapes: window 128, embedding
256, feed-forward 128, 3 heads, 2 layers; the vocabulary's size), at float32 and mixed_bfloat16, batch 64
and 512, each after a compiling warm-up, as the median of ``--rounds`` rounds of ``--steps`` steps:

- ``fit``: ``model.fit`` fed by ``Batches.feed`` from the token cache, as ``minigpt train`` trains;
- ``fit x16``: the same with ``steps_per_execution = 16`` (16 steps per compiled call): what Keras'
  per-step work in Python costs;
- ``step``: Keras' jitted ``train_step`` called in a loop on one batch already on the GPU: the floor.

Then cached generation (``Generator``, XLA) per sampler: 127 new tokens from [BOS], batch 1, with the
weights of the float32 / batch 64 model. It reports against the goals: batch 64 float32 within 1.25x of
1.93 ms/step (a stand-alone JAX probe), and the reference's 5 epochs x 2,445 steps in under a minute.
TensorFlow is blocked from the start (a ``tensorflow*`` import fails as if it were not installed), so
the run also shows that nothing on the way needs it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import backends  # noqa: E402

GUARD = backends.block_tensorflow()
os.environ["KERAS_BACKEND"] = "jax"

SAMPLERS = ("greedy", "beam", "random", "topk", "topp")
PROBE_MS = 1.93  # a stand-alone JAX training step of the reference model, batch 64, float32 (ms)
GOAL_RATIO = 1.25
REFERENCE_STEPS = 5 * 2445  # the reference: 5 epochs of SimpleBooks-92 at batch 64
GOAL_SECONDS = 60.0


def load_data(args) -> tuple[list[str], object, str]:
    """The vocabulary, the training windows (from the token cache, via ``minigpt_cli.windows``) and a note."""
    import numpy as np

    from minigpt_cli import windows as w
    from minigpt_cli.vocab import load_vocabulary

    cache, vocab_path = args.cache, args.vocab
    if args.run_dir is not None:
        vocab_path = vocab_path or args.run_dir / "vocab.txt"
        found = sorted((args.run_dir / "cache").glob("*.bin"), key=lambda p: p.stat().st_size)
        if not found and not args.quick:
            raise SystemExit(f"no token cache in {args.run_dir / 'cache'}: run 'minigpt train' on it first")
        cache = cache or (found[-1] if found else None)
    if cache is not None:
        vocab_path = vocab_path or cache.parent / "vocab.txt"
    if vocab_path is None or not Path(vocab_path).is_file():
        if not args.quick:
            raise SystemExit(f"no vocab.txt ({vocab_path}); give --vocab or --run-dir")
        vocab = ["[PAD]", "[UNK]", "[BOS]"] + [f"tok{i}" for i in range(297)]
    else:
        vocab = load_vocabulary(Path(vocab_path))
    if cache is None:
        rng = np.random.default_rng(0)
        ids = rng.integers(3, len(vocab), size=(256, args.seq_len + 1), dtype=np.int32)
        return vocab, ids, "random token ids (no --cache)"
    try:
        meta = json.loads(cache.with_suffix(".json").read_text(encoding="utf-8"))
        kind, shape = meta["windows"], meta["shape"]
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"cannot read the sidecar of {cache} ({e}); copy the .json beside the .bin") from None
    seq_len = shape[1] - 1 if kind == "reference" else args.seq_len
    mapped = w._open_cache(cache, kind, seq_len, len(vocab))  # checks size, sha256 and the ids' range
    if mapped is None:
        raise SystemExit(f"{cache} is damaged or does not belong to {vocab_path} ({len(vocab)} tokens)")
    windows = mapped.ids if kind == "reference" else w.packed_windows(mapped.ids, seq_len)
    if windows.shape[1] - 1 != args.seq_len:
        raise SystemExit(f"{cache} holds windows of {windows.shape[1] - 1} tokens, not the model's {args.seq_len}")
    return vocab, windows, f"{cache.name}: {len(windows):,} {kind} windows"


def model_config(args):
    from minigpt_cli.config import ModelConfig

    if args.quick:
        return ModelConfig(seq_len=args.seq_len, embed_dim=16, feed_forward_dim=16, num_heads=2, num_layers=1)
    return ModelConfig(seq_len=args.seq_len, embed_dim=256, feed_forward_dim=128, num_heads=3, num_layers=2)


def build(vocab_size: int, args, precision: str):
    import keras

    from minigpt_cli.config import load_config
    from minigpt_cli.model import build_model
    from minigpt_cli.train import compile_model

    cfg = load_config(None, [])
    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy(precision)
    try:
        model = build_model(vocab_size, model_config(args))
        compile_model(model, cfg, 100_000)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    model.jit_compile = backends.train_jit(cfg.train.jit_compile)  # as minigpt train: jax.jit
    return model


def time_fit(model, batches, args, position: int) -> tuple[float, list[float], float, int]:
    """Compile seconds, seconds per step of each timed round, the last loss, and the next batch's position."""
    warm = args.steps_per_execution if model.steps_per_execution > 1 else 2
    compile_s, _ = backends.timed(lambda: backends.fit_steps(model, batches, position, warm))
    position += warm
    per_step, loss = [], float("nan")
    for _ in range(args.rounds):
        seconds, loss = backends.timed(lambda p=position: backends.fit_steps(model, batches, p, args.steps))
        per_step.append(seconds / args.steps)
        position += args.steps
    return compile_s, per_step, loss, position


def time_step(model, batches, args) -> tuple[float, list[float]]:
    """Keras' jitted ``train_step`` in a loop on one batch on the device: compile seconds, seconds per step."""
    import jax
    import jax.numpy as jnp

    state = model._get_jax_state(  # the trainer's own state layout; copied, so the model's buffers survive
        trainable_variables=True, non_trainable_variables=True, optimizer_variables=True, metrics_variables=True
    )
    state = jax.tree.map(jnp.copy, state)
    data = jax.device_put(batches.batch(0))
    step = jax.jit(model.train_step, donate_argnums=0)

    def run(state, n):
        for _ in range(n):
            _, state = step(state, data)
        jax.block_until_ready(state)
        return state

    t0 = time.perf_counter()
    state = run(state, 1)
    compile_s = time.perf_counter() - t0
    per_step = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        state = run(state, args.steps)
        per_step.append((time.perf_counter() - t0) / args.steps)
    return compile_s, per_step


def train_rows(vocab, windows, args, out: dict, console):
    from minigpt_cli.windows import Batches

    rows, kept = [], None
    for precision in ("float32", "mixed_bfloat16"):
        for batch in args.batches:
            if time.perf_counter() - START > args.max_seconds * 0.6:
                console.print(f"skipped {precision} batch {batch}: past 60% of --max-seconds {args.max_seconds}")
                continue
            batches = Batches(windows, batch, seed=0)
            model = build(len(vocab), args, precision)
            row = {"precision": precision, "batch": batch, "parameters": model.count_params()}
            row["fit_compile_s"], fit, row["loss"], position = time_fit(model, batches, args, 0)
            row["fit_ms"] = 1000 * statistics.median(fit)
            row["fit_rounds_ms"] = [round(1000 * s, 3) for s in fit]
            model.steps_per_execution, model.train_function = args.steps_per_execution, None
            row["fit16_compile_s"], fit16, _, _ = time_fit(model, batches, args, position)
            row["fit16_ms"] = 1000 * statistics.median(fit16)
            model.steps_per_execution, model.train_function = 1, None
            row["step_compile_s"], step = time_step(model, batches, args)
            row["step_ms"] = 1000 * statistics.median(step)
            row["tokens_per_s"] = batch * args.seq_len / (row["fit_ms"] / 1000)
            rows.append(row)
            console.print(
                f"  {precision} batch {batch}: fit {row['fit_ms']:.2f} ms/step, fit x{args.steps_per_execution} "
                f"{row['fit16_ms']:.2f}, step {row['step_ms']:.2f}; compile {row['fit_compile_s']:.1f} s"
            )
            if precision == "float32" and kept is None:
                kept = model
            else:
                del model
    out["train"] = rows
    return rows, kept


def generation_rows(model, vocab, args, out: dict, console):
    from minigpt_cli.generate import Generator
    from minigpt_cli.samplers import SamplerSpec
    from minigpt_cli.vocab import make_tokenizer

    gen = Generator(model, make_tokenizer(vocab), jit_compile="true")
    tokens = args.seq_len - 1
    rows = []
    for name in SAMPLERS:
        if time.perf_counter() - START > args.max_seconds * 0.9:
            console.print(f"skipped {name}: past 90% of --max-seconds {args.max_seconds}")
            continue
        spec = SamplerSpec(name, k=10, p=0.5, num_beams=10, seed=0)
        first = gen.run([""], spec, tokens)[0]
        runs = [gen.run([""], spec, tokens)[0] for _ in range(args.gen_repeat)]
        rate = statistics.median(tokens / max(s.seconds, 1e-9) for s in runs)
        rows.append({"sampler": name, "tokens": tokens, "tokens_per_s": rate, "compile_s": first.compile_seconds,
                     "ms_per_token": 1000 / rate})  # fmt: skip
        console.print(f"  {name}: {rate:,.0f} tokens/s, compile {first.compile_seconds:.1f} s")
    out["generate"] = rows
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="a token cache file: windows-reference-*.bin or tokens-packed-*.bin")
    parser.add_argument("--vocab", type=Path, help="its vocab.txt (default: beside the cache, or the run's)")
    parser.add_argument("--run-dir", type=Path, help="a run: its vocab.txt and its largest cache file")
    parser.add_argument("--quick", action="store_true", help="a smoke run on a CPU: tiny model, few steps")
    parser.add_argument("--steps", type=int, help="steps per timed round (default 192; --quick 4)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 3; --quick 2)")
    parser.add_argument("--gen-repeat", type=int, help="timed generations per sampler (default 3; --quick 1)")
    parser.add_argument("--steps-per-execution", type=int, default=16, help="steps per call of the 'fit xN' column")
    parser.add_argument("--max-seconds", type=float, default=330, help="skip what is left past this (default 330)")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    args.steps = args.steps or (4 if args.quick else 192)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.gen_repeat = args.gen_repeat or (1 if args.quick else 3)
    args.batches = (8, 16) if args.quick else (64, 512)
    args.seq_len = 128
    if args.quick:
        args.steps_per_execution = 2
    if args.steps % args.steps_per_execution:
        raise SystemExit(f"--steps {args.steps} is not a multiple of --steps-per-execution {args.steps_per_execution}")
    if args.cache is not None and args.cache.suffix != ".bin":
        raise SystemExit(f"--cache takes a .bin cache file, got {args.cache}")

    import jax
    from rich.console import Console
    from rich.table import Table

    console = Console(width=200)
    info = backends.describe()
    gpu = any(d.platform == "gpu" for d in jax.devices())
    console.print(f"machine: {backends.machine([info])}; device 0: {jax.devices()[0].device_kind}")
    if not gpu and not args.quick:
        console.print("note: no GPU visible to JAX: these are CPU numbers")
    vocab, windows, source = load_data(args)
    console.print(
        f"data: {source}; vocabulary {len(vocab):,} tokens; model "
        f"{'tiny (--quick)' if args.quick else 'reference (configs/simplebooks.toml shapes)'}; "
        f"{args.rounds} rounds of {args.steps} steps after a compiling warm-up, median round"
    )
    out: dict = {"machine": backends.machine([info]), "device": jax.devices()[0].device_kind, "data": source,
                 "quick": args.quick}  # fmt: skip
    console.print("training:")
    rows, model = train_rows(vocab, windows, args, out, console)
    console.print("generation:")
    gens = generation_rows(model, vocab, args, out, console) if model is not None else []

    table = Table(title="training: ms/step")
    for col in ("precision", "batch", "fit ms", f"fit x{args.steps_per_execution} ms", "step ms (floor)",
                "fit tokens/s", "compile s", "last loss"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["precision"], str(r["batch"]), f"{r['fit_ms']:.2f}", f"{r['fit16_ms']:.2f}",
                      f"{r['step_ms']:.2f}", f"{r['tokens_per_s']:,.0f}", f"{r['fit_compile_s']:.1f}",
                      f"{r['loss']:.4f}")  # fmt: skip
    console.print(table)
    table = Table(title=f"generation: XLA, batch 1, {args.seq_len - 1} tokens")
    for col in ("sampler", "tokens/s", "ms/token", "compile s"):
        table.add_column(col, justify="right")
    for g in gens:
        table.add_row(g["sampler"], f"{g['tokens_per_s']:,.0f}", f"{g['ms_per_token']:.2f}", f"{g['compile_s']:.1f}")
    console.print(table)

    goals = {}
    for r in rows:
        if r["batch"] == args.batches[0]:
            for kind in ("fit", "fit16", "step"):
                ms = r[f"{kind}_ms"]
                goals[f"{r['precision']} {kind}"] = {
                    "ms_per_step": ms, "x_probe": ms / PROBE_MS, "reference_run_s": REFERENCE_STEPS * ms / 1000,
                }  # fmt: skip
    out["goals"] = goals
    if goals and not args.quick:
        console.print(
            f"goals: batch 64 within {GOAL_RATIO}x of the {PROBE_MS} ms/step probe "
            f"(<= {GOAL_RATIO * PROBE_MS:.2f} ms); "
            f"{REFERENCE_STEPS:,} steps (5 x 2,445) in under {GOAL_SECONDS:.0f} s (training steps only)"
        )
        for name, g in goals.items():
            ok_ratio = "met" if g["x_probe"] <= GOAL_RATIO else "missed"
            ok_time = "met" if g["reference_run_s"] < GOAL_SECONDS else "missed"
            console.print(
                f"  {name:22s} {g['ms_per_step']:6.2f} ms/step = {g['x_probe']:.2f}x the probe ({ok_ratio}); "
                f"5 x 2,445 steps in {g['reference_run_s']:.0f} s ({ok_time})"
            )
    tf_loaded = [m for m in sys.modules if m.split(".")[0].startswith("tensorflow")]
    ours = [r for r in GUARD.refused if "minigpt_cli" in r]
    console.print(
        f"TensorFlow: {'imported: ' + tf_loaded[0] if tf_loaded else 'never imported'}; "
        f"{len(GUARD.refused)} optional imports of it refused and survived"
        + (f", {len(ours)} by minigpt_cli ({'; '.join(sorted(set(ours)))})" if ours else "")
    )
    out["tensorflow_refused"] = GUARD.refused
    out["seconds"] = time.perf_counter() - START
    console.print(f"total {out['seconds']:.0f} s")
    if args.json:
        from minigpt_cli.runs import write_text

        write_text(args.json, json.dumps(out, indent=2) + "\n")


START = time.perf_counter()

if __name__ == "__main__":
    main()
