"""FastWordPieceTokenizer (no TensorFlow) against KerasHub's WordPieceTokenizer: the same ids, always.

The reference is ``MiniGPTTokenizer`` on KerasHub's TensorFlow path (tensorflow-text), the one the token cache
of ``minigpt train`` runs: the ids a model learns. On ordinary text KerasHub's eager path (pure Python since
KerasHub 0.32, what ``MiniGPTTokenizer("text")`` runs) gives the same ids, and is checked there too.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import BLOCK_TENSORFLOW, CORPUS, TINY
from keras_hub.src.tokenizers.word_piece_tokenizer import pretokenize

from minigpt_cli import fast_tokenizer
from minigpt_cli.fast_tokenizer import FastWordPieceTokenizer
from minigpt_cli.vocab import BOS, PAD, UNK, MiniGPTTokenizer, learn_vocabulary_fast

ROOT = Path(__file__).resolve().parents[1]
SIZE = int(dict(s.split("=") for s in TINY)["vocab.size"])

AWKWARD = [
    "",
    "   ",
    "Café naïve résumé ÉCOLE Zoë façade jalapeño",
    "wait… what‼ ⁇",
    "½ cup, ¾ and ⅞; 2½",
    "ﬁne ﬂour ﬀ ﬅ Ĳssel",
    "北京 東京は大きい 中文字",
    "smile 😀 thumbs 👍🏽 heart ❤️ family 👨‍👩‍👧 flag 🇫🇷",
    "zero\u200bwidth join\u200der word\u2060joiner non\u200cjoiner",
    "tab\there\rcarriage\nnewline\x0bvertical\x0cform",
    "ctl\x01chars\x7fdel\x1fus\x1cfs\x85nel",
    "before\x00after the NUL",
    "a" * 150,
    "b" * 100 + " " + "c" * 101,
    "é" * 50 + " " + "è" * 51,
    "x" * 40 + "’" + "é" * 40,
    "1234567890 3.14 1,000,000 007 ²³ ①②",
    "don't it’s rock 'n' roll ‘quoted’ “curly” «guillemets» „low“",
    "[BOS] [UNK] [PAD] ##s ##",
    "HELLO World MiXeD CaSe",
    "ΟΔΟΣ Σ σοφός ΣΟΦΟΣ",
    "Straße STRASSE ẞ",
    "İstanbul ıi Iİ",
    "a\u00a0b c\u2009d e\u202ff g\u3000h",
    "line\u2028sep para\u2029sep ogham\u1680space",
    "x<\u0338y =\u0338 >\u0338",
    "e\u0301 é a\u0308\u0301 \u0345\ufe25 \u1f88 ᾳ \u1f96\ufe0c\u0344 \ufe2f\u034f\u0356",
    "Ǆ ǅ ǆ Ⅻ ⑴ ㎏ ℌ K Å ℃",
    "Ꭰꭰ ᏸ ꮜ",
    "ＡＢＣ！ ＃tag ｶﾀｶﾅ",
    "#hashtag @home $5 100% ^caret `tick` ~tilde |pipe",
    "\ufeffBOM soft\u00adhyphen cgj\u034fhere vs\ufe0f",
    "\uf900 \uf9ff \U0001d400\U0001d41a",
    "\u1b4e\u1b4f new\u1b7fpunct \U0001ccd6\U0001ccf0 \U0001e030 \U00011b00 \U00013439x",
    "한국어 각 가각",
    "—dash– and - hyphen − minus",
]


def _reference(vocab: list[str], lowercase: bool) -> MiniGPTTokenizer:
    """KerasHub on its TensorFlow path, eagerly."""
    return MiniGPTTokenizer(vocabulary=vocab, lowercase=lowercase, _allow_python_workflow=False)


def _ids(tokenizer, lines: list[str]) -> list[list[int]]:
    return [np.asarray(ids).reshape(-1).tolist() for ids in tokenizer(tf.constant(lines))]


def _corpus_lines() -> list[str]:
    return [
        line.rstrip("\n")
        for name in ("train.txt", "valid.txt")
        for line in (CORPUS / name).read_text(encoding="utf-8").splitlines()
    ]


def _dressed(line: str) -> str:
    """``line`` as a typeset book prints it: curly quotes, dashes, accents, capitals (all on the fast path)."""
    line = line.replace(" '", " ‘").replace("'", "’").replace('"', "“", 1).replace('"', "”", 1)
    line = line.replace("--", "—").replace("cafe", "café").replace("the ", "thé ").replace("and", "ÅND")
    return line.upper() if len(line) % 3 == 0 else line


@pytest.fixture(scope="module", params=[True, False], ids=["lowercase", "cased"])
def vocab(request, tmp_path_factory) -> tuple[list[str], bool]:
    """A vocabulary of TINY's size learned (``vocab.learner = tokenizers``) from the fixture corpus, plain and
    dressed."""
    lowercase = request.param
    text = tmp_path_factory.mktemp("text") / "dressed.txt"
    text.write_text("".join(f"{_dressed(line)}\n" for line in _corpus_lines()), encoding="utf-8")
    files = [CORPUS / "train.txt", CORPUS / "valid.txt", text]
    return learn_vocabulary_fast(files, -1, SIZE, lowercase, [PAD, UNK, BOS]), lowercase


def test_corpus_lines_give_the_ids_of_keras_hub(vocab):
    tokens, lowercase = vocab
    lines = _corpus_lines()
    lines += [_dressed(line) for line in lines]
    fast = FastWordPieceTokenizer(tokens, lowercase=lowercase)
    want = _ids(_reference(tokens, lowercase), lines)
    got = fast.tokenize_batch(lines)
    assert all(ids.dtype == np.int32 and ids.ndim == 1 for ids in got)
    assert [ids.tolist() for ids in got] == want
    assert sum(map(len, want)) > 50_000 and sum(ids.count(1) for ids in want) < 100  # real text, few [UNK]
    eager = MiniGPTTokenizer(vocabulary=tokens, lowercase=lowercase)  # what `generate` runs on a prompt today
    assert [np.asarray(eager(line)).tolist() for line in lines[::7]] == want[::7]


def test_awkward_strings_give_the_ids_of_keras_hub(vocab):
    tokens, lowercase = vocab
    # Every character of the strings (folded or not), alone and as a piece that goes on a word, and the short
    # words KerasHub makes of them whole: then a word split or folded differently shows as different ids, not
    # as [UNK] for both.
    chars = {c for text in AWKWARD for c in text + unicodedata.normalize("NFKC", text).casefold()}
    pieces = sorted(c for c in chars if c.strip() and c.isprintable())
    split = pretokenize(tf.constant(AWKWARD), lowercase, False, True, True, None).to_list()
    words = [w.decode() for ws in split for w in ws if 1 < len(w.decode()) <= 12]
    words += ["a" * 100, "é" * 50, "è", "##è", "##a"]  # long words: cut or [UNK] by their UTF-8 bytes
    extra = pieces + [f"##{c}" for c in pieces[::2]] + words
    tokens = tokens + [t for t in dict.fromkeys(extra) if t not in set(tokens)]
    fast = FastWordPieceTokenizer(tokens, lowercase=lowercase)
    want = _ids(_reference(tokens, lowercase), AWKWARD)
    got = [fast(text).tolist() for text in AWKWARD]
    for text, w, g in zip(AWKWARD, want, got, strict=True):
        assert g == w, f"{text!r}: KerasHub {w}, fast {g}"
    assert fast("").shape == (0,) and fast("").dtype == np.int32
    # A word that folds to nothing is no word (and gives no id, as the ids above show).
    assert fast.words("cgj \u034f alone\ufe0f") == (["cgj", "alone"] if lowercase else ["cgj", "\u034f", "alone\ufe0f"])


def test_every_code_point_splits_and_folds_as_tensorflow_text():
    """Each character inside a word: where KerasHub's RE2 and ICU know newer Unicode than Python, too."""
    everything = [chr(c) for c in range(1, 0x110000) if not 0xD800 <= c <= 0xDFFF]
    lines = [" ".join(f"a{c}b" for c in everything[i : i + 512]) for i in range(0, len(everything), 512)]
    for lowercase in (True, False):
        fast = FastWordPieceTokenizer([UNK], lowercase=lowercase)
        want = pretokenize(tf.constant(lines), lowercase, False, True, True, None).to_list()
        for line, words in zip(lines, want, strict=True):
            words = [w for w in (w.decode() for w in words) if w]  # a word that folds to nothing gives no id
            assert fast.words(line) == words, line


def test_word_piece_is_greedy_longest_match_as_tensorflow_text():
    rng = random.Random(0)
    tokens = [PAD, UNK, BOS, "a", "ab", "abc", "abcab", "b", "c", "##a", "##b", "##bc", "##ca", "##cab", "##c", "##"]
    texts = [" ".join("".join(rng.choices("abcd", k=rng.randint(1, 9))) for _ in range(8)) for _ in range(300)]
    for lowercase in (True, False):
        assert [ids.tolist() for ids in FastWordPieceTokenizer(tokens, lowercase).tokenize_batch(texts)] == _ids(
            _reference(tokens, lowercase), texts
        )


def test_the_caches_start_again_when_full(vocab, monkeypatch):
    tokens, lowercase = vocab
    lines = _corpus_lines()[:60]
    want = [ids.tolist() for ids in FastWordPieceTokenizer(tokens, lowercase).tokenize_batch(lines)]
    monkeypatch.setattr(fast_tokenizer, "CACHE_SIZE", 5)
    small = FastWordPieceTokenizer(tokens, lowercase)
    assert [ids.tolist() for ids in small.tokenize_batch(lines)] == want
    assert len(small._word_ids) <= 5 and len(small._chunk_ids) <= 5


def test_vocabulary_lookups_match_keras_hub(vocab):
    tokens, lowercase = vocab
    fast, ref = FastWordPieceTokenizer(tokens, lowercase), _reference(tokens, lowercase)
    assert fast.get_vocabulary() == ref.get_vocabulary() == tokens
    assert fast.vocabulary_size() == ref.vocabulary_size() == len(tokens)
    for token in (PAD, UNK, BOS, tokens[-1]):
        assert fast.token_to_id(token) == ref.token_to_id(token)
        assert fast.id_to_token(fast.token_to_id(token)) == token
    with pytest.raises(ValueError):
        fast.token_to_id("not a token")
    with pytest.raises(ValueError):
        fast.id_to_token(len(tokens))
    with pytest.raises(ValueError, match=r"\[UNK\]"):
        FastWordPieceTokenizer([PAD, BOS, "a"])
    with pytest.raises(ValueError, match="twice"):
        FastWordPieceTokenizer([PAD, UNK, "a", "a"])


def test_works_where_tensorflow_cannot_be_imported(vocab, tmp_path):
    tokens, lowercase = vocab
    texts = [*_corpus_lines()[:20], *AWKWARD]
    (tmp_path / "in.json").write_text(json.dumps({"vocab": tokens, "lowercase": lowercase, "texts": texts}))
    code = BLOCK_TENSORFLOW + textwrap.dedent(
        """
        import json
        try:
            import tensorflow
            raise SystemExit("tensorflow imported")
        except ImportError:
            pass
        from minigpt_cli.fast_tokenizer import FastWordPieceTokenizer
        args = json.load(open(sys.argv[1]))
        tok = FastWordPieceTokenizer(args["vocab"], lowercase=args["lowercase"])
        ids = [tok(t).tolist() for t in args["texts"]]
        loaded = sorted({m.split(".")[0] for m in sys.modules} & {"tensorflow", "keras", "keras_hub", "tf_keras"})
        print(json.dumps({"ids": ids, "loaded": loaded}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "in.json")], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["loaded"] == []
    assert out["ids"] == _ids(_reference(tokens, lowercase), texts)
