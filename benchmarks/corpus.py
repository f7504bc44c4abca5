"""Build a large benchmark corpus from ../shared/data/books: ~500 MB of real prose, not one file repeated.

Each copy of ``train.txt`` has its paragraphs (lines) in a new seeded order, so no two copies are alike byte for
byte; ``valid.txt`` is copied as it is. The result has SimpleBooks' raw layout (one paragraph per line)::

    python benchmarks/corpus.py --out /tmp/corpus500 --mb 500
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from pathlib import Path

BOOKS = Path(__file__).resolve().parents[2] / "shared" / "data" / "books"


def build(books: Path, out: Path, megabytes: float, seed: int = 0) -> Path:
    """Write ``out/train.txt`` (about ``megabytes`` MB) and ``out/valid.txt``; returns ``out``."""
    text = (books / "train.txt").read_text(encoding="utf-8")
    lines = [line for line in text.split("\n") if line.strip()]  # minigpt's lines: split at "\n" only
    target = int(megabytes * 1e6)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "train.txt.part"
    written, copy = 0, 0
    with tmp.open("w", encoding="utf-8") as f:
        while written < target:
            order = lines[:]
            random.Random(seed * 1_000_003 + copy).shuffle(order)
            text = "\n".join(order) + "\n"
            f.write(text)
            written += len(text.encode("utf-8"))
            copy += 1
    tmp.replace(out / "train.txt")
    shutil.copyfile(books / "valid.txt", out / "valid.txt")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--books", type=Path, default=BOOKS)
    parser.add_argument("--out", type=Path, default=Path("/tmp/corpus500"))
    parser.add_argument("--mb", type=float, default=500.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    out = build(args.books, args.out, args.mb, args.seed)
    size = (out / "train.txt").stat().st_size
    print(f"{out / 'train.txt'}: {size / 1e6:,.1f} MB in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
