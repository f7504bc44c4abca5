"""Generation you can trust: seeds, beam search over mixed prompts, exact top-p, readable text, settings."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from minigpt_cli.config import GenerateConfig
from minigpt_cli.errors import MinigptError
from minigpt_cli.generate import Generator, tidy, use_xla
from minigpt_cli.model import load_model
from minigpt_cli.random_sampler import InverseCDFTopKSampler
from minigpt_cli.samplers import SamplerSpec, sampler_spec
from minigpt_cli.top_p_sampler import ExactTopPSampler
from minigpt_cli.vocab import load_vocabulary, make_tokenizer


@pytest.fixture(scope="module")
def trained(trained_run):
    vocab = load_vocabulary(trained_run / "vocab.txt")
    return load_model(trained_run / "model.keras", len(vocab)), make_tokenizer(vocab)


PROMPTS = ["the king", "", "the old fisherman walked to the"]


@pytest.mark.parametrize("name", ["random", "topk", "topp"])
def test_same_seed_same_tokens_with_and_without_xla(trained, name):
    """The compile (XLA) or trace (graph) before the timed call must not shift the random numbers."""
    model, tokenizer = trained
    spec = SamplerSpec(name, k=8, p=0.6, seed=5)
    graph = Generator(model, tokenizer, jit_compile="false").run(PROMPTS, spec, max_tokens=12)
    xla = Generator(model, tokenizer, jit_compile="true").run(PROMPTS, spec, max_tokens=12)
    assert [s.token_ids for s in xla] == [s.token_ids for s in graph]
    assert len({tuple(s.token_ids) for s in graph}) == len(PROMPTS)


def test_auto_crossing_its_threshold_gives_the_forced_tokens(trained):
    model, tokenizer = trained
    prompts, new_tokens = [""] * 60, 25
    assert use_xla("auto", len(prompts) * new_tokens) and not use_xla("auto", len(prompts) * new_tokens - 1)
    spec = SamplerSpec("topk", k=8, seed=9)
    runs = {
        mode: [s.token_ids for s in Generator(model, tokenizer, jit_compile=mode).run(prompts, spec, new_tokens)]
        for mode in ("auto", "true", "false")
    }
    assert runs["auto"] == runs["true"] == runs["false"]


def test_seeds_do_not_alias(trained):
    """Keras folds seeds modulo 2**31 - 2 before TensorFlow's stateless ops; every 32-bit seed must differ."""
    model, tokenizer = trained
    gen = Generator(model, tokenizer, jit_compile="false")
    first, second = (gen.run(PROMPTS, SamplerSpec("random", seed=s), max_tokens=12) for s in (0, 2**31 - 2))
    assert [s.token_ids for s in first] != [s.token_ids for s in second]


def test_beam_search_over_prompts_of_different_lengths(trained):
    """Each prompt of a mixed batch gets exactly what beam search gives it alone."""
    model, tokenizer = trained
    gen = Generator(model, tokenizer, jit_compile="false")
    spec = SamplerSpec("beam", num_beams=4)
    prompts = ["the old fisherman walked to the", "the king", "a"]
    together = gen.run(prompts, spec, max_tokens=10)
    alone = [gen.run([p], spec, max_tokens=10)[0] for p in prompts]
    assert [s.token_ids for s in together] == [s.token_ids for s in alone]


def _draw(sampler, probs: np.ndarray, n: int) -> np.ndarray:
    batch = np.tile(np.asarray(probs, dtype="float32")[None, :], (n, 1))
    return np.asarray(sampler.get_next_token(keras.ops.convert_to_tensor(batch)))


def test_top_k_draws_the_k_likeliest_tokens_renormalized():
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.full(30, 0.5))
    top = np.argsort(-probs)[:5]
    draws = _draw(InverseCDFTopKSampler(k=5, seed=3), probs, 20000)
    assert set(np.unique(draws)) == set(top.tolist())
    freq = np.array([(draws == t).mean() for t in top])
    assert np.abs(freq - probs[top] / probs[top].sum()).max() < 0.015


def test_top_p_keeps_the_token_that_passes_p():
    """Top-p keeps the token whose cumulative probability passes p: tokens summing to exactly p are not enough."""
    probs = np.array([0.25, 0.25] + [0.01] * 50)  # float32-exact: the first two hold exactly p = 0.5
    draws = _draw(ExactTopPSampler(p=0.5, seed=4), probs, 6000)
    # The full sort keeps tokens 0, 1 and 2 (the first of the tied tokens, where the sum passes 0.5).
    assert set(np.unique(draws)) == {0, 1, 2}
    assert abs((draws == 2).mean() - 0.01 / 0.51) < 0.008


def test_top_p_one_samples_the_whole_distribution():
    """At p = 1.0 no token may be dropped, however the float32 sums round.

    A float32 softmax sums to 1 only within rounding (up to 1.000001 on 5,000
    tokens), so the likeliest tokens can "hold" p = 1.0 while the rest have
    probability; here the head sums to exactly 1.0 and the tail adds 1%, so
    the tail's draws show up in 20,000 draws.
    """
    probs = np.array([0.5, 0.25, 0.25] + [0.0005] * 20)
    draws = _draw(ExactTopPSampler(p=1.0, seed=6), probs, 20000)
    tail = draws[draws >= 3]
    assert len(set(tail.tolist())) == 20
    assert abs(len(tail) / len(draws) - 0.01 / 1.01) < 0.003


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("the dogs ' bones were gone", "the dogs' bones were gone"),
        ("she said ' yes ' and left", "she said 'yes' and left"),
        ("i ' m sure you don ' t know", "i'm sure you don't know"),
        ("it ' s the king ' s horse , we ' re told", "it's the king's horse, we're told"),
        ("you ' ll see , i ' ve heard he ' d go", "you'll see, i've heard he'd go"),
        ("' i ' m here , ' he said .", "'i'm here,' he said."),
        ("at six o ' clock", "at six o'clock"),
        ('" come in , " he said . " sit down . "', '"come in," he said. "sit down."'),
        ('he said " wait , the dog ran off . then he left', 'he said "wait, the dog ran off. then he left'),
        ('the end . " and then the road', 'the end. "and then the road'),
        ('the end . "', 'the end."'),
        ("a well - known man - - a king", "a well-known man -- a king"),
        ("( he laughed ) [ note ] wait . . . what ? !", "(he laughed) [note] wait... what?!"),
        ("“ i can ’ t , ” he said . ‘ no ’ , she said", "“i can’t,” he said. ‘no’, she said"),
        ("the boys '", "the boys'"),
    ],
)
def test_tidy(raw, expected):
    assert tidy(raw) == expected


def test_sampler_spec_takes_the_config_then_the_flags():
    gen = GenerateConfig(sampler="topp", k=7, p=0.3, num_beams=3, temperature=0.5)
    spec = sampler_spec(gen, seed=1)
    got = (spec.name, spec.k, spec.p, spec.num_beams, spec.temperature, spec.seed)
    assert got == ("topp", 7, 0.3, 3, 0.5, 1)
    spec = sampler_spec(gen, "topk", k=2, p=0.9, num_beams=5, temperature=2.0, seed=0)
    assert (spec.name, spec.k, spec.p, spec.num_beams, spec.temperature, spec.seed) == ("topk", 2, 0.9, 5, 2.0, 0)
    with pytest.raises(MinigptError, match="--k must be at least 1"):
        sampler_spec(gen, "topk", k=0)
    with pytest.raises(MinigptError, match="--seed"):
        sampler_spec(gen, seed=2**32)


def test_sampler_spec_without_seed_draws_one_and_keeps_it():
    seeds = {sampler_spec(GenerateConfig(sampler="random")).seed for _ in range(4)}
    assert len(seeds) > 1 and all(0 <= s < 2**32 for s in seeds)
