"""Checkpoints: model + optimizer state and the training position, written atomically.

``checkpoints/ckpt-<step>.keras`` holds the compiled model (weights, optimizer
state, schedule); ``checkpoints/latest.json`` names it, with the epoch, the
step inside the epoch and the global step. The model file is written first
and the pointer renamed into place after it, so at every moment the pointer
names a complete file; older files are removed only after that.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from minigpt_cli.errors import MinigptError
from minigpt_cli.runs import atomic_path, write_text


@dataclass(frozen=True)
class Position:
    """Where training stands: ``epoch`` (0-based) and ``step`` inside it, ``global_step`` overall."""

    epoch: int
    step: int
    global_step: int
    steps_per_epoch: int
    file: str = ""


def _dir(root: Path) -> Path:
    return root / "checkpoints"


def save(root: Path, model, position: Position) -> Path:
    folder = _dir(root)
    folder.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{position.global_step:08d}.keras"
    with atomic_path(folder / name) as tmp:
        model.save(tmp)
    pointer = Position(**{**asdict(position), "file": name})
    write_text(folder / "latest.json", json.dumps(asdict(pointer), indent=2) + "\n")
    for old in folder.glob("ckpt-*.keras"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder / name


def latest(root: Path) -> Position | None:
    """The last complete checkpoint, or None when there is none."""
    pointer = _dir(root) / "latest.json"
    if not pointer.is_file():
        return None
    try:
        position = Position(**json.loads(pointer.read_text(encoding="utf-8")))
    except (ValueError, TypeError):
        raise MinigptError(f"{pointer} is damaged; delete the checkpoints folder and train again") from None
    if not (_dir(root) / position.file).is_file():
        raise MinigptError(f"{pointer} names a missing file; delete the checkpoints folder and train again")
    return position


def path_of(root: Path, position: Position) -> Path:
    return _dir(root) / position.file
