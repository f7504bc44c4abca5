"""Scaling out: tf.distribute strategies on TensorFlow, ``keras.distribution`` on JAX, and precision policies.

On JAX, ``mirrored`` and ``multi_worker`` are Keras' ``DataParallel`` over
every device (see ``_setup_jax``); PyTorch trains on one device.

``train.distribution``:

- ``none``: the default strategy (one device).
- ``mirrored``: ``tf.distribute.MirroredStrategy`` over all local GPUs, or the
  devices in ``train.devices``. Naming ``/cpu:1`` and up splits the CPU into
  that many logical devices, so mirrored training can be tried without GPUs.
- ``multi_worker``: ``tf.distribute.MultiWorkerMirroredStrategy`` over the
  cluster in the standard ``TF_CONFIG`` variable; every worker runs the same
  command, only the chief writes artifacts.
- ``auto``: mirrored when more than one GPU is visible, else none.

``data.batch_size`` stays the global batch; each replica gets its share.

Joining a multi-worker cluster blocks inside TensorFlow's C++ runtime, holding
the GIL, until every worker answers: no thread or signal handler of the
process can run then. So ``minigpt train`` under ``multi_worker`` runs the
training in a child process and supervises it (``supervise``): the child
reports on a pipe when it starts joining and when the cluster has formed;
the parent keeps ``train.worker_timeout`` (and on expiry kills the child and
ends with a one-line error, exit code 2) and forwards SIGINT/SIGTERM to it.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from minigpt_cli.errors import MinigptError


@dataclass
class Setup:
    """The strategy to build and train under, and this process's role in it."""

    strategy: object | None
    kind: str
    replicas: int
    workers: int
    is_chief: bool

    def scope(self):
        return self.strategy.scope() if self.strategy is not None else nullcontext()


def read_tf_config() -> dict:
    """``TF_CONFIG``, checked: a cluster with workers and this process's task in it."""
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        raise MinigptError(
            "train.distribution = multi_worker needs the TF_CONFIG variable describing the cluster "
            '(e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}})'
        )
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise MinigptError(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos})") from None
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not isinstance(task, dict):
        raise MinigptError('TF_CONFIG must hold "cluster" and "task" objects')
    kinds = {k: v for k, v in cluster.items() if k in ("chief", "worker")}
    if not kinds or not all(isinstance(v, list) and v for v in kinds.values()):
        raise MinigptError('TF_CONFIG "cluster" must list "worker" (and optionally "chief") addresses')
    for kind, addresses in kinds.items():
        for address in addresses:
            if not isinstance(address, str) or not re.fullmatch(r"[^\s:]+:\d{1,5}", address):
                raise MinigptError(f"TF_CONFIG {kind} address {address!r} is not host:port")
    kind, index = task.get("type"), task.get("index")
    if kind not in kinds or not isinstance(index, int) or not 0 <= index < len(kinds[kind]):
        raise MinigptError(f'TF_CONFIG "task" {task} does not name one of the cluster\'s {"/".join(kinds)} entries')
    return config


def is_chief(config: dict) -> bool:
    task = config["task"]
    if "chief" in config["cluster"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and task["index"] == 0


def _split_cpu(devices: list[str]) -> None:
    """Make ``/cpu:N`` in ``devices`` exist by splitting the CPU into logical devices."""
    import tensorflow as tf

    wanted = [int(m.group(1)) for d in devices if (m := re.fullmatch(r"/?(?:device:)?cpu:(\d+)", d.lower()))]
    if wanted and max(wanted) > 0:
        cpu = tf.config.list_physical_devices("CPU")[0]
        try:
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration()] * (max(wanted) + 1)
            )
        except RuntimeError:
            raise MinigptError("train.devices: the CPU can only be split before TensorFlow starts") from None


_WATCHDOG = """
import os, signal, sys, time
pid, seconds, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(seconds)
sys.stderr.write("error: " + message + chr(10))
sys.stderr.flush()
os.kill(pid, signal.SIGKILL)
"""


@contextmanager
def deadline(seconds: float, message: str) -> Iterator[None]:
    """End this process with ``message`` if the block has not finished in ``seconds``.

    For a process no ``supervise`` watches (``train()`` called from Python): a
    small watchdog process does the waiting, and ends us with SIGKILL, as the
    blocked join lets no handler of ours run.
    """
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), message], stdin=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        watchdog.kill()
        watchdog.wait()


#: Set for the child that ``supervise`` starts: the pipe it reports on (``JOINING``, then ``FORMED``).
REPORT_FD = "MINIGPT_CLUSTER_REPORT_FD"
JOINING, FORMED = b"J", b"F"


class Stopped(MinigptError):
    """A signal came before the cluster formed: nothing was trained."""

    exit_code = 130


def cluster_error(config: dict, seconds: float) -> str:
    workers = [a for k, v in config["cluster"].items() if k in ("chief", "worker") for a in v]
    return (
        f"could not form the cluster of {len(workers)} workers in TF_CONFIG ({', '.join(workers)}) within "
        f"{seconds:g} s: start the same command on every worker, check the addresses and ports, "
        "or raise train.worker_timeout"
    )


def _die_with_parent() -> None:  # in the child, before exec: a SIGTERM (a clean stop) if the supervisor dies
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass


def supervise(seconds: float, args: list[str]) -> int:
    """Run ``minigpt ARGS`` (this ``train`` command) as a child process and watch it; returns its exit code.

    The child reports ``JOINING`` and ``FORMED`` on a pipe. Until the cluster
    has formed, a signal ends the child (``Stopped``: nothing was trained), and
    so does ``seconds`` passing after ``JOINING`` (``MinigptError``, exit 2).
    Once it has formed, SIGINT and SIGTERM are passed on to the child, whose
    workers then stop together at a step and checkpoint. The child has its own
    session, so a Ctrl-C in the terminal reaches it once, through us.
    """
    config = read_tf_config()
    got: list[int] = []  # the signals that came, in order; the loops below act on them
    previous = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    read, write = os.pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "minigpt_cli", *args],
            env={**os.environ, REPORT_FD: str(write)},
            pass_fds=(write,),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    except BaseException:
        os.close(read)
        for s, handler in previous.items():
            signal.signal(s, handler)
        raise
    finally:
        os.close(write)
    try:
        heard, due = b"", None
        while FORMED not in heard:
            if got or (due is not None and time.monotonic() > due):
                child.kill()
                child.wait()
                if got:
                    raise Stopped(
                        f"stopped by {signal.Signals(got[0]).name} before the cluster formed; nothing was trained"
                    )
                raise MinigptError(cluster_error(config, seconds))
            if select.select([read], [], [], 0.1)[0]:
                news = os.read(read, 16)
                if not news:  # the child ended before the cluster formed (a user error it has reported)
                    break
                heard += news
                if JOINING in news:
                    due = time.monotonic() + seconds
        passed = 0
        while True:
            for signum in got[passed:]:
                child.send_signal(signum)
            passed = len(got)
            try:
                code = child.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                pass
    finally:
        os.close(read)
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.poll() is None:  # an exception of our own: leave no orphan
            child.kill()
            child.wait()
    return code if code >= 0 else 128 - code


def _report(fd: int | None, state: bytes) -> None:
    if fd is not None:
        try:
            os.write(fd, state)
        except OSError:
            pass  # the supervisor is gone; it will have ended us


_held: list[int] = []
_before_holding: dict[int, object] = {}


def _hold(signum, frame) -> None:
    """Between the cluster forming and training starting: keep the signal for ``StopFlag``."""
    if _held and signum == signal.SIGINT:
        raise KeyboardInterrupt  # a second Ctrl-C stops at once
    _held.append(signum)


def _hold_signals() -> None:
    _held.clear()
    for s in (signal.SIGINT, signal.SIGTERM):
        handler = signal.signal(s, _hold)
        _before_holding.setdefault(s, handler)


def take_held() -> tuple[int | None, dict[int, object]]:
    """The first SIGINT/SIGTERM that came since the cluster formed, and the handlers from before it formed.

    The caller (``StopFlag``) installs its own handlers, and puts these back when training ends.
    """
    held, before = (_held[0] if _held else None), dict(_before_holding)
    _held.clear()
    _before_holding.clear()
    return held, before


def set_precision(policy: str) -> None:
    import keras

    keras.mixed_precision.set_global_policy(policy)


def setup(distribution: str, devices: list[str], worker_timeout: float) -> Setup:
    """Build the strategy that ``train.distribution`` asks for, on the backend Keras runs on."""
    import keras

    backend = keras.config.backend()
    if backend == "jax":
        return _setup_jax(distribution, devices)
    if backend != "tensorflow":
        if distribution in ("mirrored", "multi_worker"):
            raise MinigptError(
                f"train.distribution = {distribution} runs on TensorFlow (tf.distribute) or JAX "
                f"(keras.distribution), not {backend}; use KERAS_BACKEND=jax or tensorflow, or train.distribution=none"
            )
        return Setup(None, "none", 1, 1, True)
    import tensorflow as tf

    if distribution == "multi_worker":
        config = read_tf_config()
        workers = sum(len(v) for k, v in config["cluster"].items() if k in ("chief", "worker"))
        fd = os.environ.pop(REPORT_FD, None)  # not passed on to any process of ours
        fd = int(fd) if fd and fd.isdigit() else None
        _report(fd, JOINING)
        waiting = deadline(worker_timeout, cluster_error(config, worker_timeout)) if fd is None else nullcontext()
        with waiting:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
            # A first all-reduce: returns only once every worker has joined.
            strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
        # From now on a worker that ended alone would make the others fail in their next all-reduce: a
        # signal is kept until training starts, and then stops every worker at the same step (StopFlag).
        _hold_signals()
        _report(fd, FORMED)
        if fd is not None:
            os.close(fd)
        return Setup(strategy, "multi_worker", strategy.num_replicas_in_sync, workers, is_chief(config))
    if devices:
        _split_cpu(devices)
    gpus = tf.config.list_physical_devices("GPU")
    if distribution == "mirrored" or (distribution == "auto" and len(gpus) > 1):
        try:
            strategy = tf.distribute.MirroredStrategy(devices=devices or None)
        except (ValueError, RuntimeError) as e:
            raise MinigptError(f"train.devices {devices}: {str(e).splitlines()[0]}") from None
        return Setup(strategy, "mirrored", strategy.num_replicas_in_sync, 1, True)
    return Setup(None, "none", 1, 1, True)


def _setup_jax(distribution: str, devices: list[str]) -> Setup:
    """Keras' own distribution API on JAX: ``DataParallel`` over every device JAX sees (all processes').

    ``mirrored``: one process, its devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N`` splits
    a CPU into N); ``multi_worker``: ``jax.distributed`` first (``keras.distribution.initialize``, which reads
    ``KERAS_DISTRIBUTION_JOB_ADDRESSES``, ``KERAS_DISTRIBUTION_NUM_PROCESSES`` and
    ``KERAS_DISTRIBUTION_PROCESS_ID``); ``auto``: mirrored when more than one GPU or TPU is visible.
    """
    import jax
    import keras

    if devices:
        raise MinigptError(
            "train.devices names TensorFlow devices; on JAX, mirrored training uses every device JAX sees "
            "(split a CPU with XLA_FLAGS=--xla_force_host_platform_device_count=N); leave train.devices out"
        )
    if distribution == "multi_worker":
        try:
            keras.distribution.initialize()
        except (ValueError, RuntimeError) as e:
            raise MinigptError(
                f"could not start jax.distributed ({str(e).splitlines()[0][:200]}); set KERAS_DISTRIBUTION_JOB_"
                "ADDRESSES, KERAS_DISTRIBUTION_NUM_PROCESSES and KERAS_DISTRIBUTION_PROCESS_ID on every worker"
            ) from None
    found = jax.devices()
    accelerators = [d for d in found if d.platform != "cpu"]
    if distribution in ("mirrored", "multi_worker") or (distribution == "auto" and len(accelerators) > 1):
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=found))
        kind = "multi_worker" if distribution == "multi_worker" else "mirrored"
        replicas = keras.distribution.distribution().device_mesh.devices.size  # the mesh the batch is split over
        return Setup(None, kind, replicas, jax.process_count(), jax.process_index() == 0)
    return Setup(None, "none", 1, 1, True)
