"""Scaling out on TensorFlow's own engine: tf.distribute strategies and precision policies.

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
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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
        import contextlib

        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()


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

    Joining a cluster blocks inside TensorFlow's C++ runtime, holding the GIL,
    until every worker answers: no thread or signal handler of ours can run
    then, and SIGTERM is caught by a handler that cannot run either. So a
    small watchdog process does the waiting, and ends us with SIGKILL.
    """
    watchdog = subprocess.Popen(
        [sys.executable, "-c", _WATCHDOG, str(os.getpid()), str(seconds), message], stdin=subprocess.DEVNULL
    )
    try:
        yield
    finally:
        watchdog.kill()
        watchdog.wait()


def set_precision(policy: str) -> None:
    import keras

    keras.mixed_precision.set_global_policy(policy)


def setup(distribution: str, devices: list[str], worker_timeout: float) -> Setup:
    """Build the strategy that ``train.distribution`` asks for."""
    import tensorflow as tf

    if distribution == "multi_worker":
        config = read_tf_config()
        workers = sum(len(v) for k, v in config["cluster"].items() if k in ("chief", "worker"))
        addresses = ", ".join(a for k, v in config["cluster"].items() if k in ("chief", "worker") for a in v)
        with deadline(
            worker_timeout,
            f"could not form the cluster of {workers} workers in TF_CONFIG ({addresses}) within "
            f"{worker_timeout:.0f} s: start the same command on every worker, check the addresses and ports, "
            "or raise train.worker_timeout",
        ):
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
            # A first all-reduce: returns only once every worker has joined.
            strategy.reduce("SUM", strategy.run(lambda: tf.constant(1.0)), axis=None)
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
