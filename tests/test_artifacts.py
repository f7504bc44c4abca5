"""Trust in the run directory: durable atomic writes, checked checkpoints and token caches, write failures,
one command at a time."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CORPUS, assert_user_error, minigpt, tiny_sets

from minigpt_cli import checkpoints
from minigpt_cli.errors import MinigptError
from minigpt_cli.runs import LOCK_NAME, RunLock, WriteError, atomic_path, file_digest, write_text

# ---------------------------------------------------------------- atomic writes


def _calls_during(fn, *names: str) -> list[str]:
    """The os functions among ``names`` that ``fn()`` calls, in order (watched with a profile hook)."""
    watched = {getattr(os, name): name for name in names}
    seen: list[str] = []

    def hook(frame, event, arg):
        if event == "c_call" and arg in watched:
            seen.append(watched[arg])

    sys.setprofile(hook)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def _umask() -> int:
    """This process's umask, read without changing it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    raise AssertionError("no Umask in /proc/self/status")


def test_write_is_flushed_before_and_after_the_rename(tmp_path):
    target = tmp_path / "a.txt"
    calls = _calls_during(lambda: write_text(target, "hello\n"), "fsync", "replace", "rename")
    assert calls == ["fsync", "replace", "fsync"], calls  # the file's data, the rename, the folder's entry
    assert target.read_text() == "hello\n"


def test_write_leaves_the_umask_alone_and_applies_it(tmp_path):
    target = tmp_path / "a.txt"
    calls = _calls_during(lambda: write_text(target, "x"), "umask")
    assert calls == [], "atomic_path changed the process-wide umask"
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    script = f"from minigpt_cli.runs import write_text; write_text({str(tmp_path / 'b.txt')!r}, 'x')"
    subprocess.run([sys.executable, "-c", script], check=True, umask=0o077)
    assert (tmp_path / "b.txt").stat().st_mode & 0o777 == 0o600


def test_failed_write_names_the_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "model.keras"
    write_text(target, "old")
    with pytest.raises(WriteError) as info:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            try:  # a library that wraps the OSError, as some savers do
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError as e:
                raise RuntimeError("could not save") from e
    message = f"cannot write {target}: No space left on device; free some space, then run the command again"
    assert str(info.value) == message
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"], "temporary file left behind"
    with pytest.raises(ValueError):  # not a write error: passes through as it is
        with atomic_path(target):
            raise ValueError("bad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras"]


def test_file_size_limit_is_a_write_error(tmp_path):
    """A real failing write (EFBIG under RLIMIT_FSIZE): one clear error, the previous file intact."""
    target = tmp_path / "big.txt"
    write_text(target, "old")
    script = textwrap.dedent(f"""
        import resource, signal
        from minigpt_cli.runs import write_text, WriteError
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            write_text({str(target)!r}, "x" * 100_000)
        except WriteError as e:
            print(e)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.startswith(f"cannot write {target}: File too large; raise the file size limit"), result
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]


def test_folder_or_rename_failing_is_a_write_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(WriteError, match="cannot write .*file/x.txt: Not a directory"):
        write_text(tmp_path / "file" / "x.txt", "x")
    (tmp_path / "folder").mkdir()
    with pytest.raises(WriteError, match="cannot write .*folder: Is a directory"):
        write_text(tmp_path / "folder", "x")  # the rename fails
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]


# ---------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def keras_models():
    import keras

    def make(units: int):
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(units)])
        model.compile(optimizer="adam", loss="mse")
        return model

    return make(3), make(5)


def test_checkpoint_records_and_checks_its_file(tmp_path, keras_models):
    import keras

    model, other = keras_models
    first = checkpoints.save(tmp_path, model, checkpoints.Position(0, 3, 3, 6))
    second = checkpoints.save(tmp_path, model, checkpoints.Position(1, 0, 6, 6))
    assert not first.exists() and second.exists(), "the older checkpoint is removed once the new one is in"
    position = checkpoints.latest(tmp_path)
    assert position.file == second.name and position.size == second.stat().st_size
    assert position.sha256 == file_digest(second)[1]
    keras.saving.load_model(checkpoints.path_of(tmp_path, position))

    again = checkpoints.save(tmp_path, model, checkpoints.Position(1, 0, 6, 6))  # same step: never overwrite
    assert again != second and checkpoints.latest(tmp_path).file == again.name

    data = again.read_bytes()
    again.write_bytes(data[: len(data) // 2])
    with pytest.raises(MinigptError, match=r"checkpoint .* is damaged: .* bytes where latest.json records .*"):
        checkpoints.latest(tmp_path)
    other.save(tmp_path / "foreign.keras")
    os.replace(tmp_path / "foreign.keras", again)  # another model's checkpoint in its place
    with pytest.raises(MinigptError, match="damaged"):
        checkpoints.latest(tmp_path)
    again.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit changed
    with pytest.raises(MinigptError, match="sha256"):
        checkpoints.latest(tmp_path)


def test_checkpoint_pointer_from_before_checksums_is_accepted(tmp_path, keras_models):
    path = checkpoints.save(tmp_path, keras_models[0], checkpoints.Position(0, 2, 2, 6))
    pointer = {"epoch": 0, "step": 2, "global_step": 2, "steps_per_epoch": 6, "file": path.name}
    (tmp_path / "checkpoints" / "latest.json").write_text(json.dumps(pointer))
    assert checkpoints.latest(tmp_path).file == path.name


# ---------------------------------------------------------------- the token cache


def test_damaged_token_cache_is_rebuilt_never_used(tmp_path):
    import hashlib

    from minigpt_cli.vocab import make_tokenizer
    from minigpt_cli.windows import cut_windows, load_windows

    text = CORPUS / "valid.txt"
    chars = sorted({c for c in text.read_text(encoding="utf-8").lower() if not c.isspace()})
    vocab = ["[PAD]", "[UNK]", "[BOS]", *chars, *(f"##{c}" for c in chars)]
    tokenizer = make_tokenizer(vocab)
    cache = tmp_path / "cache"

    def load():
        got = load_windows(cache, vocab, tokenizer, [text], "packed", 16, 64, True)
        return np.array(got.windows), got.cached

    expected = cut_windows([text], tokenizer, "packed", 16, 64)
    assert len(expected) > 10
    windows, cached = load()
    assert not cached
    np.testing.assert_array_equal(windows, expected)
    [raw] = cache.glob("*.bin")
    sidecar = raw.with_suffix(".json")
    good, good_meta = raw.read_bytes(), sidecar.read_text()
    assert load()[1], "a whole cache is read back"
    meta = json.loads(good_meta)
    ids = np.frombuffer(good, dtype=meta["dtype"])
    out_of_range = ids.copy()
    out_of_range[5] = len(vocab) + 3
    bad = out_of_range.tobytes()

    damaged = {
        "truncated": (good[: len(good) // 2], good_meta),
        "empty": (b"", good_meta),
        "same size, other bytes": (good[::-1], good_meta),
        "sidecar of another shape": (good, json.dumps({**meta, "shape": [len(ids) - 1]})),
        "sidecar of another dtype": (good, json.dumps({**meta, "dtype": "int32"})),
        "sidecar not JSON": (good, "{"),
        "an id outside the vocabulary, sidecar agreeing": (
            bad, json.dumps({**meta, "sha256": hashlib.sha256(bad).hexdigest()})
        ),
    }  # fmt: skip
    for what, (data, side) in damaged.items():
        raw.write_bytes(data)
        sidecar.write_text(side)
        windows, cached = load()
        assert not cached, what
        np.testing.assert_array_equal(windows, expected, err_msg=what)
        assert raw.read_bytes() == good and json.loads(sidecar.read_text()) == meta, f"{what}: not rewritten"
        windows, cached = load()
        assert cached, what
        np.testing.assert_array_equal(windows, expected, err_msg=what)
    sidecar.unlink()  # a cache whose sidecar was lost
    assert not load()[1]
    assert load()[1]


# ---------------------------------------------------------------- a full disk while training


def _limited(limit: int):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    return preexec


def test_training_stops_cleanly_when_a_checkpoint_cannot_be_written(tmp_path):
    import keras

    import minigpt_cli.model  # noqa: F401  (registers the model's classes for loading)

    run = tmp_path / "run"
    sets = tiny_sets("train.sample_each_epoch=false")
    assert minigpt("vocab", "--run-dir", run, *sets).returncode == 0
    first = minigpt("train", "--run-dir", run, *sets)
    assert first.returncode == 0, first.stderr
    model_bytes = (run / "model.keras").read_bytes()
    pointer = (run / "checkpoints" / "latest.json").read_text()
    ckpt = run / "checkpoints" / json.loads(pointer)["file"]
    assert ckpt.stat().st_size > 100_000  # the limit below stops it, not the small files before it

    # Every file above 64 KiB fails to grow (EFBIG): the next checkpoint is the first such file.
    env = dict(os.environ, PYTHONUNBUFFERED="1", COLUMNS="200")
    args = [sys.executable, "-m", "minigpt_cli", "train", "--resume", "--run-dir", str(run), "--set", "train.epochs=2"]

    def limited_train(*extra: str) -> str:
        result = subprocess.run([*args, *extra], capture_output=True, text=True, env=env, timeout=300,
                                preexec_fn=_limited(65536))  # fmt: skip
        assert result.returncode == 2, (result.returncode, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        assert errors == [lines[-1]], result.stderr  # one line, the last
        assert lines[-1].endswith(f", then resume with: minigpt train --resume --run-dir {run}")
        return lines[-1]

    # A checkpoint mid-epoch (step 9 of 12), and model.keras at the epoch's end, written before its checkpoint.
    line = limited_train("--set", "train.checkpoint_every=3")
    assert line.startswith(f"error: cannot write {run / 'checkpoints' / 'ckpt-00000009.keras'}: File too large")
    line = limited_train("--set", "train.checkpoint_every=0")
    assert line.startswith(f"error: cannot write {run / 'model.keras'}: File too large")

    # The previous artifacts are untouched and load; no temporary file is left.
    assert (run / "model.keras").read_bytes() == model_bytes
    assert (run / "checkpoints" / "latest.json").read_text() == pointer
    assert checkpoints.latest(run).file == ckpt.name
    keras.saving.load_model(run / "model.keras", compile=False)
    keras.saving.load_model(ckpt, compile=False)
    assert not [p for p in run.rglob(".*.tmp*")], list(run.rglob(".*.tmp*"))

    resumed = minigpt("train", "--resume", "--run-dir", run, "--set", "train.epochs=2")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in json.loads((run / "history.json").read_text())] == [1, 2]

    # A checkpoint cut short afterwards is refused, never loaded.
    ckpt = run / "checkpoints" / json.loads((run / "checkpoints" / "latest.json").read_text())["file"]
    ckpt.write_bytes(ckpt.read_bytes()[:50_000])
    refused = minigpt("train", "--resume", "--run-dir", run, "--set", "train.epochs=3")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert f"error: checkpoint {ckpt} is damaged" in refused.stderr


# ---------------------------------------------------------------- one command at a time


def test_lock_refuses_a_second_holder_and_takes_over_a_dead_ones(tmp_path):
    notes: list[str] = []
    with RunLock(tmp_path, "train") as held:
        holder = json.loads((tmp_path / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["command"] == "minigpt train"
        with pytest.raises(MinigptError, match=rf"in use by 'minigpt train' \(pid {os.getpid()}, started "):
            RunLock(tmp_path, "vocab", wait=0.2).acquire()
        assert held.fd is not None
    assert (tmp_path / LOCK_NAME).read_text() == "", "a clean end empties the lock file"
    with RunLock(tmp_path, "vocab", note=notes.append):
        pass
    assert notes == []
    # What a killed holder leaves: its record, and no lock (the kernel dropped it with the process).
    dead = {"pid": 999999, "command": "minigpt train", "host": os.uname().nodename, "started": "then"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(dead))
    with RunLock(tmp_path, "train", note=notes.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert len(notes) == 1 and "pid 999999" in notes[0] and "taking over" in notes[0]


def test_second_command_on_a_training_run_is_refused(tmp_path):
    run = tmp_path / "run"
    sets = tiny_sets("train.epochs=200", "train.steps_per_epoch=3", "train.sample_each_epoch=false")
    assert minigpt("vocab", "--run-dir", run, *sets).returncode == 0
    lock = run / LOCK_NAME
    first = subprocess.Popen(
        [sys.executable, "-m", "minigpt_cli", "train", "--run-dir", str(run), *sets],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.time() + 60
        while not (lock.is_file() and f'"pid": {first.pid},' in lock.read_text()):
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline, "the first train never took the lock"
            time.sleep(0.05)

        for command in ("train", "vocab"):
            start = time.time()
            second = minigpt(command, "--run-dir", run, "--set", "train.epochs=3", timeout=60)
            assert time.time() - start < 30
            assert_user_error(second, f"run directory {run} is in use by 'minigpt train' (pid {first.pid}")
            assert "epochs = 3" not in (run / "config.toml").read_text(), f"{command} wrote the config"
        assert first.poll() is None, "the refused commands disturbed the first"
    finally:
        first.kill()  # SIGKILL: it cannot release the lock itself
        first.communicate(timeout=60)

    third = minigpt("train", "--run-dir", run, "--set", "train.epochs=1", timeout=300)
    assert third.returncode == 0, third.stderr
    notes = [line for line in third.stderr.splitlines() if "taking over the lock" in line]
    assert len(notes) == 1 and f"pid {first.pid}" in notes[0], third.stderr
    assert lock.read_text() == "", "the lock is released at the end"
