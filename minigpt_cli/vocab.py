"""Learning, saving and loading the WordPiece vocabulary, and its tokenizer.

Two learners write the same kind of ``vocab.txt`` (``vocab.learner``):
``keras-hub``, the reference's ``keras_hub.tokenizers.compute_word_piece_vocabulary``
(tensorflow-text), and ``tokenizers``, Hugging Face ``tokenizers``' WordPiece
trainer (Rust, reads the text files itself on every core), set up to split
and normalize words the way KerasHub's ``WordPieceTokenizer`` does when it
tokenizes.
"""

from __future__ import annotations

import hashlib
import json
import time
import typing
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import keras_hub

from minigpt_cli.config import Learner, VocabConfig
from minigpt_cli.errors import MinigptError
from minigpt_cli.runs import write_text

PAD, UNK, BOS = "[PAD]", "[UNK]", "[BOS]"
LEARNERS: tuple[str, ...] = typing.get_args(Learner)
#: What a ``vocab.json`` without a ``learner`` key was learned by (every run from before there was a choice).
DEFAULT_LEARNER = "keras-hub"

# KerasHub's ``WordPieceTokenizer`` split rules (keras_hub/src/tokenizers/word_piece_tokenizer.py), in the
# Oniguruma syntax of ``tokenizers``: words end at ASCII whitespace (RE2's ``\s``) and control or format
# characters, which are dropped; punctuation (all non-alphanumeric ASCII and Unicode ``P``) and CJK ideographs
# are words of their own. One character class each: Oniguruma scans a class faster than an alternation.
_CJK = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]  # fmt: skip
_SPLIT_DROPPED = r"[\t\n\f\r \p{Cc}\p{Cf}]"
_SPLIT_KEPT = r"[!-/:-@\[-`{-~\p{P}" + "".join(rf"\x{{{lo:X}}}-\x{{{hi:X}}}" for lo, hi in _CJK) + "]"
#: Punctuation that KerasHub can meet inside a word: it splits before it case-folds (NFKC), so "wait…" is the
#: word "wait..." to it, cut as "wait", "##.", "##.", "##."; the Rust trainer normalizes first and never sees
#: a "." inside a word. These are the punctuation characters (outside CJK) in the NFKC case folding of another
#: character (… ‼ ⁇ ⑴ ℅ ⁺ ″ Ŀ ...).
_PUNCTUATION_IN_WORDS = "!$()+,./:<=>?^`|~·′‵〔〕"
#: Lines handed to the Rust trainer at a time when a line filter applies.
_LINES_PER_BATCH = 4096


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


def hf_word_piece(lowercase: bool):
    """An untrained Hugging Face WordPiece ``Tokenizer`` that cuts words as ``MiniGPTTokenizer`` does.

    KerasHub lowercases with ``case_fold_utf8`` (NFKC, then Unicode case folding) and strips no accents;
    NFKC + lowercase is the same but for ``ß`` and final ``ς``, mapped here as case folding maps them (and
    a few Cherokee and polytonic Greek letters, left alone). Without ``lowercase`` KerasHub leaves the text
    as it is, and so does this.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(unk_token=UNK, continuing_subword_prefix="##"))
    if lowercase:
        tok.normalizer = normalizers.Sequence(
            [
                normalizers.NFKC(),
                normalizers.Lowercase(),
                normalizers.Replace("ß", "ss"),
                normalizers.Replace("ς", "σ"),
            ]
        )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_DROPPED), "removed"),
            pre_tokenizers.Split(Regex(_SPLIT_KEPT), "isolated"),
        ]
    )
    return tok


def _long_lines(files: list[Path], threshold: int) -> Iterator[list[str]]:
    """Batches of the lines longer than ``threshold`` UTF-8 bytes, as ``data.raw_text_dataset`` keeps them."""
    batch: list[str] = []
    for path in files:
        with open(path, "rb") as f:
            for line in f:
                line = line.rstrip(b"\r\n")
                if len(line) > threshold:
                    batch.append(line.decode("utf-8"))
                    if len(batch) == _LINES_PER_BATCH:
                        yield batch
                        batch = []
    if batch:
        yield batch


def _word_of_its_own(char: str, lowercase: bool) -> bool:
    """KerasHub makes ``char`` a word by itself (``_SPLIT_KEPT``), and no case folding puts it inside one."""
    code = ord(char)
    return (
        (0x21 <= code <= 0x7E and not char.isalnum())
        or unicodedata.category(char).startswith("P")
        or any(lo <= code <= hi for lo, hi in _CJK)
    ) and not (lowercase and char in _PUNCTUATION_IN_WORDS)


def _loadable(token: str) -> bool:
    """A token ``vocab.txt`` can hold: one non-blank line."""
    return bool(token.strip()) and token.splitlines() == [token]


def learn_vocabulary_fast(
    files: list[Path], threshold: int, size: int, lowercase: bool, reserved_tokens: list[str]
) -> list[str]:
    """Hugging Face ``tokenizers``' WordPiece trainer over the lines of ``files`` longer than ``threshold`` bytes.

    With no line to drop (``threshold < 0``) the Rust trainer reads the files itself; otherwise the kept
    lines are handed to it in batches. The result is at most ``size`` tokens: ``reserved_tokens`` first, in
    order, then the learned ones sorted, none that ``vocab.txt`` cannot hold (blank, or holding a line break).
    Token ids mean nothing to WordPiece, which looks tokens up by their text.
    """
    from tokenizers import trainers

    tok = hf_word_piece(lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=size,
        special_tokens=list(reserved_tokens),
        continuing_subword_prefix="##",
        show_progress=False,
    )
    if threshold < 0:
        tok.train([str(f) for f in files], trainer)
    else:
        tok.train_from_iterator(_long_lines(files, threshold), trainer)
    by_id = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda item: item[1])
    reserved = set(reserved_tokens)
    learned = list(dict.fromkeys(t for t, _ in by_id if t not in reserved and _loadable(t)))
    # Every character KerasHub may meet inside a word, as a piece that goes on one: then no word of the text's
    # characters is [UNK]. The trainer only has those it saw inside words after normalizing.
    have = set(learned)
    extra = [f"##{c}" for c in learned if len(c) == 1 and f"##{c}" not in have and not _word_of_its_own(c, lowercase)]
    # The trainer's order (characters, then merges) changes from run to run (hash order, ties): cut to size in
    # that order, which keeps the characters, then sort, so that the same text gives the same vocab.txt.
    return list(reserved_tokens) + sorted(learned[: size - len(reserved_tokens) - len(extra)] + extra)


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


def make_tokenizer(vocab: list[str], lowercase: bool = True):
    """KerasHub's tokenizer (``MiniGPTTokenizer``); where TensorFlow is not installed (JAX or PyTorch alone),
    ``FastWordPieceTokenizer``, which gives the same ids without it."""
    from minigpt_cli.backend import tensorflow_available

    if not tensorflow_available():
        from minigpt_cli.fast_tokenizer import FastWordPieceTokenizer

        return FastWordPieceTokenizer(vocab, lowercase)
    return MiniGPTTokenizer(vocabulary=vocab, lowercase=lowercase)


@dataclass(frozen=True)
class Vocabulary:
    """A run's vocabulary and the tokenizer settings it was learned with.

    ``vocab.txt`` holds the tokens; ``vocab.json`` beside it the settings
    (``lowercase``, ``reserved_tokens``, the size asked for) and a digest of
    ``vocab.txt``, so every later command tokenizes as ``vocab`` did, whatever
    config it is given. ``learner`` is who learned it; None when unknown (a
    fine-tune from a KerasHub preset, whose files do not say), which no config
    contradicts.
    """

    tokens: list[str]
    lowercase: bool
    reserved_tokens: list[str]
    requested: int
    learner: str | None = DEFAULT_LEARNER

    def __len__(self) -> int:
        return len(self.tokens)

    def tokenizer(self):
        """The run's tokenizer (see ``make_tokenizer``)."""
        return make_tokenizer(self.tokens, self.lowercase)

    def digest(self) -> str:
        """sha256 of ``vocab.txt``'s contents."""
        return _digest(self.tokens)

    def settings(self) -> dict:
        return {
            "lowercase": self.lowercase,
            "reserved_tokens": self.reserved_tokens,
            "size": self.requested,
            "learner": self.learner,
        }

    def check_config(self, cfg: VocabConfig) -> None:
        """Refuse a ``[vocab]`` section that contradicts how this vocabulary was learned."""
        asked = {
            "lowercase": cfg.lowercase,
            "reserved_tokens": list(cfg.reserved_tokens),
            "size": cfg.size,
            "learner": cfg.learner,
        }
        learned = {k: v for k, v in self.settings().items() if v is not None and asked[k] != v}
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
    """The vocabulary and its settings; a ``vocab.txt`` without ``vocab.json`` takes them from ``fallback``.

    A ``vocab.json`` without ``learner`` is from before there was a choice: ``keras-hub`` learned it.
    """
    tokens = load_vocabulary(vocab_txt)
    path = settings_path(vocab_txt)
    if not path.is_file():
        return Vocabulary(tokens, fallback.lowercase, list(fallback.reserved_tokens), fallback.size, fallback.learner)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        learner = data.get("learner", DEFAULT_LEARNER)
        if learner is not None and learner not in LEARNERS:
            raise ValueError(learner)
        settings = Vocabulary(
            tokens, bool(data["lowercase"]), list(data["reserved_tokens"]), int(data["size"]), learner
        )
        digest = data["sha256"]
    except (ValueError, KeyError, TypeError, AttributeError):
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
    learner: str = DEFAULT_LEARNER


def build_vocabulary(cfg, run) -> VocabReport:
    """Learn ``vocab.txt`` (and ``vocab.json``) for the run from the training text with ``vocab.learner``.

    Both learners see the same lines: those ``data.raw_text_dataset`` keeps (longer than
    ``data.min_string_len`` bytes for reference windows, all when packed).
    """
    from minigpt_cli.data import check_text, line_threshold, raw_text_dataset, text_files

    train_files = text_files(cfg.data, "train")
    valid_files = text_files(cfg.data, "valid")
    threshold = line_threshold(cfg.data.windows, cfg.data.min_string_len)
    stats = check_text(train_files, threshold, "data.train")
    check_text(valid_files, threshold, "data.valid")
    v = cfg.vocab
    t0 = time.perf_counter()
    if v.learner == "tokenizers":
        tokens = learn_vocabulary_fast(train_files, threshold, v.size, v.lowercase, v.reserved_tokens)
    else:
        tokens = learn_vocabulary(raw_text_dataset(train_files, cfg.data), v.size, v.lowercase, v.reserved_tokens)
    seconds = time.perf_counter() - t0
    vocab = Vocabulary(tokens, v.lowercase, list(v.reserved_tokens), v.size, v.learner)
    write_vocabulary(vocab, run.vocab)
    share = unknown_share(vocab.tokenizer(), raw_text_dataset(valid_files, cfg.data))
    return VocabReport(len(vocab), v.size, seconds, share, stats.kept_lines, v.learner)
