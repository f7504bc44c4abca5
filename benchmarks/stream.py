"""Streaming speed: time to first token, and streamed tokens/s against the batch path's, side by side.

    python benchmarks/stream.py --run-dir runs/simplebooks     # a trained run
    python benchmarks/stream.py                                # random reference-size weights

For each compile mode (plain graph, XLA) and sampler, on the same model and
prompt ([BOS]), interleaved and best of ``--repeat``:

- first token, cold: the first ``Generator.stream`` call of a fresh
  generator (it traces or compiles the loop) until its first piece of text;
- first token, warm: a later call (the loop is compiled, as in every ``chat``
  turn after the first) until the first token is made, and until the first
  piece of text is printed (a piece holds back the last two words);
- streamed tokens/s and the batch path's (``Generator.run``), and their ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parent))

from generate import load, machine  # noqa: E402  (benchmarks/generate.py)


def first_piece(stream) -> tuple[float, float, int]:
    """Seconds to the first token, to the first printed piece, and the tokens made, for one stream."""
    t0 = time.perf_counter()
    first = None
    for _ in stream:
        if first is None:
            first = time.perf_counter() - t0
    return stream.first_token_seconds, first if first is not None else float("nan"), len(stream.sample.token_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=None, help="a trained run (default: random weights)")
    parser.add_argument("--tokens", type=int, default=127, help="new tokens from [BOS] (default 127)")
    parser.add_argument("--samplers", nargs="+", default=["greedy", "topk", "topp"])
    parser.add_argument("--modes", nargs="+", default=["false", "true"], help="jit_compile values")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    from minigpt_cli.generate import Generator
    from minigpt_cli.samplers import SamplerSpec

    model, tokenizer, source = load(args.run_dir, 0)
    print(f"machine: {machine()}")
    print(f"model: {source}, {model.count_params():,} parameters; {args.tokens} new tokens from [BOS]; "
          f"best of {args.repeat}, interleaved")  # fmt: skip
    header = (f"{'mode':6} {'sampler':7} {'cold 1st tok':>12} {'warm 1st tok':>12} {'warm 1st text':>13} "
              f"{'stream tok/s':>12} {'batch tok/s':>11} {'ratio':>6}")  # fmt: skip
    print(header)
    for mode in args.modes:
        for name in args.samplers:
            spec = SamplerSpec(name, k=10, p=0.5, seed=1)
            gen = Generator(model, tokenizer, jit_compile=mode)
            cold_token, _, _ = first_piece(gen.stream("", spec, args.tokens))
            warm_token = warm_text = float("inf")
            stream_rate = batch_rate = 0.0
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                token, text, made = first_piece(gen.stream("", spec, args.tokens))
                stream_rate = max(stream_rate, made / (time.perf_counter() - t0))
                warm_token, warm_text = min(warm_token, token), min(warm_text, text)
                batch_rate = max(batch_rate, gen.run([""], spec, args.tokens)[0].tokens_per_second)
            print(f"{'xla' if mode == 'true' else 'graph':6} {name:7} {cold_token * 1000:10.0f}ms "
                  f"{warm_token * 1000:10.1f}ms {warm_text * 1000:11.1f}ms {stream_rate:12,.0f} {batch_rate:11,.0f} "
                  f"{stream_rate / batch_rate:6.0%}")  # fmt: skip


if __name__ == "__main__":
    main()
