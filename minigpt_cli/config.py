"""One config for every subcommand: schema, TOML loading, overrides, checks.

The defaults are the reference example's values. A config file only names the
keys it changes; ``--set section.key=value`` overrides any key, the value
parsed as TOML (``1e-3``, ``true``, ``"text"``, ``[1, 2]``), bare words taken
as strings.

>>> cfg = load_config(None, ["model.num_layers=4"])
>>> cfg.model.num_layers
4
"""

from __future__ import annotations

import difflib
import tomllib
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from minigpt_cli.errors import MinigptError

SIMPLEBOOKS_URL = "https://dldata-public.s3.us-east-2.amazonaws.com/simplebooks.zip"

Sampler = Literal["greedy", "beam", "random", "topk", "topp"]
#: How text is cut into training windows (see ``minigpt_cli.windows``).
Windows = Literal["reference", "packed"]
Switch = Literal["auto", "true", "false"]
#: Who learns the WordPiece vocabulary: the reference's KerasHub/tensorflow-text learner, or Hugging Face
#: ``tokenizers``' WordPiece trainer (Rust, every core); both write a ``vocab.txt`` KerasHub reads.
Learner = Literal["keras-hub", "tokenizers"]
#: The Keras backend that runs the model (``KERAS_BACKEND``, when set, wins; see ``minigpt_cli.backend``).
Backend = Literal["tensorflow", "jax", "torch"]
SAMPLERS: tuple[str, ...] = typing.get_args(Sampler)
WINDOWS: tuple[str, ...] = typing.get_args(Windows)


def _range(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


@dataclass
class DataConfig:
    url: str = SIMPLEBOOKS_URL
    subset: str = "simplebooks-92-raw"
    train: str = ""
    valid: str = ""
    cache_dir: str = ""
    windows: Windows = "reference"
    min_string_len: int = field(default=512, metadata=_range(0))
    batch_size: int = field(default=64, metadata=_range(1))
    #: Processes that tokenize the text into the token cache; 0: one per CPU core.
    tokenize_workers: int = field(default=0, metadata=_range(0))


@dataclass
class VocabConfig:
    size: int = field(default=5000, metadata=_range(4))
    lowercase: bool = True
    reserved_tokens: list[str] = field(default_factory=lambda: ["[PAD]", "[UNK]", "[BOS]"])
    learner: Learner = "keras-hub"


@dataclass
class ModelConfig:
    seq_len: int = field(default=128, metadata=_range(2))
    embed_dim: int = field(default=256, metadata=_range(1))
    feed_forward_dim: int = field(default=128, metadata=_range(1))
    num_heads: int = field(default=3, metadata=_range(1))
    num_layers: int = field(default=2, metadata=_range(1))
    dropout: float = field(default=0.0, metadata=_range(0.0, 0.99))


@dataclass
class TrainConfig:
    epochs: int = field(default=5, metadata=_range(1))
    steps_per_epoch: int | None = field(default=None, metadata=_range(1))
    validation_steps: int | None = field(default=None, metadata=_range(1))
    learning_rate: float = field(default=1e-3, metadata=_range(0.0, lo_open=True))
    optimizer: Literal["adam", "adamw"] = "adam"
    weight_decay: float | None = field(default=None, metadata=_range(0.0))
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = field(default=0, metadata=_range(0))
    min_lr_ratio: float = field(default=0.1, metadata=_range(0.0, 1.0))
    clip_norm: float = field(default=0.0, metadata=_range(0.0))
    #: Micro-batches of data.batch_size whose gradients are averaged into one update (Keras' optimizer option).
    grad_accum_steps: int = field(default=1, metadata=_range(1))
    #: Stop after this many epochs without a lower validation loss; 0: never stop early.
    early_stop_patience: int = field(default=0, metadata=_range(0))
    #: TensorBoard: a point every this many steps; 0: as often as costs under 2% of a step (at most 200 an epoch).
    log_every: int = field(default=0, metadata=_range(0))
    checkpoint_every: int = field(default=0, metadata=_range(0))
    sample_each_epoch: bool = True
    jit_compile: Switch = "auto"
    distribution: Literal["auto", "none", "mirrored", "multi_worker"] = "auto"
    devices: list[str] = field(default_factory=list)
    precision: Literal["float32", "mixed_bfloat16", "mixed_float16"] = "float32"
    worker_timeout: float = field(default=120.0, metadata=_range(0.0, lo_open=True))
    #: Fine-tune: start from this run directory's (or KerasHub preset folder's) model and vocabulary.
    init_from: str = ""
    #: The parent model's sha256, recorded by ``train``; when set, a different parent model is refused.
    init_sha256: str = ""


@dataclass
class GenerateConfig:
    sampler: Sampler = "topk"
    max_tokens: int = field(default=80, metadata=_range(1))
    k: int = field(default=10, metadata=_range(1))
    p: float = field(default=0.5, metadata=_range(0.0, 1.0, lo_open=True))
    num_beams: int = field(default=10, metadata=_range(1))
    temperature: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    jit_compile: Switch = "auto"
    stop: list[str] = field(default_factory=list)
    repetition_penalty: float = field(default=1.0, metadata=_range(0.0, lo_open=True))
    no_repeat_ngram: int = field(default=0, metadata=_range(0))
    min_p: float = field(default=0.0, metadata=_range(0.0, 1.0))
    end_at_paragraph: bool = False


@dataclass
class Config:
    seed: int = field(default=42, metadata=_range(0))
    backend: Backend = "tensorflow"
    data: DataConfig = field(default_factory=DataConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data, without unset (None) values, for TOML."""
        return _drop_none(asdict(self))


#: AdamW's weight decay when the config names none.
DEFAULT_WEIGHT_DECAY = 0.01


def _drop_none(d: dict) -> dict:
    return {k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items() if v is not None}


def _sections() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in fields(Config) if f.name in _SECTION_NAMES}


_SECTION_NAMES = ("data", "vocab", "model", "train", "generate")


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``model.seq_len``."""
    keys = [f.name for f in fields(Config) if f.name not in _SECTION_NAMES]
    for name, cls in _sections().items():
        keys += [f"{name}.{f.name}" for f in fields(cls)]
    return keys


#: Keys that no longer exist, and what to do instead.
RETIRED = {
    "data.packing": 'it is now data.windows: "packed" (packing = true) or "reference" (packing = false)',
    "data.shuffle_buffer": "it had no effect and was removed: batches are shuffled by (seed, epoch, step); delete it",
    "generate.top_p_candidates": "top-p no longer sorts candidates (it finds its cut-off exactly without sorting); "
    "delete it",
}


def _unknown(key: str) -> MinigptError:
    if key in RETIRED:
        return MinigptError(f"config key '{key}' is retired: {RETIRED[key]}")
    near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return MinigptError(f"unknown config key '{key}'{hint}; run 'minigpt config --keys' for the list")


def _check_value(key: str, hint: Any, meta: Any, value: Any) -> Any:
    """Return ``value`` converted to the key's type, or raise a one-line error."""
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint) if optional else hint
    origin = typing.get_origin(base)
    if origin is Literal:
        choices = typing.get_args(base)
        if isinstance(value, bool):
            value = str(value).lower()  # generate.jit_compile = true
        if value not in choices:
            raise MinigptError(f"config key '{key}' must be one of {', '.join(choices)}; got {value!r}")
        return value
    ok = True
    if base is bool:
        ok = isinstance(value, bool)
    elif base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif base is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif base is str:
        ok = isinstance(value, str)
    elif origin is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    if not ok:
        names = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}
        tname = "a list of strings" if origin is list else names[base]
        raise MinigptError(f"config key '{key}' must be {tname}, got {value!r}")
    rng = meta.get("lo"), meta.get("hi")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = rng
        too_low = lo is not None and (value <= lo if meta.get("lo_open") else value < lo)
        too_high = hi is not None and value > hi
        if too_low or too_high:
            lo_s = "-inf" if lo is None else lo
            hi_s = "inf" if hi is None else hi
            bracket = "(" if meta.get("lo_open") else "["
            raise MinigptError(f"config key '{key}' = {value} is out of range {bracket}{lo_s}, {hi_s}]")
    return value


def _assign(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    target: Any = cfg
    if len(parts) == 2 and parts[0] in _SECTION_NAMES:
        target = getattr(cfg, parts[0])
    elif len(parts) != 1 or parts[0] in _SECTION_NAMES:
        raise _unknown(key)
    name = parts[-1]
    fmap = {f.name: f for f in fields(target)}
    if name not in fmap:
        raise _unknown(key)
    hint = typing.get_type_hints(type(target))[name]
    setattr(target, name, _check_value(key, hint, fmap[name].metadata, value))


def _migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A config file written before a key was retired, in today's keys (runs' own config.toml files)."""
    section = data.get("data")
    if isinstance(section, dict) and ("packing" in section or "shuffle_buffer" in section):
        section = dict(section)
        section.pop("shuffle_buffer", None)
        if "packing" in section:
            section.setdefault("windows", "packed" if section.pop("packing") is True else "reference")
        data = {**data, "data": section}
    section = data.get("generate")
    if isinstance(section, dict) and "top_p_candidates" in section:
        data = {**data, "generate": {k: v for k, v in section.items() if k != "top_p_candidates"}}
    return data


def _flatten(data: dict[str, Any]) -> list[tuple[str, Any]]:
    items = []
    for k, v in data.items():
        if isinstance(v, dict):
            if k not in _SECTION_NAMES:
                raise _unknown(k)
            items += [(f"{k}.{kk}", vv) for kk, vv in v.items()]
        else:
            items.append((k, v))
    return items


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``section.key=value`` and parse the value as TOML (or a bare string)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise MinigptError(f"--set expects section.key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def _validate(cfg: Config) -> None:
    reserved = cfg.vocab.reserved_tokens
    if reserved[:1] != ["[PAD]"] or "[UNK]" not in reserved or "[BOS]" not in reserved:
        raise MinigptError(
            'config key \'vocab.reserved_tokens\' must start with "[PAD]" and contain "[UNK]" and "[BOS]"'
        )
    if cfg.vocab.size <= len(reserved):
        raise MinigptError("config key 'vocab.size' must be larger than the number of reserved tokens")
    if cfg.model.embed_dim < cfg.model.num_heads:
        raise MinigptError("config key 'model.embed_dim' must be at least model.num_heads")
    t = cfg.train
    if t.weight_decay is not None and t.optimizer != "adamw":
        raise MinigptError(
            f"config key 'train.weight_decay' only applies to train.optimizer = \"adamw\" (got {t.optimizer!r}); "
            "set train.optimizer=adamw or leave train.weight_decay out"
        )
    if any(not text for text in cfg.generate.stop):
        raise MinigptError("config key 'generate.stop' must not hold an empty string")
    if t.devices and t.distribution != "mirrored":
        raise MinigptError(
            f"config key 'train.devices' only applies to train.distribution = \"mirrored\" (got {t.distribution!r}); "
            "set train.distribution=mirrored or leave train.devices out"
        )


def _items(path: str | Path | None, overrides: list[str] | tuple[str, ...]) -> list[tuple[str, Any]]:
    """The ``(key, value)`` pairs the file at ``path`` and ``overrides`` set, in order."""
    items: list[tuple[str, Any]] = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MinigptError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise MinigptError(f"config file {path} is not valid TOML: {e}") from None
        items += _flatten(_migrate(data))
    return items + [parse_override(o) for o in overrides]


def explicit_keys(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> set[str]:
    """The keys the file at ``path`` and ``overrides`` set themselves (not left at their defaults)."""
    return {key for key, _ in _items(path, overrides)}


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides``."""
    cfg = Config()
    for key, value in _items(path, overrides):
        _assign(cfg, key, value)
    _validate(cfg)
    return cfg


def dumps(cfg: Config) -> str:
    """The resolved config as TOML text."""
    import tomli_w

    return tomli_w.dumps(cfg.to_dict())
