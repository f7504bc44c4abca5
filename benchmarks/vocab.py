"""Vocabulary learners side by side: speed, memory, [UNK] share, and the quality of the split at equal steps.

    python benchmarks/vocab.py --train books/train.txt --valid books/valid.txt --size 3000 5000 --steps 400 \\
        --out /tmp/vocab-bench

For each size, each learner (``keras-hub``, the reference's; ``tokenizers``,
Hugging Face's WordPiece trainer) learns a vocabulary from the same text with
``minigpt vocab``'s ``build_vocabulary`` in a process of its own: the seconds
of learning (as the command reports them, without starting Python and
TensorFlow), MB/s over the training files, the process's peak RSS (``wait4``;
in brackets, its RSS before learning, with TensorFlow loaded), and the share
of ``[UNK]`` among the tokens of the validation text. Then, unless
``--learn-only``, a model of the config's shape (``configs/quickstart.toml``
by default: its window, model and recipe) trains ``--steps`` steps on each
vocabulary with the same seed, and ``minigpt evaluate`` scores the validation
text. Bits per character compare across vocabularies: they count the text's
characters, not its tokens. Learners take turns, so the machine's drift hits
both alike. It prints what it measured and on what, and writes
``results.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hardware import cpu_name  # noqa: E402

LEARNERS = ("keras-hub", "tokenizers")
ROOT = Path(__file__).resolve().parents[1]


# ``minigpt vocab`` (the config, the run folder and ``--set`` pairs as arguments), reporting in JSON what the
# command prints rounded, the RSS before learning (Python, TensorFlow and KerasHub loaded) and the CPU seconds
# of all threads while learning (and counting [UNK] on the validation text).
LEARN = """
import json, resource, sys
from pathlib import Path
from minigpt_cli.config import load_config
from minigpt_cli.runs import RunDir
from minigpt_cli.vocab import build_vocabulary
cfg = load_config(Path(sys.argv[1]), sys.argv[3:])
before = resource.getrusage(resource.RUSAGE_SELF)
report = build_vocabulary(cfg, RunDir(Path(sys.argv[2])).create())
after = resource.getrusage(resource.RUSAGE_SELF)
cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
print(json.dumps({**report.__dict__, "base_rss_kib": before.ru_maxrss, "cpu_s": cpu}))
"""


def minigpt(args: list[str], log: Path, python: list[str] | None = None) -> tuple[str, float, float]:
    """Run ``minigpt ARGS`` (or ``python ARGS``); stdout, wall seconds and peak RSS in MiB; stops if it fails."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", COLUMNS="200")
    t0 = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, *(python or ["-m", "minigpt_cli"]), *args],
            stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=ROOT,
        )  # fmt: skip
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not every child's so far
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"minigpt {' '.join(args[:1])} failed ({proc.returncode}); see {log}:\n{log.read_text()[-2000:]}")
    return out, seconds, usage.ru_maxrss / 1024


def sets(pairs: list[str]) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def learn(a: argparse.Namespace, size: int, learner: str, megabytes: float) -> dict:
    """``minigpt vocab`` with ``learner``: what it measured."""
    run = a.out / f"{size}-{learner}"
    common = [f"data.train={a.train}", f"data.valid={a.valid}", f"vocab.size={size}", f"vocab.learner={learner}"]
    out, wall, rss = minigpt([a.config, str(run), *common], a.out / f"{run.name}.vocab.log", python=["-c", LEARN])
    got = json.loads(out.strip().splitlines()[-1])
    assert got["learner"] == learner, got
    print(f"  learned {run.name}: {got['size']} tokens in {got['seconds']:.2f}s ({wall:.1f}s in all)", flush=True)
    return {"size": size, "learner": learner, "run": str(run), "common": common, "tokens": got["size"],
            "learn_s": got["seconds"], "cpu_s": got["cpu_s"], "vocab_wall_s": wall,
            "mb_per_s": megabytes / got["seconds"],
            "peak_rss_mib": rss, "base_rss_mib": got["base_rss_kib"] / 1024,
            "unk_share": got["unknown_share"]}  # fmt: skip


def train_and_score(a: argparse.Namespace, row: dict) -> None:
    """``--steps`` steps of the config's recipe on the row's vocabulary, then bits/char on the validation text."""
    run = Path(row["run"])
    recipe = [*row["common"], f"train.steps_per_epoch={a.steps}", "train.epochs=1", "train.validation_steps=1",
              "train.sample_each_epoch=false", "train.checkpoint_every=0"]  # fmt: skip
    _, wall, _ = minigpt(["train", "-c", a.config, "-r", str(run), *sets(recipe)], a.out / f"{run.name}.train.log")
    out, _, _ = minigpt(["evaluate", "-r", str(run), "--data", a.valid, "--json"], a.out / f"{run.name}.eval.log")
    scored = json.loads(out.strip().splitlines()[-1])
    row.update(train_wall_s=wall, steps=a.steps, bits_per_char=scored["bits_per_character"], val_loss=scored["loss"],
               val_tokens=scored["tokens"])  # fmt: skip
    print(f"  trained {run.name}: {a.steps} steps in {wall:.0f}s, {row['bits_per_char']:.4f} bits/char", flush=True)


def report(a: argparse.Namespace, results: list[dict]) -> None:
    trained = not a.learn_only
    head = (f"{'size':>5} {'learner':<11} {'tokens':>6} {'learn s':>8} {'CPU s':>7} {'MB/s':>7} "
            f"{'peak RSS (before)':>18} {'[UNK] valid':>11}")  # fmt: skip
    print(head + (f" {'bits/char @' + str(a.steps):>15} {'val tokens':>10}" if trained else ""))
    for r in results:
        line = (f"{r['size']:>5} {r['learner']:<11} {r['tokens']:>6} {r['learn_s']:>8.2f} {r['cpu_s']:>7.1f} "
                f"{r['mb_per_s']:>7.2f} "
                f"{r['peak_rss_mib']:>6,.0f} ({r['base_rss_mib']:>4,.0f}) MiB {r['unk_share']:>11.4%}")  # fmt: skip
        print(line + (f" {r['bits_per_char']:>15.4f} {r['val_tokens']:>10,}" if trained else ""))
    print()
    for size in a.size:
        ref, fast = (next(r for r in results if r["size"] == size and r["learner"] == n) for n in LEARNERS)
        line = f"vocab {size}: tokenizers is {ref['learn_s'] / fast['learn_s']:.1f}x faster"
        line += f" ({ref['cpu_s'] / fast['cpu_s']:.1f}x less CPU)"
        line += f", peak RSS x{fast['peak_rss_mib'] / ref['peak_rss_mib']:.2f}"
        line += f", [UNK] {fast['unk_share']:.4%} vs {ref['unk_share']:.4%}"
        if trained:
            delta = fast["bits_per_char"] / ref["bits_per_char"] - 1
            line += f", bits/char {delta:+.2%} ({'at most' if delta <= 0.01 else 'MORE than'} 1% worse)"
        print(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True, help="training text (file, folder or glob)")
    p.add_argument("--valid", required=True, help="validation text")
    p.add_argument("--size", type=int, nargs="+", default=[3000], help="vocabulary sizes (default 3000)")
    p.add_argument("--steps", type=int, default=400, help="training steps per run (default 400)")
    p.add_argument("--config", default=str(ROOT / "configs" / "quickstart.toml"), help="shape and recipe")
    p.add_argument("--out", type=Path, required=True, help="a new folder for the runs and results.json")
    p.add_argument("--learn-only", action="store_true", help="time the learners only; no training")
    a = p.parse_args()
    if a.out.exists() and any(a.out.iterdir()):
        sys.exit(f"--out {a.out} is not empty; give a new folder")
    a.out.mkdir(parents=True, exist_ok=True)
    from minigpt_cli.data import expand_paths

    megabytes = sum(f.stat().st_size for f in expand_paths(a.train, "--train")) / 1e6
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} at start")
    print(f"text: {a.train} ({megabytes:.1f} MB), validation {a.valid}; config {a.config}")
    results = [learn(a, size, learner, megabytes) for size in a.size for learner in LEARNERS]
    if not a.learn_only:
        for row in results:
            train_and_score(a, row)
    print(f"load average {os.getloadavg()[0]:.1f} at the end\n")
    report(a, results)
    summary = {"machine": cpu_name(), "cores": os.cpu_count(), "megabytes": megabytes, "steps": a.steps,
               "config": a.config, "results": results}  # fmt: skip
    (a.out / "results.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
