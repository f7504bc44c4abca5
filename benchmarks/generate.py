"""Generation speed: the reference's uncached loop against minigpt's, side by side.

Same weights, same sampler, same prompt ([BOS]) and length, in one run:

    python benchmarks/generate.py --run-dir runs/simplebooks     # a trained run
    python benchmarks/generate.py                                # random reference-size weights
    python benchmarks/generate.py --run-dir runs/simplebooks --cli   # + whole-command timings
    python benchmarks/generate.py --top-p-vs-top-k               # top-p against top-k, several p and T
    python benchmarks/generate.py --backend tensorflow jax torch # ours on each Keras backend, side by side

The reference loop is the KerasHub example's: ``model(prompt)[:, index - 1, :]``
on the whole window for every new token, run eagerly. Ours is the model's
cached ``generate_step`` in one compiled function (XLA and plain graph).
Top-p speed depends on how peaked the model's distribution is: random
weights give a flat one (the worst case), a trained run a peaked one.
``--top-p-vs-top-k`` times top-p at several ``p`` and temperatures against
top-k (``k=10``) at the same temperature, XLA and graph, in interleaved
rounds (the best of ``--repeat`` counts), each function compiled once.

``--backend`` runs ours (``Generator``, ``--jit`` as ``minigpt generate``'s
``generate.jit_compile``) on each backend in a process of its own, with the
same weights (the run's, or the same NumPy-drawn random ones), taking turns
round by round; round 0 (compiling) gives the compile seconds, the median of
the later rounds the tokens/s. Greedy tokens are compared with the first
backend's.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parent))

import backends  # noqa: E402

SAMPLERS = ("greedy", "random", "topk", "topp", "beam")


def machine() -> str:
    """The CPU, Python, Keras and the backend this process runs on, with its devices."""
    return backends.machine([backends.describe()])


def load(run_dir: Path | None, seed: int, same_everywhere: bool = False):
    """The model, its tokenizer and where the weights came from: a trained run, or random reference-size weights
    (``same_everywhere``: drawn by NumPy, the same on every backend)."""
    import keras

    from minigpt_cli.config import ModelConfig
    from minigpt_cli.model import build_model, load_model
    from minigpt_cli.vocab import load_vocabulary, make_tokenizer

    if run_dir is None:
        keras.utils.set_random_seed(seed)
        vocab = ["[PAD]", "[UNK]", "[BOS]"] + [f"tok{i}" for i in range(4997)]
        model = build_model(len(vocab), ModelConfig())
        if same_everywhere:
            backends.same_weights(model, seed)
        source = "random weights" + (", the same on every backend" if same_everywhere else "")
        return model, make_tokenizer(vocab), source
    vocab = load_vocabulary(run_dir / "vocab.txt")
    return load_model(run_dir / "model.keras", len(vocab)), make_tokenizer(vocab), str(run_dir)


def reference_loop(model, spec, new_tokens: int) -> tuple[float, list[int]]:
    """The reference example's generation, timed: seconds and the new token ids."""
    import keras
    import numpy as np

    from minigpt_cli.generate import reference_next

    prompt = np.zeros((1, new_tokens + 1), dtype="int32")
    prompt[0, 0] = 2
    sampler = spec.build()
    t0 = time.perf_counter()
    out = sampler(next=reference_next(model), prompt=keras.ops.convert_to_tensor(prompt), index=1)
    seconds = time.perf_counter() - t0
    return seconds, np.asarray(out)[0, 1:].tolist()


def best_reference(model, spec, new_tokens: int, repeat: int) -> tuple[float, list[int]]:
    """The fastest of ``repeat`` runs of the reference loop, as ours is timed: seconds and the new token ids."""
    return min((reference_loop(model, spec, new_tokens) for _ in range(repeat)), key=lambda r: r[0])


def speed(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from minigpt_cli.generate import Generator
    from minigpt_cli.samplers import SamplerSpec

    model, tokenizer, source = load(args.run_dir, args.seed)
    console = Console()
    console.print(f"machine: {machine()}")
    console.print(
        f"model: {model.count_params():,} parameters ({source}); {args.tokens} new tokens from [BOS]; "
        f"best of {args.repeat} runs for each"
    )
    table = Table()
    for col in (
        "sampler",
        "reference tok/s",
        "ours XLA tok/s",
        "XLA compile s",
        "ours graph tok/s",
        "graph compile s",
        "XLA / reference",
        "greedy ids equal",
    ):
        table.add_column(col, justify="right")
    for name in args.samplers:
        spec = SamplerSpec(name, k=10, p=0.5, num_beams=10, seed=args.seed)
        ref_seconds, ref_ids = best_reference(model, spec, args.tokens, args.repeat)
        ref_tps = args.tokens / ref_seconds
        results = {}
        for mode in ("true", "false"):
            gen = Generator(model, tokenizer, jit_compile=mode)
            runs = [gen.run([""], spec, args.tokens)[0] for _ in range(args.repeat)]
            best = min(runs, key=lambda s: s.seconds)
            results[mode] = (args.tokens / best.seconds, statistics.median(r.compile_seconds for r in runs), best)
        same = "yes" if name == "greedy" and results["true"][2].token_ids == ref_ids else ""
        if name == "greedy" and not same:
            same = "NO"
        table.add_row(
            name,
            f"{ref_tps:,.1f}",
            f"{results['true'][0]:,.0f}",
            f"{results['true'][1]:.2f}",
            f"{results['false'][0]:,.0f}",
            f"{results['false'][1]:.2f}",
            f"{results['true'][0] / ref_tps:,.0f}x",
            same,
        )
    console.print(table)
    if args.cli:
        one_shot(args, console)


REFERENCE_ONE_SHOT = """
import sys, os
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
from pathlib import Path
sys.path.insert(0, {bench!r})
from generate import load, reference_loop
from minigpt_cli.generate import Generator
from minigpt_cli.samplers import SamplerSpec
model, tokenizer, _ = load(Path({run!r}), 0)
_, ids = reference_loop(model, SamplerSpec("topk", k=10, seed=1), {tokens})
print(Generator(model, tokenizer).detokenize(ids))
"""


def one_shot(args, console) -> None:
    """What a user waits for: the whole command, start to printed text."""
    if args.run_dir is None:
        console.print("--cli needs --run-dir (a trained run)")
        return
    minigpt = [sys.executable, "-m", "minigpt_cli", "generate", "--run-dir", str(args.run_dir)]
    commands = {
        "minigpt generate (default: graph, no XLA)": minigpt
        + ["--sampler", "topk", "--seed", "1", "--max-tokens", "80"],
        "minigpt generate with XLA": minigpt
        + ["--sampler", "topk", "--seed", "1", "--max-tokens", "80", "--set", "generate.jit_compile=true"],
        "same program, reference loop": [
            sys.executable,
            "-c",
            REFERENCE_ONE_SHOT.format(bench=str(Path(__file__).parent), run=str(args.run_dir), tokens=80),
        ],
    }
    for label, cmd in commands.items():
        to_text, total = [], []
        for _ in range(args.cli_repeat):
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            text = proc.stdout.readline()
            to_text.append(time.perf_counter() - t0)
            proc.communicate()
            total.append(time.perf_counter() - t0)
            if proc.returncode != 0 or not text.strip():
                raise SystemExit(f"{label} failed (exit {proc.returncode})")
        console.print(
            f"{label}: {statistics.median(to_text):.2f}s to the printed text, "
            f"{statistics.median(total):.2f}s to exit (median of {args.cli_repeat}; 80 tokens, top-k)"
        )


def sampler_loop(model, sampler, xla: bool):
    """The model's cached KerasHub loop (``generate_step``) with ``sampler``, in one ``tf.function``."""
    import tensorflow as tf

    model.sampler = sampler
    spec = {
        "token_ids": tf.TensorSpec([None, None], tf.int32),
        "padding_mask": tf.TensorSpec([None, None], tf.bool),
    }
    return tf.function(
        lambda x: model.generate_step(x)["token_ids"], jit_compile=xla, input_signature=[spec], autograph=False
    )


def top_p_vs_top_k(args) -> None:
    """Top-p's tokens/s against top-k's at the same temperature; ratio = top-p / top-k."""
    import numpy as np
    import tensorflow as tf
    from rich.console import Console
    from rich.table import Table

    from minigpt_cli.samplers import SamplerSpec
    from minigpt_cli.vocab import BOS

    tf.get_logger().setLevel("ERROR")  # one tf.function per sampler is the point here, not a retracing bug
    model, tokenizer, source = load(args.run_dir, args.seed)
    console = Console()
    console.print(f"machine: {machine()}")
    console.print(
        f"model: {model.count_params():,} parameters ({source}); {args.tokens} new tokens from [BOS], batch 1; "
        f"best of {args.repeat} interleaved rounds; top-k k={args.k}; ratio = top-p tok/s / top-k tok/s"
    )
    token_ids = np.zeros((1, args.tokens + 1), dtype="int32")
    token_ids[0, 0] = tokenizer.token_to_id(BOS)
    mask = np.zeros_like(token_ids, dtype=bool)
    mask[0, 0] = True
    inputs = {"token_ids": tf.constant(token_ids), "padding_mask": tf.constant(mask)}
    table = Table()
    for col in ["mode", "T", "top-k tok/s"] + [f"top-p {p:g}" for p in args.ps]:
        table.add_column(col, justify="right")
    worst = float("inf")
    for xla in (True, False):
        for t in args.temperatures:
            specs = [SamplerSpec("topk", k=args.k, temperature=t, seed=args.seed)] + [
                SamplerSpec("topp", p=p, temperature=t, seed=args.seed) for p in args.ps
            ]
            fns = []
            for spec in specs:
                fn = sampler_loop(model, spec.build(), xla)
                fn(inputs).numpy()  # compile (XLA) or trace (graph) now, while the model holds this sampler
                fns.append(fn)
            best = [float("inf")] * len(fns)
            for _ in range(args.repeat):  # interleaved: a noisy moment hits every sampler alike
                for i, fn in enumerate(fns):
                    t0 = time.perf_counter()
                    fn(inputs).numpy()
                    best[i] = min(best[i], time.perf_counter() - t0)
            tps = [args.tokens / s for s in best]
            ratios = [x / tps[0] for x in tps[1:]]
            worst = min(worst, *ratios)
            cells = [f"{x:,.0f} ({r:.2f}x)" for x, r in zip(tps[1:], ratios, strict=True)]
            table.add_row("XLA" if xla else "graph", f"{t:g}", f"{tps[0]:,.0f}", *cells)
    console.print(table)
    console.print(f"slowest top-p / top-k: {worst:.2f}x (top-k is {1 / worst:.2f}x as fast)")


class Sampling:
    """A child's side: ``Generator`` on this process's backend, one sampler run per request."""

    def __init__(self, args):
        self.args = args
        self.gen = None

    def build(self, request: dict) -> dict:
        from minigpt_cli.generate import Generator

        model, tokenizer, source = load(self.args.run_dir, self.args.seed, same_everywhere=True)
        self.gen = Generator(model, tokenizer, jit_compile=self.args.jit)
        return {**backends.describe(), "parameters": model.count_params(), "source": source}

    def generate(self, request: dict) -> dict:
        from minigpt_cli.samplers import SamplerSpec

        spec = SamplerSpec(request["sampler"], k=10, p=0.5, num_beams=10, seed=self.args.seed)
        sample = self.gen.run([""], spec, request["tokens"])[0]
        return {"seconds": sample.seconds, "compile": sample.compile_seconds, "ids": sample.token_ids}


def side_by_side(args) -> None:
    """Generation tokens/s and compile seconds per sampler on each of ``args.backend``; one table."""
    from rich.console import Console

    console = Console(width=200)
    child_args = ["--seed", str(args.seed), "--jit", args.jit]
    if args.run_dir is not None:
        child_args += ["--run-dir", str(args.run_dir)]
    children = backends.start(Path(__file__), args.backend, child_args, build={})
    try:
        info, first = backends.built_on(children, console)
        console.print(
            f"model: {first.get('parameters', 0):,} parameters ({first.get('source', '?')}); {args.tokens} new tokens "
            f"from [BOS], batch 1; generate.jit_compile={args.jit}; {args.repeat} rounds per backend after a "
            "compiling round 0, backends taking turns (the order rotating), one at a time; median round"
        )
        requests = [{"do": "generate", "sampler": name, "tokens": args.tokens} for name in args.samplers]
        runs = backends.take_turns(children, args.repeat + 1, lambda r: requests)
    finally:
        for child in children:
            child.close()
    done = [c.backend for c in children if not c.failed and len(runs[c.backend]) > 1]
    if done:
        console.print(rate_table(args, runs, done))
    failed = [child for child in children if child.failed]
    for child in failed:
        console.print(f"{child.backend} failed: {child.failed}")
    if failed:
        raise SystemExit(1)


def rate_table(args, runs: dict[str, list[list[dict]]], done: list[str]):
    """Per sampler: each backend's median tokens/s and round 0's compile seconds, ratios to TensorFlow (else
    the first backend), and whether greedy search chose the same tokens."""
    from rich.table import Table

    base = "tensorflow" if "tensorflow" in done else done[0]
    others = [b for b in done if b != base]
    table = Table()
    table.add_column("sampler")
    for backend in done:
        table.add_column(f"{backend} tok/s", justify="right")
        table.add_column(f"{backend} compile s", justify="right")
    for backend in others:
        table.add_column(f"{backend} / {base}", justify="right")
    table.add_column(f"greedy ids = {base}'s", justify="right")
    for i, name in enumerate(args.samplers):
        rates, cells = {}, []
        for backend in done:
            rounds = [r[i] for r in runs[backend]]
            rates[backend] = statistics.median(args.tokens / max(r["seconds"], 1e-9) for r in rounds[1:])
            cells += [f"{rates[backend]:,.0f}", f"{rounds[0]['compile']:.2f}"]
        cells += [f"{rates[b] / rates[base]:.2f}x" for b in others]
        same = ""
        if name == "greedy":
            ids = {b: runs[b][-1][i]["ids"] for b in done}
            same = ", ".join(
                b + (": yes" if ids[b] == ids[base] else f": first {_common(ids[b], ids[base])} of {len(ids[base])}")
                for b in others
            )  # fmt: skip
        table.add_row(name, *cells, same)
    return table


def _common(a: list[int], b: list[int]) -> int:
    """How many leading ids two token lists share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=None, help="a trained run (default: random weights)")
    parser.add_argument("--tokens", type=int, default=127, help="new tokens from [BOS] (default 127)")
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=SAMPLERS)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of the reference and of ours per mode; the fastest counts"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cli", action="store_true", help="also time whole generate commands")
    parser.add_argument("--cli-repeat", type=int, default=3)
    parser.add_argument(
        "--top-p-vs-top-k", action="store_true", help="time top-p against top-k instead of the reference loop"
    )
    parser.add_argument("--ps", type=float, nargs="+", default=[0.5, 0.9, 0.95, 1.0], help="top-p's p values")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0, 1.5])
    parser.add_argument("--k", type=int, default=10, help="top-k's k for --top-p-vs-top-k")
    backends.add_argument(parser)
    parser.add_argument(
        "--jit", default="auto", choices=["auto", "true", "false"],
        help="with --backend: generate.jit_compile (auto: XLA for long jobs only, as minigpt generate)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.child:
        sampling = Sampling(args)
        backends.serve({"build": sampling.build, "generate": sampling.generate})
    elif args.backend:
        side_by_side(args)
    elif args.top_p_vs_top_k:
        top_p_vs_top_k(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
