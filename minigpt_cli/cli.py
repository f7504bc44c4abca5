"""The ``minigpt`` command: one thin function per subcommand."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from minigpt_cli.config import SAMPLERS, Config, Windows, all_keys, dumps, load_config
from minigpt_cli.errors import MinigptError
from minigpt_cli.runs import RunDir, write_text

app = typer.Typer(
    help="Train small GPT language models from scratch on plain text, and generate text from them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file (see configs/).")]
RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", "-r", help="Run directory (default: runs/<config name>).")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable)."),
]


@contextlib.contextmanager
def _quiet_native_stderr():
    """Silence the C++ start-up lines TensorFlow prints before its logging is set up."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _load_tensorflow() -> None:
    with _quiet_native_stderr():
        import tensorflow as tf

        tf.config.list_physical_devices()
        tf.get_logger().setLevel("ERROR")
        import keras_hub  # noqa: F401


def _trained_runs(root: Path = Path("runs")) -> list[Path]:
    return sorted(p.parent for p in root.glob("*/model.keras")) if root.is_dir() else []


def _setup(
    config: Path | None, run_dir: Path | None, overrides: list[str] | None, find_trained: bool = False
) -> tuple[Config, RunDir]:
    """Resolve the run directory and the config (the run's own config when none is given).

    ``-c runs/x/config.toml`` (a run's own config) acts on ``runs/x``. With
    ``find_trained``, a bare command (no ``-c``, no ``-r``) and no
    ``runs/default`` uses the one trained run under ``runs/``, and says so.
    """
    own_config = config is not None and config.name == "config.toml" and (config.parent / "vocab.txt").is_file()
    if run_dir is None and own_config:
        run_dir = config.parent
    if run_dir is None and config is None and find_trained and not Path("runs/default").exists():
        found = _trained_runs()
        if len(found) == 1:
            run_dir = found[0]
            err.print(f"note: using the trained run {run_dir} (the only one under runs/)")
        elif found:
            raise MinigptError(
                f"{len(found)} trained runs under runs/ ({', '.join(p.name for p in found)}); choose one with -r"
            )
    root = run_dir or Path("runs") / (config.stem if config else "default")
    run = RunDir(root)
    if config is None and run.config.is_file():
        config = run.config
    return load_config(config, overrides or []), run


def _command(name: str, config: Path | None, run_dir: Path | None, overrides: list[str] | None) -> str:
    """The command line of ``minigpt NAME`` with these options, quoted for a shell."""
    args = ["minigpt", name]
    if config is not None:
        args += ["-c", str(config)]
    if run_dir is not None:
        args += ["-r", str(run_dir)]
    for o in overrides or []:
        args += ["--set", o]
    return shlex.join(args)


def _save_config(cfg: Config, run: RunDir) -> None:
    run.create()
    write_text(run.config, dumps(cfg))


@app.command()
def vocab(config: ConfigOpt = None, run_dir: RunDirOpt = None, set_: SetOpt = None) -> None:
    """Learn the WordPiece vocabulary from the training text; writes vocab.txt."""
    cfg, run = _setup(config, run_dir, set_)
    from minigpt_cli.runs import run_lock

    with run_lock(run.root, "vocab"):  # before anything is written: one command at a time on a run
        _load_tensorflow()
        from minigpt_cli.vocab import build_vocabulary

        with err.status("learning the vocabulary..."):
            report = build_vocabulary(cfg, run)
        _save_config(cfg, run)  # only once the vocabulary it describes is written
    note = "" if report.size == report.requested else f" ({report.requested} asked; the text gives no more)"
    out.print(
        f"vocabulary: {report.size:,} tokens{note} from {report.train_lines:,} lines in {report.seconds:.1f}s; "
        f"[UNK] share on the validation text {report.unknown_share:.2%} -> {run.vocab}"
    )


@app.command()
def train(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
) -> None:
    """Train the mini-GPT on the run's vocabulary; writes model.keras, history, samples and checkpoints."""
    cfg, run = _setup(config, run_dir, set_)
    if not run.vocab.is_file():
        raise MinigptError(
            f"no vocabulary in {run.root}: learn it first with: {_command('vocab', config, run_dir, set_)}"
        )
    if cfg.train.distribution == "multi_worker":
        from minigpt_cli import distribute

        if distribute.REPORT_FD not in os.environ:
            # Joining the cluster blocks TensorFlow uninterruptibly: train in a child that this process watches.
            args = shlex.split(_command("train", config, run_dir, set_))[1:] + (["--resume"] if resume else [])
            raise SystemExit(distribute.supervise(cfg.train.worker_timeout, args))
    from minigpt_cli.runs import run_lock

    # Before anything is written: one command at a time on a run (workers of one job share the chief's).
    with run_lock(run.root, "train", multi_worker=cfg.train.distribution == "multi_worker"):
        _load_tensorflow()
        from minigpt_cli.train import train as train_model  # writes config.toml once its checks pass

        history = train_model(cfg, run, err, resume=resume)
    last = history[-1]
    out.print(
        f"trained {len(history)} epochs: val_perplexity {last['val_perplexity']:.2f} -> {run.model} "
        f"(history in {run.history_csv.name}, curve in {run.curve.name}, samples in {run.samples.name})"
    )


@app.command()
def evaluate(
    data: Annotated[str, typer.Option("--data", help="Text to score: a file, a folder of .txt files, or a glob.")],
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    windows: Annotated[
        Windows | None, typer.Option(help="How to cut the text (default: data.windows, the way the run was trained).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Loss, perplexity and bits per character of the run's model on any text."""
    cfg, run = _setup(config, run_dir, set_, find_trained=True)
    windows = windows or cfg.data.windows
    run.require_vocab()
    run.require_model()
    _load_tensorflow()
    from minigpt_cli.evaluate import evaluate as evaluate_run

    result = evaluate_run(run, data, windows, cfg.data.min_string_len, cfg.vocab, cfg.data.batch_size)
    if as_json:
        print(json.dumps(result.__dict__))
        return
    out.print(
        f"{windows} windows: loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  "
        f"bits/char {result.bits_per_character:.4f}  ({result.tokens:,} tokens scored, "
        f"{result.characters:,} characters, {result.files} files)"
    )


def _read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    if prompt is not None and prompt_file is not None:
        raise MinigptError("give --prompt or --prompt-file, not both")
    if prompt_file is None:
        return [prompt or ""]
    try:
        text = sys.stdin.read() if prompt_file == "-" else Path(prompt_file).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MinigptError(f"prompt file not found: {prompt_file}") from None
    except UnicodeDecodeError:
        raise MinigptError(f"prompt file {prompt_file} is not UTF-8 text") from None
    except OSError as e:
        raise MinigptError(f"cannot read prompt file {prompt_file}: {e.strerror or e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise MinigptError(f"no prompt in {'standard input' if prompt_file == '-' else prompt_file}")
    return prompts


@app.command()
def generate(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    sampler: Annotated[
        str | None, typer.Option(help=f"{'|'.join(SAMPLERS)}|all (default: generate.sampler, topk)")
    ] = None,
    prompt: Annotated[
        str | None, typer.Option(help="Text to continue (default: none, start from the [BOS] token).")
    ] = None,
    prompt_file: Annotated[
        str | None, typer.Option(help="File with one prompt per line ('-' reads standard input).")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="New tokens per sample (default: generate.max_tokens, 80).")
    ] = None,
    k: Annotated[int | None, typer.Option(help="Top-k: sample from the k likeliest tokens.")] = None,
    p: Annotated[float | None, typer.Option(help="Top-p: sample from the tokens holding p of the probability.")] = None,
    num_beams: Annotated[int | None, typer.Option(help="Beam search: beams kept.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Softmax temperature.")] = None,
    seed: Annotated[
        int | None, typer.Option(help="Random seed in [0, 2**32): same seed, same text (default: a fresh one).")
    ] = None,
    num_samples: Annotated[int, typer.Option(help="Samples per prompt, made in one batched call.")] = 1,
    show_prompt: Annotated[bool, typer.Option(help="Print the prompt before the new text.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per sample.")] = False,
) -> None:
    """Generate text from the run's trained model."""
    cfg, run = _setup(config, run_dir, set_, find_trained=True)
    g = cfg.generate
    name = sampler or g.sampler
    if name != "all" and name not in SAMPLERS:
        raise MinigptError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)} or all")
    if num_samples < 1:
        raise MinigptError(f"--num-samples must be at least 1, got {num_samples}")
    max_tokens = g.max_tokens if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise MinigptError(f"--max-tokens must be at least 1, got {max_tokens}")
    prompts = _read_prompts(prompt, prompt_file)
    run.require_vocab()
    run.require_model()

    from minigpt_cli.samplers import sampler_spec

    specs = [
        sampler_spec(g, s, k=k, p=p, num_beams=num_beams, temperature=temperature, seed=seed)
        for s in (SAMPLERS if name == "all" else (name,))
    ]
    _load_tensorflow()
    from minigpt_cli.generate import Generator
    from minigpt_cli.model import load_model
    from minigpt_cli.vocab import read_vocabulary

    vocabulary = read_vocabulary(run.vocab, cfg.vocab)
    model = load_model(run.model, len(vocabulary))
    generator = Generator(model, vocabulary.tokenizer(), jit_compile=g.jit_compile)
    batch = [p_ for p_ in prompts for _ in range(num_samples)]
    results = [generator.run(batch, s, max_tokens) for s in specs]
    fitted = len(results[0][0].token_ids)
    if fitted < max_tokens:
        err.print(f"note: only {fitted} new tokens fit in the model's {generator.seq_len}-token window")

    if as_json:
        for samples in results:
            for s in samples:
                print(json.dumps(s.to_dict()))
        return
    if name == "all":
        table = Table(title=f"prompt: {prompts[0]!r}" if prompts[0] else "prompt: [BOS]", show_lines=True)
        for col in ("sampler", "text", "tok/s", "repeated 4-grams", "distinct bigrams"):
            table.add_column(col, overflow="fold")
        for samples in results:
            for s in samples:
                shown = {a: b for a, b in s.settings.items() if a != "seed" and not (a == "temperature" and b == 1)}
                settings = " ".join(f"{a}={b}" for a, b in shown.items())
                table.add_row(
                    f"{s.sampler}\n{settings}",
                    (s.prompt + " | " if show_prompt and s.prompt else "") + s.text,
                    f"{s.tokens_per_second:,.0f}",
                    f"{s.stats['repeated_4grams']:.0%}",
                    f"{s.stats['distinct_bigrams']:.0%}",
                )
        out.print(table, markup=False)
        return
    for i, s in enumerate(results[0]):
        if i:
            print()
        print(f"{s.prompt} {s.text}".strip() if show_prompt else s.text)


@app.command("config")
def show_config(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    keys: Annotated[bool, typer.Option("--keys", help="List every config key.")] = False,
) -> None:
    """Print the resolved config as TOML (or, with --keys, every key)."""
    if keys:
        print("\n".join(all_keys()))
        return
    cfg, _ = _setup(config, run_dir, set_)
    print(dumps(cfg), end="")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except SystemExit as e:
        if e.code in (0, None) and "tensorflow" in sys.modules:
            # Everything is written; skip TensorFlow's teardown, which takes ~0.6 s at exit.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        raise
    except MinigptError as e:
        err.print(Text.assemble(("error: ", "bold red"), str(e)))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
