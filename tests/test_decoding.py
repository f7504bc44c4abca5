"""Streaming and decoding controls: stream == batch, stop texts, n-gram bans, penalties, min-p, paragraphs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import assert_user_error, minigpt

from minigpt_cli.generate import Generator
from minigpt_cli.logits import logits_processor, ngram_bans
from minigpt_cli.model import load_model
from minigpt_cli.samplers import Controls, SamplerSpec
from minigpt_cli.vocab import load_vocabulary, make_tokenizer


@pytest.fixture(scope="module")
def gen(trained_run) -> Generator:
    vocab = load_vocabulary(trained_run / "vocab.txt")
    return Generator(load_model(trained_run / "model.keras", len(vocab)), make_tokenizer(vocab), jit_compile="false")


def ngrams(ids: list[int], n: int) -> list[tuple[int, ...]]:
    return [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]


def forward_probabilities(gen: Generator, prompt: str, new: list[int], temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) of the uncached model for every position of prompt + new: (len(new), vocab)."""
    ids = gen.encode(prompt) + new
    x = np.asarray([ids], dtype="int32")
    logits = np.asarray(gen.model({"token_ids": x, "padding_mask": np.ones_like(x)}))[0].astype("float64")
    z = logits[len(ids) - len(new) - 1 : len(ids) - 1] / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@pytest.mark.parametrize("name", ["greedy", "random", "topk", "topp"])
def test_stream_gives_the_batch_text_piece_by_piece(gen, name):
    """Chunks of 1, 2, 4, 8, 16 tokens carry the loop's state exactly: same tokens, same text."""
    spec = SamplerSpec(name, k=8, p=0.7, seed=11)
    batch = gen.run(["the king"], spec, max_tokens=29)[0]
    stream = gen.stream("the king", spec, max_tokens=29)
    pieces = [piece.text for piece in stream]
    assert stream.sample.token_ids == batch.token_ids
    assert "".join(pieces) == stream.sample.text == batch.text
    assert len(pieces) >= 4  # it really streamed, in several chunks
    assert stream.first_token_seconds < stream.sample.seconds


def test_probabilities_are_the_models(gen):
    """Each token's recorded probability is the uncached model's softmax at the sampler's temperature."""
    spec = SamplerSpec("topk", k=5, temperature=0.7, seed=3)
    sample = gen.run(["the old man"], spec, max_tokens=20)[0]
    direct = forward_probabilities(gen, "the old man", sample.token_ids, temperature=0.7)
    expected = direct[np.arange(len(sample.token_ids)), sample.token_ids]
    np.testing.assert_allclose(sample.probabilities, expected, rtol=1e-4)


def test_no_repeat_ngram_on_a_model_that_loops(gen):
    spec = SamplerSpec("greedy")
    free = gen.run([""], spec, max_tokens=31)[0].token_ids
    assert len(set(ngrams(free, 3))) < len(ngrams(free, 3))  # greedy on this model repeats itself
    for n in (2, 3):
        banned = gen.run([""], spec, max_tokens=31, controls=Controls(no_repeat_ngram=n))[0].token_ids
        full = [gen.bos, *banned]  # the prompt's [BOS] is part of the text the rule sees
        assert len(set(ngrams(full, n))) == len(ngrams(full, n)), n
    assert len(gen.run([""], spec, max_tokens=5, controls=Controls(no_repeat_ngram=40))[0].token_ids) == 5


def test_ngram_bans_match_a_plain_python_count():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 7, size=(3, 12)).astype("int32")
    for n in (1, 2, 3, 12, 14):  # n-grams as long as the buffer, and longer
        for index in (1, 5, 11, 12):
            bans = np.asarray(ngram_bans(keras.ops.convert_to_tensor(tokens), index, n, 8))
            for row in range(3):
                seen = tokens[row, :index].tolist()
                expected = {tuple(seen[i : i + n]) for i in range(len(seen) - n + 1)}
                context = tuple(seen[len(seen) - n + 1 :]) if n > 1 else ()
                want = {g[-1] for g in expected if g[:-1] == context}
                assert set(np.flatnonzero(bans[row])) == want, (n, index, row)


def test_repetition_penalty_follows_ctrl_rule():
    logits = np.array([[2.0, -1.0, 3.0, -2.0, 0.5, 1.0]], dtype="float32")
    tokens = keras.ops.convert_to_tensor([[0, 2, 1, 3, 0, 0]])  # [PAD]=0 and [BOS]=2 are exempt
    process = logits_processor(Controls(repetition_penalty=2.0), 1.0, 6, exempt=(0, 2))
    out = np.asarray(process(keras.ops.convert_to_tensor(logits), tokens, 4))
    np.testing.assert_allclose(out, [[2.0, -2.0, 3.0, -4.0, 0.5, 1.0]])


def test_repetition_penalty_reduces_repeats(gen):
    spec = SamplerSpec("greedy")
    free = gen.run([""], spec, max_tokens=31)[0].token_ids
    penalized = gen.run([""], spec, max_tokens=31, controls=Controls(repetition_penalty=5.0))[0].token_ids
    assert len(set(penalized)) > len(set(free))


def test_min_p_keeps_only_tokens_near_the_likeliest(gen):
    """Under min-p every drawn token had at least min_p times the likeliest token's probability."""
    spec = SamplerSpec("random", temperature=1.5, seed=4)
    free = gen.run(["the"], spec, max_tokens=25)[0]
    kept = gen.run(["the"], spec, max_tokens=25, controls=Controls(min_p=0.9))[0]
    for sample, must_hold in ((free, False), (kept, True)):
        direct = forward_probabilities(gen, "the", sample.token_ids, temperature=1.5)
        chosen = direct[np.arange(len(sample.token_ids)), sample.token_ids]
        holds = bool(np.all(chosen >= 0.9 * direct.max(axis=-1) * (1 - 1e-5)))
        assert holds == must_hold


def test_stop_text_cuts_before_it_and_ends_the_stream(gen):
    spec = SamplerSpec("greedy")
    free = gen.run([""], spec, max_tokens=31)[0]
    stop = free.text.split()[3]  # a word the free text reaches after a few words
    cut = free.text[: free.text.find(stop)]
    batch = gen.run([""], spec, max_tokens=31, controls=Controls(stop=(stop,)))[0]
    assert batch.text == cut and batch.stopped == "stop"
    stream = gen.stream("", spec, max_tokens=31, controls=Controls(stop=(stop,)))
    assert "".join(p.text for p in stream) == cut
    assert stream.sample.token_ids == batch.token_ids
    assert len(batch.token_ids) < len(free.token_ids)  # generation ended at the stop, not at the window


def test_end_at_paragraph(gen):
    """A model that writes [BOS] often: the text ends at its first one, with the tokens before it unchanged."""
    model = gen.model
    bias = model.lm_head.bias
    saved = bias.numpy()
    try:
        boosted = saved.copy()
        boosted[gen.bos] = np.log(np.exp(saved).sum() / 10)  # about one token in ten is a [BOS]
        bias.assign(boosted)
        g = Generator(model, gen.tokenizer, jit_compile="false")
        spec = SamplerSpec("random", seed=2)
        free = g.run([""], spec, max_tokens=31)[0]
        assert gen.bos in free.token_ids[1:]
        ended = g.run([""], spec, max_tokens=31, controls=Controls(end_at_paragraph=True))[0]
        first = free.token_ids.index(gen.bos)
        assert ended.token_ids == free.token_ids[:first] and ended.stopped == "paragraph"
        stream = g.stream("", spec, max_tokens=31, controls=Controls(end_at_paragraph=True))
        assert "".join(p.text for p in stream) == ended.text
        assert stream.sample.token_ids == ended.token_ids
    finally:
        bias.assign(saved)


def test_cli_stream_json_and_show_probs(trained_run, gen):
    """The real command streams pieces that add up to the batch text, and colors tokens by probability."""
    result = minigpt(
        "generate", "-r", trained_run, "--sampler", "topk", "--seed", "5", "--prompt", "the king",
        "--max-tokens", "20", "--stream", "--json", "--repetition-penalty", "1.3", "--no-repeat-ngram", "2",
        "--num-samples", "2",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    ends = [i for i, line in enumerate(lines) if "token_ids" in line]
    assert len(ends) == 2
    controls = Controls(repetition_penalty=1.3, no_repeat_ngram=2)
    for nth, (begin, end) in enumerate(zip([-1, *ends[:-1]], ends, strict=True)):
        pieces, final = lines[begin + 1 : end], lines[end]
        batch = gen.run(["the king"], SamplerSpec("topk", seed=5 + nth), 20, controls)[0]  # sample n: seed + n
        assert "".join(p["text"] for p in pieces) == final["text"] == batch.text
        assert final["token_ids"] == batch.token_ids
        assert final["settings"]["no_repeat_ngram"] == 2 and final["settings"]["seed"] == 5 + nth
        np.testing.assert_allclose(final["probabilities"], batch.probabilities, rtol=1e-5)
        np.testing.assert_allclose([p for piece in pieces for p in piece["probabilities"]], batch.probabilities)
    assert lines[ends[0]]["token_ids"] != lines[ends[1]]["token_ids"]

    env = dict(os.environ, FORCE_COLOR="1", COLUMNS="200")
    colored = subprocess.run(
        [sys.executable, "-m", "minigpt_cli", "generate", "-r", str(trained_run), "--sampler", "greedy",
         "--prompt", "the king", "--max-tokens", "10", "--show-probs"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert colored.returncode == 0, colored.stderr
    plain = gen.run(["the king"], SamplerSpec("greedy"), 10)[0]
    assert "\x1b[" in colored.stdout  # styled
    assert colored.stdout.count("\x1b[3") == len([i for i in plain.token_ids if i not in gen.strip_ids])


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--min-p", "1.5"], "--min-p must be in [0, 1]"),
        (["--no-repeat-ngram", "-1"], "--no-repeat-ngram must be 0"),
        (["--repetition-penalty", "0"], "--repetition-penalty must be above 0"),
        (["--stop", ""], "--stop needs a non-empty text"),
        (["--sampler", "nucleus"], "'nucleus' is not one of 'greedy', 'beam', 'random', 'topk', 'topp', 'all'"),
        (["--stream", "--sampler", "all"], "--stream shows one sampler at a time"),
        (["--show-probs", "--sampler", "beam"], "--show-probs needs a sampler"),
        (["--set", "generate.min_p=2"], "out of range"),
    ],
)
def test_bad_decoding_arguments(trained_run, args, fragment):
    assert_user_error(minigpt("generate", "-r", trained_run, *args), fragment)


def test_shell_completion_offers_samplers_runs_and_configs(tmp_path):
    (tmp_path / "runs" / "alpha").mkdir(parents=True)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "small.toml").write_text("")
    script = Path(sys.executable).with_name("minigpt")

    def complete(words: str) -> list[str]:
        env = dict(os.environ, _MINIGPT_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(len(words.split())))
        done = subprocess.run([script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert complete("minigpt generate --sampler ") == ["greedy", "beam", "random", "topk", "topp", "all"]
    assert complete("minigpt generate -r ") == ["runs/alpha"]
    assert complete("minigpt train -c ") == ["configs/small.toml"]
    assert "--install-completion" in minigpt("--help").stdout


def test_streamed_text_never_changes_once_printed():
    """Quotes, contractions and hyphens are spaced by the words around them: a stream holds those words back."""
    from minigpt_cli.generate import Rendered, tidy

    vocab = ["[PAD]", "[UNK]", "[BOS]", "he", "said", '"', "don", "'", "t", "##ough", "go", "-", "well", "known", ".",
             "s", "dog", "##s", "bones"]  # fmt: skip
    ids = [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 11, 13, 14, 5, 16, 17, 7, 18, 7, 15, 5]
    full = Rendered(ids, vocab, {0, 2}).text
    assert full == tidy(" ".join(vocab[i] for i in ids[1:]).replace(" ##", ""))
    for m in range(len(ids) + 1):
        shown = Rendered(ids[:m], vocab, {0, 2})
        assert full.startswith(shown.text[: shown.settled()]), (m, shown.text, full)


def test_a_stop_text_is_sought_in_settled_text_only():
    """`said"` looks present while the quote could still close, but the quote opens: the text never holds it."""
    from minigpt_cli.generate import first_stop

    vocab = ["[PAD]", "[UNK]", "[BOS]", "he", "said", '"', "go", "."]
    ids = [3, 4, 5, 6, 7]
    assert first_stop(ids, ('said"',), vocab, {0, 2}) is None
    assert first_stop(ids, ('"go',), vocab, {0, 2}) == (5, 8)  # found once the closing "." settles "go"
    assert first_stop(ids[:4], ('"go',), vocab, {0, 2}, final=False) is None
