"""The ``minigpt`` command: one thin function per subcommand."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from minigpt_cli.config import SAMPLERS, Config, Windows, all_keys, dumps, load_config
from minigpt_cli.errors import MinigptError
from minigpt_cli.native import quiet_native_stderr
from minigpt_cli.runs import RunDir, write_text

app = typer.Typer(
    help="Train small GPT language models from scratch on plain text, and generate text from them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _complete_runs(incomplete: str) -> list[str]:
    """Run directories under runs/ (shell completion of -r)."""
    return [str(p) for p in sorted(Path("runs").glob("*")) if p.is_dir() and str(p).startswith(incomplete)]


def _complete_configs(incomplete: str) -> list[str]:
    """Config files under configs/ (shell completion of -c)."""
    return [str(p) for p in sorted(Path("configs").glob("*.toml")) if str(p).startswith(incomplete)]


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (see configs/).", autocompletion=_complete_configs),
]
RunDirOpt = Annotated[
    Path | None,
    typer.Option("--run-dir", "-r", help="Run directory (default: runs/<config name>).", autocompletion=_complete_runs),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable)."),
]
# Sampler settings and decoding controls, shared by generate and chat.
KOpt = Annotated[int | None, typer.Option(help="Top-k: sample from the k likeliest tokens.")]
POpt = Annotated[float | None, typer.Option(help="Top-p: sample from the tokens holding p of the probability.")]
TemperatureOpt = Annotated[float | None, typer.Option(help="Softmax temperature.")]
StopOpt = Annotated[
    list[str] | None, typer.Option(help="End the text before this text (repeatable; default: generate.stop).")
]
RepetitionPenaltyOpt = Annotated[
    float | None, typer.Option(help="Divide the logits of tokens already written by this (1: off).")
]
NoRepeatNgramOpt = Annotated[int | None, typer.Option(help="Never repeat an n-gram of this many tokens (0: off).")]
MinPOpt = Annotated[
    float | None, typer.Option(help="Keep tokens at least this share of the likeliest's probability (0: off).")
]
EndAtParagraphOpt = Annotated[
    bool | None,
    typer.Option("--end-at-paragraph/--no-end-at-paragraph", help="End at the model's first [BOS] (paragraph)."),
]
ShowProbsOpt = Annotated[
    bool, typer.Option("--show-probs", help="Color each new token by the probability it was chosen with.")
]
BestOpt = Annotated[
    bool,
    typer.Option("--best", help="Use model.best.keras (the epoch with the lowest validation loss), not model.keras."),
]


def _load_tensorflow(cfg: Config | None = None) -> None:
    """Load Keras (and KerasHub) on the backend chosen by KERAS_BACKEND or the config (TensorFlow by default)."""
    from minigpt_cli.backend import choose, tensorflow_available

    name, _ = choose(cfg.backend if cfg is not None else "tensorflow")
    with quiet_native_stderr():
        if name == "tensorflow" or tensorflow_available():  # KerasHub imports TensorFlow when it is there
            import tensorflow as tf

            if name != "tensorflow":  # it only tokenizes and logs then: the GPUs are the backend's
                tf.config.set_visible_devices([], "GPU")
            tf.config.list_physical_devices()
            tf.get_logger().setLevel("ERROR")
        import keras_hub  # noqa: F401


def _model_file(run: RunDir, best: bool = False) -> Path:
    """The run's model file: ``model.keras``, or with ``best`` (``--best``) ``model.best.keras``; it must exist."""
    return run.require_best_model() if best else run.require_model()


def _load_run(run: RunDir, cfg: Config, need_model: bool = True, best: bool = False):
    """The run's vocabulary and (with ``need_model``) model, with TensorFlow loaded; ``best``: see ``_model_file``."""
    run.require_vocab()
    path = _model_file(run, best) if need_model else None
    _load_tensorflow(cfg)
    from minigpt_cli.vocab import read_vocabulary

    vocab = read_vocabulary(run.vocab, cfg.vocab)
    if path is None:
        return vocab, None
    from minigpt_cli.model import load_model

    return vocab, load_model(path, len(vocab))


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
        _load_tensorflow(cfg)
        from minigpt_cli.vocab import build_vocabulary

        with err.status("learning the vocabulary..."):
            report = build_vocabulary(cfg, run)
        _save_config(cfg, run)  # only once the vocabulary it describes is written
    note = "" if report.size == report.requested else f" ({report.requested} asked; the text gives no more)"
    out.print(
        f"vocabulary: {report.size:,} tokens{note} from {report.train_lines:,} lines in {report.seconds:.1f}s "
        f"by the {report.learner} learner; "
        f"[UNK] share on the validation text {report.unknown_share:.2%} -> {run.vocab}"
    )


@app.command()
def train(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from",
            help="Fine-tune: start from this run's (or exported KerasHub preset's) model and vocabulary.",
            autocompletion=_complete_runs,
        ),
    ] = None,
) -> None:
    """Train the mini-GPT on the run's vocabulary; writes model.keras, history, samples and checkpoints."""
    if init_from is not None:
        if resume:
            raise MinigptError("--init-from starts a new run and --resume continues one; give one of them")
        set_ = [*(set_ or []), f"train.init_from={json.dumps(str(init_from), ensure_ascii=False)}"]
    cfg, run = _setup(config, run_dir, set_)
    finetune = bool(cfg.train.init_from) and not resume
    if finetune:  # the parent's shape and vocabulary become the run's: checked before anything is written
        _load_tensorflow(cfg)
        from minigpt_cli.config import explicit_keys
        from minigpt_cli.finetune import prepare

        given = explicit_keys(None, set_ or [])
        if "train.init_from" in given and "train.init_sha256" not in given:
            cfg.train.init_sha256 = ""  # a parent named now: its checksum is recorded afresh
        own = config if config is not None else (run.config if run.config.is_file() else None)
        explicit = {} if own is None else dict.fromkeys(explicit_keys(own), str(own))
        if init_from is not None and own == run.config:  # a new parent for this run: its old shape is not a wish
            explicit = {k: v for k, v in explicit.items() if not k.startswith(("model.", "vocab."))}
        cfg = prepare(cfg, run.root, {**explicit, **dict.fromkeys(given, "--set")})
    if not run.vocab.is_file() and not finetune:
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
        _load_tensorflow(cfg)
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
    best: BestOpt = False,
) -> None:
    """Loss, perplexity and bits per character of the run's model on any text."""
    cfg, run = _setup(config, run_dir, set_, find_trained=True)
    windows = windows or cfg.data.windows
    run.require_vocab()
    model_file = _model_file(run, best)
    _load_tensorflow(cfg)
    from minigpt_cli.evaluate import evaluate as evaluate_run

    result = evaluate_run(
        run, data, windows, cfg.data.min_string_len, cfg.vocab, cfg.data.batch_size, model_file=model_file
    )
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


SamplerChoice = Literal["greedy", "beam", "random", "topk", "topp", "all"]


def _probability_style(p: float | None) -> str:
    """A color for a token's probability: green (sure) through yellow to red (a long shot)."""
    if p is None or p != p:
        return ""
    return "green" if p >= 0.5 else "yellow" if p >= 0.2 else "dark_orange" if p >= 0.05 else "red"


def _colored(parts: list[tuple[str, float | None]]) -> Text:
    return Text.assemble(*((text, _probability_style(p)) for text, p in parts))


@app.command()
def generate(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    sampler: Annotated[SamplerChoice | None, typer.Option(help="Sampler (default: generate.sampler, topk).")] = None,
    prompt: Annotated[
        str | None, typer.Option(help="Text to continue (default: none, start from the [BOS] token).")
    ] = None,
    prompt_file: Annotated[
        str | None, typer.Option(help="File with one prompt per line ('-' reads standard input).")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="New tokens per sample (default: generate.max_tokens, 80).")
    ] = None,
    k: KOpt = None,
    p: POpt = None,
    num_beams: Annotated[int | None, typer.Option(help="Beam search: beams kept.")] = None,
    temperature: TemperatureOpt = None,
    seed: Annotated[
        int | None, typer.Option(help="Random seed in [0, 2**32): same seed, same text (default: a fresh one).")
    ] = None,
    stop: StopOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    no_repeat_ngram: NoRepeatNgramOpt = None,
    min_p: MinPOpt = None,
    end_at_paragraph: EndAtParagraphOpt = None,
    num_samples: Annotated[int, typer.Option(help="Samples per prompt, made in one batched call.")] = 1,
    stream: Annotated[
        bool, typer.Option("--stream", help="Print tokens as they come (beam search prints its best beam at the end).")
    ] = False,
    show_probs: ShowProbsOpt = False,
    show_prompt: Annotated[bool, typer.Option(help="Print the prompt before the new text.")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per sample (with --stream, one per piece too).")
    ] = False,
    best: BestOpt = False,
) -> None:
    """Generate text from the run's trained model."""
    cfg, run = _setup(config, run_dir, set_, find_trained=True)
    g = cfg.generate
    name = sampler or g.sampler
    if num_samples < 1:
        raise MinigptError(f"--num-samples must be at least 1, got {num_samples}")
    max_tokens = g.max_tokens if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise MinigptError(f"--max-tokens must be at least 1, got {max_tokens}")
    if stream and name == "all":
        raise MinigptError("--stream shows one sampler at a time; choose one with --sampler")
    if show_probs and name == "beam":
        raise MinigptError("--show-probs needs a sampler that picks one token at a time; beam search scores beams")
    prompts = _read_prompts(prompt, prompt_file)
    run.require_vocab()
    _model_file(run, best)

    from minigpt_cli.samplers import controls as decoding_controls
    from minigpt_cli.samplers import sampler_spec

    specs = [
        sampler_spec(g, s, k=k, p=p, num_beams=num_beams, temperature=temperature, seed=seed)
        for s in (SAMPLERS if name == "all" else (name,))
    ]
    ctl = decoding_controls(
        g,
        stop=stop,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram=no_repeat_ngram,
        min_p=min_p,
        end_at_paragraph=end_at_paragraph,
    )
    vocabulary, model = _load_run(run, cfg, best=best)
    from minigpt_cli.generate import Generator

    generator = Generator(model, vocabulary.tokenizer(), jit_compile=g.jit_compile)
    batch = [p_ for p_ in prompts for _ in range(num_samples)]
    if stream and name != "beam":
        _stream(generator, batch, specs[0], max_tokens, ctl, show_prompt, show_probs, as_json)
        return
    results = [generator.run(batch, s, max_tokens, ctl) for s in specs]
    fitted = generator.fit_lengths(batch, max_tokens)[1]
    if fitted < max_tokens:
        err.print(f"note: only {fitted} new tokens fit in the model's {generator.seq_len}-token window")

    if as_json:
        for samples in results:
            for s in samples:
                print(json.dumps(s.to_dict(), allow_nan=False))
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
        head = f"{s.prompt} " if show_prompt and s.prompt else ""
        if show_probs:
            parts = generator.render(s.token_ids).parts(0, len(s.text), s.probabilities)
            out.print(Text(head) + _colored(parts), markup=False)
        else:
            print(head + s.text)


def _stream(generator, prompts, spec, max_tokens, ctl, show_prompt, show_probs, as_json) -> None:
    """Print each prompt's text as it is made, one after the other; a prompt's n-th sample uses seed + n."""
    from dataclasses import replace

    from minigpt_cli.samplers import SEED_LIMIT

    for i, text in enumerate(prompts):
        nth = prompts[:i].count(text)
        stream = generator.stream(text, replace(spec, seed=(spec.seed + nth) % SEED_LIMIT), max_tokens, ctl)
        if stream.new_tokens < max_tokens:
            err.print(f"note: only {stream.new_tokens} new tokens fit in the model's {generator.seq_len}-token window")
        if i and not as_json:
            print()
        if show_prompt and text and not as_json:
            out.print(text + " ", end="", markup=False)
        for piece in stream:
            if as_json:
                line = {"prompt": text, "text": piece.text, "probabilities": piece.probabilities}
                print(json.dumps(line), flush=True)
            elif show_probs:
                out.print(_colored(piece.parts), end="", markup=False)
            else:
                sys.stdout.write(piece.text)
                sys.stdout.flush()
        if as_json:
            print(json.dumps(stream.sample.to_dict(), allow_nan=False), flush=True)
        else:
            print(flush=True)


@app.command("config")
def show_config(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    keys: Annotated[bool, typer.Option("--keys", help="List every config key.")] = False,
    size: Annotated[
        bool,
        typer.Option(
            "--size", help="Print parameters, FLOPs per token, memory for a batch and the time an epoch takes here."
        ),
    ] = False,
) -> None:
    """Print the resolved config as TOML (or, with --keys, every key; with --size, what training it costs)."""
    if keys:
        print("\n".join(all_keys()))
        return
    cfg, run = _setup(config, run_dir, set_)
    if size:
        from minigpt_cli.flops import cached_peak, machine_peak, plan_for

        peak = cached_peak(cfg.train.precision)
        if peak is None:  # TensorFlow starts only for this, once per machine
            err.print("measuring this machine's peak FLOP/s (once)...")
            with quiet_native_stderr():
                peak = machine_peak(cfg.train.precision)
        print("\n".join(plan_for(cfg, run, peak).lines()))
        return
    print(dumps(cfg), end="")


from minigpt_cli.cli_chat import chat  # noqa: E402  (these use this module's helpers)
from minigpt_cli.cli_export import export  # noqa: E402
from minigpt_cli.cli_inspect import inspect_app  # noqa: E402
from minigpt_cli.cli_serve import serve  # noqa: E402

app.command()(chat)
app.command()(serve)
app.command()(export)
app.add_typer(inspect_app, name="inspect")


def _fast_exit() -> None:
    """Everything is written; skip TensorFlow's teardown, which takes ~0.6 s at exit."""
    if "tensorflow" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def main() -> None:
    """Entry point: user errors (ours and the command line's) become one line on stderr and exit code 2."""
    try:  # Typer 0.29 carries its own copy of click
        from typer._click.exceptions import NoArgsIsHelpError, UsageError
    except ImportError:  # pragma: no cover
        from click.exceptions import NoArgsIsHelpError, UsageError

    try:
        code = app(standalone_mode=False)
    except SystemExit as e:
        if e.code in (0, None):
            _fast_exit()
        raise
    except NoArgsIsHelpError as e:
        e.ctx.get_help()  # Typer prints its help itself
        sys.exit(2)
    except UsageError as e:
        command = e.ctx.command_path if e.ctx else "minigpt"
        message = e.format_message().replace("Value error, ", "").replace("\n", " ")
        err.print(Text.assemble(("error: ", "bold red"), f"{message} (see '{command} --help')"))
        sys.exit(2)
    except MinigptError as e:
        err.print(Text.assemble(("error: ", "bold red"), str(e)))
        sys.exit(e.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted")
        sys.exit(130)
    if code == 130:  # Typer turns Ctrl-C into exit code 130
        err.print("interrupted")
    if isinstance(code, int) and code:
        sys.exit(code)
    _fast_exit()
