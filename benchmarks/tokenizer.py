"""FastWordPieceTokenizer against KerasHub's WordPieceTokenizer: the same ids, and how fast each gives them.

    python benchmarks/tokenizer.py --text books/train.txt --vocab runs/quickstart/vocab.txt

Every line of ``--text`` is tokenized by ``MiniGPTTokenizer`` on KerasHub's TensorFlow path (a ``tf.function``
over batches of lines, as the token cache of ``minigpt train`` runs it: the ids the model learns) and by
``minigpt_cli.fast_tokenizer.FastWordPieceTokenizer.tokenize_batch`` over the same batches; the ids of every
line must be equal. With ``--eager`` KerasHub's eager path joins in (what ``MiniGPTTokenizer("text")`` runs
outside a ``tf.function``: pure Python since KerasHub 0.32). ``lowercase`` comes from ``vocab.json`` beside
``vocab.txt`` (true without one). It prints the machine, the lines compared, the lines that differ (and the
first few), the tokens, and each tokenizer's seconds (wall and CPU, the best of ``--repeat`` runs taken in
turns) and lines/s. The fast tokenizer starts each run with empty caches, as in a new process; its "warm"
row is a second pass of one tokenizer over the text.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hardware import cpu_name  # noqa: E402

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--text", type=Path, required=True, help="a UTF-8 text file; every line is tokenized")
    parser.add_argument("--vocab", type=Path, required=True, help="a vocab.txt (vocab.json beside it: lowercase)")
    parser.add_argument("--batch", type=int, default=1024, help="lines per call (default 1024)")
    parser.add_argument("--lines", type=int, default=0, help="only the first N lines (default all)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, in turns; the best counts (default 3)")
    parser.add_argument("--eager", action="store_true", help="time KerasHub's eager (pure Python) path too, once")
    args = parser.parse_args()

    import numpy as np
    import tensorflow as tf

    from minigpt_cli.fast_tokenizer import FastWordPieceTokenizer
    from minigpt_cli.vocab import MiniGPTTokenizer, load_vocabulary, settings_path

    vocab = load_vocabulary(args.vocab)
    settings = settings_path(args.vocab)
    lowercase = bool(json.loads(settings.read_text())["lowercase"]) if settings.is_file() else True
    with open(args.text, encoding="utf-8") as f:
        lines = [line.rstrip("\r\n") for line in f]
    if args.lines:
        lines = lines[: args.lines]
    batches = [lines[i : i + args.batch] for i in range(0, len(lines), args.batch)]
    mb = sum(len(line.encode()) for line in lines) / 1e6
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; tensorflow {tf.__version__}")
    print(f"text: {args.text} ({len(lines):,} lines, {mb:.1f} MB); vocab: {args.vocab} ({len(vocab):,} tokens, "
          f"lowercase={lowercase}); {args.batch} lines per call")  # fmt: skip

    reference = MiniGPTTokenizer(vocabulary=vocab, lowercase=lowercase, _allow_python_workflow=False)
    graph = tf.function(reference.tokenize, input_signature=[tf.TensorSpec([None], tf.string)])
    graph(tf.constant(lines[:2] or [""]))  # trace outside the timing

    def keras_hub_tf() -> list[list[int]]:
        out = []
        for batch in batches:
            ragged = graph(tf.constant(batch))
            ids, splits = ragged.flat_values.numpy(), ragged.row_splits.numpy()
            out += [ids[splits[i] : splits[i + 1]].tolist() for i in range(len(batch))]
        return out

    t0 = time.perf_counter()
    FastWordPieceTokenizer(vocab, lowercase=lowercase)
    build_s = time.perf_counter() - t0
    warm = FastWordPieceTokenizer(vocab, lowercase=lowercase)

    def fast_path(tok=None) -> list[list[int]]:
        tok = tok or FastWordPieceTokenizer(vocab, lowercase=lowercase)  # its caches empty, as in a new process
        return [ids.tolist() for batch in batches for ids in tok.tokenize_batch(batch)]

    runs = {"KerasHub, TensorFlow path": keras_hub_tf, "FastWordPieceTokenizer": fast_path}
    runs["FastWordPieceTokenizer, warm"] = lambda: fast_path(warm)  # its second pass over the text
    if args.eager:
        eager = MiniGPTTokenizer(vocabulary=vocab, lowercase=lowercase)
        runs["KerasHub, eager path"] = lambda: [np.asarray(ids).tolist() for b in batches for ids in eager(b)]
    fast_path(warm)
    results, seconds, cpu = {}, {name: float("inf") for name in runs}, {name: float("inf") for name in runs}
    for _ in range(args.repeat):  # in turns, so that the machine's drift hits all alike; the best of each
        for name, run in runs.items():
            if name == "KerasHub, eager path" and name in results:
                continue  # minutes: once is enough
            t0, c0 = time.perf_counter(), time.process_time()
            results[name] = run()
            seconds[name] = min(seconds[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)

    names = list(runs)
    want = results[names[0]]
    print(f"lines compared: {len(lines):,}; tokens: {sum(map(len, want)):,}; distinct chunks {len(warm._chunk_ids):,}, "
          f"words {len(warm._word_ids):,}; building FastWordPieceTokenizer: {build_s * 1000:.0f} ms")  # fmt: skip
    for name in names[1:]:
        differ = [i for i, ids in enumerate(results[name]) if ids != want[i]]
        print(f"lines that differ, {name} against {names[0]}: {len(differ)}")
        for i in differ[:5]:
            print(f"  line {i + 1}: {lines[i][:80]!r}\n    want {want[i][:20]}\n    got  {results[name][i][:20]}")
    print(f"{'tokenizer':<32}{'seconds':>9}{'CPU s':>8}{'lines/s':>11}{'MB/s':>8}{'speed-up':>10}")
    for name in names:
        s, ratio = seconds[name], seconds[names[0]] / seconds[name]
        print(f"{name:<32}{s:>9.2f}{cpu[name]:>8.2f}{len(lines) / s:>11,.0f}{mb / s:>8.2f}{ratio:>9.1f}x")


if __name__ == "__main__":
    main()
