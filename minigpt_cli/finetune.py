"""Fine-tuning: a new run that starts from another model's weights and vocabulary.

The parent is a run directory (``model.keras`` + ``vocab.txt``) or a KerasHub
preset folder written by ``minigpt export --format keras-hub``. Its shape
(``model.*``) and vocabulary (``vocab.*``) become the new run's; a config that
sets one of those keys to another value is refused. The optimizer and the
recipe are the new config's, from step 0.

>>> parent = find_parent(Path("runs/simplebooks"))  # doctest: +SKIP
>>> cfg = adopt(cfg, parent, explicit={"data.train": "--set"})  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import hashlib
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from minigpt_cli.config import Config, VocabConfig, load_config
from minigpt_cli.errors import MinigptError
from minigpt_cli.runs import file_digest
from minigpt_cli.vocab import BOS, PAD, UNK, Vocabulary, load_vocabulary, read_vocabulary, settings_path

#: The backbone's constructor arguments that are the config's ``model.*`` keys.
SHAPE_KEYS = {
    "sequence_length": "model.seq_len",
    "embedding_dim": "model.embed_dim",
    "intermediate_dim": "model.feed_forward_dim",
    "num_heads": "model.num_heads",
    "num_layers": "model.num_layers",
}
#: A preset's weight files: the backbone's and the task's (the head).
PRESET_WEIGHTS = ("model.weights.h5", "task.weights.h5")
#: Above this share of ``[UNK]`` tokens in the new text, ``train`` warns.
HIGH_UNKNOWN_SHARE = 0.01


@dataclass(frozen=True)
class Parent:
    """The model a fine-tune starts from: where it is, its vocabulary, its shape and its checksum."""

    path: Path
    kind: Literal["run", "preset"]
    vocab: Vocabulary
    shape: dict[str, int]
    sha256: str

    def settings(self) -> dict[str, object]:
        """The config keys the parent fixes, with its values."""
        v = self.vocab
        return {
            **self.shape,
            "vocab.size": v.requested,
            "vocab.lowercase": v.lowercase,
            "vocab.reserved_tokens": v.reserved_tokens,
            # A preset does not say who learned its vocabulary: then the config's vocab.learner stands.
            **({"vocab.learner": v.learner} if v.learner is not None else {}),
        }

    def weights(self) -> list[np.ndarray]:
        """The parent model's weights, checked to come from the file whose checksum ``sha256`` is."""
        model = self.load_model()
        weights = [np.asarray(w) for w in model.weights]
        if _checksum(self.path, self.kind) != self.sha256:
            raise MinigptError(f"the model in {self.path} changed while it was read (is it training?); try again")
        return weights

    def load_model(self):
        """The parent's ``MiniGPTCausalLM`` (imports TensorFlow)."""
        from minigpt_cli.model import MiniGPTCausalLM, load_model

        if self.kind == "run":
            return load_model(self.path / "model.keras", len(self.vocab))
        import keras_hub

        try:
            model = keras_hub.models.CausalLM.from_preset(str(self.path), preprocessor=None)
        except Exception as e:  # a damaged weights file, a missing class...
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise MinigptError(f"cannot load the preset {self.path} ({first[:200]}); export it again") from None
        if not isinstance(model, MiniGPTCausalLM) or model.backbone.vocabulary_size != len(self.vocab):
            raise MinigptError(f"the preset {self.path} holds no minigpt model of its vocabulary; export it again")
        return model


def _json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MinigptError(f"--init-from: cannot read {what} {path} ({e}); point it at a run or a preset") from None


def _shape(backbone: dict, where: Path) -> dict[str, int]:
    """The ``model.*`` keys from a serialized ``MiniGPTBackbone``."""
    name = backbone.get("registered_name") or backbone.get("class_name")
    if name not in ("minigpt>MiniGPTBackbone", "MiniGPTBackbone"):
        raise MinigptError(
            f"--init-from: {where} holds a {backbone.get('class_name')}, not a minigpt model; "
            "start from a minigpt run or a preset written by 'minigpt export --format keras-hub'"
        )
    config = backbone.get("config", {})
    try:
        return {key: int(config[arg]) for arg, key in SHAPE_KEYS.items()}
    except (KeyError, TypeError, ValueError):
        raise MinigptError(f"--init-from: the model config in {where} is damaged; train or export it again") from None


def _checksum(path: Path, kind: str) -> str:
    """sha256 of a run's ``model.keras``; for a preset, sha256 over its two weight files' sha256s."""
    if kind == "run":
        return file_digest(path / "model.keras")[1]
    digest = hashlib.sha256()
    for name in PRESET_WEIGHTS:
        if not (path / name).is_file():
            raise MinigptError(f"--init-from: the preset {path} has no {name}; export it again")
        digest.update(f"{name}:{file_digest(path / name)[1]}\n".encode())
    return digest.hexdigest()


def _leading_reserved(tokens: list[str]) -> list[str]:
    """The bracketed tokens a vocabulary starts with (its reserved tokens)."""
    reserved = []
    for t in tokens:
        if not (t.startswith("[") and t.endswith("]")):
            break
        reserved.append(t)
    return reserved


def find_parent(path: Path) -> Parent:
    """The parent at ``path``, checked without loading TensorFlow's runtime: its vocabulary, shape and checksum."""
    path = Path(path)
    if (path / "model.keras").is_file():
        if not (path / "vocab.txt").is_file():
            raise MinigptError(f"--init-from: {path} has a model but no vocab.txt; it is not a whole run")
        try:
            with zipfile.ZipFile(path / "model.keras") as z:
                config = json.loads(z.read("config.json"))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile):
            raise MinigptError(f"--init-from: {path / 'model.keras'} is damaged; train the parent again") from None
        shape = _shape(config.get("config", {}).get("backbone", {}), path / "model.keras")
        if settings_path(path / "vocab.txt").is_file():
            fallback = VocabConfig()  # unused: vocab.json says how the vocabulary was learned
        elif (path / "config.toml").is_file():
            fallback = load_config(path / "config.toml").vocab
        else:
            raise MinigptError(f"--init-from: {path} has neither vocab.json nor config.toml to say how to tokenize")
        vocab = read_vocabulary(path / "vocab.txt", fallback)
        return Parent(path, "run", vocab, shape, _checksum(path, "run"))
    if (path / "config.json").is_file() and (path / "metadata.json").is_file():
        shape = _shape(_json(path / "config.json", "the preset config"), path)
        if not (path / "task.json").is_file():
            raise MinigptError(
                f"--init-from: the preset {path} has a backbone but no CausalLM task (task.json); "
                "export the whole model with 'minigpt export --format keras-hub'"
            )
        has_tokenizer = (path / "tokenizer.json").is_file()
        tokenizer = _json(path / "tokenizer.json", "the preset tokenizer") if has_tokenizer else {}
        vocab_file = path / "assets" / "tokenizer" / "vocabulary.txt"
        if not vocab_file.is_file():
            raise MinigptError(f"--init-from: the preset {path} has no tokenizer vocabulary ({vocab_file})")
        tokens = load_vocabulary(vocab_file)
        lowercase = bool(tokenizer.get("config", {}).get("lowercase", True))
        vocab = Vocabulary(tokens, lowercase, _leading_reserved(tokens), len(tokens), learner=None)
        return Parent(path, "preset", vocab, shape, _checksum(path, "preset"))
    what = "no such folder" if not path.exists() else "neither a run with a model.keras nor a KerasHub preset"
    raise MinigptError(f"--init-from: {path} is {what}; give a trained run directory or a folder from 'minigpt export'")


def adopt(cfg: Config, parent: Parent, explicit: dict[str, str]) -> Config:
    """``cfg`` with the parent's shape and vocabulary settings, its path and checksum.

    ``explicit`` maps the keys the user set to where they were set (a file,
    ``--set``); one of the parent's keys set to another value is refused, as is
    a ``train.init_sha256`` that is not the parent model's.
    """
    settings = parent.settings()
    flat = {f"{section}.{k}": v for section in ("model", "vocab") for k, v in vars(getattr(cfg, section)).items()}
    conflicts = [
        f"{key} = {flat[key]!r} (in {explicit[key]}; the parent has {value!r})"
        for key, value in settings.items()
        if key in explicit and flat[key] != value
    ]
    if conflicts:
        raise MinigptError(
            f"--init-from {parent.path} fixes the model's shape and vocabulary, but the config sets "
            f"{'; '.join(conflicts)}; drop those keys"
        )
    if cfg.train.init_sha256 and cfg.train.init_sha256 != parent.sha256:
        raise MinigptError(
            f"the model in {parent.path} is not the one recorded in train.init_sha256 ({cfg.train.init_sha256[:12]}..."
            f", now {parent.sha256[:12]}...): it changed since; set train.init_sha256=\"\" to start from it as it is"
        )
    cfg = copy.deepcopy(cfg)
    for key, value in settings.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, list(value) if isinstance(value, list) else value)
    cfg.train.init_from = str(parent.path.resolve())
    cfg.train.init_sha256 = parent.sha256
    return cfg


def check_run(parent: Parent, root: Path) -> None:
    """Refuse to fine-tune into the parent's own folder (or one inside it) or over another vocabulary."""
    child, source = Path(root).resolve(), parent.path.resolve()
    if child == source or source in child.parents or child in source.parents:
        raise MinigptError(
            f"the run directory {root} would overwrite its parent {parent.path}; fine-tune into a new one (-r runs/NEW)"
        )
    vocab_txt = Path(root) / "vocab.txt"
    if vocab_txt.is_file() and load_vocabulary(vocab_txt) != parent.vocab.tokens:
        raise MinigptError(
            f"{vocab_txt} is another vocabulary than the parent's ({parent.path}); "
            "fine-tune into a new run directory (-r runs/NEW)"
        )


def prepare(cfg: Config, root: Path, explicit: dict[str, str]) -> Config:
    """The config of a fine-tune into ``root``, checked before anything is written (``train`` checks it again)."""
    parent = find_parent(Path(cfg.train.init_from))
    check_run(parent, root)
    return adopt(cfg, parent, explicit)


def unknown_share(windows: np.ndarray, tokens: list[str]) -> float:
    """Share of ``[UNK]`` among the text tokens (not ``[PAD]`` or ``[BOS]``) of ``windows``' labels.

    The labels (each window but its first token) are the tokens training
    predicts, each once: packed windows overlap by that first token.
    """
    pad, bos, unk = tokens.index(PAD), tokens.index(BOS), tokens.index(UNK)
    total = unknown = 0
    for start in range(0, len(windows), 1 << 16):  # in blocks: the windows may be a memory-mapped cache
        ids = np.asarray(windows[start : start + (1 << 16), 1:])
        total += int(((ids != pad) & (ids != bos)).sum())
        unknown += int((ids == unk).sum())
    return unknown / total if total else 0.0


def copy_weights(model, weights: list[np.ndarray]) -> None:
    """Put the parent's weights into ``model`` (same shape; dropout and dtype policy may differ)."""
    if [tuple(w.shape) for w in model.weights] != [w.shape for w in weights]:
        raise MinigptError("the parent's weights do not fit the shape its config gives; train or export it again")
    for variable, value in zip(model.weights, weights, strict=True):
        variable.assign(value)
