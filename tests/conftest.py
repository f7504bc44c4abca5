"""Shared fixtures: a tiny model trained once through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CORPUS = Path(__file__).parent / "fixtures" / "corpus"

# A model of a few thousand parameters on the fixture corpus.
TINY = [
    "data.min_string_len=64",
    "data.batch_size=16",
    "vocab.size=300",
    "model.seq_len=32",
    "model.embed_dim=16",
    "model.feed_forward_dim=16",
    "model.num_heads=2",
    "model.num_layers=1",
    "train.epochs=1",
    "train.steps_per_epoch=6",
    "train.validation_steps=2",
    "generate.max_tokens=12",
]


#: Python source that, run first, makes TensorFlow unimportable as where it is not installed (``find_spec`` finds
#: no ``tensorflow*`` or ``tf_keras`` module): KerasHub and Keras then run without it.
BLOCK_TENSORFLOW = """
import importlib.machinery, sys
class _NoTensorFlow(importlib.machinery.PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        top = name.split(".")[0]
        if top.startswith("tensorflow") or top == "tf_keras":
            return None  # as if not installed
        return super().find_spec(name, path, target)
sys.meta_path = [_NoTensorFlow if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
"""


def tiny_sets(*extra: str, train: Path = CORPUS / "train.txt", valid: Path = CORPUS / "valid.txt") -> list[str]:
    """``--set`` arguments for a tiny run on the fixture corpus."""
    args = []
    for s in [f"data.train={train}", f"data.valid={valid}", *TINY, *extra]:
        args += ["--set", s]
    return args


def minigpt(*args: str, cwd: Path | None = None, stdin: str | None = None, timeout: int = 300):
    """Run the real ``minigpt`` command in a subprocess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-m", "minigpt_cli", *map(str, args)],
        cwd=cwd,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def assert_user_error(result, *fragments: str) -> None:
    """Exit code 2, one line on stderr, no traceback, and the line says what is wrong."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session", autouse=True)
def machine_cache(tmp_path_factory):
    """``$XDG_CACHE_HOME`` for the session: the peak FLOP/s probe runs once per session, never in the user's cache."""
    path = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(path))
        yield path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """vocab -> train through the CLI once; tests read (never modify) this run."""
    run = tmp_path_factory.mktemp("run")
    vocab = minigpt("vocab", "--run-dir", run, *tiny_sets())
    assert vocab.returncode == 0, vocab.stderr
    train = minigpt("train", "--run-dir", run, *tiny_sets())
    assert train.returncode == 0, train.stderr
    return run


def samples_json(result) -> list[dict]:
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
