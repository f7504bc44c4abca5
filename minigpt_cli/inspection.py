"""Look inside a run: how text splits into tokens, what the model predicts next, where it is surprised,
where it attends.

Each view is a function returning a dataclass with ``to_dict()`` (what ``--json`` prints); nothing here
prints. The numbers come from the real pieces: the run's tokenizer, the model's own forward pass, the
samplers ``SamplerSpec.build()`` makes, the windows ``evaluate`` scores, and the attention weights of the
model's own ``CachedMultiHeadAttention`` layers.

>>> vocab = read_vocabulary(run.vocab, cfg.vocab)                         # doctest: +SKIP
>>> split_tokens("The old king", vocab).pieces()                          # doctest: +SKIP
['the', 'old', 'king']
>>> model = load_model(run.model, len(vocab))                             # doctest: +SKIP
>>> view = next_tokens(model, vocab, "the old", k=10, p=0.5)              # doctest: +SKIP
>>> view.greedy_token, view.top_p.tokens                                  # doctest: +SKIP
('king', ['king', 'man', 'woman'])
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from minigpt_cli.errors import MinigptError
from minigpt_cli.vocab import BOS, UNK, Vocabulary

#: Temperatures always shown beside the one asked for, to show how temperature reshapes the distribution.
SHOWN_TEMPERATURES = (0.7, 1.0, 1.5)
#: Tokens of context shown before a surprising token.
CONTEXT_SHOWN = 8


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, with the run's tokenizer."""
    if not texts:
        return []
    if hasattr(tokenizer, "tokenize_batch"):  # FastWordPieceTokenizer: no TensorFlow
        return [[int(i) for i in row] for row in tokenizer.tokenize_batch(texts)]
    import tensorflow as tf

    ids = tokenizer(tf.constant(texts))
    return [[int(i) for i in row] for row in (ids.to_list() if hasattr(ids, "to_list") else ids)]


def join_pieces(pieces: list[str]) -> str:
    """Word pieces as text: ``##`` pieces glued to the one before, others spaced (``wood ##en`` -> ``wooden``)."""
    text = ""
    for piece in pieces:
        if piece.startswith("##") and len(piece) > 2:
            text += piece[2:]
        else:
            text += (" " if text else "") + piece
    return text


def _check_text(text: str) -> None:
    if not text.strip():
        raise MinigptError("the text is empty; give some text (an argument, --file FILE, or '-' for standard input)")


# --- tokens ---------------------------------------------------------------------------------------------------


@dataclass
class WordSplit:
    """One whitespace-separated word and the pieces the tokenizer makes of it."""

    word: str
    ids: list[int]
    pieces: list[str]

    @property
    def unknown(self) -> int:
        return self.pieces.count(UNK)


@dataclass
class TokenSplit:
    """How a text splits into word pieces."""

    text: str
    words: list[WordSplit]
    vocab_size: int
    lowercase: bool

    def pieces(self) -> list[str]:
        return [p for w in self.words for p in w.pieces]

    def ids(self) -> list[int]:
        return [i for w in self.words for i in w.ids]

    @property
    def tokens(self) -> int:
        return sum(len(w.ids) for w in self.words)

    @property
    def unknown(self) -> int:
        return sum(w.unknown for w in self.words)

    @property
    def tokens_per_word(self) -> float:
        return self.tokens / len(self.words) if self.words else 0.0

    @property
    def characters_per_token(self) -> float:
        return len(self.text) / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "words": len(self.words),
            "unknown": self.unknown,
            "tokens_per_word": self.tokens_per_word,
            "characters_per_token": self.characters_per_token,
            "vocab_size": self.vocab_size,
            "lowercase": self.lowercase,
            "ids": self.ids(),
            "pieces": self.pieces(),
            "split": [{"word": w.word, "ids": w.ids, "pieces": w.pieces, "unknown": w.unknown} for w in self.words],
        }


def split_tokens(text: str, vocab: Vocabulary) -> TokenSplit:
    """Split ``text`` into word pieces with the run's tokenizer, word by word (needs only ``vocab.txt``).

    WordPiece never joins pieces across whitespace, so the words' pieces, in
    order, are exactly the text's tokens.
    """
    _check_text(text)
    words = re.findall(r"\S+", text)
    ids = _tokenize(vocab.tokenizer(), words)
    split = [WordSplit(w, i, [vocab.tokens[t] for t in i]) for w, i in zip(words, ids, strict=True)]
    return TokenSplit(text=text, words=split, vocab_size=len(vocab), lowercase=vocab.lowercase)


# --- next -----------------------------------------------------------------------------------------------------


@dataclass
class KeptSet:
    """The tokens a sampler can draw from (likeliest first) and their renormalized probabilities."""

    ids: list[int]
    tokens: list[str]
    probabilities: list[float]
    mass: float  # the share of the (tempered) distribution they hold before renormalizing

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Candidate:
    """One likely next token."""

    rank: int
    id: int
    token: str
    probability: float  # at temperature 1
    tempered: float  # at the temperature asked for
    by_temperature: dict[str, float]
    greedy: bool
    top_k: float | None  # renormalized probability in top-k's set, None when outside it
    top_p: float | None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class NextTokens:
    """The likeliest next tokens after a prompt, and what each sampler does with them."""

    prompt: str
    context: list[str]  # the tokens the model sees: [BOS] + the prompt's
    context_ids: list[int]
    temperature: float
    k: int
    p: float
    probabilities: np.ndarray = field(repr=False)  # over the whole vocabulary, temperature 1
    tempered: np.ndarray = field(repr=False)  # over the whole vocabulary, at ``temperature``
    greedy: int
    greedy_token: str
    top_k: KeptSet
    top_p: KeptSet
    candidates: list[Candidate]
    temperatures: dict[str, dict[str, float]]  # "0.7" -> entropy_bits, top_probability

    def to_dict(self) -> dict:
        return {
            "prompt": self.prompt,
            "context": self.context,
            "context_ids": self.context_ids,
            "temperature": self.temperature,
            "k": self.k,
            "p": self.p,
            "vocab_size": int(self.probabilities.size),
            "probability_sum": float(self.probabilities.sum(dtype=np.float64)),
            "greedy": {"id": self.greedy, "token": self.greedy_token},
            "top_k": self.top_k.to_dict(),
            "top_p": self.top_p.to_dict(),
            "candidates": [c.to_dict() for c in self.candidates],
            "temperatures": self.temperatures,
        }


def encode(vocab: Vocabulary, text: str) -> list[int]:
    """``[BOS]`` + the text's token ids: what the model sees, as in generation."""
    return [vocab.tokens.index(BOS)] + (_tokenize(vocab.tokenizer(), [text])[0] if text.strip() else [])


def _entropy_bits(probs: np.ndarray) -> float:
    p = probs[probs > 0].astype(np.float64)
    return float(-(p * np.log2(p)).sum())


def top_k_set(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Ids top-k can draw: the ``k`` likeliest (ties to the lower id, as ``top_k`` breaks them), less any of
    probability 0 (an inverse-CDF draw never picks those)."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return order[probabilities[order] > 0]


def top_p_set(probabilities: np.ndarray, p: float) -> np.ndarray:
    """Ids top-p can draw, likeliest first: the sampler's own exact rule (``top_p_sampler.top_p_mask``: the
    likeliest through the first whose cumulative probability passes ``p``), less any of probability 0.
    On JAX and PyTorch, ``SortedTopPSampler``'s rule: the likeliest, and each next while the sum before it is
    at most ``p``."""
    import keras

    if keras.config.backend() != "tensorflow":
        order = np.argsort(-probabilities, kind="stable")
        sorted_p = np.asarray(probabilities, dtype=np.float32)[order]
        before = np.cumsum(sorted_p, dtype=np.float32) - sorted_p
        keep = (before <= p) | (np.arange(len(order)) == 0) | (p >= 1)
        return order[keep & (sorted_p > 0)]
    import tensorflow as tf

    from minigpt_cli.top_p_sampler import flush, top_p_mask

    row = tf.constant(np.asarray(probabilities, dtype=np.float32)[None, :])
    kept = np.asarray(top_p_mask(row, p))[0] & (np.asarray(flush(row))[0] > 0)
    order = np.argsort(-probabilities, kind="stable")
    return order[kept[order]]


def _kept(ids: np.ndarray, probabilities: np.ndarray, vocab: Vocabulary) -> KeptSet:
    kept = probabilities[ids].astype(np.float64)
    return KeptSet(
        ids=[int(i) for i in ids],
        tokens=[vocab.tokens[i] for i in ids],
        probabilities=[float(x) for x in kept / kept.sum()],
        mass=float(kept.sum()),
    )


def _logits(model, ids: list[int]) -> np.ndarray:
    """The model's next-token logits after ``ids``: one forward pass."""
    from keras import ops

    x = np.asarray([ids], dtype="int32")
    logits = _no_grad(lambda: model({"token_ids": x, "padding_mask": np.ones_like(x)}, training=False))
    return ops.convert_to_numpy(logits)[0, -1]


def _no_grad(fn):
    """``fn()`` without recording gradients (PyTorch's autograd would keep the graph of every forward pass)."""
    import keras

    if keras.config.backend() != "torch":
        return fn()
    import torch

    with torch.no_grad():
        return fn()


def check_window(ids: list[int], seq_len: int, what: str) -> None:
    """Refuse ``[BOS]`` + tokens longer than the model's window, saying the limit."""
    if len(ids) > seq_len:
        raise MinigptError(
            f"the {what} is {len(ids) - 1} tokens but the model's window is {seq_len} tokens "
            f"([BOS] + at most {seq_len - 1}); shorten it"
        )


def next_tokens(model, vocab: Vocabulary, prompt: str, *, k: int = 10, p: float = 0.5, temperature: float = 1.0,
                top: int = 10) -> NextTokens:  # fmt: skip
    """The ``top`` likeliest next tokens after ``[BOS]`` + ``prompt``, and what each sampler would do.

    The probabilities are the samplers' own (``compute_probabilities`` of the
    samplers ``SamplerSpec.build()`` makes); greedy's pick is the greedy
    sampler's; the top-k and top-p sets are the tokens those samplers draw
    from at ``temperature`` (tests check them against the samplers' draws).
    """
    from minigpt_cli.samplers import SamplerSpec

    SamplerSpec("topk", k=k, temperature=temperature).check(vocab_size=len(vocab))
    SamplerSpec("topp", p=p, temperature=temperature).check()
    if top < 1:
        raise MinigptError(f"--top must be at least 1, got {top}")
    ids = encode(vocab, prompt)
    check_window(ids, model.backbone.sequence_length, "prompt")
    logits = _logits(model, ids)[None, :]

    def probabilities(t: float) -> np.ndarray:
        return np.asarray(SamplerSpec("greedy", temperature=t).build().compute_probabilities(logits))[0]

    plain, tempered = probabilities(1.0), probabilities(temperature)
    greedy = int(np.asarray(SamplerSpec("greedy", temperature=temperature).build().get_next_token(tempered[None]))[0])
    top_k = _kept(top_k_set(tempered, k), tempered, vocab)
    top_p = _kept(top_p_set(tempered, p), tempered, vocab)
    shown = sorted({*SHOWN_TEMPERATURES, temperature})
    by_t = {f"{t:g}": probabilities(t) for t in shown}
    in_k = dict(zip(top_k.ids, top_k.probabilities, strict=True))
    in_p = dict(zip(top_p.ids, top_p.probabilities, strict=True))
    order = np.argsort(-plain, kind="stable")[: min(top, plain.size)]
    candidates = [
        Candidate(
            rank=rank + 1,
            id=int(i),
            token=vocab.tokens[i],
            probability=float(plain[i]),
            tempered=float(tempered[i]),
            by_temperature={t: float(probs[i]) for t, probs in by_t.items()},
            greedy=int(i) == greedy,
            top_k=in_k.get(int(i)),
            top_p=in_p.get(int(i)),
        )
        for rank, i in enumerate(order)
    ]
    return NextTokens(
        prompt=prompt,
        context=[vocab.tokens[i] for i in ids],
        context_ids=ids,
        temperature=temperature,
        k=k,
        p=p,
        probabilities=plain,
        tempered=tempered,
        greedy=greedy,
        greedy_token=vocab.tokens[greedy],
        top_k=top_k,
        top_p=top_p,
        candidates=candidates,
        temperatures={
            t: {"entropy_bits": _entropy_bits(probs), "top_probability": float(probs.max())}
            for t, probs in by_t.items()
        },
    )


# --- surprise -------------------------------------------------------------------------------------------------


@dataclass
class ScoredToken:
    """One token of the text and the model's surprise at it (``bits`` is None where it is not scored)."""

    id: int
    token: str
    line: int  # the text's line (of the lines the windows are cut from) it belongs to
    bits: float | None
    evaluated: bool  # one of the tokens ``evaluate`` scores with these windows
    position: int = 0  # its index in ``Surprise.tokens``
    context_tokens: int = 0  # how many tokens of context the model saw ([BOS] included)

    @property
    def probability(self) -> float | None:
        return None if self.bits is None else 2.0**-self.bits

    def to_dict(self) -> dict:
        return {**asdict(self), "probability": self.probability}


@dataclass
class Surprise:
    """A text scored token by token; totals for all its scored tokens and for those ``evaluate`` scores."""

    windows: str
    seq_len: int
    vocab_size: int
    tokens: list[ScoredToken]
    characters: int  # characters of the text the scored tokens cover
    evaluated_characters: int  # ... the tokens ``evaluate`` scores cover (its bits/char denominator)
    files: int = 1

    def scored(self) -> list[ScoredToken]:
        return [t for t in self.tokens if t.bits is not None]

    @property
    def bits(self) -> float:
        return math.fsum(t.bits for t in self.scored())

    @property
    def evaluated_bits(self) -> float:
        return math.fsum(t.bits for t in self.scored() if t.evaluated)

    @property
    def evaluated_tokens(self) -> int:
        return sum(t.evaluated for t in self.scored())

    @property
    def bits_per_token(self) -> float:
        n = len(self.scored())
        return self.bits / n if n else 0.0

    @property
    def bits_per_character(self) -> float:
        return self.bits / self.characters if self.characters else 0.0

    def evaluation(self) -> dict | None:
        """What ``minigpt evaluate`` reports for this text and windows (None when it scores no token)."""
        n = self.evaluated_tokens
        if not n:
            return None
        loss = self.evaluated_bits * math.log(2) / n
        return {
            "loss": loss,
            "perplexity": math.exp(loss),
            "bits": self.evaluated_bits,
            "tokens": n,
            "characters": self.evaluated_characters,
            "bits_per_character": self.evaluated_bits / self.evaluated_characters if self.evaluated_characters else 0.0,
        }

    def most_surprising(self, n: int) -> list[ScoredToken]:
        return sorted(self.scored(), key=lambda t: -t.bits)[:n]

    def context(self, token: ScoredToken, n: int = CONTEXT_SHOWN) -> list[str]:
        """The last ``n`` tokens of the context the model saw before ``token``."""
        i, c = token.position, token.context_tokens
        if self.windows == "packed":  # the token list is the stream
            seen = [t.token for t in self.tokens[i - c : i]]
        else:  # [BOS] + the line's tokens before it
            seen = [BOS] + [t.token for t in self.tokens[i - c + 1 : i]]
        return seen[-n:] if n else []

    def to_dict(self, top: int = 10) -> dict:
        return {
            "windows": self.windows,
            "seq_len": self.seq_len,
            "tokens_scored": len(self.scored()),
            "tokens_unscored": len(self.tokens) - len(self.scored()),
            "bits": self.bits,
            "bits_per_token": self.bits_per_token,
            "characters": self.characters,
            "bits_per_character": self.bits_per_character,
            "evaluate": self.evaluation(),
            "most_surprising": [{**t.to_dict(), "context": self.context(t)} for t in self.most_surprising(top)],
            "tokens": [t.to_dict() for t in self.tokens],
        }


@dataclass
class _Window:
    ids: np.ndarray  # seq_len + 1 ids, [PAD]-padded
    tokens: list[int]  # index into the text's token list of each label (-1: padding)
    first: int  # labels before this index are not scored here (scored by an earlier window)
    evaluated: bool


def _token_nats(model, windows: list[_Window], batch_size: int) -> list[np.ndarray]:
    """Cross-entropy (nats) of every label of every window, as ``evaluate`` computes it."""
    import keras
    from keras import ops

    from minigpt_cli.backend import compiled

    def token_nats(x, y):
        logits = model({"token_ids": x, "padding_mask": ops.cast(ops.not_equal(x, 0), "int32")}, training=False)
        return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)

    nats = compiled(token_nats, model, [], xla=False)

    if not windows:
        return []
    size = min(batch_size, len(windows))  # every batch this size (the last one padded): one trace
    result = []
    for start in range(0, len(windows), size):
        w = np.zeros((size, len(windows[0].ids)), dtype=np.int32)
        part = windows[start : start + size]
        w[: len(part)] = [win.ids for win in part]
        result += list(ops.convert_to_numpy(nats(w[:, :-1], w[:, 1:]))[: len(part)])
    return result


def _lines(files: list[Path]) -> list[str]:
    from minigpt_cli.evaluate import _lines

    return _lines(files)


def surprise(model, vocab: Vocabulary, files: list[Path], windows: str, min_string_len: int,
             batch_size: int = 64) -> Surprise:  # fmt: skip
    """Every token of the text in ``files``, scored in the windows ``evaluate`` cuts, plus what they leave out.

    The tokens ``evaluate`` scores (``windows.cut_windows``: same windows, same
    cross-entropy) are marked ``evaluated``; their bits sum to ``evaluate``'s
    loss x tokens / ln 2. So that a short text is scored too, the rest is
    scored the same way: with ``packed`` windows, the stream's tail after the
    last whole window in one more window of the stream's last ``seq_len + 1``
    tokens (full context); with ``reference`` windows, lines of at most
    ``min_string_len`` bytes as their own window. Reference windows never
    see past a line's first ``seq_len`` tokens: those are left unscored.
    """
    from minigpt_cli.evaluate import _prefix_characters, scored_characters
    from minigpt_cli.windows import cut_windows, packed_windows

    tokenizer = vocab.tokenizer()
    seq_len = model.backbone.sequence_length
    bos = vocab.tokens.index(BOS)
    lines = _lines(files)
    if not any(line.strip() for line in lines):
        raise MinigptError("the text is empty; give some text (an argument, --file FILE, or '-' for standard input)")
    tokens: list[ScoredToken] = []
    cut: list[_Window] = []
    if windows == "reference":
        every_line = cut_windows(files, tokenizer, "reference", seq_len, -1)  # one window per line, in order
        line_ids = _tokenize(tokenizer, lines)
        for n, (line, ids, w) in enumerate(zip(lines, line_ids, every_line, strict=True)):
            start = len(tokens)
            evaluated = len(line.encode()) > min_string_len  # what cut_windows keeps with the real threshold
            tokens += [ScoredToken(i, vocab.tokens[i], n, None, evaluated and j < seq_len) for j, i in enumerate(ids)]
            labels = [start + j if j < min(len(ids), seq_len) else -1 for j in range(seq_len)]
            if ids:
                cut.append(_Window(w, labels, 0, evaluated))
        evaluated_chars = scored_characters(files, tokenizer, "reference", seq_len, min_string_len)
        short = [(line, len(ids)) for line, ids in zip(lines, line_ids, strict=True) if ids]
        short = [(line, n) for line, n in short if len(line.encode()) <= min_string_len]
        cut_short = [(line, seq_len) for line, n in short if n > seq_len]  # as scored_characters counts them
        all_chars = evaluated_chars + sum(len(line) for line, n in short if n <= seq_len)
        all_chars += round(sum(_prefix_characters(cut_short, tokenizer))) if cut_short else 0
    else:
        kept = [line for line in lines if line.strip(" \t\n\r\f\v")]  # as cut_windows: tf.strings.strip
        stream = [bos]
        tokens.append(ScoredToken(bos, BOS, 0, None, False))  # the stream's first token: context only
        for n, ids in enumerate(_tokenize(tokenizer, kept)):
            if n:
                stream.append(bos)
                tokens.append(ScoredToken(bos, BOS, n - 1, None, True))  # predicted at the end of line n - 1
            stream += ids
            tokens += [ScoredToken(i, vocab.tokens[i], n, None, True) for i in ids]
        stream_ids = np.asarray(stream, dtype=np.int32)
        evaluate_windows = cut_windows(files, tokenizer, "packed", seq_len, min_string_len)
        assert np.array_equal(evaluate_windows, packed_windows(stream_ids, seq_len))  # the stream is evaluate's
        for n, w in enumerate(evaluate_windows):
            cut.append(_Window(w, list(range(n * seq_len + 1, (n + 1) * seq_len + 1)), 0, True))
        labelled = len(evaluate_windows) * seq_len  # stream positions 1..labelled are evaluate's labels
        for t in tokens[labelled + 1 :]:
            t.evaluated = False
        if labelled + 1 < len(stream):  # the tail: one more window, ending with the stream
            start = max(0, len(stream) - seq_len - 1)
            w = np.zeros(seq_len + 1, dtype=np.int32)
            w[: len(stream) - start] = stream_ids[start:]
            labels = [start + j + 1 if start + j + 1 < len(stream) else -1 for j in range(seq_len)]
            cut.append(_Window(w, labels, labelled + 1, False))
        evaluated_chars = scored_characters(files, tokenizer, "packed", seq_len, min_string_len)
        all_chars = sum(len(line) for line in kept)
    for w, nats in zip(cut, _token_nats(model, cut, batch_size), strict=True):
        for j, t in enumerate(w.tokens):  # label j is w.ids[j + 1], seen after w.ids[: j + 1]
            if t < w.first:
                continue
            token = tokens[t]
            token.bits = float(nats[j]) / math.log(2)
            token.context_tokens = j + 1
    for i, t in enumerate(tokens):
        t.position = i
    return Surprise(
        windows=windows,
        seq_len=seq_len,
        vocab_size=len(vocab),
        tokens=tokens,
        characters=all_chars,
        evaluated_characters=evaluated_chars,
        files=len(files),
    )


def surprise_text(model, vocab: Vocabulary, text: str, windows: str, min_string_len: int,
                  batch_size: int = 64) -> Surprise:  # fmt: skip
    """``surprise`` of a text given as a string (read as a file would be, line by line)."""
    _check_text(text)
    with tempfile.TemporaryDirectory(prefix="minigpt-inspect-") as folder:
        path = Path(folder) / "text.txt"
        path.write_text(text, encoding="utf-8")
        return surprise(model, vocab, [path], windows, min_string_len, batch_size)


# --- attention ------------------------------------------------------------------------------------------------


@dataclass
class Link:
    """Attention from one token (the query) to an earlier one (the key)."""

    query: int
    key: int
    query_token: str
    key_token: str
    weight: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class HeadSummary:
    """What one head does: its strongest links, and its mean weight on [BOS], on itself, on the token before."""

    layer: int
    head: int
    links: list[Link]
    on_bos: float
    on_self: float
    on_previous: float

    def to_dict(self) -> dict:
        return {**asdict(self), "links": [link.to_dict() for link in self.links]}


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else 0.0


@dataclass
class Attention:
    """The attention weights of every layer and head over ``[BOS]`` + a text's tokens."""

    text: str
    tokens: list[str]
    ids: list[int]
    weights: np.ndarray = field(repr=False)  # (layers, heads, query, key); rows sum to 1
    hidden: np.ndarray = field(repr=False)  # the last layer's output, (tokens, embedding_dim)

    @property
    def layers(self) -> int:
        return self.weights.shape[0]

    @property
    def heads(self) -> int:
        return self.weights.shape[1]

    def summaries(self, top: int = 3) -> list[HeadSummary]:
        """Per head: the ``top`` strongest links and its mean weights over the queries after [BOS].

        Strongest: most above an even spread over the query's keys (a query at
        position ``q`` spreads ``1 / (q + 1)`` evenly), so the first tokens,
        with few keys to choose from, do not win by default. Query [BOS] (it
        can only attend to itself) and links to [BOS] (``on_bos``) are left out.
        """
        n = len(self.tokens)
        result = []
        for layer in range(self.layers):
            for head in range(self.heads):
                w = self.weights[layer, head]
                pairs = [(w[q, k] - 1 / (q + 1), q, k) for q in range(1, n) for k in range(1, q + 1)]
                pairs.sort(key=lambda x: (-x[0], x[1], x[2]))
                links = [Link(q, k, self.tokens[q], self.tokens[k], float(w[q, k])) for _, q, k in pairs[:top]]
                rows = np.arange(1, n)
                result.append(
                    HeadSummary(
                        layer=layer + 1,
                        head=head + 1,
                        links=links,
                        on_bos=_mean(w[rows, 0]),
                        on_self=_mean(w[rows, rows]),
                        on_previous=_mean(w[rows, rows - 1]),
                    )
                )
        return result

    def to_dict(self, top: int = 3) -> dict:
        return {
            "text": self.text,
            "tokens": self.tokens,
            "ids": self.ids,
            "layers": self.layers,
            "heads": self.heads,
            "heads_summary": [s.to_dict() for s in self.summaries(top)],
            "weights": self.weights.tolist(),
        }


def attention(model, vocab: Vocabulary, text: str) -> Attention:
    """The attention weights the model's own layers use on ``[BOS]`` + ``text``.

    Runs the embedding and the ``TransformerDecoder`` layers in order; before
    each, asks its ``CachedMultiHeadAttention`` for its scores on that layer's
    input, with the mask the decoder itself builds (causal and padding).
    """
    from keras import ops

    _check_text(text)
    ids = encode(vocab, text)
    check_window(ids, model.backbone.sequence_length, "text")
    backbone = model.backbone
    token_ids = ops.convert_to_tensor(np.asarray([ids], dtype="int32"))
    padding_mask = ops.ones_like(token_ids)
    x = backbone.embedding(token_ids)
    weights = []
    for layer in backbone.transformer_layers:
        mask = layer._compute_self_attention_mask(
            decoder_sequence=x,
            decoder_padding_mask=padding_mask,
            decoder_attention_mask=None,
            use_causal_mask=True,
            self_attention_cache=None,
            self_attention_cache_update_index=None,
        )
        query = layer._self_attention_layer_norm(x) if layer.normalize_first else x
        _, scores = layer._self_attention_layer(
            query=query, value=query, attention_mask=mask, return_attention_scores=True, training=False
        )
        weights.append(ops.convert_to_numpy(ops.cast(scores, "float32"))[0])  # float32 also under mixed precision
        x = layer(x, decoder_padding_mask=padding_mask, training=False)
    return Attention(
        text=text,
        tokens=[vocab.tokens[i] for i in ids],
        ids=ids,
        weights=np.stack(weights),
        hidden=ops.convert_to_numpy(ops.cast(x, "float32"))[0],
    )
