"""Running a benchmark on several Keras backends: a child process per backend, the children taking turns.

Keras fixes its backend when it is first imported, so each backend gets a
process of its own: ``python benchmarks/X.py --child ...`` with
``KERAS_BACKEND`` set. The children start together, build what they time,
then wait; the parent hands each in turn one round's work, the order
rotating every round, so the machine's drift hits every backend alike and
only one child works at a time.

The protocol is one JSON object per line: requests on the child's stdin,
answers on the child's original stdout (the child points its fd 1 at stderr,
so whatever the libraries print cannot mix with the answers). A child that
fails answers ``{"error": ...}``; one that dies is reported with the end of
its stderr.

Also here: what the machine and each backend are (``describe``, ``machine``),
training steps fed as ``minigpt train`` feeds them (``fit_steps``, ``train_jit``),
weights that are the same on every backend (``same_weights``), and a guard
that refuses any import of TensorFlow (``block_tensorflow``).
"""

from __future__ import annotations

import argparse
import importlib.abc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

BACKENDS = ("tensorflow", "jax", "torch")


def current() -> str:
    """The backend a plain run of a benchmark gets: ``KERAS_BACKEND``, else TensorFlow (minigpt's default)."""
    return os.environ.get("KERAS_BACKEND", "tensorflow")


def add_argument(parser: argparse.ArgumentParser) -> None:
    """``--backend NAME...``: run on these backends, side by side (default: only the current one, in-process)."""
    parser.add_argument(
        "--backend",
        nargs="+",
        choices=BACKENDS,
        default=None,
        help="Keras backends to compare, each in its own process, taking turns round by round "
        "(default: the current one only, in this process)",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)


# ---------------------------------------------------------------- what runs where


def describe() -> dict:
    """This process's backend: its name, version and the devices it computes on (imports Keras)."""
    import keras

    name = keras.backend.backend()
    info = {"backend": name, "keras": keras.__version__}
    try:
        import keras_hub

        info["keras_hub"] = keras_hub.__version__
    except ImportError:
        pass
    if name == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        info.update(version=tf.__version__, devices=f"{len(gpus)} GPU" if gpus else "CPU")
    elif name == "jax":
        import jax

        kinds = sorted({d.platform for d in jax.devices()})
        info.update(version=jax.__version__, devices=f"{len(jax.devices())} {'/'.join(kinds)}".replace("cpu", "CPU"))
    elif name == "torch":
        import torch

        n = torch.cuda.device_count()
        info.update(version=torch.__version__, devices=f"{n} GPU ({torch.cuda.get_device_name(0)})" if n else "CPU")
    else:
        info.update(version="?", devices="?")
    return info


def machine(infos: list[dict]) -> str:
    """One line: the CPU, its cores, Python, and each backend's version and devices (``describe``'s)."""
    from hardware import cpu_name  # benchmarks/, on the path as the script's folder

    from minigpt_cli.flops import cpu_cores

    parts = [f"{b['backend']} {b['version']} ({b['devices']})" for b in infos]
    keras = next(iter(infos), {})
    libs = f"Keras {keras.get('keras', '?')}, KerasHub {keras.get('keras_hub', '-')}"
    return f"{cpu_name()}, {cpu_cores()} usable cores; Python {platform.python_version()}; {libs}; {'; '.join(parts)}"


# ---------------------------------------------------------------- training steps on any backend


def fit_steps(model, batches, start: int, steps: int) -> float:
    """Train ``model`` on batches ``start`` to ``start + steps`` of ``batches`` (a ``minigpt_cli.windows.Batches``)
    as ``minigpt train`` feeds them (``Batches.feed``: ``tf.data`` on TensorFlow, NumPy batches elsewhere).

    Returns the last step's loss.
    """
    history = model.fit(batches.feed(start, start + steps), steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    return float(history.history["loss"][-1])


def train_jit(setting: str) -> bool:
    """``model.jit_compile`` as ``minigpt train`` sets it from ``train.jit_compile`` (no distribution strategy):
    ``auto`` is XLA on TensorFlow and JAX, eager (no ``torch.compile``) on PyTorch."""
    from minigpt_cli.train import step_jit

    return step_jit(setting)


def same_weights(model, seed: int) -> None:
    """Give ``model`` weights drawn by NumPy from ``seed``: the same on every backend (whose own random
    initializers differ), so their losses and greedy tokens can be compared.

    Constant variables (biases, norms) keep their value; the others get a normal draw scaled as Glorot's
    (fan in = the first axis, fan out = the rest).
    """
    import numpy as np
    from keras import ops

    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = ops.convert_to_numpy(variable)
        if value.size == 0 or value.min() == value.max():
            continue
        shape = value.shape
        std = (2.0 / (shape[0] + int(np.prod(shape[1:])))) ** 0.5 if len(shape) > 1 else 0.02
        variable.assign(rng.normal(0.0, std, shape).astype(value.dtype))


# ---------------------------------------------------------------- parent and children


class ChildFailed(RuntimeError):
    """A child answered with an error, or died."""


class Child:
    """A benchmark process on one backend, answering requests one at a time."""

    def __init__(self, script: Path, backend: str, args: list[str]):
        self.backend = backend
        self.failed: str | None = None
        self._stderr = tempfile.TemporaryFile(mode="w+")
        env = dict(os.environ, KERAS_BACKEND=backend, PYTHONUNBUFFERED="1")
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        self.proc = subprocess.Popen(
            [sys.executable, str(script), "--child", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            env=env,
        )

    def send(self, **request) -> None:
        if self.failed:
            raise ChildFailed(self.failed)
        try:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        except OSError:
            self._died()

    def receive(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self._died()
        answer = json.loads(line)
        if "error" in answer:
            self.failed = answer["error"]
            raise ChildFailed(self.failed)
        return answer

    def ask(self, **request) -> dict:
        self.send(**request)
        return self.receive()

    def _died(self):
        code = self.proc.wait()
        self._stderr.seek(0)
        tail = [line for line in self._stderr.read().splitlines() if line.strip()][-3:]
        self.failed = f"the {self.backend} process exited ({code}): " + " | ".join(tail)
        raise ChildFailed(self.failed)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()


def start(script: Path, backends: list[str], args: list[str], build: dict) -> list[Child]:
    """One child per backend, each sent ``build`` at once (they build side by side); their answers are read later."""
    children = [Child(script, backend, args) for backend in backends]
    for child in children:
        try:
            child.send(do="build", **build)
        except ChildFailed:
            pass
    return children


def built(children: list[Child]) -> dict[str, dict]:
    """Each child's answer to ``build`` (children that failed are left out, their ``failed`` set)."""
    answers = {}
    for child in children:
        try:
            answers[child.backend] = child.receive()
        except ChildFailed:
            pass
    return answers


def built_on(children: list[Child], console) -> tuple[dict[str, dict], dict]:
    """``built``'s answers, with the machine they ran on printed; and the first answer ({} when none)."""
    info = built(children)
    if info:
        console.print(f"machine: {machine(list(info.values()))}")
    return info, next(iter(info.values()), {})


def take_turns(children: list[Child], rounds: int, requests: Callable[[int], list[dict]]) -> dict[str, list[list]]:
    """``rounds`` rounds; in each, every live child in turn (the order rotating) answers ``requests(round)``.

    Returns, per backend, a list per round of its answers (a backend that fails stops getting turns).
    """
    answers: dict[str, list[list]] = {c.backend: [] for c in children}
    for r in range(rounds):
        live = [c for c in children if not c.failed]
        if not live:
            break
        shift = r % len(live)
        for child in live[shift:] + live[:shift]:
            try:
                answers[child.backend].append([child.ask(**req) for req in requests(r)])
            except ChildFailed:
                pass
    return answers


def serve(handlers: dict[str, Callable[[dict], dict]]) -> None:
    """The child's loop: answer each request line with ``handlers[request["do"]](request)``, until stdin ends."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # what the libraries print goes to stderr
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = handlers[request.pop("do")](request)
        except Exception as e:  # noqa: BLE001 - sent to the parent, which reports it
            where = traceback.extract_tb(e.__traceback__)[-1]
            first = (str(e).strip().splitlines() or [""])[0][:300]
            answer = {"error": f"{type(e).__name__}: {first} (at {Path(where.filename).name}:{where.lineno})"}
            traceback.print_exc()
        answers.write(json.dumps(answer) + "\n")


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Seconds ``fn()`` took, and what it returned."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


# ---------------------------------------------------------------- no TensorFlow


class _NoTensorFlow(importlib.abc.MetaPathFinder):
    """Refuses ``tensorflow*`` imports as if the package were absent; remembers who asked."""

    def __init__(self):
        self.refused: list[str] = []

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0].startswith("tensorflow") or name.split(".")[0] == "tf_keras":
            caller = next(
                (f for f in reversed(traceback.extract_stack()[:-1]) if "importlib" not in f.filename),
                None,
            )
            self.refused.append(f"{name} (from {caller.filename}:{caller.lineno})" if caller else name)
            raise ModuleNotFoundError(f"No module named '{name}' (TensorFlow is blocked here)", name=name)
        return None


def block_tensorflow() -> _NoTensorFlow:
    """From now on, importing TensorFlow fails as on a machine without it; returns the guard (``.refused``)."""
    loaded = [m for m in sys.modules if m.split(".")[0].startswith("tensorflow")]
    if loaded:
        raise RuntimeError(f"TensorFlow is already imported ({loaded[0]}); block it before anything imports it")
    guard = _NoTensorFlow()
    sys.meta_path.insert(0, guard)
    return guard
