"""``minigpt inspect``: every view's numbers checked against the model, the samplers and ``evaluate``."""

from __future__ import annotations

import json
import math
import shutil

import keras
import numpy as np
import pytest
from conftest import CORPUS, assert_user_error, minigpt
from typer.testing import CliRunner

from minigpt_cli.cli import app
from minigpt_cli.config import ModelConfig, VocabConfig
from minigpt_cli.errors import MinigptError
from minigpt_cli.evaluate import evaluate
from minigpt_cli.inspection import attention, next_tokens, split_tokens, surprise, surprise_text
from minigpt_cli.model import build_model, load_model
from minigpt_cli.runs import RunDir
from minigpt_cli.samplers import SamplerSpec
from minigpt_cli.vocab import BOS, UNK, read_vocabulary

MIN_STRING_LEN = 64  # the tiny run's data.min_string_len (conftest.TINY)
TEXT = "The old fisherman walked to the market, and the king's xylophone€ was gone."


@pytest.fixture(scope="module")
def loaded(trained_run):
    vocab = read_vocabulary(trained_run / "vocab.txt", VocabConfig())
    return vocab, load_model(trained_run / "model.keras", len(vocab))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits.astype(np.float64) - logits.max())
    return z / z.sum()


def _forward(model, ids: list[int], length: int | None = None) -> np.ndarray:
    """Logits of every position, from one plain call of the model on ``ids`` padded to ``length``."""
    x = np.zeros((1, length or len(ids)), dtype="int32")
    x[0, : len(ids)] = ids
    return np.asarray(model({"token_ids": x, "padding_mask": (x != 0).astype("int32")}, training=False))[0]


# --- tokens ---------------------------------------------------------------------------------------------------


def test_tokens_are_the_tokenizers_own(loaded):
    """Word by word, the pieces are exactly the tokenizer's tokens of the whole text, [UNK]s marked."""
    vocab, _ = loaded
    split = split_tokens(TEXT, vocab)
    whole = [int(i) for i in np.asarray(vocab.tokenizer()(TEXT))]
    assert split.ids() == whole
    assert split.pieces() == [vocab.tokens[i] for i in whole]
    assert [w.word for w in split.words] == TEXT.split()
    assert split.unknown == whole.count(vocab.tokens.index(UNK)) >= 1  # "xylophone€" has a piece it cannot make
    assert split.tokens == len(whole) and split.tokens_per_word == len(whole) / len(TEXT.split())
    king = next(w for w in split.words if w.word == "king's")
    assert king.pieces == ["king", "'", "s"]
    with pytest.raises(MinigptError, match="empty"):
        split_tokens("  \n ", vocab)


# --- next -----------------------------------------------------------------------------------------------------


def test_next_probabilities_are_the_models(loaded):
    """Over the whole vocabulary they sum to 1 and equal a plain forward pass on [BOS] + the prompt."""
    vocab, model = loaded
    view = next_tokens(model, vocab, "the old fisherman", k=5, p=0.4, temperature=0.7, top=12)
    ids = [vocab.tokens.index(BOS), *[int(i) for i in np.asarray(vocab.tokenizer()("the old fisherman"))]]
    assert view.context_ids == ids and view.context[0] == BOS
    # Padded to the window, as a batch would be: the causal mask makes the padding irrelevant.
    logits = _forward(model, ids, length=model.backbone.sequence_length)[len(ids) - 1]
    assert view.probabilities.size == len(vocab)
    assert view.probabilities.sum(dtype=np.float64) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(view.probabilities, _softmax(logits), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(view.tempered, _softmax(logits / 0.7), rtol=1e-4, atol=1e-7)
    assert view.greedy == int(np.argmax(logits)) == view.candidates[0].id and view.candidates[0].greedy
    assert [c.id for c in view.candidates] == list(np.argsort(-_softmax(logits), kind="stable")[:12])
    for c in view.candidates:
        assert c.probability == pytest.approx(_softmax(logits)[c.id], rel=1e-4)
        assert c.by_temperature["1.5"] == pytest.approx(_softmax(logits / 1.5)[c.id], rel=1e-4)
    # Temperature reshapes: sharper below 1, flatter above.
    entropy = {t: v["entropy_bits"] for t, v in view.temperatures.items()}
    assert entropy["0.7"] < entropy["1"] < entropy["1.5"] <= math.log2(len(vocab))


@pytest.mark.parametrize("name", ["topk", "topp"])
def test_kept_sets_are_what_the_samplers_draw_from(loaded, name):
    """Many draws of the real sampler on the same probabilities: only the shown set's tokens, all of them,
    at their shown renormalized probabilities."""
    vocab, model = loaded
    spec = SamplerSpec(name, k=8, p=0.3, temperature=0.8, seed=11)
    view = next_tokens(model, vocab, "the king", k=spec.k, p=spec.p, temperature=spec.temperature)
    kept = view.top_k if name == "topk" else view.top_p
    sampler = spec.build()
    logits = _forward(model, view.context_ids)[-1:]
    probabilities = np.asarray(sampler.compute_probabilities(logits))
    np.testing.assert_allclose(view.tempered, probabilities[0], rtol=1e-5, atol=1e-8)
    draws = 20000
    drawn = np.asarray(sampler.get_next_token(np.repeat(probabilities, draws, axis=0)))
    counts = np.bincount(drawn, minlength=len(vocab))
    assert set(np.flatnonzero(counts)) <= set(kept.ids)
    assert 3 <= len(kept.ids) and sum(kept.probabilities) == pytest.approx(1.0)
    # The shown probabilities are the sampler's own (tempered) ones, renormalized over the set.
    sampler_kept = probabilities[0][kept.ids].astype(np.float64)
    np.testing.assert_allclose(kept.probabilities, sampler_kept / sampler_kept.sum(), rtol=1e-5)
    for token, q in zip(kept.ids, kept.probabilities, strict=True):
        assert q * draws > 30, "too few draws to see every kept token"
        sigma = math.sqrt(draws * q * (1 - q))
        assert abs(counts[token] - draws * q) < 5 * sigma, (vocab.tokens[token], counts[token], draws * q)


def test_next_refuses_bad_settings(loaded):
    vocab, model = loaded
    for kwargs, fragment in [
        ({"k": 0}, "--k must be at least 1"),
        ({"k": len(vocab) + 1}, f"only {len(vocab)} tokens"),
        ({"p": 0.0}, "--p must be in (0, 1]"),
        ({"temperature": 0.0}, "--temperature must be above 0"),
    ]:
        with pytest.raises(MinigptError, match=fragment.replace("(", r"\(").replace("]", r"\]")):
            next_tokens(model, vocab, "the", **kwargs)
    with pytest.raises(MinigptError, match=r"window is 32 tokens \(\[BOS\] \+ at most 31\)"):
        next_tokens(model, vocab, "the king " * 20)


# --- surprise -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """Eight validation lines (long ones, for reference windows) and a short one, in a file."""
    lines = (CORPUS / "valid.txt").read_text(encoding="utf-8").splitlines()[:8]
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n".join([*lines[:4], "The king laughed.", *lines[4:]]) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("windows", ["reference", "packed"])
def test_surprise_totals_are_evaluates(trained_run, loaded, text_file, windows):
    """The bits of the tokens ``evaluate`` scores sum to its loss x tokens / ln 2; bits/char are its own."""
    vocab, model = loaded
    view = surprise(model, vocab, [text_file], windows, MIN_STRING_LEN, batch_size=4)
    result = evaluate(RunDir(trained_run), str(text_file), windows, MIN_STRING_LEN, VocabConfig(), batch_size=16)
    e = view.evaluation()
    assert e["tokens"] == result.tokens
    assert e["bits"] == pytest.approx(result.loss * result.tokens / math.log(2), rel=1e-5)
    assert e["characters"] == result.characters
    assert e["bits_per_character"] == pytest.approx(result.bits_per_character, rel=1e-5)
    assert e["loss"] == pytest.approx(result.loss, rel=1e-5)
    # The rest is scored too: the short line (reference) or the stream's tail (packed).
    extra = [t for t in view.scored() if not t.evaluated]
    assert extra and view.bits == pytest.approx(e["bits"] + math.fsum(t.bits for t in extra))
    assert view.most_surprising(3)[0].bits == max(t.bits for t in view.scored())
    _check_bits_by_forward_pass(model, view, vocab.tokens)


def _check_bits_by_forward_pass(model, view, tokens: list[str]) -> None:
    """Every scored token's bits are -log2 p(token | the context it was scored with), from a plain forward pass;
    ``evaluate``'s tokens see the context of its windows, the others as much as the window holds."""
    seq_len, bos = model.backbone.sequence_length, tokens.index(BOS)
    if view.windows == "packed":  # the token list is the stream: [BOS] line [BOS] line ...
        sequences = {0: [t.id for t in view.tokens]}
        where = [(0, i) for i in range(len(view.tokens))]
    else:  # one [BOS] + line per line
        sequences, where = {}, []
        for t in view.tokens:
            sequence = sequences.setdefault(t.line, [bos])
            sequence.append(t.id)
            where.append((t.line, len(sequence) - 1))
    windows: dict[tuple[int, int], list] = {}
    for t, (line, i) in zip(view.tokens, where, strict=True):
        if t.bits is None:
            assert view.windows == "reference" and i > seq_len or i == 0  # only what reference windows cannot see
            continue
        start = i - t.context_tokens
        assert 1 <= t.context_tokens <= seq_len
        if view.windows == "packed" and t.evaluated:
            assert start % seq_len == 0  # evaluate's windows start every seq_len tokens
        elif view.windows == "packed":
            assert start == max(0, len(sequences[0]) - seq_len - 1)  # the tail: the stream's last window
        else:
            assert start == 0
        windows.setdefault((line, start), []).append((t, i))
        assert view.context(t) == [tokens[j] for j in sequences[line][max(start, i - 8) : i]]  # what is shown
    for (line, start), members in windows.items():
        logits = _forward(model, sequences[line][start : max(i for _, i in members)])
        for t, i in members:
            assert t.bits == pytest.approx(-math.log2(_softmax(logits[i - 1 - start])[t.id]), rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("windows", ["reference", "packed"])
def test_surprise_of_a_short_text_is_a_forward_pass(loaded, windows):
    """Shorter than any window ``evaluate`` cuts: every token is still scored, with [BOS] + all before it."""
    vocab, model = loaded
    text = "the king walked to the old castle, and the miller laughed."
    view = surprise_text(model, vocab, text, windows, MIN_STRING_LEN)
    assert view.evaluation() is None
    ids = [vocab.tokens.index(BOS), *[int(i) for i in np.asarray(vocab.tokenizer()(text))]]
    logits = _forward(model, ids)
    expected = [-math.log2(_softmax(logits[j])[ids[j + 1]]) for j in range(len(ids) - 1)]
    scored = view.scored()
    assert [t.id for t in scored] == ids[1:]
    np.testing.assert_allclose([t.bits for t in scored], expected, rtol=1e-4)
    assert [t.context_tokens for t in scored] == list(range(1, len(ids)))
    assert view.characters == len(text)
    assert view.bits_per_character == pytest.approx(sum(expected) / len(text), rel=1e-4)


# --- attention ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["trained", "two-layer"])
def attending(request, loaded):
    """The trained run's model (one layer), and a fresh two-layer one: layer 2 must see layer 1's output."""
    vocab, model = loaded
    if request.param == "two-layer":
        keras.utils.set_random_seed(3)
        config = ModelConfig(seq_len=32, embed_dim=16, feed_forward_dim=16, num_heads=2, num_layers=2)
        model = build_model(len(vocab), config)
    return vocab, model


def test_attention_rows_sum_to_one_and_are_causal(attending):
    vocab, model = attending
    view = attention(model, vocab, "the old fisherman walked to the market")
    backbone = model.backbone
    n = len(view.tokens)
    assert view.tokens[0] == BOS and n == 1 + len(
        np.asarray(vocab.tokenizer()("the old fisherman walked to the market"))
    )
    assert view.weights.shape == (backbone.num_layers, backbone.num_heads, n, n)
    np.testing.assert_allclose(view.weights.sum(axis=-1), 1.0, atol=1e-5)
    assert np.all(view.weights >= 0)
    assert np.abs(np.triu(view.weights, k=1)).max() == 0.0  # nothing attends to a later token
    assert np.all(np.diagonal(view.weights, axis1=-2, axis2=-1)[..., 0] == pytest.approx(1.0))  # [BOS]: itself
    for s in view.summaries(top=2):
        assert len(s.links) == 2 and all(0 < link.key <= link.query for link in s.links)
        w = view.weights[s.layer - 1, s.head - 1]
        assert s.links[0].weight == pytest.approx(float(w[s.links[0].query, s.links[0].key]))
        assert s.on_bos == pytest.approx(float(w[1:, 0].mean()))


def test_attention_weights_are_the_ones_the_model_uses(attending):
    """From the weights alone, each decoder's output is rebuilt, and the last equals the backbone's."""
    vocab, model = attending
    view = attention(model, vocab, "the miller gave the teacher a golden key")
    backbone = model.backbone
    x = np.asarray(view.ids, dtype="int32")[None]
    hidden = np.asarray(backbone({"token_ids": x, "padding_mask": np.ones_like(x)}, training=False))[0]
    np.testing.assert_allclose(view.hidden, hidden, atol=1e-5)
    h = backbone.embedding(x)
    for layer, weights in zip(backbone.transformer_layers, view.weights, strict=True):
        assert not layer.normalize_first
        mha = layer._self_attention_layer
        values = np.asarray(mha._value_dense(h))[0]  # (key, head, dim)
        mixed = np.einsum("hqk,khd->qhd", weights, values)
        attended = mha._output_dense(mixed[None])
        y = layer._self_attention_layer_norm(attended + h)
        z = layer._feedforward_layer_norm(y + layer._feedforward_output_dense(layer._feedforward_intermediate_dense(y)))
        h = layer(h, decoder_padding_mask=np.ones_like(x), training=False)
        np.testing.assert_allclose(np.asarray(z), np.asarray(h), atol=1e-4)
    logits = np.asarray(model.lm_head(keras.ops.convert_to_tensor(view.hidden[None])))[0]
    np.testing.assert_allclose(logits, _forward(model, view.ids), atol=1e-4)


# --- the commands ---------------------------------------------------------------------------------------------


def _invoke(*args: str, stdin: str | None = None):
    """The command in this process (TensorFlow is loaded already): for the views and their errors."""
    return CliRunner().invoke(app, ["inspect", *map(str, args)], input=stdin)


def test_views_render(trained_run, tmp_path):
    r = str(trained_run)
    tokens = _invoke("tokens", "-r", r, TEXT)
    assert tokens.exit_code == 0, tokens.output
    assert "[UNK]" in tokens.output and "xylophone€" in tokens.output and "tokens/word" in tokens.output
    nxt = _invoke("next", "-r", r, "--prompt", "the old", "--k", "4", "--p", "0.3", "--temperature", "0.8")
    assert nxt.exit_code == 0, nxt.output
    assert "greedy picks" in nxt.output and "top-k (k=4) draws from 4 tokens" in nxt.output and "0.8*" in nxt.output
    sur = _invoke("surprise", "-r", r, "-", "--windows", "packed", "--top", "3", stdin="the king walked home.\n")
    assert sur.exit_code == 0, sur.output
    assert "most surprising" in sur.output and "bits/char" in sur.output and "scores none of it" in sur.output
    att = _invoke("attention", "-r", r, "the king walked home", "--out", tmp_path / "a.png")
    assert att.exit_code == 0, att.output
    assert "layer.head" in att.output and (tmp_path / "a.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["tokens", "   "], "the text is empty"),
        (["tokens"], "give a text"),
        (["tokens", "x", "--file", "y"], "not both"),
        (["surprise", "--file", "/no/such/file.txt"], "no such file"),
        (["next", "--k", "0"], "--k must be at least 1"),
        (["next", "--p", "1.5"], "--p must be in (0, 1]"),
        (["next", "--temperature", "-1"], "--temperature must be above 0"),
        (["next", "--k", "100000"], "only"),
        (["attention", "the king " * 20], "window is 32 tokens"),
    ],
)
def test_user_errors(trained_run, args, fragment):
    result = _invoke(*args, "-r", trained_run)
    assert isinstance(result.exception, MinigptError), result.output
    assert fragment in str(result.exception)


def test_tokens_need_only_the_vocabulary(loaded, trained_run, tmp_path):
    for name in ("vocab.txt", "vocab.json"):
        shutil.copy(trained_run / name, tmp_path / name)
    result = _invoke("tokens", "-r", tmp_path, TEXT, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ids"] == split_tokens(TEXT, loaded[0]).ids() and data["unknown"] >= 1
    missing = _invoke("next", "-r", tmp_path)
    assert "no trained model" in str(missing.exception)


def test_cli_next_json(loaded, trained_run):
    vocab, model = loaded
    result = minigpt("inspect", "next", "-r", trained_run, "--prompt", "the old", "--k", "6", "--p", "0.35",
                     "--temperature", "1.3", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    view = next_tokens(model, vocab, "the old", k=6, p=0.35, temperature=1.3, top=15)
    assert data["probability_sum"] == pytest.approx(1.0, abs=1e-5)
    assert data["greedy"]["id"] == view.greedy
    assert data["top_k"]["ids"] == view.top_k.ids and data["top_p"]["ids"] == view.top_p.ids
    np.testing.assert_allclose(data["top_p"]["probabilities"], view.top_p.probabilities, rtol=1e-5)
    assert [c["id"] for c in data["candidates"]] == [c.id for c in view.candidates]


def test_cli_surprise_json_from_stdin(loaded, trained_run, text_file):
    vocab, model = loaded
    text = text_file.read_text(encoding="utf-8")
    result = minigpt("inspect", "surprise", "-r", trained_run, "-", "--windows", "packed", "--json", stdin=text)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    view = surprise_text(model, vocab, text, "packed", MIN_STRING_LEN)
    assert data["bits"] == pytest.approx(view.bits, rel=1e-5)
    assert data["evaluate"]["tokens"] == view.evaluated_tokens
    assert len(data["most_surprising"]) == 10 and data["tokens_scored"] == len(view.scored())


def test_cli_attention_json_and_png(loaded, trained_run, tmp_path):
    vocab, model = loaded
    png = tmp_path / "attention.png"
    result = minigpt("inspect", "attention", "-r", trained_run, "the king walked to the castle", "--out", png, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_allclose(data["weights"], attention(model, vocab, "the king walked to the castle").weights,
                               atol=1e-6)  # fmt: skip
    too_long = minigpt("inspect", "attention", "-r", trained_run, "the king " * 20)
    assert_user_error(too_long, "the text is 40 tokens", "window is 32 tokens", "shorten it")


@pytest.mark.parametrize(
    ("probabilities", "p", "kept"),
    [([0.5, 0.4, 0.1], 0.9, [0, 1]), ([0.3, 0.3, 0.2, 0.2], 0.8, [0, 1, 2]), ([0.2, 0.5, 0.3, 0.0], 1.0, [1, 2, 0])],
)
def test_top_p_set_is_the_exact_rule_at_the_boundary(probabilities, p, kept):
    """float32 sums round 0.5 + 0.4 down to 0.9; the exact sum passes it, so the third token is not kept."""
    from minigpt_cli.inspection import top_p_set

    assert top_p_set(np.asarray(probabilities, dtype=np.float32), p).tolist() == kept
