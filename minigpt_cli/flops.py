"""Know before you start: parameters, FLOPs per token, memory for a batch, this machine's peak, time per epoch.

**FLOPs per token**, counted from the config. Forward: 2 × the weights of
every matmul (each layer's query, key, value and output projections,
``d × a`` each, where ``a = heads × (d // heads)`` is the attention width
KerasHub builds; the feed-forward ``d × ff`` and ``ff × d``; the output layer
``d × V``), plus the attention itself, 2 × 2 × ``seq_len`` × ``a`` per layer
(the scores ``QKᵀ`` and the weighted sum of the values). No causal halving:
KerasHub computes every score of the window and masks the future ones, so
that work is done. Not counted: the embedding lookups, biases, norms,
softmax, activations, the loss and the optimizer's update. Training is 3 ×
forward (the backward pass is twice the forward).

**MFU** (model FLOPs utilization) is that count × tokens/s ÷ the peak: the
share of the machine's peak the model's own arithmetic runs at.

**The peak** is taken from vendor datasheets for known GPUs (dense, no
sparsity; TF32 for float32 when TensorFlow runs float32 matmuls as TF32, as
it does by default on Ampere and later) and otherwise measured once per
machine by a short probe (``n × n`` matmuls in the compute dtype for about a
second, best of 3 rounds), cached in ``$XDG_CACHE_HOME/minigpt/peak.json``
(``~/.cache/minigpt``), keyed by the CPU, its usable cores, the GPUs the
driver lists, the dtype and the Keras backend.

**Time per step** = training FLOPs per step ÷ (peak × ``EFFICIENCY[xla]``) + a
fixed per-step overhead (``step_overhead``): a FLOPs count alone is far off
for small models, whose steps are dominated by dispatch, not arithmetic.
Both terms were measured on a 2-core AMD EPYC (see their comments); on other
machines they are assumptions.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

#: The share of the matmul probe's peak a training step's FLOPs run at, with XLA and without, measured on a
#: 2-core AMD EPYC with nothing else running (probe 120-128 GFLOP/s): 0.65 for the reference's shape (V 2,857,
#: batch 64 × 128, XLA: median step), 0.29 for a 0.3 M-parameter model (V 300, window 64, 128 wide, batch 64,
#: no XLA: fastest step). Readings taken while other programs ran (probe 20-75 GFLOP/s) were higher and are not
#: used. The rest goes to work the FLOPs count leaves out.
EFFICIENCY = {True: 0.6, False: 0.3}

#: UTF-8 bytes per token (a [BOS] per line included) of English prose under a vocabulary learned from it,
#: measured on books/train.txt (11.8 MB) with vocabularies of 953, 2,990 and 4,797 tokens (asked 1,000, 3,000,
#: 5,000); books/valid.txt gave 2.76, 3.46, 3.74. Used to guess packed windows before the text is tokenized.
BYTES_PER_TOKEN = {1000: 2.83, 3000: 3.54, 5000: 3.81}

#: Dense peak TFLOP/s from vendor datasheets: (pattern in the device name, fp32, tf32, bf16, fp16).
GPU_PEAKS: tuple[tuple[str, float, float | None, float | None, float], ...] = (
    (r"H200 NVL", 60.0, 417.5, 835.5, 835.5),
    (r"H200", 67.0, 494.5, 989.5, 989.5),
    (r"H100 NVL", 60.0, 417.5, 835.5, 835.5),
    (r"H100 PCIe", 51.0, 378.0, 756.0, 756.0),
    (r"GH200|H100", 67.0, 494.5, 989.5, 989.5),  # SXM5 (HBM3)
    (r"A100", 19.5, 156.0, 312.0, 312.0),
    (r"L40S", 91.6, 183.0, 362.0, 362.0),
    (r"L40\b", 90.5, 90.5, 181.0, 181.0),
    (r"\bL4\b", 30.3, 60.0, 121.0, 121.0),
    (r"\bA10\b", 31.2, 62.5, 125.0, 125.0),
    (r"\bT4\b", 8.1, None, None, 65.0),
    (r"V100", 15.7, None, None, 125.0),
)


@dataclass(frozen=True)
class Shape:
    """The numbers of a mini-GPT that its size follows from."""

    vocab: int
    seq_len: int
    d: int
    ff: int
    heads: int
    layers: int

    @classmethod
    def of(cls, vocab_size: int, model) -> Shape:
        """From the vocabulary's size and a ``ModelConfig``."""
        return cls(vocab_size, model.seq_len, model.embed_dim, model.feed_forward_dim, model.num_heads,
                   model.num_layers)  # fmt: skip

    @property
    def attention(self) -> int:
        """The width of the query/key/value projections: ``heads × (d // heads)``."""
        return self.heads * (self.d // self.heads)


def param_count(s: Shape) -> int:
    """Parameters, as ``model.count_params()`` counts them."""
    a = s.attention
    layer = 3 * (s.d * a + a) + (a * s.d + s.d) + 2 * 2 * s.d + (s.d * s.ff + s.ff) + (s.ff * s.d + s.d)
    return s.vocab * s.d + s.seq_len * s.d + s.layers * layer + s.d * s.vocab + s.vocab


def matmul_weights(s: Shape) -> int:
    """The weights that multiply activations: projections, feed-forward, output layer (no biases, no embeddings)."""
    return s.layers * (4 * s.d * s.attention + 2 * s.d * s.ff) + s.d * s.vocab


def forward_flops_per_token(s: Shape) -> int:
    """FLOPs of one token's forward pass (see the module's docstring)."""
    return 2 * matmul_weights(s) + s.layers * 2 * 2 * s.seq_len * s.attention


def train_flops_per_token(s: Shape) -> int:
    """FLOPs of one token's forward and backward pass: 3 × forward."""
    return 3 * forward_flops_per_token(s)


@dataclass(frozen=True)
class Memory:
    """Bytes a training step holds on one device."""

    weights: int
    gradients: int
    optimizer: int
    accumulators: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.accumulators + self.activations


def batch_memory(s: Shape, batch_size: int, accum_steps: int = 1, precision: str = "float32") -> Memory:
    """An estimate of the memory for training on a (micro-)batch of ``batch_size`` windows.

    Weights, gradients, Adam's two moments and (with accumulation) the gradient
    accumulators, 4 bytes per parameter each. Activations kept for the
    backward pass, per token and layer: about 6·d + 4·a + 2·ff values (inputs,
    q/k/v, attention output, projections, norms, the feed-forward's hidden
    and activated values) and 2·heads·seq_len (scores and softmax), in the
    compute dtype; plus the embedding's output and, per token, the logits and
    their softmax (2·V, float32). Dropout masks, XLA's scratch space and the
    framework's own buffers are not counted.
    """
    p = param_count(s)
    act = 2 if precision.startswith("mixed") else 4
    per_layer = 6 * s.d + 4 * s.attention + 2 * s.ff + 2 * s.heads * s.seq_len
    per_token = (s.layers * per_layer + s.d) * act + 2 * s.vocab * 4
    return Memory(
        weights=4 * p,
        gradients=4 * p,
        optimizer=2 * 4 * p,
        accumulators=4 * p if accum_steps > 1 else 0,
        activations=batch_size * s.seq_len * per_token,
    )


# --- the machine's peak -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peak:
    """A device's peak FLOP/s in a dtype, and where the figure comes from."""

    flops: float
    dtype: str
    device: str
    source: str  # "measured", "measured earlier" (from the cache), "datasheet"

    def describe(self) -> str:
        how = {"datasheet": "datasheet, dense"}.get(self.source, f"{self.source}: matmul probe")
        return f"{human_flops(self.flops)}/s {self.dtype} on {self.device} ({how})"


def compute_dtype(precision: str) -> str:
    """The dtype the matmuls run in under ``train.precision``."""
    return {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(precision, "float32")


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo, or what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def cpu_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _driver_gpus() -> list[str]:
    """GPU models the NVIDIA driver lists (no TensorFlow needed), for the cache key."""
    names = []
    for info in sorted(Path("/proc/driver/nvidia/gpus").glob("*/information")):
        try:
            for line in info.read_text().splitlines():
                if line.startswith("Model:"):
                    names.append(line.split(":", 1)[1].strip())
        except OSError:
            pass
    return names


def cache_file() -> Path:
    """``$XDG_CACHE_HOME/minigpt/peak.json`` (``~/.cache/minigpt/peak.json``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(root) / "minigpt" / "peak.json"


def machine_key(dtype: str) -> str:
    """What a measured peak belongs to: backend, dtype, CPU, usable cores, visible GPUs."""
    keras = sys.modules.get("keras")  # not imported for this: it starts TensorFlow
    backend = keras.backend.backend() if keras is not None else os.environ.get("KERAS_BACKEND", "tensorflow")
    gpus = ",".join(_driver_gpus()) or "no GPU"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus += f" (CUDA_VISIBLE_DEVICES={visible})"
    return f"{backend}|{dtype}|{cpu_name()}|{cpu_cores()} cores|{gpus}"


def gpu_peak(name: str, dtype: str, tf32: bool = True) -> float | None:
    """The datasheet's dense peak FLOP/s of GPU ``name`` in ``dtype``, or None if it is not in the table."""
    for pattern, fp32, tf32_peak, bf16, fp16 in GPU_PEAKS:
        if re.search(pattern, name):
            tflops = {
                "float32": tf32_peak if tf32 and tf32_peak else fp32,
                "bfloat16": bf16,
                "float16": fp16,
            }.get(dtype)
            return tflops * 1e12 if tflops else None
    return None


def probe(dtype: str = "float32", n: int = 2048, seconds: float = 1.0) -> float:
    """Peak FLOP/s of ``n × n`` matmuls in ``dtype`` on the Keras backend's default device: best of 3 rounds."""
    from minigpt_cli.backend import matmul_seconds

    once = max(matmul_seconds(n, dtype, 1), 1e-6)
    reps = max(1, int(seconds / 3 / once))
    return max(reps * 2 * n**3 / matmul_seconds(n, dtype, reps) for _ in range(3))


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_peak(precision: str = "float32") -> Peak | None:
    """The peak found earlier on this machine for ``precision``, or None."""
    dtype = compute_dtype(precision)
    hit = _read_cache(cache_file()).get(machine_key(dtype))
    if isinstance(hit, dict) and isinstance(hit.get("flops"), (int, float)) and hit["flops"] > 0:
        source = "datasheet" if hit.get("source") == "datasheet" else "measured earlier"
        return Peak(float(hit["flops"]), dtype, str(hit.get("device", "?")), source)
    return None


def machine_peak(precision: str = "float32", note=None) -> Peak:
    """This machine's peak FLOP/s for training under ``precision``: cached, from the GPU table, or probed now.

    With GPUs, the first visible one's (see ``devices`` for a whole job). ``note(text)`` is told before a probe.
    """
    peak = cached_peak(precision)
    if peak is not None:
        return peak
    from minigpt_cli import backend

    dtype = compute_dtype(precision)
    gpus = backend.gpus()
    name = gpus[0] if gpus else ""
    known = gpu_peak(name, dtype, backend.tf32()) if gpus else None
    if known:
        peak = Peak(known, dtype, name, "datasheet")
    else:
        if note is not None:
            note(f"measuring this machine's peak FLOP/s (once; kept in {cache_file()})")
        device = name or f"{cpu_name()}, {cpu_cores()} cores"
        peak = Peak(probe(dtype, n=8192 if gpus else 2048), dtype, device, "measured")
    _remember(cache_file(), machine_key(dtype), peak)
    return peak


def devices(replicas: int, workers: int) -> int:
    """Devices of one peak each that a job's batch is split over: its GPU replicas, or one CPU per worker
    (a CPU split into logical devices is still one CPU)."""
    from minigpt_cli.backend import gpus

    return replicas if gpus() else workers


def _remember(path: Path, key: str, peak: Peak) -> None:
    from minigpt_cli.runs import WriteError, write_text

    entries = _read_cache(path)
    entries[key] = {"flops": peak.flops, "device": peak.device, "source": peak.source,
                    "when": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
    try:
        write_text(path, json.dumps(entries, indent=2) + "\n")
    except WriteError:
        pass  # a read-only home: measured again next time


# --- time ---------------------------------------------------------------------------------------------------


def step_overhead(layers: int, xla: bool) -> float:
    """Seconds a training step takes beyond its FLOPs: (1 + 2 × layers) ms with XLA, (6 + 2 × layers) without.

    Measured on a 2-core AMD EPYC with 16-wide models of 1 and 4 layers (fastest steps, batch 16 × 32, through
    the same tf.data pipeline as training): 3.3 and 10.3 ms with XLA, 7.9 and 14.5 ms without.
    """
    return ((1.0 if xla else 6.0) + 2.0 * layers) / 1000


def step_seconds(s: Shape, batch_size: int, peak: float, xla: bool, forward_only: bool = False) -> float:
    """Estimated seconds per (micro-)batch step: FLOPs ÷ (peak × EFFICIENCY[xla]) + overhead."""
    per_token = forward_flops_per_token(s) if forward_only else train_flops_per_token(s)
    return batch_size * s.seq_len * per_token / (peak * EFFICIENCY[xla]) + step_overhead(s.layers, xla)


def mfu(flops_per_token: float, tokens_per_second: float, peak: float) -> float:
    """Model FLOPs utilization: the model's FLOPs per second as a share of the peak."""
    return flops_per_token * tokens_per_second / peak if peak > 0 else 0.0


# --- words --------------------------------------------------------------------------------------------------


def human_flops(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP"


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def human_seconds(t: float) -> str:
    if t < 1:
        return f"{t * 1000:.3g} ms"
    if t < 120:
        return f"{t:.3g} s"
    minutes = t / 60
    return f"{minutes:.0f} min" if minutes < 120 else f"{int(minutes // 60)} h {int(minutes % 60):02d} min"


def format_mfu(value: float) -> str:
    return f"{value * 100:.3g}%"


# --- a run's plan -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What training a config will take: what ``config --size`` and the first lines of ``train`` print.

    ``batch_size`` is the global micro-batch (``data.batch_size``), split over ``devices`` devices of ``peak``
    each (GPUs; a CPU split into logical devices is one device). Steps are micro-batch steps.
    """

    shape: Shape
    batch_size: int
    accum_steps: int
    precision: str
    peak: Peak
    xla: bool
    epochs: int
    devices: int = 1
    steps_per_epoch: int | None = None
    valid_steps: int | None = None
    windows_note: str = ""

    @property
    def params(self) -> int:
        return param_count(self.shape)

    @property
    def flops_per_token(self) -> int:
        return train_flops_per_token(self.shape)

    @property
    def peak_flops(self) -> float:
        """The peak of every device the batch is split over."""
        return self.peak.flops * self.devices

    @property
    def memory(self) -> Memory:
        return batch_memory(self.shape, -(-self.batch_size // self.devices), self.accum_steps, self.precision)

    @property
    def step_seconds(self) -> float:
        return step_seconds(self.shape, -(-self.batch_size // self.devices), self.peak.flops, self.xla)

    @property
    def epoch_seconds(self) -> float | None:
        if self.steps_per_epoch is None:
            return None
        valid = step_seconds(self.shape, -(-self.batch_size // self.devices), self.peak.flops, self.xla, True)
        return self.steps_per_epoch * self.step_seconds + (self.valid_steps or 0) * valid

    def mfu(self, tokens_per_second: float) -> float:
        return mfu(self.flops_per_token, tokens_per_second, self.peak_flops)

    def memory_line(self) -> str:
        m, s = self.memory, self.shape
        per = f"{-(-self.batch_size // self.devices)} × {s.seq_len}"
        parts = [f"weights {human_bytes(m.weights)}", f"gradients {human_bytes(m.gradients)}",
                 f"Adam's moments {human_bytes(m.optimizer)}"]  # fmt: skip
        if m.accumulators:
            parts.append(f"accumulators {human_bytes(m.accumulators)}")
        parts.append(f"activations {human_bytes(m.activations)}")
        where = " per device" if self.devices > 1 else ""
        return f"about {human_bytes(m.total)}{where} for a batch of {per} ({', '.join(parts)})"

    def time_line(self) -> str:
        s = self.shape
        work = human_flops(self.batch_size * s.seq_len * self.flops_per_token)
        overhead = human_seconds(step_overhead(s.layers, self.xla))
        share = EFFICIENCY[self.xla]
        step = (
            f"{human_seconds(self.step_seconds)} per step ({work} at {share:.0%} of the peak + {overhead}"
            f" with XLA {'on' if self.xla else 'off'})"
        )
        epoch = self.epoch_seconds
        if epoch is None:
            return f"{step}; steps per epoch unknown{f' ({self.windows_note})' if self.windows_note else ''}"
        note = f", {self.windows_note}" if self.windows_note else ""
        total = f", {human_seconds(epoch * self.epochs)} for {self.epochs} epochs" if self.epochs > 1 else ""
        return f"{step}; {self.steps_per_epoch:,} steps per epoch{note}: {human_seconds(epoch)} per epoch{total}"

    def lines(self) -> list[str]:
        """The full report (``config --size``)."""
        s = self.shape
        return [
            f"parameters: {self.params:,}",
            f"FLOPs per token: {human_flops(self.flops_per_token)} to train (3 × "
            f"{human_flops(forward_flops_per_token(s))} forward: the matmuls, and attention over the full window)",
            f"memory: {self.memory_line()}",
            f"peak: {self.peak.describe()}" + (f" × {self.devices} devices" if self.devices > 1 else ""),
            f"time: {self.time_line()}",
        ]

    def summary(self) -> list[str]:
        """Two lines for the start of ``train``."""
        return [
            f"size: {human_flops(self.flops_per_token)} per token to train, {self.memory_line()}; "
            f"peak {self.peak.describe()}" + (f" × {self.devices}" if self.devices > 1 else ""),
            f"estimate: {self.time_line()}",
        ]


def bytes_per_token(vocab_size: int) -> float:
    """``BYTES_PER_TOKEN`` at the measured vocabulary size nearest to ``vocab_size``."""
    return BYTES_PER_TOKEN[min(BYTES_PER_TOKEN, key=lambda size: abs(size - vocab_size))]


def count_windows(cfg, run, vocab: list[str] | None, lowercase: bool, split: str) -> tuple[int, str]:
    """Windows of ``split`` ("train" or "valid"), and how they were counted: from the run's token cache,
    exactly from the text's long lines (reference windows), or estimated from its bytes (packed windows)."""
    from minigpt_cli.data import check_text, line_threshold, text_files
    from minigpt_cli.windows import cache_key

    files = text_files(cfg.data, split)
    seq_len = cfg.model.seq_len
    if vocab is not None:
        key = cache_key(vocab, files, cfg.data.windows, seq_len, cfg.data.min_string_len, lowercase)
        for sidecar in sorted((run.root / "cache").glob(f"*{cfg.data.windows}*-{key}.json")):
            try:
                shape = json.loads(sidecar.read_text(encoding="utf-8"))["shape"]
                return (max(int(shape[0]) - 1, 0) // seq_len if len(shape) == 1 else int(shape[0])), "token cache"
            except (OSError, ValueError, KeyError, TypeError, IndexError):
                continue
    stats = check_text(files, line_threshold(cfg.data.windows, cfg.data.min_string_len), f"data.{split}")
    if cfg.data.windows == "reference":
        return stats.kept_lines, "one per line longer than data.min_string_len"
    ratio = bytes_per_token(len(vocab) if vocab is not None else cfg.vocab.size)
    tokens = sum(f.stat().st_size for f in files) / ratio
    return int(tokens - 1) // seq_len, f"estimated from the text at {ratio} bytes per token"


def _downloaded(data) -> bool:
    """Whether ``data.url``'s archive is extracted already, where ``data.download_corpus`` keeps it."""
    import hashlib
    from urllib.parse import urlsplit

    from minigpt_cli.data import cache_dir

    key = hashlib.sha1(data.url.encode()).hexdigest()[:10]
    name = os.path.basename(urlsplit(data.url).path) or "corpus.zip"
    return (cache_dir(data) / f"{Path(name).stem}-{key}" / "extracted").is_dir()


def plan_for(cfg, run, peak: Peak | None = None, note=None) -> Plan:
    """The ``Plan`` of training ``cfg`` in ``run``, before anything is tokenized (``config --size``).

    The vocabulary's size is the run's ``vocab.txt``'s, else ``vocab.size``; the windows come from
    ``count_windows``; XLA is assumed on unless ``train.jit_compile`` is false or a strategy is named.
    """
    from minigpt_cli.errors import MinigptError

    vocab, lowercase = None, cfg.vocab.lowercase
    if run.vocab.is_file():
        vocab = run.vocab.read_text(encoding="utf-8").splitlines()
        try:
            lowercase = bool(json.loads(run.vocab.with_suffix(".json").read_text(encoding="utf-8"))["lowercase"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    shape = Shape.of(len(vocab) if vocab is not None else cfg.vocab.size, cfg.model)
    steps = valid_steps = None
    if (cfg.data.train and cfg.data.valid) or _downloaded(cfg.data):  # --size never downloads
        try:
            train, how = count_windows(cfg, run, vocab, lowercase, "train")
            valid, _ = count_windows(cfg, run, vocab, lowercase, "valid")
        except MinigptError as e:
            note = f"the text cannot be read: {e}"
        else:
            steps = cfg.train.steps_per_epoch or train // cfg.data.batch_size
            every = -(-valid // cfg.data.batch_size)
            valid_steps = min(cfg.train.validation_steps or every, every)
            note = f"{train:,} {cfg.data.windows} training windows ({how})"
    else:
        note = "the text is downloaded by 'minigpt vocab'"
    if vocab is None:
        note += f"; vocabulary of {cfg.vocab.size:,} as asked (the learned one can be smaller)"
    xla = cfg.train.jit_compile == "true" or (
        cfg.train.jit_compile == "auto" and cfg.train.distribution in ("auto", "none")
    )
    return Plan(
        shape, cfg.data.batch_size, cfg.train.grad_accum_steps, cfg.train.precision,
        peak or machine_peak(cfg.train.precision, note), xla, cfg.train.epochs,
        steps_per_epoch=steps, valid_steps=valid_steps, windows_note=note,
    )  # fmt: skip
