"""The run directory: where subcommands leave artifacts for each other.

Every artifact is written to a temporary name in the same folder, flushed to
disk (fsync), renamed into place, and the folder flushed after the rename, so
a crash, a kill or a power cut never leaves a half-written file behind, and a
file once renamed into place stays there. A write that fails (disk full,
read-only file system, no permission) is a one-line error naming the file,
and the file it would have replaced is left as it was.

One command at a time writes a run directory: ``RunLock`` holds an exclusive
``flock`` on ``<run>/.lock`` for as long as a command works on it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from minigpt_cli.errors import MinigptError


def _fix_for(error: OSError, folder: Path) -> str:
    """What to do about a failed write, by its errno."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space"
    if error.errno == errno.EFBIG:
        return "raise the file size limit (ulimit -f) or use a file system that takes larger files"
    if error.errno == errno.EROFS:
        return "make the file system writable or use another --run-dir"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"make {folder} writable"
    return "fix that"


class WriteError(MinigptError):
    """An artifact could not be written; the file it would have replaced is left as it was."""

    def __init__(self, path: Path, error: OSError, then: str = "run the command again"):
        self.path, self.error, self.then = Path(path), error, then
        reason = error.strerror or str(error) or type(error).__name__
        super().__init__(f"cannot write {path}: {reason}; {_fix_for(error, self.path.parent)}, then {then}")


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind ``exc``: itself, or one it was raised from or while handling (libraries wrap them)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _new_temp(path: Path) -> Path:
    """Create an empty file beside ``path`` under a fresh name; the process's umask applies to its mode."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}"
        try:
            os.close(os.open(tmp, flags, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(path))


def fsync_file(path: Path) -> None:
    """Flush ``path``'s data to disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename into it) to disk; a no-op where the file system cannot."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def file_digest(path: Path) -> tuple[int, str]:
    """Size and sha256 of a file."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the caller to write; on success fsync it, rename it to
    ``path`` and fsync the folder. An OSError while writing, flushing or renaming (also one a library wrapped)
    becomes a ``WriteError`` naming ``path``; the temporary file is removed and ``path`` left as it was."""
    path = Path(path)
    try:
        if not path.parent.is_dir():
            if path.parent.exists():  # mkdir would only say "File exists"
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent))
            path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _new_temp(path)
    except OSError as e:
        raise WriteError(path, e) from e
    try:
        try:
            yield tmp
        except MinigptError:
            raise
        except Exception as e:
            error = _os_error_in(e)
            if error is None:
                raise
            raise WriteError(path, error) from e
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        raise WriteError(path, e) from e
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


LOCK_NAME = ".lock"


def _note(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _describe(holder: dict) -> str:
    where = "" if holder.get("host") in (None, socket.gethostname()) else f" on {holder['host']}"
    return f"'{holder.get('command', '?')}' (pid {holder.get('pid', '?')}{where}, started {holder.get('started', '?')})"


class RunLock:
    """One command at a time on a run directory: an exclusive ``flock`` on ``<run>/.lock``.

    The file names the holder (pid, command, host, start time). The kernel drops the lock when its process
    dies, however it dies, and the holder empties the file when it is done; so a file found unlocked but not
    empty was left by a process that was killed, and is taken over with a note.
    """

    def __init__(self, root: Path, command: str, note: Callable[[str], None] = _note, wait: float = 2.0):
        self.root, self.command, self.note, self.wait = Path(root), command, note, wait
        self.fd: int | None = None
        self.stale: dict | None = None  # the dead holder this lock was taken over from

    @property
    def path(self) -> Path:
        return self.root / LOCK_NAME

    def acquire(self) -> RunLock:
        """Take the lock, or raise MinigptError naming the process that holds it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise MinigptError(f"cannot lock run directory {self.root}: {e.strerror}") from None
        deadline = time.monotonic() + self.wait
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = _read_holder(fd)
                    # The holder writes its name just after it locks: wait a moment for it, not longer.
                    if holder is None and time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    who = _describe(holder) if holder else "another process"
                    raise MinigptError(
                        f"run directory {self.root} is in use by {who}; wait for it to finish or stop it, "
                        "then run this command again"
                    ) from None
            self.stale = _read_holder(fd)
            record = {
                "pid": os.getpid(),
                "command": f"minigpt {self.command}",
                "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        except OSError as e:
            os.close(fd)
            raise MinigptError(f"cannot lock run directory {self.root}: {e.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        if self.stale is not None:
            self.note(
                f"note: taking over the lock on {self.root} from {_describe(self.stale)}, "
                "which ended without releasing it"
            )
        return self

    def release(self) -> None:
        """Empty the lock file (a clean end) and unlock it."""
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the last descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict | None:
    """The holder recorded in the lock file, or None when it is empty (or being written)."""
    try:
        data = os.pread(fd, 4096, 0)
        holder = json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def run_lock(root: Path, command: str, multi_worker: bool = False) -> contextlib.AbstractContextManager:
    """The ``RunLock`` a command takes; none for a non-chief worker of a multi-worker job, which shares the
    chief's run directory and writes nothing to it."""
    if multi_worker:
        from minigpt_cli.distribute import is_chief, read_tf_config

        if not is_chief(read_tf_config()):
            return contextlib.nullcontext()
    return RunLock(root, command)


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
    def best_model(self) -> Path:
        """The model of the epoch with the lowest validation loss so far (see ``callbacks.BestModel``)."""
        return self.root / "model.best.keras"

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

    def require_best_model(self) -> Path:
        if not self.best_model.is_file():
            raise MinigptError(
                f"no {self.best_model.name} in {self.root}: it is written at the end of each epoch whose validation "
                f"loss is the lowest so far; train at least one epoch ('minigpt train --run-dir {self.root}'), "
                "or use model.keras (leave out --best)"
            )
        return self.best_model
