"""Exact top-p (nucleus) sampling without sorting the vocabulary.

What "exact" means here. Take the row's float32 probabilities ``q`` (values
below float32's smallest normal number, 2**-126, count as 0: TensorFlow
flushes them to zero on a CPU anyway) and sort them likeliest first, equal
ones in vocabulary order (a stable sort, as ``top_k`` breaks ties). Top-p
keeps the sorted tokens whose preceding probabilities sum to at most ``p``,
the sums and the comparison done in exact (real-number) arithmetic and ``p``
taken as the exact value of the Python float: the likeliest tokens through
the first whose cumulative probability passes ``p``. For ``p >= 1`` every
token is kept (the float32 sums of a softmax can pass 1.0 before its last
tokens, which a cumulative test would drop); ``p <= 0`` keeps the likeliest
token alone. This module keeps that set, token for token, without a sort.

How. A float32 ``q >= 0`` orders like its bit pattern read as an int32, and
``A(b)``, the probability of the tokens whose bits are above ``b``, falls as
``b`` grows. The kept tokens are those above ``t``, the smallest bit pattern
with ``A(t) <= p``, and the first ``ties`` of those equal to ``t``, where
``ties = min(m, floor((p - A(t)) / t) + 1)`` for the ``m`` tokens equal to
``t`` (sorted, those tied tokens come straight after everything above ``t``
and each adds exactly ``t``). Proof: every token above ``t`` has at most
``A(t) <= p`` before it; the tokens below ``t`` have all of ``A(t - 1) > p``
before them; a tied token of rank ``j`` has ``A(t) + j t`` before it.

``t`` is searched with fixed-point sums: each probability as the integer
``floor(q * 2**s)`` (``s = 48`` for 5,000 tokens), added exactly in int64;
under XLA by bisection on the bit pattern (30 halvings of ``[0, 2**30)``, the
bits of every float in [0, 2), each one masked sum over the vocabulary), in
plain graphs ten bits at a time from three weighted histograms
(``bincount``: far fewer ops, and TensorFlow runs each op of a graph at a
cost). Such a sum ``F`` bounds the exact one, ``F <= A * 2**s < F + c`` for
``c`` tokens, so ``A(t) <= p < A(t - 1)`` is *certified* by two integer
comparisons, and the tie count when both ends of the interval holding
``(p - A(t)) * 2**s`` give the same count (each floor checked with exact
float64 products): the exact ``A`` falls with ``b``, so ``t`` is then the
smallest, however the search found it. A row is left uncertified only when
``A(t)`` is within ``c * 2**-s`` (about 1e-11) of ``p``: sums landing exactly
on ``p``, crafted inputs. Then the whole batch takes an exact path instead: a
full sort and exact cumulative sums in integer arithmetic (base-``2**w``
digits of ``q * 2**149`` held in float64, which adds integers below 2**53
exactly). Either way the kept set is the same, so XLA and plain graphs draw
alike.

Draws are by inverse CDF over the kept probabilities in vocabulary order (in
float64, ``draw``), from one uniform number per row and step (see
``random_sampler``): the same distribution as drawing from the sorted kept
tokens (each token's share is its probability over the kept total), and the
same tokens under XLA and without it.
"""

from __future__ import annotations

from fractions import Fraction

import keras_hub
import tensorflow as tf

from minigpt_cli.random_sampler import inverse_cdf, uniform

#: Bit patterns of the floats in [0, 2) are below 2**BITS: 30 halvings (or 3 histograms of 2**10) find one.
BITS = 30
#: Halvings per step of bisection's loop: XLA compiles 30 in line slowly, graphs run loop steps slowly.
UNROLLED = 15
#: Bits per histogram.
RADIX = 10
#: Probabilities below float32's smallest normal number count as 0.
TINY = 2.0**-126
#: Every float32 probability (flushed as above) is a whole multiple of 2**-SCALE.
SCALE = 149


def limb_layout(vocab_size: int | None) -> tuple[int, int]:
    """Bits per digit and digits per number such that a sum of ``vocab_size`` digits stays below 2**53."""
    n = vocab_size if vocab_size is not None else 2**24
    width = 53 - n.bit_length()  # n * 2**width < 2**53
    return width, -(-(SCALE + 1) // width)  # q * 2**SCALE <= 2**SCALE: SCALE + 1 bits


def _digits(x: tf.Tensor, width: int, count: int) -> tf.Tensor:
    """Base-``2**width`` digits of ``x * 2**SCALE``, least significant first (``x``: float64 of float32s); exact.

    Scaling by a power of two is exact, ``floor`` is exact, and ``y - floor(y / 2**width) * 2**width`` is an
    integer below 2**width with no more significant bits than ``y``: representable, so IEEE gives it exactly.
    """
    out = []
    for i in range(count):
        y = tf.floor(x * 2.0 ** (SCALE - width * i))
        out.append(y - tf.floor(y * 2.0**-width) * 2.0**width)
    return tf.stack(out, axis=-1)


def _carry(digits: tf.Tensor, width: int) -> list[tf.Tensor]:
    """Digits (integers below 2**53 in float64) with carries moved up: all but the last below 2**width."""
    out, carry = [], 0.0
    parts = tf.unstack(digits, axis=-1)
    for part in parts[:-1]:
        v = part + carry
        carry = tf.floor(v * 2.0**-width)
        out.append(v - carry * 2.0**width)
    return out + [parts[-1] + carry]


def _at_most(digits: list[tf.Tensor], bound: list[int]) -> tf.Tensor:
    """Whether the number with carried ``digits`` is at most the one with digits ``bound`` (same base)."""
    le = tf.ones_like(digits[0], dtype=tf.bool)
    for d, b in zip(digits, bound, strict=True):
        le = (d < b) | ((d == b) & le)
    return le


def _bound_digits(p: float, width: int, count: int) -> list[int]:
    """Base-``2**width`` digits of ``floor(p * 2**SCALE)``: sums of probabilities are at most p iff at most this."""
    whole = int(Fraction(p) * 2**SCALE)  # floor, p >= 0
    digits = [(whole >> (width * i)) & ((1 << width) - 1) for i in range(count - 1)]
    return digits + [whole >> (width * (count - 1))]


def flush(probabilities: tf.Tensor) -> tf.Tensor:
    """The probabilities as float32, those below 2**-126 set to 0 (as TensorFlow's CPU kernels treat them)."""
    q = tf.cast(probabilities, tf.float32)
    return tf.where(q < TINY, 0.0, q)


def in_xla() -> bool:
    """Whether the graph being traced is for XLA (``jit_compile=True``), by TensorFlow's own internal test.

    Only picks the faster search; if that internal function moves, bisection (right everywhere) is used.
    """
    try:
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util

        return bool(control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph()))
    except (ImportError, AttributeError):
        return True


def fixed_point(vocab_size: int | None) -> int:
    """Bits ``s`` after the point for the searches' sums: ``floor(q * 2**s)`` of ``vocab_size`` tokens below 2
    add up below 2**62, exactly in int64, and ``p * 2**s`` stays below 2**53, exact in float64."""
    return min(61 - (vocab_size if vocab_size is not None else 2**24).bit_length(), 52)


def _bisect(bits: tf.Tensor, fixed: tf.Tensor, bound: int) -> tf.Tensor:
    """The smallest ``t`` with ``F(t) <= bound``: 30 halvings, each one masked integer sum (fast under XLA)."""

    def halve(k, x):  # x: the largest with F(x) > bound so far, in [-1, 2**30); UNROLLED halvings per loop step
        for j in range(UNROLLED):
            y = x + tf.bitwise.left_shift(1, k - j)
            x = tf.where(tf.reduce_sum(tf.where(bits > y, fixed, 0), axis=-1, keepdims=True) > bound, y, x)
        return k - UNROLLED, x

    x = tf.fill([tf.shape(bits)[0], 1], -1)
    _, x = tf.while_loop(lambda k, x: k >= 0, halve, (BITS - 1, x), maximum_iterations=BITS // UNROLLED)
    return x + 1


def _histogram(bits: tf.Tensor, fixed: tf.Tensor, bound: int) -> tf.Tensor:
    """The same ``t`` ten bits at a time from weighted histograms (``bincount``): few ops, for plain graphs."""
    prefix = tf.zeros([tf.shape(bits)[0], 1], tf.int32)  # t's bits above `shift + RADIX`
    above = tf.zeros([tf.shape(bits)[0], 1], tf.float64)  # ~F of the last bit pattern with that prefix
    weights = tf.cast(fixed, tf.float64)  # bincount adds floats; rounding here only slows the certificate
    buckets = 1 << RADIX
    for shift in range(BITS - RADIX, -1, -RADIX):
        inside = tf.bitwise.right_shift(bits, shift + RADIX) == prefix
        bucket = tf.where(inside, tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, shift), buckets - 1), buckets)
        mass = tf.raw_ops.DenseBincount(input=bucket, size=buckets + 1, weights=weights)  # per row
        ends = above + tf.math.cumsum(mass[:, :buckets], axis=-1, reverse=True, exclusive=True)  # ~F(bucket's end)
        k = tf.minimum(tf.reduce_sum(tf.cast(ends > bound, tf.int32), axis=-1, keepdims=True), buckets - 1)
        above = tf.gather(ends, k, batch_dims=1)
        prefix = prefix * buckets + k
    return prefix


def search_cutoff(q: tf.Tensor, p: float, method: str = "auto") -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """The cut-off found with fixed-point sums, and whether it is certain: ``(bits, ties, certified)``, each
    ``[batch, 1]``.

    Keep the tokens whose float32 bits are above ``bits`` and the first ``ties`` equal to it; a row is right
    for certain where ``certified`` (module docstring), whichever search found it. ``method``: ``"bisect"``,
    ``"histogram"`` (not under XLA) or ``"auto"`` (bisection under XLA, histograms otherwise). ``q``: ``flush``-ed.
    """
    scale = fixed_point(q.shape[-1])
    bits = tf.bitcast(q, tf.int32)
    fixed = tf.cast(tf.cast(q, tf.float64) * 2.0**scale, tf.int64)  # truncation: floor, q >= 0
    if method == "auto":
        method = "bisect" if in_xla() else "histogram"
    t = (_bisect if method == "bisect" else _histogram)(bits, fixed, int(Fraction(p) * 2**scale))
    return (t, *_certify(bits, fixed, scale, p, t))


def certify(q: tf.Tensor, p: float, t: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """For any candidate cut-off ``t`` (bits, ``[batch, 1]``): ``(ties, certified)``, where certified rows are
    certainly right (``keep_mask(q, t, ties)`` is top-p's set) and the others unknown. ``q``: ``flush``-ed."""
    scale = fixed_point(q.shape[-1])
    fixed = tf.cast(tf.cast(q, tf.float64) * 2.0**scale, tf.int64)  # truncation: floor, q >= 0
    return _certify(tf.bitcast(q, tf.int32), fixed, scale, p, t)


def _certify(bits: tf.Tensor, fixed: tf.Tensor, scale: int, p: float, t: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Integer bounds on ``A``: each ``floor(q * 2**s)`` is below ``q * 2**s`` by less than 1, so
    ``F <= A * 2**s < F + c`` for ``F``, their exact int64 sum over ``c`` tokens."""
    bound = int(Fraction(p) * 2**scale)  # A * 2**s <= p * 2**s iff floor(...) <= bound, for integers
    above = bits > t
    hi = tf.reduce_sum(tf.where(above, fixed, 0), axis=-1, keepdims=True)  # F(t)
    c = tf.reduce_sum(tf.cast(above, tf.int64), axis=-1, keepdims=True)
    tied = bits == t
    m = tf.reduce_sum(tf.cast(tied, tf.int64), axis=-1, keepdims=True)
    value = tf.cast(tf.bitcast(t, tf.float32), tf.float64) * 2.0**scale  # t * 2**s, exact
    lo = hi + m * tf.cast(tf.floor(value), tf.int64)  # F(t - 1): the tied tokens' floors are all equal
    upper = hi + c <= bound  # A(t) * 2**s < F(t) + c <= p * 2**s (or F(t) = c = 0)
    lower = (t == 0) | (lo > bound)  # A(t - 1) * 2**s >= F(t - 1) > p * 2**s
    # (p - A(t)) * 2**s lies in [max(bound - hi - c, 0), bound + 1 - hi); the tie count is min(m, floor(. / t) + 1)
    # at both ends, each floor checked with exact products (f <= m < 2**24 tokens, value: 24 significant bits).
    room = tf.cast(tf.concat([tf.maximum(bound - hi - c, 0), bound + 1 - hi], axis=-1), tf.float64)  # < 2**53
    m64 = tf.cast(m, tf.float64)
    f = tf.minimum(tf.floor(room / tf.where(value > 0, value, 1.0)), m64)
    exact = (f * value <= room) & ((f == m64) | (room < (f + 1.0) * value))
    ties = tf.where(value > 0, tf.minimum(m64, f + 1.0), m64)  # t = 0: the zeros, all kept
    same = (ties[:, :1] == ties[:, 1:]) & tf.reduce_all(exact | (value <= 0), axis=-1, keepdims=True)
    return tf.cast(ties[:, :1], tf.int32), upper & lower & same


def exact_cutoff(q: tf.Tensor, p: float) -> tuple[tf.Tensor, tf.Tensor]:
    """The cut-off ``(bits, ties)`` by a full sort and exact integer cumulative sums; ``q``: ``flush``-ed."""
    vocab_size = q.shape[-1]
    width, count = limb_layout(vocab_size)
    k = vocab_size if vocab_size is not None else tf.shape(q)[-1]
    top, _ = tf.math.top_k(q, k=k, sorted=True)
    before = tf.math.cumsum(_digits(tf.cast(top, tf.float64), width, count), axis=1, exclusive=True)
    keep = _at_most(_carry(before, width), _bound_digits(p, width, count))  # a prefix, never empty
    kept = tf.reduce_sum(tf.cast(keep, tf.int32), axis=-1, keepdims=True)
    last = tf.gather(top, kept - 1, batch_dims=1)  # [batch, 1]
    ties = kept - tf.reduce_sum(tf.cast(q > last, tf.int32), axis=-1, keepdims=True)
    return tf.bitcast(last, tf.int32), ties


def cutoff(q: tf.Tensor, p: float) -> tuple[tf.Tensor, tf.Tensor]:
    """The cut-off ``(bits, ties)`` for ``0 <= p < 1``: the search's where it is certified for every row, the
    exact sort-based path's otherwise. ``q``: ``flush``-ed."""
    t, ties, certified = search_cutoff(q, p)
    return tf.cond(tf.reduce_all(certified), lambda: (t, ties), lambda: exact_cutoff(q, p))


def keep_mask(q: tf.Tensor, t: tf.Tensor, ties: tf.Tensor) -> tf.Tensor:
    """The tokens whose bits are above ``t``, and the first ``ties`` of those equal to it (vocabulary order)."""
    bits = tf.bitcast(q, tf.int32)
    tied = bits == t

    def some_tied():  # only part of the tokens equal to t: a cumulative count ranks them
        rank = tf.math.cumsum(tf.cast(tied, tf.int32), axis=-1, exclusive=True)
        return (bits > t) | (tied & (rank < ties))

    if not in_xla():  # a plain graph counts faster than it branches; XLA's cumulative sums are slow on a CPU
        return some_tied()
    m = tf.reduce_sum(tf.cast(tied, tf.int32), axis=-1, keepdims=True)
    return tf.cond(tf.reduce_any(ties < m), some_tied, lambda: bits >= t)


def top_p_mask(probabilities: tf.Tensor, p: float) -> tf.Tensor:
    """The tokens top-p keeps, exactly (module docstring): bool ``[batch, vocab]``."""
    q = flush(probabilities)
    if p >= 1:
        return tf.ones_like(q, dtype=tf.bool)
    return keep_mask(q, *cutoff(q, max(float(p), 0.0)))


def draw(weights: tf.Tensor, u: tf.Tensor, block: int = 64) -> tf.Tensor:
    """Inverse CDF in vocabulary order, in float64: the first index whose cumulative weight reaches ``u`` times
    the row's total; never one of weight 0.

    Two levels (sums of blocks of ``block`` tokens, then one block) instead of one cumulative sum over the
    vocabulary, which XLA makes slow on a CPU. Float64 sums of float32 weights round by about 1e-16 of the
    total, whatever the order XLA or TensorFlow adds them in: far below the uniform numbers' 2**-23 steps.
    """
    vocab_size = weights.shape[-1]
    if vocab_size is None:
        return inverse_cdf(weights, u)
    batch, blocks = tf.shape(weights)[0], -(-vocab_size // block)
    w = tf.pad(tf.cast(weights, tf.float64), [[0, 0], [0, blocks * block - vocab_size]])
    w = tf.reshape(w, [batch, blocks, block])
    cdf = tf.math.cumsum(tf.reduce_sum(w, axis=-1), axis=-1)  # [batch, blocks]
    target = tf.cast(u, tf.float64)[:, None] * cdf[:, -1:]
    b = tf.minimum(tf.reduce_sum(tf.cast(cdf < target, tf.int32), axis=-1), blocks - 1)  # first cdf >= target
    base = tf.where(b > 0, tf.gather(cdf, tf.maximum(b - 1, 0), batch_dims=1), 0.0)[:, None]  # < target
    inner = tf.gather(w, b, batch_dims=1)  # [batch, block]
    i = tf.reduce_sum(tf.cast(base + tf.math.cumsum(inner, axis=-1) < target, tf.int32), axis=-1)
    last = block - 1 - tf.argmax(tf.reverse(inner, axis=[-1]) > 0, axis=-1, output_type=tf.int32)
    return b * block + tf.minimum(i, last)  # `last`: the block's sum may round above its cumulative sum


class ExactTopPSampler(keras_hub.samplers.TopPSampler):
    """KerasHub's ``TopPSampler`` made exact and sort-free (module docstring), drawn by inverse CDF.

    ``k`` is accepted and ignored (it was the count of sorted candidates, ``generate.top_p_candidates``);
    nothing is cut before top-p.
    """

    def __init__(self, p: float = 0.1, k: int | None = None, seed=None, **kwargs):
        super().__init__(p=p, k=None, seed=seed, **kwargs)

    def get_next_token(self, probabilities):
        u = uniform(self.seed_generator, tf.shape(probabilities)[0])  # one draw per step, whatever the path
        q = flush(probabilities)
        if self.p >= 1:
            return draw(q, u)
        return draw(tf.where(keep_mask(q, *cutoff(q, max(float(self.p), 0.0))), q, 0.0), u)


#: The former name (it sorted the likeliest ``k`` candidates), for callers not yet moved.
CandidateTopPSampler = ExactTopPSampler
