"""Learning, saving and loading the WordPiece vocabulary, and its tokenizer."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import keras_hub

from minigpt_cli.config import VocabConfig
from minigpt_cli.errors import MinigptError
from minigpt_cli.runs import write_text

PAD, UNK, BOS = "[PAD]", "[UNK]", "[BOS]"


@keras.saving.register_keras_serializable(package="minigpt")
class MiniGPTTokenizer(keras_hub.tokenizers.WordPieceTokenizer):
    """The reference's lowercase WordPiece tokenizer, with ``[BOS]`` as start token.

    There is no end token: generation runs for the number of tokens asked.

    >>> tok = MiniGPTTokenizer(vocabulary=["[PAD]", "[UNK]", "[BOS]", "the", "cat"])
    >>> tok("The cat").numpy().tolist()
    [3, 4]
    """

    def __init__(self, vocabulary=None, lowercase: bool = True, **kwargs):
        self._add_special_token(PAD, "pad_token")
        self._add_special_token(BOS, "start_token")
        self.end_token_id = None
        kwargs.setdefault("oov_token", UNK)
        super().__init__(vocabulary=vocabulary, lowercase=lowercase, **kwargs)


def learn_vocabulary(raw_train_ds, size: int, lowercase: bool, reserved_tokens: list[str]) -> list[str]:
    """The reference's ``compute_word_piece_vocabulary`` over a dataset of text batches."""
    return keras_hub.tokenizers.compute_word_piece_vocabulary(
        raw_train_ds,
        vocabulary_size=size,
        lowercase=lowercase,
        reserved_tokens=list(reserved_tokens),
    )


def save_vocabulary(vocab: list[str], path: Path) -> None:
    write_text(path, "".join(f"{tok}\n" for tok in vocab))


def load_vocabulary(path: Path) -> list[str]:
    """Read ``vocab.txt``; refuse a file that cannot be the vocabulary of a run."""
    try:
        vocab = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise MinigptError(f"{path} is not a UTF-8 vocabulary file; run 'minigpt vocab' again") from None
    if len(vocab) < 4 or vocab[0] != PAD or UNK not in vocab or BOS not in vocab:
        raise MinigptError(
            f"{path} is not a minigpt vocabulary (it must start with {PAD} and hold {UNK} and {BOS}); "
            "run 'minigpt vocab' again"
        )
    if len(set(vocab)) != len(vocab):
        raise MinigptError(f"{path} lists a token twice; run 'minigpt vocab' again")
    return vocab


def make_tokenizer(vocab: list[str], lowercase: bool = True) -> MiniGPTTokenizer:
    return MiniGPTTokenizer(vocabulary=vocab, lowercase=lowercase)


@dataclass(frozen=True)
class Vocabulary:
    """A run's vocabulary and the tokenizer settings it was learned with.

    ``vocab.txt`` holds the tokens; ``vocab.json`` beside it the settings
    (``lowercase``, ``reserved_tokens``, the size asked for) and a digest of
    ``vocab.txt``, so every later command tokenizes as ``vocab`` did, whatever
    config it is given.
    """

    tokens: list[str]
    lowercase: bool
    reserved_tokens: list[str]
    requested: int

    def __len__(self) -> int:
        return len(self.tokens)

    def tokenizer(self) -> MiniGPTTokenizer:
        return make_tokenizer(self.tokens, self.lowercase)

    def digest(self) -> str:
        """sha256 of ``vocab.txt``'s contents."""
        return _digest(self.tokens)

    def settings(self) -> dict:
        return {"lowercase": self.lowercase, "reserved_tokens": self.reserved_tokens, "size": self.requested}

    def check_config(self, cfg: VocabConfig) -> None:
        """Refuse a ``[vocab]`` section that contradicts how this vocabulary was learned."""
        asked = {"lowercase": cfg.lowercase, "reserved_tokens": list(cfg.reserved_tokens), "size": cfg.size}
        learned = {k: v for k, v in self.settings().items() if asked[k] != v}
        if learned:
            raise MinigptError(
                f"the config says {', '.join(f'vocab.{k} = {asked[k]!r}' for k in learned)} but the run's "
                f"vocabulary was learned with {', '.join(f'vocab.{k} = {v!r}' for k, v in learned.items())}; "
                "run 'minigpt vocab' again with this config, or drop those keys"
            )


def settings_path(vocab_txt: Path) -> Path:
    return Path(vocab_txt).with_suffix(".json")


def _digest(tokens: list[str]) -> str:
    return hashlib.sha256("".join(f"{t}\n" for t in tokens).encode()).hexdigest()


def write_vocabulary(vocab: Vocabulary, vocab_txt: Path) -> None:
    """``vocab.txt`` and, beside it, ``vocab.json`` with the settings and the digest that ties them."""
    save_vocabulary(vocab.tokens, vocab_txt)
    write_text(settings_path(vocab_txt), json.dumps({**vocab.settings(), "sha256": _digest(vocab.tokens)}, indent=2))


def read_vocabulary(vocab_txt: Path, fallback: VocabConfig) -> Vocabulary:
    """The vocabulary and its settings; a ``vocab.txt`` without ``vocab.json`` takes them from ``fallback``."""
    tokens = load_vocabulary(vocab_txt)
    path = settings_path(vocab_txt)
    if not path.is_file():
        return Vocabulary(tokens, fallback.lowercase, list(fallback.reserved_tokens), fallback.size)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        settings = Vocabulary(tokens, bool(data["lowercase"]), list(data["reserved_tokens"]), int(data["size"]))
        digest = data["sha256"]
    except (ValueError, KeyError, TypeError):
        raise MinigptError(f"{path} is damaged; run 'minigpt vocab' again") from None
    if digest != _digest(tokens):
        raise MinigptError(f"{path} does not describe {vocab_txt} (one was changed); run 'minigpt vocab' again")
    return settings


def unknown_share(tokenizer: MiniGPTTokenizer, raw_ds) -> float:
    """Share of ``[UNK]`` among the tokens of a dataset of text batches."""
    import tensorflow as tf

    unk = tokenizer.token_to_id(UNK)
    total = unknown = 0
    for ids in raw_ds.map(tokenizer):
        ids = ids.flat_values
        total += int(tf.size(ids))
        unknown += int(tf.reduce_sum(tf.cast(ids == unk, tf.int64)))
    return unknown / total if total else 0.0


@dataclass(frozen=True)
class VocabReport:
    size: int
    requested: int
    seconds: float
    unknown_share: float
    train_lines: int


def build_vocabulary(cfg, run) -> VocabReport:
    """Learn ``vocab.txt`` (and ``vocab.json``) for the run from the training text, as the reference does."""
    from minigpt_cli.data import check_text, line_threshold, raw_text_dataset, text_files

    train_files = text_files(cfg.data, "train")
    valid_files = text_files(cfg.data, "valid")
    threshold = line_threshold(cfg.data.windows, cfg.data.min_string_len)
    stats = check_text(train_files, threshold, "data.train")
    check_text(valid_files, threshold, "data.valid")
    t0 = time.perf_counter()
    tokens = learn_vocabulary(
        raw_text_dataset(train_files, cfg.data), cfg.vocab.size, cfg.vocab.lowercase, cfg.vocab.reserved_tokens
    )
    seconds = time.perf_counter() - t0
    vocab = Vocabulary(tokens, cfg.vocab.lowercase, list(cfg.vocab.reserved_tokens), cfg.vocab.size)
    write_vocabulary(vocab, run.vocab)
    share = unknown_share(vocab.tokenizer(), raw_text_dataset(valid_files, cfg.data))
    return VocabReport(len(vocab), cfg.vocab.size, seconds, share, stats.kept_lines)
