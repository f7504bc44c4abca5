"""Top-p without a sort: the kept set is the sort-based one, token for token; draws follow it; XLA agrees."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import tensorflow as tf

from minigpt_cli.top_p_sampler import (
    ExactTopPSampler,
    certify,
    draw,
    exact_cutoff,
    flush,
    keep_mask,
    search_cutoff,
    top_p_mask,
)

SCALE = 2**149  # every float32 of at least 2**-126 is a whole multiple of 2**-149


def reference(q: np.ndarray, p: float) -> np.ndarray:
    """The sort-based top-p set of one row: the likeliest tokens (ties in vocabulary order) whose preceding
    probabilities sum to at most ``p``, in exact integer arithmetic (a float64 cumulative sum rounds, and
    crafted cases below sit exactly where that would matter)."""
    q = np.where(q < 2.0**-126, 0.0, q.astype(np.float64))  # flushed, as TensorFlow's CPU kernels do
    keep = np.zeros(len(q), dtype=bool)
    if p >= 1:
        return ~keep
    order = np.argsort(-q, kind="stable")
    before = np.concatenate([[0], np.cumsum([int(x) for x in q[order] * SCALE], dtype=object)[:-1]])
    keep[order[before <= int(Fraction(max(p, 0.0)) * SCALE)]] = True
    return keep


def _softmax(logits: np.ndarray) -> np.ndarray:
    return tf.nn.softmax(tf.constant(logits, tf.float32)).numpy()


def _flat_and_peaked(rng, vocab: int, temperature: float) -> np.ndarray:
    """A random-weights model's flat rows (logits' spread ~0.3) and a trained model's peaked ones, in one batch."""
    logits = rng.normal(size=(3, vocab)) * np.array([[0.3], [3.0], [12.0]]) / temperature
    return _softmax(logits)


def _dirichlet(rng, vocab: int) -> np.ndarray:
    rows = [rng.dirichlet(np.full(vocab, a)) for a in (0.01, 0.3, 1.0, 100.0)]
    return np.array(rows, dtype=np.float32)


def _ties(rng, vocab: int) -> tuple[np.ndarray, list[float]]:
    """Dyadic probabilities with many equal values: exact sums land exactly on p, the cut splits a tie group."""
    counts = rng.choice([0, 1, 1, 2, 2, 2, 4, 8], size=(3, vocab)).astype(np.float64)
    q = (counts / counts.sum(axis=1, keepdims=True).max()).astype(np.float32)  # rows sum to <= 1, dyadic-ish
    s = np.sort(q[0].astype(np.float64))[::-1].cumsum()
    return q, [float(s[len(s) // 3]), float(s[len(s) // 2]), 0.5, 0.25]


def _boundary_ps(q: np.ndarray) -> list[float]:
    """``p`` exactly at a cumulative sum of the sorted first row, and one double either side."""
    s = sum(Fraction(float(x)) for x in np.sort(q[0])[::-1][: max(1, int((q[0] > 0).sum()) // 2)])
    p = float(s)
    return [p, float(np.nextafter(p, 0.0)), float(np.nextafter(p, 1.0))]


def _crafted() -> tuple[np.ndarray, float]:
    """Two tokens of 2**-80 after a head summing exactly to p: the searches' sums lose them, so only the exact
    path can tell; the sort keeps exactly one of the two."""
    q = np.zeros((2, 8), dtype=np.float32)
    q[0, :5] = [0.5, 0.25, 2.0**-80, 2.0**-80, 0.125]
    q[1, :3] = [0.6, 0.3, 0.1]
    return q, 0.875


def cases() -> list[tuple[str, np.ndarray, float]]:
    rng = np.random.default_rng(0)
    out = []
    for temperature in (0.7, 1.0, 1.5):
        q = _flat_and_peaked(rng, 5000, temperature)
        out += [(f"model-like T={temperature} p={p}", q, p) for p in (0.5, 0.9, 0.95, 0.999, 1.0)]
        out += [(f"model-like T={temperature} at a sum", q, p) for p in _boundary_ps(q)]
    for vocab in (3, 64, 1000):
        q = _dirichlet(rng, vocab)
        out += [(f"dirichlet V={vocab} p={p:.3g}", q, p) for p in (0.3, 0.9, float(rng.uniform()), 1e-9, 0.0)]
        out += [(f"dirichlet V={vocab} at a sum", q, p) for p in _boundary_ps(q)]
        q, ps = _ties(rng, vocab)
        out += [(f"ties V={vocab} p={p:.3g}", q, p) for p in ps + _boundary_ps(q)]
    uniform = np.full((2, 100), np.float32(0.01))
    out += [("uniform p=0.5 (the cut inside one tie group)", uniform, 0.5)]
    underflow = _softmax(np.random.default_rng(1).normal(size=(2, 300)) * 40)  # exact zeros in the tail
    out += [("underflow p=0.999999", underflow, 0.999999)]
    short = np.array([[0.2, 0.1, 0.0, 0.1, 0.0], [0.3, 0.3, 0.2, 0.1, 0.1]], dtype=np.float32)
    out += [("rows summing below p: all kept, zeros too", short, 0.95)]
    q, p = _crafted()
    out += [("below the searches' resolution", q, p)]
    # Three tokens tied at t = 2**-30 straddle the cut: p - A(t) = 2t - 2**-53, so two are kept. A token just
    # above 2**-29 loses a fraction to the searches' fixed point: only a certificate that allows for it is right.
    tiny = np.zeros((1, 5000), dtype=np.float32)  # 5,000 tokens: the sums keep 48 bits after the point
    tiny[0, :5] = [0.5, 2.0**-30, 2.0**-29 * (1 + 2.0**-23), 2.0**-30, 2.0**-30]
    out += [("tie count within the sums' rounding", tiny, 0.5 + 2.0**-28 + 2.0**-53)]
    denormal = np.array([[0.5, 0.3, 1e-39, 1e-40, 0.0]], dtype=np.float32)  # all kept: they add 0
    out += [("denormals count as 0", denormal, float(Fraction(0.5) + Fraction(float(np.float32(0.3)))))]
    return out


CASES = cases()


@pytest.mark.parametrize("name, q, p", CASES, ids=[c[0] for c in CASES])
def test_kept_set_is_the_sort_based_one(name, q, p):
    got = top_p_mask(tf.constant(q), p).numpy()
    for row in range(len(q)):
        np.testing.assert_array_equal(got[row], reference(q[row], p), err_msg=f"{name}, row {row}")


@pytest.mark.parametrize("method", ["bisect", "histogram"])
def test_every_path_is_exact_and_the_searches_know_when_they_are(method):
    """Certified rows of either search and the exact path all give the reference; the searches serve usual rows."""
    certified_rows = usual_rows = 0
    for name, q, p in CASES:
        if p >= 1:
            continue
        qt = flush(tf.constant(q))
        t, ties, certified = search_cutoff(qt, p, method)
        fast, exact = keep_mask(qt, t, ties).numpy(), keep_mask(qt, *exact_cutoff(qt, p)).numpy()
        certified = certified.numpy()[:, 0]
        for row in range(len(q)):
            want = reference(q[row], p)
            np.testing.assert_array_equal(exact[row], want, err_msg=f"exact path: {name}, row {row}")
            if certified[row]:
                np.testing.assert_array_equal(fast[row], want, err_msg=f"{method}: {name}, row {row}")
        if name.startswith(("model-like", "dirichlet")) and "at a sum" not in name:  # at a sum: exact path
            certified_rows += certified.sum()
            usual_rows += len(q)
        if name.startswith("below the searches'"):
            assert not certified[0], "the searches cannot see the 2**-80 tokens: this row must not be certified"
    assert certified_rows == usual_rows  # the slow exact path is for crafted inputs only


def test_the_certificate_never_vouches_for_a_wrong_cutoff():
    """Exactness rests on the certificate: offer it the right cut-off and its neighbours (one bit pattern either
    side, the next token value either side); it vouches for the right one alone, and that gives the reference."""
    vouched = 0
    for name, q, p in CASES:
        if p >= 1:
            continue
        qt = flush(tf.constant(q))
        right = exact_cutoff(qt, p)[0].numpy()[:, 0]
        bits = qt.numpy().view(np.int32)
        rows, candidates = [], []
        for row, t in enumerate(right):
            values = np.unique(bits[row])
            i = int(np.searchsorted(values, t))
            for candidate in {t, t - 1, t + 1, values[max(i - 1, 0)], values[min(i + 1, len(values) - 1)]}:
                rows.append(row)
                candidates.append([candidate])
        batch = tf.gather(qt, rows)
        ties, certified = certify(batch, p, tf.constant(candidates, tf.int32))
        masks = keep_mask(batch, tf.constant(candidates, tf.int32), ties).numpy()
        for j in np.flatnonzero(certified.numpy()[:, 0]):
            row, candidate = rows[j], candidates[j][0]
            np.testing.assert_array_equal(masks[j], reference(q[row], p), err_msg=f"{name}, row {row}, {candidate}")
            vouched += candidate != right[row]
    assert vouched == 0  # a neighbour always breaks A(t) <= p < A(t - 1)


def test_draw_is_the_inverse_cdf_in_vocabulary_order():
    rng = np.random.default_rng(3)
    weights = rng.dirichlet(np.full(1000, 0.3), size=4).astype(np.float32)  # 1000: not a multiple of the block
    weights[:, rng.choice(1000, 300, replace=False)] = 0
    weights[0, :200] = 0  # whole blocks of zeros
    u = (rng.integers(0, 2**23, size=(500, 4)) + 0.5) / 2**23  # as random_sampler.uniform makes them
    got = draw(tf.constant(np.tile(weights, (500, 1))), tf.constant(u.reshape(-1), tf.float32)).numpy()
    cdf = np.cumsum(weights.astype(np.float64), axis=1)
    want = [np.searchsorted(cdf[r], uu * cdf[r, -1], side="left") for r, uu in zip(range(4), u.T, strict=True)]
    np.testing.assert_array_equal(got.reshape(500, 4), np.array(want).T)
    assert (np.tile(weights, (500, 1))[np.arange(2000), got] > 0).all()


def test_draws_follow_the_renormalized_kept_distribution():
    """Chi-square of 12,000 seeded draws against the kept probabilities renormalized, the cut inside ties."""
    probs = np.array([0.3, 0.1, 0.1, 0.1, 0.1, 0.1] + [0.2 / 40] * 40, dtype=np.float32)
    p = 0.55  # kept: 0.3 and the first three of the five 0.1s (0.6 passes p)
    want = reference(probs, p)
    assert want.sum() == 4 and want[:4].all()
    n = 12000
    draws = ExactTopPSampler(p=p, seed=7).get_next_token(tf.constant(np.tile(probs, (n, 1)))).numpy()
    assert set(np.unique(draws)) == set(np.flatnonzero(want))
    expected = probs[want] / probs[want].sum() * n
    observed = np.bincount(draws, minlength=len(probs))[want]
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 16.3, (observed, expected)  # 3 degrees of freedom: P(chi2 > 16.3) = 0.001


def _loop(sampler, table: np.ndarray, xla: bool) -> tuple[np.ndarray, np.ndarray]:
    """Tokens from ``sampler`` at each step of ``table`` ([steps, batch, vocab]) inside one tf.while_loop, and
    ``top_p_mask`` of each step, compiled the same way."""
    table = tf.constant(table)
    steps, batch = table.shape[0], table.shape[1]

    @tf.function(jit_compile=xla, autograph=False)
    def run():
        def body(i, out, masks):
            token = tf.cast(sampler.get_next_token(table[i]), tf.int32)
            mask = top_p_mask(table[i], sampler.p)
            return i + 1, tf.tensor_scatter_nd_update(out, [[i]], token[None]), masks.write(i, mask)

        init = (0, tf.zeros([steps, batch], tf.int32), tf.TensorArray(tf.bool, size=steps))
        _, out, masks = tf.while_loop(lambda i, *_: i < steps, body, init)
        return out, masks.stack()

    return tuple(x.numpy() for x in run())


@pytest.mark.parametrize("p", [0.875, 1.0])
def test_same_seed_same_tokens_with_and_without_xla(p):
    """A batch of rows with their own cut-offs, steps that take the exact path too, in a loop under XLA."""
    rng = np.random.default_rng(5)
    crafted, p_crafted = _crafted()
    assert p in (p_crafted, 1.0)
    table = np.zeros((6, 4, 512), dtype=np.float32)
    table[:, :3] = _flat_and_peaked(rng, 512, 1.5) * rng.uniform(0.5, 1.0, size=(6, 3, 1))  # each step its own
    table[1::2, 3, :8] = crafted[0]  # the exact path at odd steps
    table[::2, 3] = table[::2, 0]
    graph, graph_masks = _loop(ExactTopPSampler(p=p, seed=11), table, xla=False)
    xla, xla_masks = _loop(ExactTopPSampler(p=p, seed=11), table, xla=True)
    np.testing.assert_array_equal(xla, graph)
    assert len(np.unique(graph[:, 0])) >= 5  # the flat row: really drawn, not stuck on one token
    for step in range(6):
        for row in range(4):
            want = reference(table[step, row], p)
            assert want[graph[step, row]], (step, row)
            np.testing.assert_array_equal(xla_masks[step, row], want, err_msg=f"XLA, step {step}, row {row}")
            np.testing.assert_array_equal(graph_masks[step, row], want, err_msg=f"graph, step {step}, row {row}")
