"""minigpt at corpus scale: vocab, tokenize, train and evaluate on books (12 MB) and a 500 MB corpus, side by side.

    python benchmarks/corpus.py --out /tmp/corpus500 --mb 500      # builds the large corpus from books
    python benchmarks/scale.py --corpus books=../shared/data/books --corpus 500mb=/tmp/corpus500

Each corpus folder holds ``train.txt`` and ``valid.txt``. For each, through the real CLI, in this order:
``minigpt vocab``; ``minigpt train`` (its first lines tokenize the text into the run's token cache; then
``--steps`` training steps of the packed reference model); ``minigpt train`` again on the cache (one step, to
time a start that reads the cache back); ``minigpt evaluate`` on ``valid.txt``. Every command is timed, and its
peak memory (resident set) is sampled ten times a second: the command's own process, and the sum over it and
the processes it starts (the tokenizing processes). It prints a table and the ratios of the large corpus to the
first one.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hardware import cpu_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = [int(c) for t in Path(f"/proc/{p}/task").iterdir()
                    for c in (t / "children").read_text().split()]  # fmt: skip
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


@dataclass
class Measured:
    seconds: float
    peak_mb: float  # the command's own process
    tree_peak_mb: float  # it and every process it started, summed
    stderr: str


def measure(args: list[str]) -> Measured:
    """Run ``minigpt ARGS``, sampling its memory; raise if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "minigpt_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, COLUMNS="200"))  # fmt: skip
    peak = tree = 0
    done = threading.Event()

    def sample():
        nonlocal peak, tree
        while not done.is_set():
            own = _rss_kb(proc.pid)
            peak = max(peak, own)
            tree = max(tree, own + sum(_rss_kb(p) for p in _descendants(proc.pid)))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"minigpt {' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    return Measured(seconds, peak / 1024, tree / 1024, err + out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", action="append", required=True, help="NAME=FOLDER with train.txt, valid.txt")
    parser.add_argument("--out", type=Path, default=Path("/tmp/minigpt-scale"))
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "simplebooks-packed.toml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--learner", default="tokenizers")
    parser.add_argument("--set", action="append", default=[], dest="sets", help="more --set for every command")
    args = parser.parse_args()

    rows = []
    for spec in args.corpus:
        name, folder = spec.split("=", 1)
        folder = Path(folder)
        run = args.out / name
        if run.exists():
            raise SystemExit(f"{run} exists; remove it or pick another --out")
        megabytes = (folder / "train.txt").stat().st_size / 1e6
        sets = [f"data.train={folder / 'train.txt'}", f"data.valid={folder / 'valid.txt'}",
                f"vocab.learner={args.learner}", "train.epochs=1", "train.validation_steps=20",
                "train.sample_each_epoch=false", "train.checkpoint_every=0", *args.sets]  # fmt: skip
        common = ["-c", str(args.config), "--run-dir", str(run)]
        for s in sets:
            common += ["--set", s]
        print(f"{name}: {megabytes:,.1f} MB of training text", flush=True)
        vocab = measure(["vocab", *common])
        train = measure(["train", *common, "--set", f"train.steps_per_epoch={args.steps}"])
        tokenized = re.search(r"tokenized data\.train: ([\d,.]+) MB in ([\d.]+)s \(([\d.]+) MB/s\)", train.stderr)
        step = re.search(r"epoch \d+/\d+:.* ([\d,]+) tok/s", train.stderr)
        again = measure(["train", *common, "--set", "train.steps_per_epoch=1", "--set", "train.validation_steps=1"])
        evaluate = measure(["evaluate", "--run-dir", str(run), "--data", str(folder / "valid.txt")])
        rows.append((name, megabytes, vocab, train, tokenized, step, again, evaluate))
        tok_s = tokenized.group(2) if tokenized else "?"
        print(f"  vocab {vocab.seconds:.1f}s, train {train.seconds:.1f}s (tokenizing {tok_s}s), "
              f"restart from the cache {again.seconds:.1f}s, evaluate {evaluate.seconds:.1f}s", flush=True)  # fmt: skip

    print(f"\n{cpu_name()}, {os.cpu_count()} cores; {args.steps} steps of {args.config.name}, learner {args.learner}")
    print(f"{'corpus':>8} {'MB':>7} | {'step':<22} {'seconds':>8} {'MB/s':>7} {'peak RSS MB':>12} {'with workers':>13}")
    for name, megabytes, vocab, train, tokenized, step, again, evaluate in rows:
        tok = f"{float(tokenized.group(3)):.1f}" if tokenized else "?"
        for label, m, rate in [
            ("vocab", vocab, f"{megabytes / vocab.seconds:.1f}"),
            (f"train (tokenize + {args.steps} steps)", train, tok),
            ("train from the cache", again, ""),
            ("evaluate valid.txt", evaluate, ""),
        ]:
            print(f"{name:>8} {megabytes:7.1f} | {label:<22} {m.seconds:8.1f} {rate:>7} {m.peak_mb:12.0f} "
                  f"{m.tree_peak_mb:13.0f}")  # fmt: skip
        if tokenized:
            print(f"{'':>18}   tokenizing: {tokenized.group(1)} MB in {tokenized.group(2)} s; "
                  f"training {step.group(1) if step else '?'} tok/s")  # fmt: skip
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        train_ratio = last[3].peak_mb / max(first[3].peak_mb, 1e-9)
        tree_ratio = last[3].tree_peak_mb / max(first[3].tree_peak_mb, 1e-9)
        print(f"\n{last[0]} / {first[0]}: text {last[1] / first[1]:.1f}x; peak RSS of train {train_ratio:.2f}x "
              f"(with workers {tree_ratio:.2f}x), of vocab {last[2].peak_mb / first[2].peak_mb:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
