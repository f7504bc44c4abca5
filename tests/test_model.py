"""The model and generation library, in process: sizes, cache correctness, samplers."""

from __future__ import annotations

import keras
import keras_hub
import numpy as np
import pytest

from minigpt_cli.config import ModelConfig
from minigpt_cli.generate import Generator, reference_next, repetition, tidy
from minigpt_cli.model import MiniGPTCausalLM, build_model, load_model
from minigpt_cli.random_sampler import InverseCDFRandomSampler
from minigpt_cli.samplers import SamplerSpec
from minigpt_cli.top_p_sampler import ExactTopPSampler
from minigpt_cli.vocab import load_vocabulary, make_tokenizer


def test_reference_parameter_count():
    model = build_model(5000, ModelConfig())
    assert model.count_params() == 3_255_938
    assert model.lm_head.units == 5000


@pytest.fixture(scope="module")
def trained(trained_run):
    vocab = load_vocabulary(trained_run / "vocab.txt")
    model = load_model(trained_run / "model.keras", len(vocab))
    return model, make_tokenizer(vocab), vocab


def test_output_layer_matches_vocab_file(trained):
    model, _, vocab = trained
    assert isinstance(model, MiniGPTCausalLM)
    assert model.backbone.vocabulary_size == len(vocab) == model.lm_head.units


def _reference(model, token_ids, mask, sampler):
    index = int(mask.sum(axis=1).min())
    out = sampler(
        next=reference_next(model),
        prompt=keras.ops.convert_to_tensor(token_ids),
        index=index,
        mask=keras.ops.convert_to_tensor(mask),
    )
    return np.asarray(out)


def _cached(model, token_ids, mask, sampler):
    model.sampler = sampler
    return np.asarray(model.generate_step({"token_ids": token_ids, "padding_mask": mask})["token_ids"])


def _prompts(seq_len: int, rows: list[list[int]]):
    token_ids = np.zeros((len(rows), seq_len), dtype="int32")
    mask = np.zeros((len(rows), seq_len), dtype=bool)
    for r, ids in enumerate(rows):
        token_ids[r, : len(ids)] = ids
        mask[r, : len(ids)] = True
    return token_ids, mask


def test_cached_greedy_equals_uncached_reference_loop(trained):
    model, tokenizer, _ = trained
    bos = tokenizer.token_to_id("[BOS]")
    seq_len = model.backbone.sequence_length
    rows = [[bos], [bos, *np.asarray(tokenizer("the old fisherman walked to")).tolist()]]
    token_ids, mask = _prompts(seq_len, rows)
    expected = _reference(model, token_ids, mask, keras_hub.samplers.GreedySampler())
    got = _cached(model, token_ids, mask, keras_hub.samplers.GreedySampler())
    np.testing.assert_array_equal(got, expected)
    assert (got[:, 1:] != 0).any()


def test_cached_beam_search_equals_uncached_reference_loop(trained):
    """Beam search reorders the cache every step; the result must not change."""
    model, tokenizer, _ = trained
    bos = tokenizer.token_to_id("[BOS]")
    token_ids, mask = _prompts(model.backbone.sequence_length, [[bos, *np.asarray(tokenizer("the king")).tolist()]])
    expected = _reference(model, token_ids, mask, keras_hub.samplers.BeamSampler(num_beams=4))
    got = _cached(model, token_ids, mask, keras_hub.samplers.BeamSampler(num_beams=4))
    np.testing.assert_array_equal(got, expected)


def test_cached_equals_reference_when_pad_is_generated():
    """An untrained model emits [PAD] now and then; the cache must mask it like the full model does."""
    keras.utils.set_random_seed(0)
    model = build_model(50, ModelConfig(seq_len=16, embed_dim=8, feed_forward_dim=8, num_heads=2, num_layers=1))
    bias = model.lm_head.bias.numpy()
    bias[0] += 0.5  # make [PAD] likely enough to be chosen at some steps
    model.lm_head.bias.assign(bias)
    token_ids, mask = _prompts(16, [[2], [2, 5, 7]])
    expected = _reference(model, token_ids, mask, keras_hub.samplers.GreedySampler())
    assert (expected[~mask] == 0).any() and (expected[~mask] != 0).any(), "the test needs [PAD] among other tokens"
    got = _cached(model, token_ids, mask, keras_hub.samplers.GreedySampler())
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", ["random", "topk", "topp"])
def test_seeded_samplers_repeat(trained, name):
    model, tokenizer, _ = trained
    gen = Generator(model, tokenizer)
    spec = SamplerSpec(name, k=5, p=0.9, seed=11)
    first = gen.run(["the king", ""], spec, max_tokens=10)
    again = gen.run(["the king", ""], spec, max_tokens=10)
    other = gen.run(["the king", ""], SamplerSpec(name, k=5, p=0.9, seed=12), max_tokens=10)
    assert [s.token_ids for s in first] == [s.token_ids for s in again]
    assert [s.token_ids for s in first] != [s.token_ids for s in other]  # the seed is used, not ignored
    assert all(len(s.token_ids) == 10 for s in first)


def test_xla_and_graph_paths_agree(trained):
    model, tokenizer, _ = trained
    spec = SamplerSpec("greedy")
    plain = Generator(model, tokenizer, jit_compile="false").run(["the miller"], spec, max_tokens=8)
    xla = Generator(model, tokenizer, jit_compile="true").run(["the miller"], spec, max_tokens=8)
    assert plain[0].token_ids == xla[0].token_ids


def _draw(sampler, probs: np.ndarray, n: int) -> np.ndarray:
    batch = np.tile(probs[None, :], (n, 1)).astype("float32")
    return np.asarray(sampler.get_next_token(keras.ops.convert_to_tensor(batch)))


def test_top_p_gives_the_full_sort_distribution():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(200, 0.05))
    order = np.argsort(-probs)
    p = 0.6
    cum = np.cumsum(probs[order])
    kept = order[: int(np.searchsorted(cum, p, side="right")) + 1]  # full sort: through the token crossing p
    draws = _draw(ExactTopPSampler(p=p, seed=1), probs, 4000)
    assert set(np.unique(draws)) <= set(kept.tolist())
    expected = probs[kept] / probs[kept].sum()
    freq = np.array([(draws == t).mean() for t in kept])
    assert np.abs(freq - expected).max() < 0.03


def test_top_p_of_a_flat_distribution_keeps_many_tokens():
    probs = np.full(100, 1 / 100)
    draws = _draw(ExactTopPSampler(p=0.5, seed=2), probs, 2000)
    # Top-p 0.5 of a uniform distribution keeps 50 or 51 tokens (the sums round either way at the boundary).
    assert len(np.unique(draws)) > 20


def test_inverse_cdf_random_sampler_draws_the_softmax_distribution():
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.full(30, 0.5))
    draws = _draw(InverseCDFRandomSampler(seed=3), probs, 20000)
    freq = np.bincount(draws, minlength=30) / len(draws)
    assert np.abs(freq - probs).max() < 0.015
    assert draws.min() >= 0 and draws.max() < 30


def test_tidy_joins_punctuation():
    raw = '" i \' m going to tell you , " said the boy . " don \' t ! " ( he laughed )'
    assert tidy(raw) == '"i\'m going to tell you," said the boy. "don\'t!" (he laughed)'


def test_tidy_curly_quotes():
    assert tidy("“ i can ’ t , ” he said .") == "“i can’t,” he said."


def test_repetition_figures():
    assert repetition([1, 2, 3, 4, 1, 2, 3, 4]) == {"repeated_4grams": 1 - 4 / 5, "distinct_bigrams": 4 / 7}
    assert repetition([1, 2, 3, 4, 5]) == {"repeated_4grams": 0.0, "distinct_bigrams": 1.0}
