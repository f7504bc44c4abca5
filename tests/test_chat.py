"""``minigpt chat``: the command parser and settings (in-process), sessions in-process, a pipe and a terminal."""

from __future__ import annotations

import io
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import assert_user_error, minigpt
from rich.console import Console

from minigpt_cli.chat import (
    COMMANDS,
    ChatSession,
    Settings,
    apply_command,
    ctrl_c_noted,
    help_text,
    parse_command,
    run_session,
    settings_from_options,
)
from minigpt_cli.config import GenerateConfig
from minigpt_cli.errors import MinigptError
from minigpt_cli.samplers import Controls, SamplerSpec

BASE = Settings(SamplerSpec("topk", k=10, p=0.5, seed=None), Controls(), max_tokens=12)


# --- the command parser and settings (no TensorFlow) ----------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("/temperature 0.8", ("temperature", "0.8")),
        ("/temp 0.8", ("temperature", "0.8")),  # an alias
        ("/T   0.8 ", ("temperature", "0.8")),  # a unique prefix, any case, spaces
        ("/sa topp", ("sampler", "topp")),
        ("/max_tokens 5", ("max-tokens", "5")),
        ("/k 20", ("k", "20")),  # an exact name wins over the prefix of nothing else
        ("/p 0.9", ("p", "0.9")),  # exact, though /paragraph and /probs start with p too
        ("/stop  the end ", ("stop", "the end")),
        ("/exit", ("quit", "")),
        ("/q", ("quit", "")),
        ("/?", ("help", "")),
    ],
)
def test_parse_command(line, expected):
    assert parse_command(line) == expected


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("/s 3", "/s is ambiguous: /sampler, /seed, /stop, /settings"),
        ("/m 3", "ambiguous: /max-tokens, /min-p"),
        ("/bogus", "unknown command /bogus; /help lists them"),
        ("/", "a command needs a name"),
    ],
)
def test_parse_command_refuses(line, fragment):
    with pytest.raises(MinigptError, match=re.escape(fragment)):
        parse_command(line)


@pytest.mark.parametrize(
    ("line", "field", "value"),
    [
        ("/sampler topp", "spec.name", "topp"),
        ("/sampler GREEDY", "spec.name", "greedy"),
        ("/k 20", "spec.k", 20),
        ("/p 0.9", "spec.p", 0.9),
        ("/temperature 0.7", "spec.temperature", 0.7),
        ("/seed 7", "spec.seed", 7),
        ("/seed random", "spec.seed", None),
        ("/max-tokens 60", "max_tokens", 60),
        ("/probs on", "show_probs", True),
        ("/probs", "show_probs", True),  # a bare switch toggles
        ("/stop the end", "controls.stop", ("the end",)),
        ("/stop ' the'", "controls.stop", (" the",)),  # quotes keep the spaces
        ("/repetition-penalty 1.2", "controls.repetition_penalty", 1.2),
        ("/no-repeat-ngram 3", "controls.no_repeat_ngram", 3),
        ("/min-p 0.05", "controls.min_p", 0.05),
        ("/paragraph on", "controls.end_at_paragraph", True),
    ],
)
def test_apply_command_sets_one_setting(line, field, value):
    start = replace(BASE, spec=replace(BASE.spec, seed=1))
    settings, said = apply_command(start, *parse_command(line), vocab_size=300, window=32)
    obj = settings
    for attr in field.split("."):
        obj = getattr(obj, attr)
    assert obj == value
    # Nothing else moved.
    changed = {f for f in ("spec", "controls", "max_tokens", "show_probs") if getattr(settings, f) != getattr(start, f)}
    assert changed == {field.split(".")[0]}
    assert said


def test_stop_adds_and_a_bare_stop_clears():
    s, _ = apply_command(BASE, "stop", "the")
    s, said = apply_command(s, "stop", "and")
    assert s.controls.stop == ("the", "and") and "'the', 'and'" in said
    s, said = apply_command(s, "stop", "")
    assert s.controls.stop == () and said == "stop texts cleared"


def test_a_bare_value_command_shows_the_value():
    s, said = apply_command(BASE, "k", "")
    assert s == BASE and said == "k 10"
    assert apply_command(BASE, "sampler", "")[1].startswith("sampler topk (k 10) (choose from greedy, random")
    assert apply_command(BASE, "seed", "")[1].startswith("seed random")


def test_the_replies_say_what_a_setting_does():
    assert apply_command(BASE, "p", "0.9")[1] == "p 0.9 (used by /sampler topp; the sampler is topk)"
    assert "at most 31" in apply_command(BASE, "max-tokens", "200", window=32)[1]
    assert "same prompt, same text" in apply_command(BASE, "seed", "3")[1]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("/k 0", "/k must be at least 1, got 0"),  # SamplerSpec.check's line, its --k named /k
        ("/k 301", "/k is 301 but the vocabulary has only 300 tokens"),
        ("/k many", "/k needs a whole number, got 'many'"),
        ("/p 0", "/p must be in (0, 1], got 0.0"),
        ("/p 1.5", "/p must be in (0, 1], got 1.5"),
        ("/temperature 0", "/temperature must be above 0"),
        ("/seed -1", "/seed must be in [0, 4294967295]"),
        ("/seed 4294967296", "/seed must be in [0, 4294967295]"),
        ("/seed x", "/seed needs a whole number"),
        ("/max-tokens 0", "/max-tokens must be at least 1"),
        ("/sampler beam", "beam search cannot stream"),
        ("/sampler nucleus", "unknown sampler 'nucleus'"),
        ("/repetition-penalty 0", "/repetition-penalty must be above 0"),  # Controls.check's lines
        ("/no-repeat-ngram -1", "/no-repeat-ngram must be 0 (off) or more"),
        ("/min-p 2", "/min-p must be in [0, 1]"),
        ("/probs maybe", "/probs takes on or off"),
        ("/settings x", None),  # not a setting: handled by the session, never here
    ],
)
def test_bad_values_are_refused_with_the_cli_checks(line, message):
    name, arg = parse_command(line)
    if message is None:
        with pytest.raises(MinigptError, match="does not change a setting"):
            apply_command(BASE, name, arg)
        return
    with pytest.raises(MinigptError, match=re.escape(message)) as e:
        apply_command(BASE, name, arg, vocab_size=300)
    assert "--" not in str(e.value) or "generate --sampler beam" in str(e.value)


def test_settings_from_options():
    g = GenerateConfig(sampler="topp", p=0.7, max_tokens=30, stop=["."], min_p=0.1)
    s, note = settings_from_options(g, temperature=0.5)
    assert note is None
    assert (s.spec.name, s.spec.p, s.spec.temperature, s.max_tokens) == ("topp", 0.7, 0.5, 30)
    assert s.spec.seed is None  # no --seed: a fresh seed each turn, not one drawn once
    assert s.controls == Controls(stop=(".",), min_p=0.1)
    assert settings_from_options(g, seed=5, sampler="random")[0].spec.seed == 5
    s, note = settings_from_options(GenerateConfig(sampler="beam"))
    assert s.spec.name == "topk" and "beam" in note
    with pytest.raises(MinigptError, match="beam search cannot stream"):
        settings_from_options(g, sampler="beam")
    with pytest.raises(MinigptError, match="--max-tokens must be at least 1"):
        settings_from_options(g, max_tokens=0)
    with pytest.raises(MinigptError, match="--p must be in"):
        settings_from_options(g, p=2.0)


def test_help_lists_every_command_and_the_seed_rule():
    text = help_text()
    for c in COMMANDS:
        assert c.usage in text
    assert "/seed N every turn starts from seed N" in text and "/seed random each turn draws a fresh seed" in text


# --- sessions in-process ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def generator(trained_run):
    from minigpt_cli.generate import Generator
    from minigpt_cli.model import load_model
    from minigpt_cli.vocab import load_vocabulary, make_tokenizer

    vocab = load_vocabulary(trained_run / "vocab.txt")
    return Generator(load_model(trained_run / "model.keras", len(vocab)), make_tokenizer(vocab))


def _consoles() -> tuple[Console, Console]:
    return (Console(file=io.StringIO(), soft_wrap=True, width=200) for _ in range(2))


def _lines(console: Console) -> list[str]:
    return console.file.getvalue().splitlines()


def _reader(lines: list[str]):
    it = iter(lines)

    def read(_prompt: str) -> str:
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return read


def test_a_session_in_process(generator):
    """Commands change the next turn; a fixed seed repeats a text; bad lines change nothing; /quit leaves."""
    from minigpt_cli.generate import Generator

    out, info = _consoles()
    session = ChatSession(Generator(generator.model, generator.tokenizer), BASE, out=out, info=info)
    session.warm_up()
    session.wait_warm()
    assert len(session.gen._loops) == 1  # the warm-up compiled the loop the first turn needs...
    script = [
        "/seed 3",
        "the king",
        "/k 0",  # refused: k stays 10
        "/bogus",
        "the king",  # same seed, same settings: same text
        "/seed random",
        "/k 5",
        "the king",
        "",  # an empty line: from [BOS]
        "the " * 40,  # longer than the window: one line, the session goes on
        "/settings",
        "/help",
        "/quit",
        "never run",
    ]
    assert run_session(session, _reader(script)) == 0
    texts = [t.text for t in session.turns]
    assert [t.prompt for t in session.turns] == ["the king", "the king", "the king", ""]
    assert texts[0] == texts[1] and texts[0]
    assert session.turns[0].seed == session.turns[1].seed == 3
    assert session.turns[2].seed != 3 and session.turns[3].seed != session.turns[2].seed
    assert len(session.gen._loops) == 2  # ...and the first two turns used it (k=5 is another loop)
    # The stream gives exactly what the batch generator gives for the same seed.
    reference = generator.run(["the king"], SamplerSpec("topk", k=10, seed=3), max_tokens=12)[0]
    assert texts[0] == reference.text
    # One line of output per prompt (the refused long prompt included); everything else on info.
    assert _lines(out) == [*texts, ""]
    said = info.file.getvalue()
    assert "error: /k must be at least 1, got 0" in said
    assert "unknown command /bogus" in said
    assert "the prompt is 40 tokens but the model's window is 32 tokens" in said
    assert "sampler topk · k 5 · temperature 1.0 · max-tokens 12 · seed random" in said
    assert "Seeds: with /seed N" in said
    assert said.count(" tokens · ") == 4 and "first token" in said and "seed 3" in said


class _CtrlCConsole(Console):
    """Sends this process SIGINT (as Ctrl-C on a terminal does) as the stream prints its ``n``-th piece."""

    def __init__(self, *n: int):
        super().__init__(file=io.StringIO(), soft_wrap=True, width=200)
        self.n, self.pieces = set(n), 0

    def print(self, *args, **kwargs):
        super().print(*args, **kwargs)
        if args and kwargs.get("end") == "" and args[0].style != "dim":  # a piece, not the prompt's echo
            self.pieces += 1
            if self.pieces in self.n:
                os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_stops_the_generation_and_the_session_goes_on(generator):
    settings = replace(BASE, spec=replace(BASE.spec, seed=4), max_tokens=25)
    out, info = _CtrlCConsole(2), Console(file=io.StringIO(), soft_wrap=True, width=200)
    session = ChatSession(generator, settings, out=out, info=info, interactive=True)
    run_session(session, _reader(["the king", "the king"]))
    first, second = session.turns
    assert first.interrupted and not second.interrupted
    assert first.text and second.text.startswith(first.text) and len(second.text) > len(first.text)
    assert "stopped (Ctrl-C)" in info.file.getvalue()
    assert _lines(out) == [f"the king {first.text}", f"the king {second.text}"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is itself again at the prompt


def test_ctrl_c_during_a_turn_is_noted_not_raised():
    """During a turn Ctrl-C must not land inside TensorFlow or a half-printed line: it is held, then noted."""
    idle = threading.Event()
    bystander = threading.Thread(target=idle.wait, daemon=True)  # started before: it may take the signal
    bystander.start()
    try:
        with ctrl_c_noted() as came:
            assert not came()
            os.kill(os.getpid(), signal.SIGINT)
            try:
                time.sleep(0.2)  # the bystander may take the signal now: Python's handler must only set the flag
            except KeyboardInterrupt:
                pytest.fail("Ctrl-C raised KeyboardInterrupt inside the turn")
            deadline = time.monotonic() + 5
            while not came() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert came()
            seen = []
            thread = threading.Thread(target=lambda: seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
            thread.start()
            thread.join()
            assert signal.SIGINT in seen[0]  # threads started meanwhile (TensorFlow's) hold it too
    finally:
        idle.set()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    with pytest.raises(KeyboardInterrupt):  # and after the turn, Ctrl-C is itself again
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)


def test_ctrl_c_during_a_script_turn_ends_the_script(generator):
    out, info = _CtrlCConsole(1), Console(file=io.StringIO(), soft_wrap=True, width=200)
    session = ChatSession(generator, replace(BASE, max_tokens=25), out=out, info=info)
    with pytest.raises(KeyboardInterrupt):
        run_session(session, _reader(["the king", "the king"]))
    assert len(_lines(out)) == 1 and not session.turns


def test_ctrl_c_at_the_prompt(generator):
    """A terminal: Ctrl-C drops the line and asks again, Ctrl-D leaves with 0. A script: Ctrl-C ends it."""
    keys = iter([KeyboardInterrupt, "the king", EOFError])

    def read(_prompt):
        key = next(keys)
        if isinstance(key, type):
            raise key
        return key

    out, info = _consoles()
    session = ChatSession(generator, BASE, out=out, info=info, interactive=True)
    assert run_session(session, read, prompt="> ") == 0
    assert [t.prompt for t in session.turns] == ["the king"]
    session.interactive = False
    keys = iter([KeyboardInterrupt, "the king"])
    with pytest.raises(KeyboardInterrupt):
        run_session(session, read)
    assert len(session.turns) == 1


# --- the real command: a pipe and a terminal ---------------------------------------------------------------


def test_chat_from_a_pipe(trained_run):
    """A script: one line of text per prompt on stdout, everything else on stderr, exit 0."""
    script = "the king\n/seed 3\nthe king\nthe king\n/k 0\n/bogus\n/sampler beam\n/sampler topp\n\n/quit\nnever run\n"
    result = minigpt("chat", "-r", trained_run, "--max-tokens", "8", stdin=script, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 5, result.stdout  # four prompts, four lines: no prompt, no banner
    assert lines[1] == lines[2] and lines[1], result.stdout
    assert "error: /k must be at least 1, got 0" in result.stderr
    assert "error: unknown command /bogus" in result.stderr
    assert "error: beam search cannot stream" in result.stderr
    assert "sampler topp (p 0.5)" in result.stderr
    status = [line for line in result.stderr.splitlines() if " tokens · " in line]
    assert len(status) == 4 and all("first token" in s for s in status)
    assert "seed 3" in status[1] and "topp" in status[3]
    assert not any(line.startswith(">") for line in lines) and "minigpt chat on" not in result.stdout


def test_chat_refuses_beam_and_bad_options_before_loading():
    assert_user_error(minigpt("chat", "--sampler", "beam"), "beam search cannot stream")
    assert_user_error(minigpt("chat", "--max-tokens", "0"), "--max-tokens must be at least 1")


ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\x1b[=>]|\r")
# Runs minigpt with standard input as its controlling terminal, so that Ctrl-C on it sends SIGINT.
CTTY = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "os.execv(sys.executable, [sys.executable, '-m', 'minigpt_cli', *sys.argv[1:]])"
)


class Terminal:
    """``minigpt`` on a pseudo-terminal: type keys, wait for what appears."""

    def __init__(self, args: list[str], env: dict):
        import fcntl
        import struct
        import termios

        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CTTY, *args], stdin=slave, stdout=slave, stderr=slave, env=env,
            start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.seen = ""  # all output so far, ANSI codes and carriage returns removed
        self.at = 0  # where the next expect starts looking

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 65536)
        except OSError:  # the child is gone
            return False
        self.seen += ANSI.sub("", data.decode(errors="replace"))
        return bool(data)

    def expect(self, pattern: str, timeout: float = 30) -> re.Match:
        """Wait for ``pattern`` after the last match; return the match."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern).search(self.seen, self.at)
            if found:
                self.at = found.end()
                return found
            left = deadline - time.monotonic()
            if left <= 0 or (not self._read(left) and self.proc.poll() is not None):
                raise AssertionError(f"never saw {pattern!r}; the terminal showed:\n{self.seen[self.at :]}")

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            os.close(self.master)


def _threads_holding_sigint(pid: int) -> dict[int, bool]:
    """For each thread of a process, whether it holds (blocks) SIGINT."""
    holding = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
        holding[int(task.name)] = bool(int(status["SigBlk"], 16) & (1 << (signal.SIGINT - 1)))
    return holding


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the pseudo-terminal test is written for Linux")
def test_chat_on_a_terminal(trained_run, tmp_path):
    """Typing, streaming, the Up arrow's history, Ctrl-C during a generation and at the prompt, Ctrl-D."""
    env = dict(os.environ, TERM="xterm", MINIGPT_CACHE=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    term = Terminal(["chat", "-r", str(trained_run), "--max-tokens", "25"], env)
    try:
        term.expect(r"/help lists the commands")
        term.expect(r"\n> $", timeout=60)
        term.send("/seed 5\r")
        term.expect(r"seed 5: every turn starts from it.*\n> $")
        term.send("the king\r")
        first = term.expect(r"the king\n\s*the king (.*)\n(.* tokens · .*seed 5)\n> $")
        term.send("\x1b[A")  # Up: readline recalls "the king" from the history
        term.expect(r"the king$")
        term.send("\r")
        second = term.expect(r"\n\s*the king (.*)\n(.* tokens · .*seed 5)\n> $")
        assert second.group(1) == first.group(1)  # the same prompt, re-run: the same text (seed 5)
        # Another k is another loop to trace: the turn right after the command traces it (a second or so,
        # before the warm-up's settling delay is over), so the Ctrl-C lands inside the generation.
        term.send("/k 3\rthe queen\r")
        term.expect(r"the queen\n\s*the queen ")  # the typed line, then its echo: the turn has begun
        term.send("\x03")
        term.expect(r"stopped \(Ctrl-C\)\n> $")
        term.send("the queen\r")  # the session is whole after an interrupted trace
        term.expect(r"the queen\n\s*the queen .*\n.* tokens · .*topk k=3 .*\n> $")
        term.send("half a line")
        term.expect(r"half a line$")
        # CPython's readline acts on a signal only when it interrupts its select(): one that comes while it is
        # still busy with the last key (a human cannot be that fast) waits for the next key. Let it settle.
        time.sleep(0.5)
        term.send("\x03")  # Ctrl-C at the prompt: the line is dropped, a new prompt
        term.expect(r"\n> $")
        term.send("/settings\r")
        term.expect(r"sampler topk · k 3 .* seed 5 .*\n> $")
        assert " tokens · " not in term.seen[term.seen.rindex("half a line") :]  # nothing ran in between
        holding = _threads_holding_sigint(term.proc.pid)
        # The main thread takes Ctrl-C, no other (TensorFlow's pools, the warm-up) may: see chat.sigint_held.
        assert holding.pop(term.proc.pid) is False
        assert all(holding.values()), holding
        term.send("\x04")  # Ctrl-D: leave
        assert term.close() == 0, term.seen
    finally:
        if term.proc.poll() is None:
            term.proc.kill()
    history = (tmp_path / "chat_history").read_text()
    assert "the king" in history and "/seed 5" in history and "half a line" not in history
    assert "Traceback" not in term.seen
