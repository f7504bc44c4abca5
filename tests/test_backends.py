"""Every Keras backend: one run moves between TensorFlow, JAX and PyTorch; JAX needs no TensorFlow at all.

Each test runs the real CLI in subprocesses with ``KERAS_BACKEND`` set; the
suite's own process stays on its backend.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import BLOCK_TENSORFLOW, CORPUS, minigpt, tiny_sets

pytestmark = pytest.mark.backends

def on(backend: str, *args: str, env: dict | None = None, block_tensorflow: bool = False):
    """``minigpt ARGS`` in a subprocess on ``backend`` (optionally where TensorFlow cannot be imported)."""
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONUNBUFFERED="1", COLUMNS="200", **(env or {}))
    code = "from minigpt_cli.cli import main; import sys; sys.argv[0] = 'minigpt'; main()"
    if block_tensorflow:
        code = BLOCK_TENSORFLOW + code
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], input="", capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip


def ok(result) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def steps(run: Path) -> list[float]:
    return [float(r["loss"]) for r in csv.DictReader((run / "steps.csv").open())]


def history(run: Path) -> list[dict]:
    return json.loads((run / "history.json").read_text())


def greedy(backend: str, run: Path, **kw) -> list[int]:
    result = on(backend, "generate", "--run-dir", run, "--sampler", "greedy", "--json", "--prompt", "the", **kw)
    ok(result)
    return json.loads(result.stdout.splitlines()[0])["token_ids"]


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_train_on_tensorflow_resume_on_jax_generate_on_torch(tmp_path):
    """A run is portable: TensorFlow's checkpoint resumes on JAX as it would on TensorFlow, and every backend
    reads the result to the same greedy tokens."""
    sets = tiny_sets("train.epochs=1", "train.sample_each_epoch=false")
    straight = tmp_path / "straight"
    assert minigpt("vocab", "--run-dir", straight, *sets).returncode == 0
    moved = copy_run(straight, tmp_path / "moved")
    ok(on("tensorflow", "train", "--run-dir", straight, *tiny_sets("train.epochs=2", "train.sample_each_epoch=false")))
    ok(on("tensorflow", "train", "--run-dir", moved, *sets))
    said = ok(on("jax", "train", "--run-dir", moved, "--resume", *tiny_sets("train.epochs=2",
                                                                             "train.sample_each_epoch=false")))
    assert "backend jax (KERAS_BACKEND)" in said and "resuming at epoch 2" in said
    # The second epoch on JAX follows TensorFlow's own second epoch: same batches, same optimizer state.
    a, b = steps(straight), steps(moved)
    assert len(a) == len(b) == 12
    np.testing.assert_allclose(b, a, rtol=2e-4)
    np.testing.assert_allclose(history(moved)[1]["val_loss"], history(straight)[1]["val_loss"], rtol=2e-4)
    tokens = {backend: greedy(backend, moved) for backend in ("torch", "jax", "tensorflow")}
    assert tokens["torch"] == tokens["jax"] == tokens["tensorflow"], tokens
    assert len(tokens["torch"]) == 12


def test_backend_key_and_environment(trained_run, tmp_path):
    """The config's ``backend`` chooses; ``KERAS_BACKEND`` wins over it; the run says which it used. With
    dropout, whose seed states PyTorch keeps in int32."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("vocab.txt", "vocab.json"):
        shutil.copy(trained_run / name, run / name)
    env = {**{k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}, "COLUMNS": "200"}
    sets = ("train.sample_each_epoch=false", "backend=torch", "model.dropout=0.1")
    result = subprocess.run([sys.executable, "-m", "minigpt_cli", "train", "--run-dir", str(run), *tiny_sets(*sets)],
                            capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert "backend torch (the config's backend key)" in ok(result)
    said = ok(on("jax", "train", "--run-dir", run, "--resume", *tiny_sets(*sets, "train.epochs=2")))
    assert "backend jax (KERAS_BACKEND)" in said
    assert [row["epoch"] for row in history(run)] == [1, 2]
    bad = on("mxnet", "generate", "--run-dir", run)
    assert bad.returncode == 2 and "KERAS_BACKEND is 'mxnet'" in bad.stderr and "Traceback" not in bad.stderr


def test_jax_without_tensorflow(trained_run, tmp_path):
    """With vocab.txt and the token cache made, JAX trains, generates and evaluates with TensorFlow blocked."""
    run = copy_run(trained_run, tmp_path / "run")
    sets = tiny_sets("train.epochs=2")
    said = ok(on("jax", "train", "--run-dir", run, "--resume", *sets, block_tensorflow=True))
    assert "(from the cache)" in said and "no TensorBoard logs" in said
    assert len(history(run)) == 2
    with_tf = greedy("tensorflow", run)
    result = on("jax", "generate", "--run-dir", run, "--sampler", "greedy", "--json", "--prompt", "the",
                block_tensorflow=True)  # fmt: skip
    ok(result)
    assert json.loads(result.stdout.splitlines()[0])["token_ids"] == with_tf
    ok(on("jax", "generate", "--run-dir", run, "--sampler", "topp", "--seed", "3", block_tensorflow=True))
    scores = {}
    for blocked in (True, False):
        result = on("jax", "evaluate", "--run-dir", run, "--data", CORPUS / "valid.txt", "--json",
                    block_tensorflow=blocked)  # fmt: skip
        ok(result)
        scores[blocked] = json.loads(result.stdout.splitlines()[-1])
    for key in ("tokens", "characters"):
        assert scores[True][key] == scores[False][key], key
    assert scores[True]["loss"] == pytest.approx(scores[False]["loss"], rel=1e-6)


def test_jax_data_parallel_matches_one_device(tmp_path):
    """``train.distribution = mirrored`` on JAX is Keras' DataParallel: on two host devices, the same losses."""
    # The whole validation text: its last batch is partial, and is padded to split over the two devices.
    sets = tiny_sets("train.sample_each_epoch=false", "train.steps_per_epoch=4", "train.validation_steps=1000")
    one = tmp_path / "one"
    assert minigpt("vocab", "--run-dir", one, *sets).returncode == 0
    two = copy_run(one, tmp_path / "two")
    flags = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    ok(on("jax", "train", "--run-dir", one, *sets, env=flags))
    said = ok(on("jax", "train", "--run-dir", two, *sets, "--set", "train.distribution=mirrored", env=flags))
    assert "distribution: mirrored, 2 replica(s)" in said
    np.testing.assert_allclose(steps(two), steps(one), rtol=1e-5)
    assert len(steps(one)) == 4
    np.testing.assert_allclose(history(two)[0]["val_loss"], history(one)[0]["val_loss"], rtol=1e-5)


@pytest.mark.parametrize("windows", ["reference", "packed"])
def test_windows_without_tensorflow_equal_keras_hub(trained_run, windows):
    """The token cache cut with the TensorFlow-free tokenizer equals the one cut by KerasHub's graphs."""
    from minigpt_cli.fast_tokenizer import FastWordPieceTokenizer
    from minigpt_cli.vocab import MiniGPTTokenizer, load_vocabulary
    from minigpt_cli.windows import cut_windows

    tokens = load_vocabulary(trained_run / "vocab.txt")
    files = [CORPUS / "train.txt", CORPUS / "valid.txt"]
    fast = cut_windows(files, FastWordPieceTokenizer(tokens), windows, 32, 64)
    keras_hub = cut_windows(files, MiniGPTTokenizer(vocabulary=tokens), windows, 32, 64)
    assert fast.shape == keras_hub.shape and len(fast) > 10
    np.testing.assert_array_equal(fast, keras_hub)
