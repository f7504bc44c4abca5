"""The vocabulary learners (``vocab.learner``): Hugging Face ``tokenizers`` against the reference's KerasHub one."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from conftest import TINY, assert_user_error, minigpt

from minigpt_cli.config import load_config
from minigpt_cli.errors import MinigptError
from minigpt_cli.runs import RunDir
from minigpt_cli.vocab import (
    BOS,
    PAD,
    UNK,
    Vocabulary,
    build_vocabulary,
    hf_word_piece,
    learn_vocabulary_fast,
    load_vocabulary,
    make_tokenizer,
    read_vocabulary,
    settings_path,
    unknown_share,
    write_vocabulary,
)

SIZE = 300
# Accents, a sharp s, Greek with a final sigma, CJK, digits and punctuation (ASCII and Unicode): the split and
# normalization rules the two tokenizers must agree on.
WORDS = (
    "the a and of to in he she it was said little old king queen forest river house garden bread water "
    "Café café naïve résumé Zoë Straße ÉLAN façade jalapeño ΣΟΦΟΣ σοφός 北京 東京は大きい "
    "1999 42 3.14 don't it's «quoted» “curly” (aside) [note] well—then co-op e-mail $5 100% #tag @home ¿qué? ¡sí! "
    "wait… what‼ ⑴ ½ ﬁne"
).split() + [  # and enough made-up words that the text gives more pieces than the size asked
    "".join(random.Random(i).choices(["ka", "ri", "mo", "tel", "sun", "dra", "vo", "lin", "ph", "qu", "ing"], k=3))
    for i in range(600)
]


def _lines(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(14, 24))) + "\n" for _ in range(n))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("learner-corpus")
    train, valid = folder / "train.txt", folder / "valid.txt"
    train.write_text(_lines(0, 400), encoding="utf-8")
    # The validation text: the same words, and a few the training text never had (their letters it had).
    valid.write_text(_lines(1, 40) + "a quixotic sphinx jumped over the lazy dwarf\n" * 2, encoding="utf-8")
    return {"train": train, "valid": valid}


def _sets(corpus: dict[str, Path], *extra: str) -> list[str]:
    pairs = [f"data.train={corpus['train']}", f"data.valid={corpus['valid']}", *TINY, f"vocab.size={SIZE}", *extra]
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, corpus) -> tuple[Path, str]:
    """``minigpt vocab`` with the tokenizers learner, then a tiny ``minigpt train`` on it, through the CLI."""
    run = tmp_path_factory.mktemp("hf-run")
    vocab = minigpt("vocab", "-r", run, *_sets(corpus, "vocab.learner=tokenizers"))
    assert vocab.returncode == 0, vocab.stderr
    train = minigpt("train", "-r", run, *_sets(corpus, "vocab.learner=tokenizers", "train.sample_each_epoch=false",
                                              "train.jit_compile=false"))
    assert train.returncode == 0, train.stderr
    return run, vocab.stdout


def _in_process_vocab(tmp_path: Path, corpus: dict[str, Path], learner: str, *extra: str):
    cfg = load_config(None, [f"data.train={corpus['train']}", f"data.valid={corpus['valid']}", *TINY,
                             f"vocab.size={SIZE}", f"vocab.learner={learner}", *extra])  # fmt: skip
    run = RunDir(tmp_path / learner).create()
    report = build_vocabulary(cfg, run)
    return report, load_vocabulary(run.vocab)


def test_vocab_learns_a_loadable_vocabulary_and_trains(hf_run):
    """vocab.txt of the asked size, reserved tokens first, loaded unchanged by KerasHub; the learner recorded."""
    run, stdout = hf_run
    assert "by the tokenizers learner" in stdout and " in " in stdout
    tokens = load_vocabulary(run / "vocab.txt")
    assert len(tokens) == SIZE
    assert tokens[:3] == [PAD, UNK, BOS]
    assert all(t.strip() == t and t for t in tokens)
    tokenizer = make_tokenizer(tokens)
    assert tokenizer.token_to_id(PAD) == 0 and tokenizer.vocabulary_size() == SIZE
    assert json.loads(settings_path(run / "vocab.txt").read_text())["learner"] == "tokenizers"
    assert json.loads((run / "history.json").read_text())[-1]["val_loss"] > 0


def test_contradicting_learner_is_refused(hf_run, corpus):
    """A config whose vocab.learner is not the one that learned the run's vocabulary: one line, as for size."""
    run, _ = hf_run
    result = minigpt("train", "-r", run, *_sets(corpus, "vocab.learner=keras-hub"))
    assert_user_error(
        result, "vocab.learner = 'keras-hub'", "learned with vocab.learner = 'tokenizers'", "run 'minigpt vocab' again"
    )


def test_vocab_json_without_learner_means_keras_hub(tmp_path):
    """Runs from before the choice: no learner in vocab.json is the reference learner."""
    vocab_txt = tmp_path / "vocab.txt"
    write_vocabulary(Vocabulary([PAD, UNK, BOS, "the"], True, [PAD, UNK, BOS], 4), vocab_txt)
    data = json.loads(settings_path(vocab_txt).read_text())
    del data["learner"]
    settings_path(vocab_txt).write_text(json.dumps(data))
    cfg = load_config(None, ["vocab.size=4"]).vocab
    vocab = read_vocabulary(vocab_txt, cfg)
    assert vocab.learner == "keras-hub"
    vocab.check_config(cfg)
    cfg.learner = "tokenizers"
    with pytest.raises(MinigptError, match="vocab.learner = 'tokenizers'.*learned with vocab.learner = 'keras-hub'"):
        vocab.check_config(cfg)


def test_unknown_learner_contradicts_no_config(tmp_path):
    """A fine-tune from a KerasHub preset does not know who learned the vocabulary: it says so, and any goes."""
    vocab_txt = tmp_path / "vocab.txt"
    write_vocabulary(Vocabulary([PAD, UNK, BOS, "the"], True, [PAD, UNK, BOS], 4, learner=None), vocab_txt)
    assert json.loads(settings_path(vocab_txt).read_text())["learner"] is None
    cfg = load_config(None, ["vocab.size=4"]).vocab
    vocab = read_vocabulary(vocab_txt, cfg)
    assert vocab.learner is None
    for learner in ("keras-hub", "tokenizers"):
        cfg.learner = learner
        vocab.check_config(cfg)


def test_no_unknown_for_words_of_the_training_text(hf_run, corpus):
    """KerasHub's tokenizer on the tokenizers-learned vocabulary cuts every training word into known pieces.

    A learner that splits or normalizes words otherwise than KerasHub (strips accents, keeps CJK or
    punctuation inside words) learns pieces the tokenizer never asks for and misses some it does.
    """
    import tensorflow as tf

    run, _ = hf_run
    tokenizer = make_tokenizer(load_vocabulary(run / "vocab.txt"))
    share = unknown_share(tokenizer, tf.data.TextLineDataset([str(corpus["train"])]).batch(64))
    if share:
        unknown = {w for w in set(corpus["train"].read_text(encoding="utf-8").split()) if UNK in _pieces(tokenizer, w)}
        pytest.fail(f"[UNK] share {share:.2%} on the training text; words cut into [UNK]: {sorted(unknown)}")


def _pieces(tokenizer, word: str) -> list[str]:
    ids = tokenizer(word)
    return [tokenizer.id_to_token(int(i)) for i in (ids.numpy() if hasattr(ids, "numpy") else ids)]


def test_words_are_cut_as_keras_hub_cuts_them():
    """The Rust normalizer and pre-tokenizer give the words KerasHub's tokenizer gives (lowercase or not)."""
    import tensorflow as tf
    from keras_hub.src.tokenizers.word_piece_tokenizer import pretokenize

    texts = [
        "Café, naïve RÉSUMÉ; Straße ΣΟΦΟΣ σοφός Zoë.",
        "北京東京は大きい: x中y (aside) [note] «quoted» “curly” well—then",
        "don't $5 100% #tag @home ¿qué? ¡sí! 3.14 co-op e_mail a\tb\u200bc ﬁne",
    ]
    for lowercase in (True, False):
        hf = hf_word_piece(lowercase)
        for text in texts:
            normalized = hf.normalizer.normalize_str(text) if hf.normalizer else text
            ours = [w for w, _ in hf.pre_tokenizer.pre_tokenize_str(normalized)]
            theirs = pretokenize(tf.constant([text]), lowercase, False, True, True).to_list()[0]
            assert ours == [w.decode("utf-8") for w in theirs], (lowercase, text)


def test_unknown_share_comparable_to_keras_hub(tmp_path, corpus):
    """On the validation text both learners' vocabularies leave about the same share of [UNK]."""
    hf, hf_tokens = _in_process_vocab(tmp_path, corpus, "tokenizers")
    kh, kh_tokens = _in_process_vocab(tmp_path, corpus, "keras-hub")
    assert (hf.learner, kh.learner) == ("tokenizers", "keras-hub")
    assert len(hf_tokens) == SIZE and hf_tokens != kh_tokens
    assert hf.unknown_share <= kh.unknown_share + 0.005, (hf.unknown_share, kh.unknown_share)


def test_only_the_lines_the_reference_keeps(tmp_path, corpus):
    """Reference windows learn from the lines longer than data.min_string_len bytes only, as keras-hub does."""
    short = tmp_path / "short.txt"
    short.write_text(corpus["train"].read_text(encoding="utf-8") + "zyzzyva zyzzyva\n" * 500, encoding="utf-8")
    both = {"train": short, "valid": corpus["valid"]}
    _, reference = _in_process_vocab(tmp_path / "r", both, "tokenizers", "data.windows=reference")
    _, packed = _in_process_vocab(tmp_path / "p", both, "tokenizers", "data.windows=packed")
    assert "zyzzyva" in packed and "zyzzyva" not in reference


def test_same_text_same_vocabulary(corpus):
    """The trainer's own order changes from run to run; vocab.txt does not."""
    learn = [learn_vocabulary_fast([corpus["train"]], 64, SIZE, True, [PAD, UNK, BOS]) for _ in range(3)]
    assert learn[0] == learn[1] == learn[2]


def test_random_text_is_cut_as_keras_hub_cuts_it():
    """Random strings over letters, marks, digits, punctuation, symbols, controls and CJK: the same words.

    Not "…" and the like (see ``_PUNCTUATION_IN_WORDS``): one word to KerasHub, three to the trainer, whose
    vocabulary has the pieces KerasHub needs all the same (``test_no_unknown_for_words_of_the_training_text``).
    """
    import tensorflow as tf
    from keras_hub.src.tokenizers.word_piece_tokenizer import pretokenize

    pool = list("aZéÉßςΣΐ09٣_-'.,;!?¿¡«»“”—()[]{}<>$€%&*+=/\\|~^`@#§©°±½ﬁ中文字は")
    pool += list("\t\r \x07\x1b\x7f\u00ad\u200b\u200d\ufeff")  # whitespace, controls, format (not NUL: TF stops there)
    rng = random.Random(0)
    texts = ["".join(rng.choice(pool) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    for lowercase in (True, False):
        hf = hf_word_piece(lowercase)
        theirs = pretokenize(tf.constant(texts), lowercase, False, True, True).to_list()
        for text, words in zip(texts, theirs, strict=True):
            normalized = hf.normalizer.normalize_str(text) if hf.normalizer else text
            ours = [w for w, _ in hf.pre_tokenizer.pre_tokenize_str(normalized)]
            assert ours == [w.decode("utf-8") for w in words], (lowercase, text)


def test_learner_keeps_size_and_order_when_text_is_rich(tmp_path):
    """More characters than room: the vocabulary is still at most the size asked, reserved tokens first."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(chr(c) for c in range(0x4E00, 0x4E00 + 400)) + "\n", encoding="utf-8")
    tokens = learn_vocabulary_fast([text], -1, 50, True, [PAD, UNK, BOS, "[SEP]"])
    assert len(tokens) == 50 and tokens[:4] == [PAD, UNK, BOS, "[SEP]"]
