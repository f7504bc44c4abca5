"""The Keras backend (TensorFlow, JAX or PyTorch): choosing it, and compiling a function its way.

Keras reads ``KERAS_BACKEND`` once, when it is first imported. ``choose``
sets it from the config's ``backend`` key unless the environment already
names one (the environment wins), and must run before anything imports Keras.

>>> choose("tensorflow")  # doctest: +SKIP
('tensorflow', 'config')
"""

from __future__ import annotations

import os
import sys
import typing
from collections.abc import Callable

from minigpt_cli.config import Backend
from minigpt_cli.errors import MinigptError

BACKENDS: tuple[str, ...] = typing.get_args(Backend)
#: Where the backend in use was chosen from, once ``choose`` has run.
_source: str | None = None


def choose(configured: str) -> tuple[str, str]:
    """Set ``KERAS_BACKEND`` (unless set) from the config; returns ``(backend, where it came from)``."""
    global _source
    from minigpt_cli import USER_BACKEND as given  # the package's import sets KERAS_BACKEND's default
    if given:
        if given not in BACKENDS:
            raise MinigptError(f"KERAS_BACKEND is {given!r}; use one of {', '.join(BACKENDS)} (or unset it)")
        name, source = given, "KERAS_BACKEND"
    else:
        name, source = configured, "config"
    if "keras" not in sys.modules and not _installed(name):
        raise MinigptError(
            f"backend {name} ({source}) is not installed here; pip install {name} (or: pip install -e '.[dev]'), "
            "or choose another with KERAS_BACKEND"
        )
    if "keras" in sys.modules:  # already loaded (a library caller, a test): it keeps the backend it has
        import keras

        loaded = keras.config.backend()
        if loaded != name:
            raise MinigptError(
                f"Keras is already running on {loaded} in this process, so backend {name!r} ({source}) cannot "
                "be used; start a new process"
            )
        _source = source
        return name, source
    os.environ["KERAS_BACKEND"] = name
    _source = source
    return name, source


def name() -> str:
    """The backend Keras runs on."""
    import keras

    return keras.config.backend()


def describe() -> str:
    """The backend in use and where it was chosen, e.g. ``jax (KERAS_BACKEND)``."""
    where = {"KERAS_BACKEND": " (KERAS_BACKEND)", "config": " (the config's backend key)"}.get(_source or "", "")
    return name() + where


def _installed(package: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def tensorflow_available() -> bool:
    """Whether TensorFlow can be imported (without importing it)."""
    return _installed("tensorflow")


def compiled(fn: Callable, model, stateful: list, *, xla: bool, tf_signature=None) -> Callable:
    """``fn(*tensors)`` compiled the backend's way, reading ``model``'s current weights at every call.

    TensorFlow: a ``tf.function`` (XLA with ``xla``; ``tf_signature`` fixes
    its input signature so it traces once). JAX: ``jax.jit`` of a pure
    function of the weights, the way KerasHub compiles ``generate``; the
    ``stateful`` variables (a sampler's seed state) are written back after
    each call. PyTorch: eager, without autograd.
    """
    import keras

    backend = keras.config.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=xla, input_signature=tf_signature, autograph=False)
    if backend == "jax":
        import jax

        weights = [*model.trainable_variables, *model.non_trainable_variables]

        def pure(values, seeds, *args):
            mapping = [*zip(weights, values, strict=True), *zip(stateful, seeds, strict=True)]
            with keras.StatelessScope(state_mapping=mapping) as scope:
                out = fn(*args)
            new = [scope.get_current_value(v) for v in stateful]
            return out, [n if n is not None else s for n, s in zip(new, seeds, strict=True)]

        jitted = jax.jit(pure)

        def call(*args):
            out, seeds = jitted([v.value for v in weights], [v.value for v in stateful], *args)
            for variable, value in zip(stateful, seeds, strict=True):
                variable.assign(value)
            return out

        return call
    import torch

    def eager(*args):
        with torch.no_grad():
            return fn(*args)

    return eager


def gpus() -> list[str]:
    """The names of the GPUs the backend in use trains on (empty on a CPU)."""
    backend = name()
    if backend == "jax":
        import jax

        return [d.device_kind for d in jax.devices() if d.platform == "gpu"]
    if backend == "torch":
        import torch

        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    import tensorflow as tf

    found = tf.config.list_physical_devices("GPU")
    return [tf.config.experimental.get_device_details(g).get("device_name", "GPU") for g in found]


def tf32() -> bool:
    """Whether float32 matmuls run as TensorFloat-32 on a GPU that has it (each backend's own default)."""
    backend = name()
    if backend == "jax":
        import jax

        return jax.config.jax_default_matmul_precision in (None, "default", "tensorfloat32", "bfloat16_3x")
    if backend == "torch":
        import torch

        return bool(torch.backends.cuda.matmul.allow_tf32)
    import tensorflow as tf

    return bool(tf.config.experimental.tensor_float_32_execution_enabled())


def matmul_seconds(n: int, dtype: str, reps: int) -> float:
    """Seconds for ``reps`` matmuls of two ``n × n`` matrices in ``dtype`` on the backend's default device."""
    import time

    import numpy as np

    rng = np.random.default_rng(0)  # not the backend's random state, which training seeds
    host = [rng.standard_normal((n, n), dtype=np.float32) for _ in range(2)]
    backend = name()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        a, b = (jnp.asarray(x, dtype=dtype) for x in host)
        matmul = jax.jit(jnp.matmul)

        def wait(c):
            return c.block_until_ready()
    elif backend == "torch":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        a, b = (torch.as_tensor(x, device=device).to(getattr(torch, dtype)) for x in host)
        matmul = torch.matmul

        def wait(c):
            if device == "cuda":
                torch.cuda.synchronize()
            return c
    else:
        import tensorflow as tf

        a, b = (tf.cast(tf.constant(x), dtype) for x in host)
        matmul = tf.function(tf.linalg.matmul)

        def wait(c):
            return float(c[0, 0])
    wait(matmul(a, b))  # trace, compile and warm up
    start = time.perf_counter()
    c = None
    for _ in range(reps):
        c = matmul(a, b)
    wait(c)
    return time.perf_counter() - start
