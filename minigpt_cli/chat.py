"""An interactive session on a trained run: type text, watch its continuation stream.

The library behind ``minigpt chat`` (no Typer here, so tests drive it in-process):

- ``Settings``: what the next turn uses (sampler, its settings, max tokens,
  seed, probabilities shown, decoding controls), made from the config and the
  command line by ``settings_from_options``;
- ``parse_command`` and ``apply_command``: a ``/command`` line becomes new
  ``Settings`` (or one ``MinigptError`` line), with the command line's own
  checks (``SamplerSpec.check``, ``Controls.check``);
- ``ChatSession``: the ``Generator``, a warm-up that compiles the loop for the
  current settings while the user types, and one turn (a streamed text and a
  status line);
- ``run_session``: the read-eval loop over any input function.

>>> session = ChatSession(generator, settings, out=out, info=err, interactive=True)  # doctest: +SKIP
>>> session.warm_up()                                                               # doctest: +SKIP
>>> run_session(session, input, prompt="> ")                                        # doctest: +SKIP
> /seed 7
seed 7: every turn starts from it (same prompt, same text)
> the old king
the old king nothing. "a jug loaf. the white goose an owl and i will bring a golden had hidden a walked to the
24 tokens · 215 tok/s · first token 17 ms · topk k=10 temperature=1.0 · seed 7
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from minigpt_cli.config import SAMPLERS, GenerateConfig
from minigpt_cli.errors import MinigptError
from minigpt_cli.samplers import SEED_LIMIT, Controls, SamplerSpec, controls, sampler_spec

if TYPE_CHECKING:  # generate.py imports TensorFlow: not needed to parse commands
    from minigpt_cli.generate import Generator

#: Samplers that pick one token at a time, so their text can stream (beam search's best beam changes to the end).
STREAMING = tuple(s for s in SAMPLERS if s != "beam")
BEAM_REFUSED = "beam search cannot stream (its best beam changes until the end); use 'minigpt generate --sampler beam'"


@dataclass(frozen=True)
class Settings:
    """What the next turn uses. ``spec.seed`` is the fixed seed, or None for a fresh one each turn."""

    spec: SamplerSpec
    controls: Controls
    max_tokens: int
    show_probs: bool = False

    def describe(self) -> str:
        """The settings in one line, as the commands that set them would read."""
        spec, ctl = self.spec, self.controls
        words = [f"sampler {spec.name}"]
        if spec.name == "topk":
            words.append(f"k {spec.k}")
        if spec.name == "topp":
            words.append(f"p {spec.p}")
        words += [
            f"temperature {spec.temperature}",
            f"max-tokens {self.max_tokens}",
            f"seed {'random' if spec.seed is None else spec.seed}",
            f"probs {'on' if self.show_probs else 'off'}",
            f"stop {' '.join(map(repr, ctl.stop)) if ctl.stop else '(none)'}",
            f"repetition-penalty {ctl.repetition_penalty}",
            f"no-repeat-ngram {ctl.no_repeat_ngram}",
            f"min-p {ctl.min_p}",
            f"paragraph {'on' if ctl.end_at_paragraph else 'off'}",
        ]
        return " · ".join(words)


def settings_from_options(
    gen: GenerateConfig,
    *,
    sampler: str | None = None,
    k: int | None = None,
    p: float | None = None,
    temperature: float | None = None,
    seed: int | None = None,
    max_tokens: int | None = None,
    show_probs: bool = False,
    stop: list[str] | None = None,
    repetition_penalty: float | None = None,
    no_repeat_ngram: int | None = None,
    min_p: float | None = None,
    end_at_paragraph: bool | None = None,
) -> tuple[Settings, str | None]:
    """The starting settings: the config's ``[generate]`` section, overridden by any option given.

    Returns them with a note for the user, or None. ``--sampler beam`` is
    refused; a config whose default sampler is beam starts with topk instead
    (and says so). Without ``seed``, every turn draws a fresh one.
    """
    note = None
    name = sampler or gen.sampler
    if name == "beam":
        if sampler:
            raise MinigptError(BEAM_REFUSED)
        name, note = "topk", "note: the config's sampler is beam search, which cannot stream; starting with topk"
    max_tokens = gen.max_tokens if max_tokens is None else max_tokens
    if max_tokens < 1:
        raise MinigptError(f"--max-tokens must be at least 1, got {max_tokens}")
    spec = sampler_spec(gen, name, k=k, p=p, temperature=temperature, seed=seed)
    ctl = controls(
        gen,
        stop=stop,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram=no_repeat_ngram,
        min_p=min_p,
        end_at_paragraph=end_at_paragraph,
    )
    return Settings(replace(spec, seed=seed), ctl, max_tokens, show_probs), note


# --- commands -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One ``/command``: its name, how it is written, and what it does."""

    name: str
    usage: str
    help: str


COMMANDS = (
    Command("sampler", "/sampler NAME", f"{', '.join(STREAMING)} (beam cannot stream: use minigpt generate)"),
    Command("k", "/k N", "top-k: sample from the N likeliest tokens"),
    Command("p", "/p X", "top-p: sample from the likeliest tokens holding X of the probability, 0 < X <= 1"),
    Command("temperature", "/temperature X", "softmax temperature, above 0 (below 1: safer, above 1: wilder)"),
    Command("max-tokens", "/max-tokens N", "new tokens per turn (at most what the model's window leaves)"),
    Command("seed", "/seed N|random", "fixed: the same prompt gives the same text; random: a fresh seed each turn"),
    Command("probs", "/probs [on|off]", "color each new token by its probability: green sure ... red a long shot"),
    Command("stop", "/stop [TEXT]", "also end the text before TEXT; /stop alone clears the stop texts"),
    Command("repetition-penalty", "/repetition-penalty X", "divide the logits of tokens already written by X (1: off)"),
    Command("no-repeat-ngram", "/no-repeat-ngram N", "never repeat an n-gram of N tokens (0: off)"),
    Command("min-p", "/min-p X", "keep tokens at least X times the likeliest's probability (0: off)"),
    Command("paragraph", "/paragraph [on|off]", "end the text at the model's first [BOS] (a paragraph's end)"),
    Command("settings", "/settings", "show the current settings"),
    Command("help", "/help", "this help"),
    Command("quit", "/quit", "leave (Ctrl-D too)"),
)
NAMES = tuple(c.name for c in COMMANDS)
ALIASES = {
    "exit": "quit",
    "?": "help",
    "temp": "temperature",
    "max": "max-tokens",
    "show-probs": "probs",
    "end-at-paragraph": "paragraph",
}


def help_text() -> str:
    """What ``/help`` prints."""
    width = max(len(c.usage) for c in COMMANDS)
    lines = ["Type text and press Enter: the model continues it (an empty line starts from [BOS])."]
    lines += [f"  {c.usage:<{width}}  {c.help}" for c in COMMANDS]
    lines += [
        "Commands can be shortened while unambiguous (/t 0.8, /sa topp); '//text' sends a prompt starting with '/'.",
        "Seeds: with /seed N every turn starts from seed N, so the same prompt and settings give the same text;",
        "with /seed random each turn draws a fresh seed, shown in its status line (/seed it to get that text again).",
        "Keys: Up/Down recall earlier lines, Ctrl-C stops a generation (or clears the line), Ctrl-D leaves.",
    ]
    return "\n".join(lines)


def parse_command(line: str) -> tuple[str, str]:
    """``"/temp 0.8"`` -> ``("temperature", "0.8")``: the command's full name and its argument.

    Names are case-insensitive, ``_`` is read as ``-``, and any unambiguous
    prefix of a name works. An unknown or ambiguous one is a ``MinigptError``.
    """
    word, _, arg = line.strip().removeprefix("/").partition(" ")
    word = word.lower().replace("_", "-")
    if not word:
        raise MinigptError("a command needs a name after '/'; /help lists them")
    if word in NAMES:
        return word, arg.strip()
    if word in ALIASES:
        return ALIASES[word], arg.strip()
    matches = [n for n in NAMES if n.startswith(word)]
    if len(matches) == 1:
        return matches[0], arg.strip()
    if matches:
        raise MinigptError(f"/{word} is ambiguous: {', '.join('/' + m for m in matches)}")
    raise MinigptError(f"unknown command /{word}; /help lists them")


def _number(arg: str, name: str, kind: type):
    if not arg:
        raise MinigptError(f"/{name} needs a value: {_usage(name)}")
    try:
        return kind(arg)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        raise MinigptError(f"/{name} needs {what}, got {arg!r}") from None


def _switch(arg: str, name: str, current: bool) -> bool:
    """``on``/``off`` (and yes/no, true/false, 1/0); nothing toggles."""
    value = arg.lower()
    if not value:
        return not current
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise MinigptError(f"/{name} takes on or off, got {arg!r}")


def _usage(name: str) -> str:
    return next(c.usage for c in COMMANDS if c.name == name)


def _unquote(text: str) -> str:
    """``"' the'"`` -> ``" the"``: quotes keep a stop text's spaces."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def apply_command(
    settings: Settings, name: str, arg: str, vocab_size: int | None = None, window: int | None = None
) -> tuple[Settings, str]:
    """The settings after the setting command ``name`` with ``arg``, and a line saying what they are now.

    Bad values are refused with the command line's own checks (its ``--flag``
    named as the ``/command``); ``vocab_size`` bounds ``/k`` and ``window``
    (the model's window) notes a ``/max-tokens`` that cannot fit.
    """
    spec, ctl = settings.spec, settings.controls
    if not arg and name not in ("stop", "probs", "paragraph"):
        choices = f" (choose from {', '.join(STREAMING)})" if name == "sampler" else ""
        return settings, _said(settings, name, window) + choices  # a bare /k, /seed...: what it is now
    if name == "sampler" and arg.lower() == "beam":
        raise MinigptError(BEAM_REFUSED)
    try:
        if name == "sampler":
            spec = replace(spec, name=arg.lower())
        elif name == "k":
            spec = replace(spec, k=_number(arg, name, int))
        elif name == "p":
            spec = replace(spec, p=_number(arg, name, float))
        elif name == "temperature":
            spec = replace(spec, temperature=_number(arg, name, float))
        elif name == "seed":
            seed = None if arg.lower() in ("random", "none", "off") else _number(arg, name, int)
            spec = replace(spec, seed=seed)
        elif name == "max-tokens":
            value = _number(arg, name, int)
            if value < 1:
                raise MinigptError(f"--max-tokens must be at least 1, got {value}")
            settings = replace(settings, max_tokens=value)
        elif name == "probs":
            settings = replace(settings, show_probs=_switch(arg, name, settings.show_probs))
        elif name == "paragraph":
            ctl = replace(ctl, end_at_paragraph=_switch(arg, name, ctl.end_at_paragraph))
        elif name == "stop":
            ctl = replace(ctl, stop=ctl.stop + (_unquote(arg),) if arg else ())
        elif name == "repetition-penalty":
            ctl = replace(ctl, repetition_penalty=_number(arg, name, float))
        elif name == "no-repeat-ngram":
            ctl = replace(ctl, no_repeat_ngram=_number(arg, name, int))
        elif name == "min-p":
            ctl = replace(ctl, min_p=_number(arg, name, float))
        else:
            raise MinigptError(f"/{name} does not change a setting")
        spec.check(vocab_size=vocab_size)
        if name in ("k", "p"):  # checked now, whichever sampler is on, not when one switches to it
            replace(spec, name="topk" if name == "k" else "topp").check(vocab_size=vocab_size)
        ctl.check()
    except MinigptError as e:  # the CLI's messages name its flags: name the command instead
        raise MinigptError(re.sub(r"--(?=[a-z])", "/", str(e))) from None
    settings = replace(settings, spec=spec, controls=ctl)
    return settings, _said(settings, name, window)


def _said(settings: Settings, name: str, window: int | None) -> str:
    """The line that confirms a setting."""
    spec, ctl = settings.spec, settings.controls
    if name == "sampler":
        extra = {"topk": f" (k {spec.k})", "topp": f" (p {spec.p})"}.get(spec.name, "")
        return f"sampler {spec.name}{extra}"
    if name in ("k", "p"):
        value = spec.k if name == "k" else spec.p
        used = "topk" if name == "k" else "topp"
        unused = "" if spec.name == used else f" (used by /sampler {used}; the sampler is {spec.name})"
        return f"{name} {value}{unused}"
    if name == "temperature":
        return f"temperature {spec.temperature}"
    if name == "seed":
        if spec.seed is None:
            return "seed random: each turn draws a fresh seed (shown in its status line)"
        return f"seed {spec.seed}: every turn starts from it (same prompt, same text)"
    if name == "max-tokens":
        full = window is not None and settings.max_tokens >= window
        room = f" (the model's window leaves room for at most {window - 1})" if full else ""
        return f"max-tokens {settings.max_tokens}{room}"
    if name == "probs":
        return f"probs {'on' if settings.show_probs else 'off'}"
    if name == "paragraph":
        return f"paragraph {'on: the text ends at the first [BOS]' if ctl.end_at_paragraph else 'off'}"
    if name == "stop":
        return f"stop texts: {', '.join(map(repr, ctl.stop))}" if ctl.stop else "stop texts cleared"
    if name == "repetition-penalty":
        return f"repetition-penalty {ctl.repetition_penalty}" + (" (off)" if ctl.repetition_penalty == 1 else "")
    if name == "no-repeat-ngram":
        return f"no-repeat-ngram {ctl.no_repeat_ngram}" + (" (off)" if not ctl.no_repeat_ngram else "")
    return f"min-p {ctl.min_p}" + (" (off)" if not ctl.min_p else "")


# --- the session ----------------------------------------------------------------------------------------


@dataclass
class Turn:
    """What one turn made, and how long it took."""

    prompt: str
    text: str
    tokens: int
    seed: int | None
    #: From Enter to the first new token: any wait for the warm-up plus the stream's own first token.
    first_token_seconds: float
    waited_seconds: float
    seconds: float
    stopped: str
    interrupted: bool = False


def loop_key(settings: Settings) -> tuple:
    """What the compiled loop depends on: a change here costs a new trace (the seed and stop texts do not)."""
    return replace(settings.spec, seed=None), replace(settings.controls, stop=())


@contextlib.contextmanager
def sigint_held():
    """SIGINT held pending in this thread, and in every thread started from it meanwhile.

    TensorFlow starts its thread pools from the thread that first needs them.
    A Ctrl-C may be handed to any thread that does not hold SIGINT (Linux
    prefers the main thread, but not always, and other systems need not);
    taken by another thread, it would not wake the main one from ``input()``
    (readline waits in ``select``, which only the thread that takes the
    signal leaves). So every thread but the main one holds it.
    """
    if not hasattr(signal, "pthread_sigmask"):  # pragma: no cover - Windows
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def ctrl_c_noted():
    """While in the block, Ctrl-C raises nothing: the yielded ``came()`` says whether one came.

    The signal is held (``sigint_held``) and taken when ``came()`` finds it
    pending; one taken by a thread that does not hold it only sets a flag. So
    no KeyboardInterrupt lands inside TensorFlow's trace or a half-printed line.
    """
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag.is_set
        return

    def came() -> bool:
        # Take a pending one (or it would fire when the mask is lifted); never wait: another thread that does
        # not hold SIGINT may take it first, and then Python's handler sets the flag.
        if hasattr(signal, "sigtimedwait") and signal.sigtimedwait({signal.SIGINT}, 0) is not None:
            flag.set()
        return flag.is_set()

    previous = signal.signal(signal.SIGINT, lambda signum, frame: flag.set())
    try:
        with sigint_held():
            yield came
    finally:
        signal.signal(signal.SIGINT, previous)


class ChatSession:
    """A trained model, the current settings, and one turn at a time.

    ``out`` gets the generated text only (one line per turn); ``info``
    everything else (command replies, status lines, errors).
    ``colored(parts)`` renders a piece's tokens by probability (``/probs on``).
    ``interactive`` (a terminal): the prompt is printed, dim, before its
    continuation, and Ctrl-C stops a generation (see ``turn``) or clears the
    line being typed (see ``run_session``); otherwise (a script) Ctrl-C ends
    the command, as it would any other.
    """

    #: Seconds a warm-up after a command waits, so that a script's run of commands compiles only the last.
    SETTLE = 0.25

    def __init__(
        self,
        generator: Generator,
        settings: Settings,
        out: Console,
        info: Console,
        colored: Callable[[list[tuple[str, float | None]]], Text] | None = None,
        interactive: bool = False,
    ):
        self.gen = generator
        self.settings = settings
        self.out, self.info = out, info
        self.colored = colored or (lambda parts: Text("".join(text for text, _ in parts)))
        self.interactive = interactive
        self.turns: list[Turn] = []
        # Held by a turn and by a warm-up: a turn waits for a warm-up in flight instead of racing it.
        self._lock = threading.Lock()
        self._warm_thread: threading.Thread | None = None

    @property
    def vocab_size(self) -> int:
        return self.gen.model.backbone.vocabulary_size

    def _stream(self, prompt: str, spec: SamplerSpec, settings: Settings):
        # One buffer length for every turn (the model's window): every prompt then runs the shapes the warm-up
        # ran. Buffers cut to each prompt cost 50-200 ms more on each new length (the runtime's first call with
        # a shape; XLA would compile again), more than the longer buffer costs (measured on the reference model).
        return self.gen.stream(prompt, spec, settings.max_tokens, settings.controls, length=self.gen.seq_len)

    def warm_up(self, background: bool = True, delay: float = 0.0) -> None:
        """Compile the loop for the current settings (in a thread while the user types, by default).

        ``delay`` lets quick successive commands (a script's) settle first: a
        warm-up whose settings are no longer current does nothing.
        """
        if not background:
            self._warm(self.settings)
            return
        self._warm_thread = threading.Thread(target=self._warm, args=(self.settings, delay), daemon=True)
        with sigint_held():  # the thread, and the TensorFlow threads it may start, leave Ctrl-C to the main one
            self._warm_thread.start()

    def wait_warm(self) -> None:
        """Block until a warm-up in flight is done."""
        if self._warm_thread is not None:
            self._warm_thread.join()

    def _warm(self, settings: Settings, delay: float = 0.0) -> None:
        time.sleep(delay)
        with self._lock:
            if loop_key(settings) != loop_key(self.settings):  # changed since: the next turn compiles its own
                return
            try:
                for _ in self._stream("", replace(settings.spec, seed=0), settings):
                    break  # the first piece: prefill and the chunk loop are traced (or compiled)
            except Exception:  # the turn will meet (and report) the same error itself
                return

    def handle(self, line: str) -> bool:
        """Run one line: a ``/command`` or a prompt. False when the session should end."""
        line = line.strip()
        if line.startswith("/") and not line.startswith("//"):
            return self.command(line)
        prompt = line[1:] if line.startswith("//") else line
        try:
            self.turn(prompt)
        except MinigptError as e:
            self.error(str(e))
            if not self.interactive:
                self.out.print()  # a script still gets one line of output per prompt
        return True

    def error(self, message: str) -> None:
        self.info.print(Text.assemble(("error: ", "bold red"), message))

    def command(self, line: str) -> bool:
        """Apply a ``/command``; a bad one prints one line and changes nothing. False for ``/quit``."""
        try:
            name, arg = parse_command(line)
            if name == "quit":
                return False
            if name == "help":
                self.info.print(help_text(), markup=False)
            elif name == "settings":
                self.info.print(self.settings.describe(), markup=False)
            else:
                before = self.settings
                self.settings, said = apply_command(before, name, arg, self.vocab_size, self.gen.seq_len)
                self.info.print(said, markup=False)
                if loop_key(self.settings) != loop_key(before):
                    self.warm_up(delay=self.SETTLE)  # another compiled loop: build it while the user types
        except MinigptError as e:
            self.error(str(e))
        return True

    def turn(self, prompt: str) -> Turn:
        """Stream the continuation of ``prompt`` to ``out``, then a status line to ``info``.

        Ctrl-C stops the generation at its next piece of text (see
        ``ctrl_c_noted``): what was printed stays, and, interactive, a note
        says so and the session goes on; otherwise (a script) the turn ends
        its line and raises KeyboardInterrupt.
        """
        settings = self.settings
        seed = settings.spec.seed
        if seed is None and settings.spec.name != "greedy":
            seed = random.SystemRandom().randrange(SEED_LIMIT)
        spec = replace(settings.spec, seed=seed)
        t0 = time.perf_counter()
        with self._lock:  # Ctrl-C while waiting for a warm-up: a KeyboardInterrupt, nothing printed yet
            waited = time.perf_counter() - t0
            stream = self._stream(prompt, spec, settings)  # a too-long prompt is refused here, before any output
            text: list[str] = []
            with ctrl_c_noted() as came:
                if self.interactive and prompt:
                    self.out.print(Text(prompt + " ", style="dim"), end="")
                for piece in stream:
                    self.out.print(self.colored(piece.parts) if settings.show_probs else Text(piece.text), end="")
                    text.append(piece.text)
                    if came():
                        break
                self.out.print()
                stopped = came()
        if stopped and not self.interactive:
            raise KeyboardInterrupt
        seconds = time.perf_counter() - t0
        sample = stream.sample
        first = waited + stream.first_token_seconds
        if sample is None:
            turn = Turn(prompt, "".join(text), 0, seed, first, waited, seconds, "interrupted", True)
            self.info.print(Text("stopped (Ctrl-C)", style="dim"))
        else:
            turn = Turn(prompt, sample.text, len(sample.token_ids), seed, first, waited, seconds, sample.stopped)
            self.info.print(Text(self.status(turn, spec), style="dim"))
        self.turns.append(turn)
        return turn

    def status(self, turn: Turn, spec: SamplerSpec) -> str:
        """The dim line after a turn: tokens, speed, time to the first token, sampler and seed."""
        rate = turn.tokens / turn.seconds if turn.seconds > 0 else float("inf")
        words = [
            f"{turn.tokens} tokens",
            f"{rate:,.0f} tok/s",
            f"first token {turn.first_token_seconds * 1000:,.0f} ms",
            " ".join([spec.name, *(f"{k}={v}" for k, v in reversed(spec.settings().items()) if k != "seed")]),
        ]
        if turn.seed is not None and "seed" in spec.settings():
            words.append(f"seed {turn.seed}")
        if turn.stopped != "length":
            words.append(f"ended at {'a stop text' if turn.stopped == 'stop' else 'a paragraph'}")
        elif turn.tokens < self.settings.max_tokens:
            words.append("the model's window is full")
        return " · ".join(words)


def run_session(session: ChatSession, read: Callable[[str], str], prompt: str = "") -> int:
    """Read lines with ``read(prompt)`` and run each until EOF (Ctrl-D) or ``/quit``; returns the exit code 0.

    Interactive (``session.interactive``), Ctrl-C at the prompt clears the
    line and asks again, like a shell. Otherwise (a script) a Ctrl-C ends the
    session with KeyboardInterrupt, as it would any command.
    """
    interactive = session.interactive
    while True:
        try:
            line = read(prompt)
        except EOFError:
            if interactive:
                session.info.print()
            return 0
        except KeyboardInterrupt:
            if not interactive:
                raise
            session.info.print()
            continue
        try:
            if not session.handle(line):
                return 0
        except KeyboardInterrupt:  # between the stream and its status line, or while waiting for the warm-up
            if not interactive:
                raise
            session.info.print(Text("stopped (Ctrl-C)", style="dim"))


# --- the terminal ---------------------------------------------------------------------------------------


def setup_readline(history: Path | None) -> Callable[[], None]:
    """Arrow-key editing, history (kept in ``history`` when it can be) and Tab completion of commands.

    Returns a function to call after each line: it appends the line to the
    history file. A history file that cannot be read or written is skipped
    silently.
    """
    try:
        import readline
    except ImportError:  # a Python built without it: plain input(), no editing or history
        return lambda: None

    def complete(text: str, state: int) -> str | None:
        if not text.startswith("/"):
            return None
        options = [f"/{n} " for n in NAMES if f"/{n}".startswith(text)]
        return options[state] if state < len(options) else None

    readline.set_completer(complete)
    readline.set_completer_delims(" \t\n")
    if "libedit" in (readline.__doc__ or ""):  # macOS
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
    readline.set_history_length(1000)
    if history is not None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            if history.is_file():
                readline.read_history_file(history)
            readline.write_history_file(history)  # trimmed to the last 1000 lines
        except OSError:
            history = None
    seen = readline.get_current_history_length()

    def remember() -> None:
        nonlocal seen
        now = readline.get_current_history_length()
        if history is not None and now > seen:
            try:
                readline.append_history_file(now - seen, history)
            except OSError:
                pass
        seen = now

    return remember
