"""``minigpt chat``: an interactive session on a trained run (CLI layer only; the session is ``minigpt_cli.chat``).

minigpt chat -r runs/simplebooks --sampler topp --p 0.5
printf 'the old king\\n/seed 3\\nthe old king\\n' | minigpt chat -r runs/simplebooks   # one line out per prompt
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

StreamingChoice = Literal["greedy", "beam", "random", "topk", "topp"]


def chat(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    sampler: Annotated[
        StreamingChoice | None, typer.Option(help="Sampler to start with (default: generate.sampler; not beam).")
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="New tokens per turn (default: generate.max_tokens, 80).")
    ] = None,
    k: KOpt = None,
    p: POpt = None,
    temperature: TemperatureOpt = None,
    seed: Annotated[
        int | None,
        typer.Option(help="A seed in [0, 2**32) for every turn: same prompt, same text (default: fresh each turn)."),
    ] = None,
    stop: StopOpt = None,
    repetition_penalty: RepetitionPenaltyOpt = None,
    no_repeat_ngram: NoRepeatNgramOpt = None,
    min_p: MinPOpt = None,
    end_at_paragraph: EndAtParagraphOpt = None,
    show_probs: ShowProbsOpt = False,
    best: BestOpt = False,
    warm_up: Annotated[
        bool, typer.Option(hidden=True, help="Compile the generation loop while the first prompt is typed.")
    ] = True,
) -> None:
    """Type text, watch the model continue it; /help lists the commands that change settings as you go.

    The model is loaded and compiled once, so every turn after the first is
    instant. On a terminal: arrow keys edit and recall lines, Ctrl-C stops a
    generation, Ctrl-D leaves. From a pipe: one prompt (or /command) per line,
    one line of generated text per prompt on standard output, everything else
    on standard error.
    """
    from minigpt_cli.chat import ChatSession, run_session, settings_from_options, setup_readline, sigint_held

    cfg, run = _setup(config, run_dir, set_, find_trained=True)
    settings, note = settings_from_options(
        cfg.generate,
        sampler=sampler,
        k=k,
        p=p,
        temperature=temperature,
        seed=seed,
        max_tokens=max_tokens,
        show_probs=show_probs,
        stop=stop,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram=no_repeat_ngram,
        min_p=min_p,
        end_at_paragraph=end_at_paragraph,
    )
    run.require_vocab()  # before the note and the loading status
    _model_file(run, best)
    terminal = sys.stdin.isatty()
    if note:
        err.print(note)
    # TensorFlow's threads start now: they must leave Ctrl-C to the main thread (see sigint_held).
    with sigint_held(), err.status("loading the model...") if terminal else contextlib.nullcontext():
        vocabulary, model = _load_run(run, cfg, best=best)
        from minigpt_cli.generate import Generator

        generator = Generator(model, vocabulary.tokenizer(), jit_compile=cfg.generate.jit_compile)
    session = ChatSession(generator, settings, out=out, info=err, colored=_colored, interactive=terminal)
    if warm_up:
        session.warm_up()  # while the first prompt is typed; the first turn waits for it if need be
    if not terminal:
        if hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="replace")  # a stray byte is a character, not a crash
        run_session(session, _read_line)
        return
    history = Path(os.environ.get("MINIGPT_CACHE") or "~/.cache/minigpt").expanduser() / "chat_history"
    remember = setup_readline(history)
    err.print(
        f"minigpt chat on {run.root}: type text and press Enter to have the model continue it "
        f"(it continues text, it does not answer). /help lists the commands; Ctrl-D leaves."
    )
    err.print(settings.describe(), style="dim", markup=False)

    def read(prompt: str) -> str:
        if not sys.stdout.isatty():  # the output goes to a file: keep the prompt out of it
            err.print(prompt, end="")
            prompt = ""
        try:
            return input(prompt)
        finally:
            remember()

    run_session(session, read, prompt="> ")


def _read_line(_prompt: str) -> str:
    """One line of a piped standard input; EOFError at its end."""
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\r\n")


# At the end: cli.py imports this module at its end, and this module may be imported first.
from minigpt_cli.cli import (  # noqa: E402
    BestOpt,
    ConfigOpt,
    EndAtParagraphOpt,
    KOpt,
    MinPOpt,
    NoRepeatNgramOpt,
    POpt,
    RepetitionPenaltyOpt,
    RunDirOpt,
    SetOpt,
    ShowProbsOpt,
    StopOpt,
    TemperatureOpt,
    _colored,
    _load_run,
    _model_file,
    _setup,
    err,
    out,
)
