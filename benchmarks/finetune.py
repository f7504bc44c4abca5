"""Fine-tune against from scratch, at equal steps, on books the parent never saw.

    python benchmarks/finetune.py --books ../shared/data/books --out /tmp/finetune-bench

``train.txt`` is split at the blank line (a book boundary) nearest its middle:
the parent learns its vocabulary and trains on the first half; then, on the
second half (every 20th paragraph held out for validation), a run fine-tuned
from the parent (``train --init-from``) and a run from scratch on the same
vocabulary train for the same steps with the same recipe. Both are scored
with ``minigpt evaluate`` on the held-out paragraphs and on ``valid.txt``
(other books again). Everything runs through the real CLI; the model is
``configs/quickstart.toml``'s shape and recipe. It prints what it measured
and on what.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def minigpt(*args: object) -> str:
    result = subprocess.run([sys.executable, "-m", "minigpt_cli", *map(str, args)], capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"minigpt {' '.join(map(str, args))} failed:\n{result.stderr}")
    return result.stdout


def split_books(train: Path, out: Path) -> dict[str, Path]:
    """The first books, the other books' paragraphs, and every 20th of those held out."""
    lines = train.read_text(encoding="utf-8").splitlines(keepends=True)
    blanks = [i for i, line in enumerate(lines) if not line.strip()]
    cut = min(blanks, key=lambda i: abs(i - len(lines) // 2))
    second = [line for line in lines[cut:] if line.strip()]
    parts = {
        "a": "".join(lines[:cut]),
        "b": "".join(line for i, line in enumerate(second) if i % 20),
        "b_valid": "".join(line for i, line in enumerate(second) if i % 20 == 0),
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in parts.items():
        paths[name] = out / f"{name}.txt"
        paths[name].write_text(text, encoding="utf-8")
    return paths


def sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--books", type=Path, default=ROOT.parent / "shared" / "data" / "books")
    parser.add_argument("--out", type=Path, default=Path("/tmp/finetune-bench"))
    parser.add_argument("--parent-steps", type=int, default=1200)
    parser.add_argument("--steps", type=int, default=300, help="steps of the fine-tuned and the scratch run")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    texts = split_books(args.books / "train.txt", args.out / "text")
    config = ROOT / "configs" / "quickstart.toml"
    common = ["train.sample_each_epoch=false", "train.epochs=1", "train.validation_steps=20"]
    parent, tuned, scratch = args.out / "parent", args.out / "finetuned", args.out / "scratch"

    t0 = time.perf_counter()
    data_a = [f"data.train={texts['a']}", f"data.valid={args.books / 'valid.txt'}"]
    minigpt("vocab", "-c", config, "-r", parent, *sets(*data_a))
    minigpt("train", "-c", config, "-r", parent, *sets(*data_a, *common, f"train.steps_per_epoch={args.parent_steps}"))
    parent_seconds = time.perf_counter() - t0

    data_b = [f"data.train={texts['b']}", f"data.valid={texts['b_valid']}"]
    child = [*data_b, *common, f"train.steps_per_epoch={args.steps}"]
    t0 = time.perf_counter()
    log = subprocess.run(
        [sys.executable, "-m", "minigpt_cli", "train", "-c", config, "-r", tuned, "--init-from", parent, *sets(*child)],
        capture_output=True, text=True,
    )  # fmt: skip
    if log.returncode:
        sys.exit(log.stderr)
    tuned_seconds = time.perf_counter() - t0
    unk = next((line for line in log.stderr.splitlines() if "[UNK] share" in line), "")
    scratch.mkdir(parents=True)
    for name in ("vocab.txt", "vocab.json"):
        shutil.copy(parent / name, scratch / name)
    t0 = time.perf_counter()
    minigpt("train", "-c", config, "-r", scratch, *sets(*child))
    scratch_seconds = time.perf_counter() - t0

    def score(run: Path, data: Path) -> dict:
        return json.loads(minigpt("evaluate", "-r", run, "--data", data, "--json"))

    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    a_mb, b_mb = (texts[k].stat().st_size / 1e6 for k in ("a", "b"))
    print(f"parent: {a_mb:.1f} MB (first books), {args.parent_steps} steps, {parent_seconds:.0f} s with its vocab")
    print(f"new text: {b_mb:.1f} MB (the other books); {unk.split(': ', 1)[-1]}")
    print(f"both runs: {args.steps} steps, quickstart shape and recipe, the parent's vocabulary")
    print(f"{'run':<11} {'held-out loss':>13} {'ppl':>8} {'bits/char':>9} {'valid.txt ppl':>13} {'seconds':>8}")
    for name, run, seconds in (("scratch", scratch, scratch_seconds), ("fine-tuned", tuned, tuned_seconds)):
        held, other = score(run, texts["b_valid"]), score(run, args.books / "valid.txt")
        print(
            f"{name:<11} {held['loss']:>13.4f} {held['perplexity']:>8.2f} {held['bits_per_character']:>9.4f} "
            f"{other['perplexity']:>13.2f} {seconds:>8.0f}"
        )
    held = score(parent, texts["b_valid"])
    print(f"{'parent':<11} {held['loss']:>13.4f} {held['perplexity']:>8.2f} {held['bits_per_character']:>9.4f}")


if __name__ == "__main__":
    main()
