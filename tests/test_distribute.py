"""tf.distribute on CPU: mirrored over logical devices, two workers on 127.0.0.1, precision."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import minigpt, samples_json, tiny_sets

from minigpt_cli.distribute import is_chief, read_tf_config
from minigpt_cli.errors import MinigptError

SETS = ("data.packing=true", "train.sample_each_epoch=false", "train.epochs=2", "train.steps_per_epoch=4")


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


def test_mirrored_over_two_cpus_matches_one_device(tmp_path, vocab_run):
    single = _run_with_vocab(tmp_path, vocab_run, "single")
    mirrored = _run_with_vocab(tmp_path, vocab_run, "mirrored")
    one = minigpt("train", "--run-dir", single, *tiny_sets(*SETS, "train.distribution=none"))
    assert one.returncode == 0, one.stderr
    two = minigpt(
        "train", "--run-dir", mirrored,
        *tiny_sets(*SETS, "train.distribution=mirrored", 'train.devices=["/cpu:0", "/cpu:1"]'),
    )  # fmt: skip
    assert two.returncode == 0, two.stderr
    assert "distribution: mirrored, 2 replica(s)" in two.stderr and "8 per replica" in two.stderr
    a, b = _losses(single), _losses(mirrored)
    assert len(a) == len(b) == 8
    assert a == pytest.approx(b, rel=2e-3, abs=2e-3)
    assert a[0] != pytest.approx(a[-1], rel=1e-3)  # the curve moves, so matching it means something


def test_batch_must_split_over_replicas(tmp_path, vocab_run):
    run = _run_with_vocab(tmp_path, vocab_run, "odd")
    devices = 'train.devices=["/cpu:0", "/cpu:1", "/cpu:2"]'
    result = minigpt("train", "--run-dir", run, *tiny_sets(*SETS, "train.distribution=mirrored", devices))
    assert result.returncode == 2 and "does not split over 3 replicas" in result.stderr


def test_mixed_bfloat16_trains_and_generates(tmp_path, vocab_run):
    run = _run_with_vocab(tmp_path, vocab_run, "bf16")
    result = minigpt("train", "--run-dir", run, *tiny_sets(*SETS, "train.precision=mixed_bfloat16"))
    assert result.returncode == 0, result.stderr
    assert "precision mixed_bfloat16" in result.stderr
    assert all(x == x for x in _losses(run)), "NaN loss"
    [sample] = samples_json(minigpt("generate", "--run-dir", run, "--json", "--seed", "1"))
    assert len(sample["token_ids"]) == 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(run, index: int, cluster: dict, *extra: str, timeout_set: str = "train.worker_timeout=90"):
    env = dict(os.environ, TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}))
    args = ["train", "--run-dir", str(run), *tiny_sets(*SETS, "train.distribution=multi_worker", timeout_set, *extra)]
    return subprocess.Popen(
        [sys.executable, "-m", "minigpt_cli", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def test_two_workers_on_localhost(tmp_path, vocab_run):
    run = _run_with_vocab(tmp_path, vocab_run, "cluster")
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    workers = [_worker(run, i, cluster) for i in range(2)]
    results = []
    for w in workers:
        try:
            out, err = w.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in workers:
                other.kill()
            raise AssertionError("a worker hung") from None
        results.append((w.returncode, out, err))
    for code, _out, err in results:
        assert code == 0, err
    assert "2 replica(s) on 2 worker(s)" in results[0][2]
    assert "not the chief" in results[1][2] and "not the chief" not in results[0][2]
    for name in ("model.keras", "history.csv", "steps.csv", "checkpoints/latest.json"):
        assert (run / name).is_file(), name
    assert len(json.loads((run / "history.json").read_text())) == 2
    [sample] = samples_json(minigpt("generate", "--run-dir", run, "--json", "--seed", "2"))
    assert len(sample["token_ids"]) == 12


def test_unreachable_worker_is_an_error_not_a_hang(tmp_path, vocab_run):
    run = _run_with_vocab(tmp_path, vocab_run, "alone")
    cluster = {"worker": [f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"]}
    start = time.monotonic()
    lonely = _worker(run, 0, cluster, timeout_set="train.worker_timeout=10")
    try:
        _, err = lonely.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        lonely.kill()
        raise AssertionError("the lone worker hung") from None
    assert lonely.returncode != 0
    assert "error: could not form the cluster of 2 workers" in err and "Traceback" not in err
    assert time.monotonic() - start < 90
    assert not (run / "model.keras").exists()


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
