"""A WordPiece tokenizer without TensorFlow that gives exactly ``MiniGPTTokenizer``'s ids.

``minigpt_cli.vocab.MiniGPTTokenizer`` is KerasHub's ``WordPieceTokenizer``; the ids a model learns are those of
its TensorFlow path (tensorflow-text, in the ``tf.function`` of the token cache). This module needs numpy and
the standard library only, and cuts text the same way:

1. the text ends at its first NUL character (tensorflow-text's ``regex_split`` reads no further);
2. it is split into words: ASCII whitespace and control or format characters (``\\p{Cc}``, ``\\p{Cf}``) end a
   word and are dropped; punctuation (every non-alphanumeric ASCII character and ``\\p{P}``) and CJK
   ideographs are words of their own; every other character is part of a word, Unicode spaces such as
   U+00A0 included;
3. with ``lowercase``, each word is case-folded with ICU's NFKC_Casefold (NFKC, full case folding, default
   ignorable characters dropped; accents kept). The split comes first: "wait…" is the words "wait" and
   "..." (one word of three dots), "½" the word "1⁄2", "a<" + U+0338 + "b" three words where folding first
   would make one ("a≮b"); a word that folds to nothing is dropped;
4. each word is cut into WordPiece tokens by greedy longest match, the pieces after the first prefixed
   ``##``; a word of more than 100 UTF-8 bytes, or one that cannot be cut, is one ``[UNK]``.

Text is cut at spaces into chunks ("said," "“Well"), and the ids of each distinct chunk and word are
computed once and remembered: running text repeats them.

KerasHub's eager path (pure Python since KerasHub 0.32: ``MiniGPTTokenizer("text")`` outside a
``tf.function``) gives the same ids on ordinary text, but not after a NUL, nor where case folding turns a
mark into a letter or drops one between marks (U+0345, U+034F), nor for case pairs newer than Python's
Unicode: this module follows the TensorFlow path.

Unicode versions differ between the parts: TensorFlow 2.21's RE2 knows Unicode 15, its ICU Unicode 16, and
Python 3.11's ``unicodedata`` Unicode 14. ``_RE2_FORMAT``, ``_RE2_PUNCTUATION``, ``_NOT_PUNCTUATION`` and
``_NEWER_FOLDS`` carry the differences, found by comparing every code point against tensorflow-text; the
tests compare every code point again.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable
from itertools import chain

import numpy as np

UNK = "[UNK]"
SUFFIX = "##"
#: tensorflow-text's ``FastWordpieceTokenizer`` makes a longer word (in UTF-8 bytes) one ``[UNK]``.
MAX_BYTES_PER_WORD = 100
#: Distinct chunks (and words) whose ids are remembered; a cache that holds more starts again.
CACHE_SIZE = 1 << 18

_CJK = [(0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
        (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)]  # fmt: skip
#: Unicode 15 format characters and punctuation, which RE2 knows and Python 3.11 does not.
_RE2_FORMAT = range(0x13439, 0x13440)
_RE2_PUNCTUATION = [*range(0x11B00, 0x11B0A), *range(0x11F43, 0x11F50)]
#: Unicode 16 punctuation, which RE2 does not know (nor Python before 3.14): letters inside a word to KerasHub.
_NOT_PUNCTUATION = [0x1B4E, 0x1B4F, 0x1B7F, 0x10D6E, 0x113D4, 0x113D5, 0x113D7, 0x113D8, 0x11BE1, 0x16D6D,
                    0x16D6E, 0x16D6F, 0x1E5FF]  # fmt: skip
#: Case foldings (and NFKC mappings) of Unicode 15 and 16 that TensorFlow's ICU applies and Python 3.11's
#: ``unicodedata`` does not know: the first code point of a run, and what each one folds to.
_NEWER_FOLDS = {
    start + i: target
    for start, targets in [
        (0x1C89, "\u1c8a"),
        (0xA7CB, "\u0264\ua7cd"),
        (0xA7DA, "\ua7db"),
        (0xA7DC, "\u019b"),
        (0x10D50, "".join(map(chr, range(0x10D70, 0x10D86)))),
        (0x1CCD6, "abcdefghijklmnopqrstuvwxyz0123456789"),
        (
            0x1E030,
            "\u0430\u0431\u0432\u0433\u0434\u0435\u0436\u0437\u0438\u043a\u043b\u043c\u043e\u043f\u0440\u0441"
            "\u0442\u0443\u0444\u0445\u0446\u0447\u0448\u044b\u044d\u044e\ua689\u04d9\u0456\u0458\u04e9\u04af"
            "\u04cf\u0430\u0431\u0432\u0433\u0434\u0435\u0436\u0437\u0438\u043a\u043b\u043e\u043f\u0441\u0443"
            "\u0444\u0445\u0446\u0447\u0448\u044a\u044b\u0491\u0456\u0455\u045f\u04ab\ua651\u04b1",
        ),
    ]
    for i, target in enumerate(targets)
}
#: Unicode's Default_Ignorable_Code_Point, which NFKC_Casefold drops.
_IGNORABLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f\u3164"
    "\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)
#: KerasHub's whitespace (RE2's ``\s``): where text is cut into chunks.
_SPACES = re.compile(r"[\t\n\f\r ]+")


class _CharFolds(dict):
    """Each character's NFKC_Casefold, canonically decomposed; computed on first use."""

    def __missing__(self, code: int) -> str:
        char = chr(code)
        folded = _NEWER_FOLDS.get(code) or unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", char).casefold())
        self[code] = folded = unicodedata.normalize("NFKD", _IGNORABLE.sub("", folded))
        return folded


_CHAR_FOLDS = _CharFolds()


def fold(word: str) -> str:
    """ICU's NFKC_Casefold of ``word``, as ``tf_text.case_fold_utf8`` computes it.

    ICU maps each character, then reorders the marks and composes (so a folded U+0345 is a letter that
    stops the marks around it from moving, and a dropped U+034F stops nothing); NFKC, case folding and
    NFKC again over the whole word would reorder the marks first.
    """
    if word.isascii():
        return word.lower()
    return unicodedata.normalize("NFC", word.translate(_CHAR_FOLDS))


def _char_class(codes: list[int]) -> str:
    """The body of a ``re`` character class holding ``codes`` (sorted), as ranges."""
    runs: list[list[int]] = []
    for c in codes:
        if runs and runs[-1][1] + 1 == c:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return "".join(re.escape(chr(lo)) + (f"-{re.escape(chr(hi))}" if hi > lo else "") for lo, hi in runs)


def _word_pattern(dropped: set[int], kept: set[int], cjk: list[tuple[int, int]]) -> re.Pattern[str]:
    """A run of characters in none of the three, or one character of ``kept`` or ``cjk``."""
    kept_class = _char_class(sorted(kept - {c for lo, hi in cjk for c in range(lo, hi + 1)}))
    kept_class += "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in cjk)
    return re.compile(f"[^{_char_class(sorted(dropped - kept))}{kept_class}]+|[{kept_class}]")


@functools.lru_cache(maxsize=1)
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """KerasHub's words (a run of word characters, or one punctuation character or CJK ideograph; what is in
    neither is dropped) in ASCII text, in text of the Basic Multilingual Plane and in any text (``re`` tests
    a class of characters beyond the BMP range by range: 3x slower), and the Unicode spaces that
    ``str.split`` cuts at and KerasHub does not.

    Built from ``unicodedata`` (a tenth of a second): planes 4-13 hold no character, 15-16 private use ones.
    """
    category = unicodedata.category
    codes = [*range(0x40000), *range(0xE0000, 0xE1000)]
    dropped = {9, 10, 12, 13, 32, *_RE2_FORMAT} | {c for c in codes if category(chr(c)) in ("Cc", "Cf")}
    kept = {c for c in range(0x21, 0x7F) if not chr(c).isalnum()} | set(_RE2_PUNCTUATION)
    kept |= {c for c in codes if category(chr(c))[0] == "P"}
    kept -= set(_NOT_PUNCTUATION)
    bmp = set(range(0x10000))
    ascii_words = _word_pattern({c for c in dropped if c < 0x80}, {c for c in kept if c < 0x80}, [])
    bmp_words = _word_pattern(dropped & bmp, kept & bmp, [(lo, hi) for lo, hi in _CJK if hi < 0x10000])
    words = _word_pattern(dropped, kept, _CJK)
    word_spaces = re.compile(f"[{_char_class([c for c in range(0x3001) if chr(c).isspace() and c not in dropped])}]")
    return ascii_words, bmp_words, words, word_spaces


class _Cache(dict):
    """Values computed by ``compute`` on first use; it starts again when it holds ``CACHE_SIZE`` keys."""

    def __init__(self, compute: Callable[[str], tuple[int, ...]]):
        super().__init__()
        self._compute = compute

    def __missing__(self, key: str) -> tuple[int, ...]:
        if len(self) >= CACHE_SIZE:
            self.clear()
        self[key] = value = self._compute(key)
        return value


class FastWordPieceTokenizer:
    """``MiniGPTTokenizer``'s ids for text, without TensorFlow.

    >>> tok = FastWordPieceTokenizer(["[PAD]", "[UNK]", "[BOS]", "the", "cat"])
    >>> tok("The cat").tolist()
    [3, 4]
    """

    def __init__(self, vocabulary: list[str], lowercase: bool = True):
        self._vocabulary = list(vocabulary)
        self._ids = {token: i for i, token in enumerate(self._vocabulary)}
        if len(self._ids) != len(self._vocabulary):
            raise ValueError("the vocabulary lists a token twice")
        if UNK not in self._ids:
            raise ValueError(f"the vocabulary has no {UNK} token")
        self.lowercase = lowercase
        self._unk = self._ids[UNK]
        self._longest = max(map(len, self._vocabulary))
        self._ascii_words, self._bmp_words, self._words, self._word_spaces = _patterns()
        self._word_ids = _Cache(self._word_piece)
        self._chunk_ids = _Cache(self._chunk_piece)

    def __call__(self, text: str) -> np.ndarray:
        """The ids of ``text``: an int32 vector, as ``MiniGPTTokenizer(text)`` gives."""
        return np.fromiter(chain.from_iterable(map(self._chunk_ids.__getitem__, self._chunks(text))), np.int32)

    def tokenize_batch(self, lines: list[str]) -> list[np.ndarray]:
        """The ids of each of ``lines``."""
        return [self(line) for line in lines]

    def words(self, text: str) -> list[str]:
        """The words of ``text`` that WordPiece cuts: split, and case-folded with ``lowercase``."""
        return [word for chunk in self._chunks(text) for word in self._split(chunk)]

    def _chunks(self, text: str) -> list[str]:
        """``text`` (up to a NUL) cut at KerasHub's whitespace; ``str.split`` where it cuts at that alone."""
        if "\x00" in text:
            text = text[: text.index("\x00")]
        return text.split() if text.isascii() or not self._word_spaces.search(text) else _SPACES.split(text)

    def _split(self, chunk: str) -> list[str]:
        """The words of ``chunk``, case-folded with ``lowercase`` (where ASCII, before the split: the same)."""
        if chunk.isascii():
            return self._ascii_words.findall(chunk.lower() if self.lowercase else chunk)
        words = (self._bmp_words if max(chunk) < "\U00010000" else self._words).findall(chunk)
        return [w for w in map(fold, words) if w] if self.lowercase else words

    def _chunk_piece(self, chunk: str) -> tuple[int, ...]:
        return tuple(chain.from_iterable(map(self._word_ids.__getitem__, self._split(chunk))))

    def _word_piece(self, word: str) -> tuple[int, ...]:
        """Greedy longest match, the pieces after the first prefixed ``##``; ``[UNK]`` if too long or stuck."""
        if len(word.encode()) > MAX_BYTES_PER_WORD:
            return (self._unk,)
        ids = self._ids
        if word in ids:
            return (ids[word],)
        cut, start = [], 0
        while start < len(word):
            for end in range(min(len(word), start + self._longest), start, -1):
                i = ids.get(word[start:end] if start == 0 else SUFFIX + word[start:end])
                if i is not None:
                    break
            else:
                return (self._unk,)
            cut.append(i)
            start = end
        return tuple(cut)

    def get_vocabulary(self) -> list[str]:
        return list(self._vocabulary)

    def vocabulary_size(self) -> int:
        return len(self._vocabulary)

    def token_to_id(self, token: str) -> int:
        if token not in self._ids:
            raise ValueError(f"Token '{token}' is not in the vocabulary.")
        return self._ids[token]

    def id_to_token(self, i: int) -> str:
        if not 0 <= i < len(self._vocabulary):
            raise ValueError(f"`id` must be in range [0, {len(self._vocabulary) - 1}]. Received: {i}")
        return self._vocabulary[i]
