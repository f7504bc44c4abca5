"""The run directory: where subcommands leave artifacts for each other.

Every artifact is written to a temporary name in the same folder and renamed
into place, so a crash or kill never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minigpt_cli.errors import MinigptError


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp" + path.suffix)
    os.close(fd)
    tmp_path = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@dataclass(frozen=True)
class RunDir:
    """Paths of the artifacts in one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def vocab(self) -> Path:
        return self.root / "vocab.txt"

    @property
    def model(self) -> Path:
        return self.root / "model.keras"

    @property
    def history_json(self) -> Path:
        return self.root / "history.json"

    @property
    def history_csv(self) -> Path:
        return self.root / "history.csv"

    @property
    def steps_csv(self) -> Path:
        return self.root / "steps.csv"

    @property
    def curve(self) -> Path:
        return self.root / "training_curve.png"

    @property
    def samples(self) -> Path:
        return self.root / "samples.txt"

    def create(self) -> RunDir:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MinigptError(f"cannot create run directory {self.root}: {e.strerror}") from None
        if not self.root.is_dir():
            raise MinigptError(f"run directory {self.root} is not a directory")
        return self

    def require_vocab(self) -> Path:
        if not self.vocab.is_file():
            raise MinigptError(f"no vocabulary in {self.root}: run 'minigpt vocab --run-dir {self.root}' first")
        return self.vocab

    def require_model(self) -> Path:
        if not self.model.is_file():
            raise MinigptError(f"no trained model in {self.root}: run 'minigpt train --run-dir {self.root}' first")
        return self.model
