"""tf.distribute on CPU: mirrored over logical devices, two workers on 127.0.0.1, precision."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_user_error, minigpt, samples_json, tiny_sets

from minigpt_cli import checkpoints
from minigpt_cli.distribute import is_chief, read_tf_config
from minigpt_cli.errors import MinigptError

SETS = ("data.windows=packed", "train.sample_each_epoch=false", "train.epochs=2", "train.steps_per_epoch=4")
#: How far a mixed_bfloat16 run's per-step losses may be from float32's (relative).
BF16_REL = 0.01


def _losses(run) -> list[float]:
    rows = (run / "steps.csv").read_text().splitlines()[1:]
    return [float(r.split(",")[1]) for r in rows]


@pytest.fixture(scope="module")
def vocab_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dist") / "vocab"
    assert minigpt("vocab", "--run-dir", run, *tiny_sets(*SETS)).returncode == 0
    return run


def _run_with_vocab(tmp_path, vocab_run, name):
    run = tmp_path / name
    run.mkdir()
    (run / "vocab.txt").write_bytes((vocab_run / "vocab.txt").read_bytes())
    return run


@pytest.fixture(scope="module")
def one_device(tmp_path_factory, vocab_run) -> list[float]:
    """The per-step losses of one device in float32: the curve the distributed runs are held to."""
    run = _run_with_vocab(tmp_path_factory.mktemp("one"), vocab_run, "single")
    result = minigpt("train", "--run-dir", run, *tiny_sets(*SETS, "train.distribution=none"))
    assert result.returncode == 0, result.stderr
    losses = _losses(run)
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 0.05, losses  # the curve moves, so matching it means something
    return losses


def test_mirrored_over_two_cpus_matches_one_device(tmp_path, vocab_run, one_device):
    mirrored = _run_with_vocab(tmp_path, vocab_run, "mirrored")
    two = minigpt(
        "train", "--run-dir", mirrored,
        *tiny_sets(*SETS, "train.distribution=mirrored", 'train.devices=["/cpu:0", "/cpu:1"]'),
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert "distribution: mirrored, 2 replica(s)" in two.stderr and "8 per replica" in two.stderr
    assert _losses(mirrored) == pytest.approx(one_device, rel=2e-3, abs=2e-3)


def test_batch_must_split_over_replicas(tmp_path, vocab_run):
    run = _run_with_vocab(tmp_path, vocab_run, "odd")
    devices = 'train.devices=["/cpu:0", "/cpu:1", "/cpu:2"]'
    result = minigpt("train", "--run-dir", run, *tiny_sets(*SETS, "train.distribution=mirrored", devices))
    assert result.returncode == 2 and "does not split over 3 replicas" in result.stderr


def test_mixed_bfloat16_trains_and_generates(tmp_path, vocab_run, one_device):
    run = _run_with_vocab(tmp_path, vocab_run, "bf16")
    result = minigpt("train", "--run-dir", run, *tiny_sets(*SETS, "train.precision=mixed_bfloat16"))
    assert result.returncode == 0, result.stderr
    assert "precision mixed_bfloat16" in result.stderr
    # bfloat16 keeps 8 bits of mantissa: the curve is float32's to within a percent, step by step.
    losses = _losses(run)
    assert losses == pytest.approx(one_device, rel=BF16_REL)
    assert losses[-1] < losses[0] - 0.05
    [sample] = samples_json(minigpt("generate", "--run-dir", run, "--json", "--seed", "1"))
    assert len(sample["token_ids"]) == 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster() -> dict:
    return {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.fixture
def spawned():
    """Worker processes a test starts; any left at its end are killed with everything they started."""
    procs: list[subprocess.Popen] = []
    yield procs
    for p in procs:
        if p.poll() is None:  # not yet reaped, so its pid is still its own
            for pid in [*_descendants(p.pid), p.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            p.communicate()


def _worker(spawned, run, index: int, cluster: dict, *extra: str, resume: bool = False):
    env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
    args = ["train", "--run-dir", str(run), *(["--resume"] if resume else [])]
    args += tiny_sets(*SETS, "train.distribution=multi_worker", "train.worker_timeout=90", *extra)
    worker = subprocess.Popen(
        [sys.executable, "-m", "minigpt_cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    spawned.append(worker)
    return worker


def _finish(workers, timeout: float) -> list[tuple[int, str, str]]:
    """Each worker's (exit code, stdout, stderr); fails if they have not all ended within ``timeout`` s."""
    end = time.monotonic() + timeout
    results = []
    for w in workers:
        try:
            out, err = w.communicate(timeout=max(end - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"a worker hung: {[x.poll() for x in workers]}") from None
        results.append((w.returncode, out, err))
    return results


def test_two_workers_on_localhost(tmp_path, vocab_run, one_device, spawned):
    run = _run_with_vocab(tmp_path, vocab_run, "cluster")
    cluster = _cluster()
    results = _finish([_worker(spawned, run, i, cluster) for i in range(2)], timeout=300)
    for code, _out, err in results:
        assert code == 0, err
    assert "2 replica(s) on 2 worker(s)" in results[0][2] and "8 per replica" in results[0][2]
    assert "not the chief" in results[1][2] and "not the chief" not in results[0][2]
    for name in ("model.keras", "history.csv", "steps.csv", "checkpoints/latest.json"):
        assert (run / name).is_file(), name
    assert len(json.loads((run / "history.json").read_text())) == 2
    # Each worker takes half of every global batch: the curve is the one device's, step by step.
    assert _losses(run) == pytest.approx(one_device, rel=1e-3, abs=1e-3)
    [sample] = samples_json(minigpt("generate", "--run-dir", run, "--json", "--seed", "2"))
    assert len(sample["token_ids"]) == 12


def _wait_for_checkpoint(run, chief, timeout: float = 240) -> None:
    """Until the chief has written its first checkpoint: training is under way on every worker."""
    pointer = run / "checkpoints" / "latest.json"
    end = time.monotonic() + timeout
    while not pointer.is_file() and chief.poll() is None and time.monotonic() < end:
        time.sleep(0.1)
    assert pointer.is_file(), "no checkpoint from the chief"


def test_a_signal_to_one_worker_stops_all_at_one_step_and_resume_finishes(tmp_path, vocab_run, spawned):
    run = _run_with_vocab(tmp_path, vocab_run, "stopped")
    long = ("train.steps_per_epoch=16", "train.checkpoint_every=2")
    cluster = _cluster()
    chief, other = (_worker(spawned, run, i, cluster, *long) for i in range(2))
    _wait_for_checkpoint(run, chief)
    other.send_signal(signal.SIGTERM)  # the non-chief: the chief learns of it through the all-reduce
    results = _finish([chief, other], timeout=120)
    position = checkpoints.latest(run)  # complete: its size and sha256 are the ones latest.json records
    assert position is not None and 0 < position.global_step < 32
    stops = []
    for code, _out, err in results:
        assert code == 130, err
        assert "Traceback" not in err
        [line] = [x for x in err.splitlines() if "Resume with:" in x]
        assert f"Resume with: minigpt train --resume --run-dir {run}" in line
        stops.append(line)
    # Both stopped for the same signal at the same step: the one the chief's checkpoint holds.
    assert stops[0] == stops[1] and "stopped by SIGTERM" in stops[0]
    assert f"at epoch {position.epoch + 1}, step {position.step};" in stops[0]
    assert len(_losses(run)) == position.global_step
    scratch = re.search(r"its artifacts go to (\S+)\)", results[1][2])
    assert scratch and not Path(scratch.group(1)).exists()  # the non-chief's scratch folder is gone

    cluster = _cluster()
    resumed = [_worker(spawned, run, i, cluster, *long, resume=True) for i in range(2)]
    for code, _out, err in _finish(resumed, timeout=300):
        assert code == 0, err
        assert f"resuming at epoch {position.epoch + 1}, step {position.step}" in err
    assert [row["epoch"] for row in json.loads((run / "history.json").read_text())] == [1, 2]
    steps = (run / "steps.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in steps] == list(range(1, 33))
    assert checkpoints.latest(run).global_step == 32


def test_a_worker_killed_outright_ends_the_others_and_they_clean_up(tmp_path, vocab_run, spawned):
    run = _run_with_vocab(tmp_path, vocab_run, "killed")
    cluster = _cluster()
    chief, other = (
        _worker(spawned, run, i, cluster, "train.steps_per_epoch=40", "train.checkpoint_every=2") for i in range(2)
    )
    _wait_for_checkpoint(run, chief)
    for pid in _descendants(chief.pid):  # the chief's training process: no chance to stop cleanly
        os.kill(pid, signal.SIGKILL)
    [(_, _, _), (code, _out, err)] = _finish([chief, other], timeout=120)  # TensorFlow's heartbeats: no hang
    assert code == 2 and "Traceback" not in err, (code, err)
    assert "error: a worker of the cluster stopped answering" in err.splitlines()[-1]
    scratch = re.search(r"its artifacts go to (\S+)\)", err)
    assert scratch and not Path(scratch.group(1)).exists()  # the non-chief's scratch folder is gone


def test_unreachable_worker_is_an_error_not_a_hang(tmp_path, vocab_run, spawned):
    run = _run_with_vocab(tmp_path, vocab_run, "alone")
    start = time.monotonic()
    lonely = _worker(spawned, run, 0, _cluster(), "train.worker_timeout=10")
    [(code, out, err)] = _finish([lonely], timeout=120)
    assert_user_error(
        subprocess.CompletedProcess(lonely.args, code, out, err), "could not form the cluster of 2 workers", "10 s"
    )
    assert time.monotonic() - start < 90
    assert not (run / "model.keras").exists()


def test_a_signal_before_the_cluster_forms_ends_the_worker(tmp_path, vocab_run, spawned):
    run = _run_with_vocab(tmp_path, vocab_run, "waiting")
    lonely = _worker(spawned, run, 0, _cluster(), "train.worker_timeout=300")
    time.sleep(3)
    lonely.send_signal(signal.SIGINT)
    [(code, _out, err)] = _finish([lonely], timeout=30)
    assert code == 130, err
    assert "stopped by SIGINT before the cluster formed" in err and "Traceback" not in err
    assert not (run / "checkpoints").exists()


def test_a_signal_while_a_job_starts_stops_training_at_its_first_step():
    """Between the cluster forming and training starting, a worker keeps a signal for the stop flag."""
    from minigpt_cli import callbacks, distribute

    before = signal.getsignal(signal.SIGTERM)
    distribute._hold_signals()  # as setup() does once the cluster has formed
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)
    stop = callbacks.StopFlag()
    with stop.installed():
        assert stop.received == signal.SIGTERM and stop.agree()  # stops at the first step
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers from before the job are back


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("", "needs the TF_CONFIG variable"),
        ("{not json", "not valid JSON"),
        ('{"cluster": {"worker": ["127.0.0.1:1"]}}', '"cluster" and "task"'),
        ('{"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}}', "is not host:port"),
        ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 3}}', "does not name"),
        ('{"cluster": {"ps": ["a:1"]}, "task": {"type": "ps", "index": 0}}', 'must list "worker"'),
    ],
)
def test_bad_tf_config(monkeypatch, value, fragment):
    monkeypatch.setenv("TF_CONFIG", value)
    with pytest.raises(MinigptError) as info:
        read_tf_config()
    assert fragment in str(info.value)


def test_bad_tf_config_through_the_cli(tmp_path, vocab_run):
    run = _run_with_vocab(tmp_path, vocab_run, "bad")
    env = dict(os.environ, TF_CONFIG="{not json")
    result = subprocess.run(
        [sys.executable, "-m", "minigpt_cli", "train", "--run-dir", str(run),
         *tiny_sets(*SETS, "train.distribution=multi_worker")],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "TF_CONFIG is not valid JSON" in result.stderr


def test_chief_is_worker_zero_or_the_chief():
    workers = {"cluster": {"worker": ["a:1", "b:1"]}}
    assert is_chief({**workers, "task": {"type": "worker", "index": 0}})
    assert not is_chief({**workers, "task": {"type": "worker", "index": 1}})
    with_chief = {"cluster": {"chief": ["c:1"], "worker": ["a:1"]}}
    assert is_chief({**with_chief, "task": {"type": "chief", "index": 0}})
    assert not is_chief({**with_chief, "task": {"type": "worker", "index": 0}})
