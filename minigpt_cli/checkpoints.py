"""Checkpoints: model + optimizer state and the training position, written atomically and durably.

``checkpoints/ckpt-<step>.keras`` holds the compiled model (weights, optimizer
state, schedule); ``checkpoints/latest.json`` names it, with the epoch, the
step inside the epoch, the global step, and the file's size and sha256. The
model file is written and flushed to disk first, the pointer after it, so at
every moment the pointer names a complete file; older files are removed only
once both are on disk. ``latest()`` checks the file against the pointer, so a
truncated or replaced checkpoint is refused, never loaded.
"""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from minigpt_cli.errors import MinigptError
from minigpt_cli.runs import WriteError, atomic_path, file_digest, write_text


@dataclass(frozen=True)
class Position:
    """Where training stands: ``epoch`` (0-based) and ``step`` inside it, ``global_step`` overall.

    ``file`` names the checkpoint, ``size`` and ``sha256`` are its bytes' (empty in pointers written
    before they were recorded); ``trained_with`` holds what the weights were trained with (the config keys a
    resume may not change, and the vocabulary's digest).
    """

    epoch: int
    step: int
    global_step: int
    steps_per_epoch: int
    file: str = ""
    size: int = -1
    sha256: str = ""
    trained_with: dict = field(default_factory=dict)


def _dir(root: Path) -> Path:
    return root / "checkpoints"


def save(root: Path, model, position: Position, copy_of: Path | None = None) -> Path:
    """Write the model (or a copy of the model file ``copy_of``) as a new checkpoint and point ``latest.json``
    at it; then remove older ones.

    A failed write raises ``WriteError`` saying how to go on; the previous checkpoint is left whole.
    """
    folder = _dir(root)
    previous = (folder / "latest.json").is_file()
    name = f"ckpt-{position.global_step:08d}.keras"
    if (folder / name).exists():  # never overwrite the file the current pointer may name
        name = f"ckpt-{position.global_step:08d}-{secrets.token_hex(3)}.keras"
    try:
        with atomic_path(folder / name) as tmp:
            if copy_of is None:
                model.save(tmp)
            else:
                shutil.copyfile(copy_of, tmp)
            size, sha256 = file_digest(tmp)
        pointer = replace(position, file=name, size=size, sha256=sha256)
        write_text(folder / "latest.json", json.dumps(asdict(pointer), indent=2) + "\n")
    except WriteError as e:
        then = f"resume with: minigpt train --resume --run-dir {root}" if previous else "train again"
        raise WriteError(e.path, e.error, then=then) from e
    for old in folder.glob("ckpt-*.keras"):
        if old.name != name:
            old.unlink(missing_ok=True)
    for tmp in folder.glob(".ckpt-*.tmp.keras"):  # left by a process killed while writing
        tmp.unlink(missing_ok=True)
    return folder / name


def verify(root: Path, position: Position) -> None:
    """Refuse a checkpoint file that is missing, or not the one ``latest.json`` recorded (truncated, replaced)."""
    path = path_of(root, position)
    fix = f"delete {_dir(root)} and train again without --resume"
    if not path.is_file():
        raise MinigptError(f"{_dir(root) / 'latest.json'} names a missing file {path.name}; {fix}")
    if position.size < 0 and not position.sha256:
        return  # a pointer from before sizes and checksums were recorded
    size, sha256 = file_digest(path)
    if size != position.size:
        raise MinigptError(
            f"checkpoint {path} is damaged: {size:,} bytes where latest.json records {position.size:,} "
            f"(truncated or replaced); {fix}"
        )
    if sha256 != position.sha256:
        raise MinigptError(
            f"checkpoint {path} is damaged: its sha256 is not the one latest.json records (changed or replaced); {fix}"
        )


def latest(root: Path) -> Position | None:
    """The last complete checkpoint, checked against its recorded size and sha256; None when there is none."""
    pointer = _dir(root) / "latest.json"
    if not pointer.is_file():
        return None
    try:
        position = Position(**json.loads(pointer.read_text(encoding="utf-8")))
    except (ValueError, TypeError, UnicodeDecodeError):
        raise MinigptError(f"{pointer} is damaged; delete the checkpoints folder and train again") from None
    if not position.file or Path(position.file).name != position.file:
        raise MinigptError(f"{pointer} is damaged; delete the checkpoints folder and train again")
    verify(root, position)
    return position


def path_of(root: Path, position: Position) -> Path:
    return _dir(root) / position.file
