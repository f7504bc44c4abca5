"""Dynamic batching for ``minigpt serve``: requests that arrive together run as one compiled call.

One worker thread owns the model (TensorFlow); the asyncio side only queues
``Job``s and reads their events, so the event loop never waits on the model.
The batcher takes the first queued job, waits up to ``batch_wait`` seconds
for more (up to ``max_batch`` rows; a job's rows are never split, so one
job of more rows runs alone), groups them by compiled-loop key (sampler and
its settings, decoding controls without stop texts: what
``Generator._loop`` compiles once) and runs each group as ONE batched call
of that loop: prompts padded into one token buffer with a mask, a prefill
of the positions the loop reads, then chunks of steps. Between chunks each
row's text is settled (``SettledText``), streamed rows get their pieces, and
rows that are done (their ``max_tokens``, a stop text, a ``[BOS]``) or whose
client left are answered or dropped; in a graph batch without a seed they
also leave the tensors, so they cost nothing more.

Seeds: a job with a seed runs in a batch of its own, its rows in
``minigpt generate``'s order (each prompt ``n`` times) and with its buffer
length, so it gets exactly the tokens ``minigpt generate --seed S
--num-samples n`` gives (batch-mates would change the random numbers a row
draws). Jobs without a seed share batches and draw on from the sampler's
random state (fresh per process; drawn afresh after a seeded job set it).

>>> engine = Engine(Generator(model, tokenizer), max_batch=64, batch_wait=0.005)  # doctest: +SKIP
>>> await engine.start()                                                         # doctest: +SKIP
>>> job = Job(["the king"], n=1, max_tokens=20, spec=SamplerSpec("greedy"), controls=Controls())  # doctest: +SKIP
>>> await engine.submit(job); print(await job.events.get())                      # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from minigpt_cli import backend
from minigpt_cli.samplers import SEED_LIMIT, Controls, SamplerSpec

log = logging.getLogger("minigpt.serve")


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, the request field it is about (``param``), and why."""

    def __init__(self, status: int, param: str | None, message: str, kind: str = "invalid_request_error",
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status, self.param, self.message, self.kind, self.code = status, param, message, kind, code

    def body(self) -> dict:
        """OpenAI's error shape."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request's work: ``n`` rows per prompt, and the queue its events arrive on.

    Events, in order: ``("start", prompt_tokens)`` or ``("error", RequestError)``;
    then per row, streamed ``("piece", index, text)`` and one ``("done", index,
    text, finish_reason, completion_tokens)``; last ``("end",)``. ``index`` is
    the OpenAI choice index: prompt ``i``'s ``j``-th row is ``i * n + j``.
    Setting ``cancelled`` drops the job's rows at the next chunk boundary.
    """

    prompts: list[str]
    n: int
    max_tokens: int
    spec: SamplerSpec
    controls: Controls
    stream: bool = False
    cancelled: bool = False
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop | None = None
    rows_left: int = 0

    @property
    def rows(self) -> int:
        return len(self.prompts) * self.n

    @property
    def key(self) -> Any:
        """Jobs with the same key can share one compiled call; a seeded job shares with nothing."""
        if self.spec.seed is not None:
            return id(self)
        return replace(self.spec, seed=None), replace(self.controls, stop=())

    def post(self, *event) -> None:
        """Hand an event to the job's reader (called from the worker thread)."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


@dataclass
class _Row:
    job: Job
    index: int
    encoded: list[int]
    new_tokens: int
    settled: Any  # SettledText
    pending_ids: list[int] = field(default_factory=list)
    pending_probs: list[float] = field(default_factory=list)

    @property
    def start(self) -> int:
        return len(self.encoded)


class Engine:
    """Batches ``Job``s into compiled generation calls on one worker thread (see the module docstring).

    Batches run the loop as a plain graph (one trace serves every batch
    size and length). With ``xla``, batches of up to ``XLA_ROWS`` rows of the
    settings ``warm`` compiled run under XLA instead, padded to a power of two
    rows and the model's window, so that a handful of compiles serve them
    all: several times faster for small batches on a CPU, where a graph's
    per-step overhead dominates; bigger batches gain little from XLA and
    stay in the graph. Seeded jobs always run the graph at ``minigpt
    generate``'s exact shapes.

    ``chunk_pause`` (seconds) sleeps between chunks: for tests and demos of
    streaming, disconnects and shutdown on a model too fast to watch.
    ``max_loops`` bounds the compiled loops kept (one per sampler setting
    seen; the least recently used goes first, never a warmed one), so
    clients sending ever new temperatures cannot grow memory without end.
    """

    #: Tokens per chunk of a batch with no streamed row (a streamed one uses ``Generator.CHUNKS``).
    BATCH_CHUNK = 16
    #: With ``xla``: the most rows a batch may have to run under XLA.
    XLA_ROWS = 4

    def __init__(self, generator, max_batch: int = 64, batch_wait: float = 0.005, chunk_pause: float = 0.0,
                 max_loops: int = 16, xla: bool = False):  # fmt: skip
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if batch_wait < 0:
            raise ValueError(f"batch_wait must be 0 or more, got {batch_wait}")
        self.gen = generator
        self.max_batch, self.batch_wait, self.chunk_pause = max_batch, batch_wait, chunk_pause
        self.max_loops, self.xla = max_loops, xla
        self.stats = {"requests": 0, "batches": 0, "xla_batches": 0, "rows": 0, "largest_batch": 0,
                      "dropped_rows": 0, "in_flight": 0, "active_rows": 0, "loops_compiled": 0}  # fmt: skip
        self._queue: asyncio.Queue[Job | None] | None = None
        self._held: Job | None = None  # taken from the queue but too big for the batch being filled
        self._task: asyncio.Task | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minigpt-model")
        self._recent: OrderedDict = OrderedDict()  # loop keys, least recently used first
        self._pinned: set = set()  # warmed loop keys: never forgotten
        self._xla_shapes: set = set()  # (job key, rows) that XLA compiled in ``warm``
        self._reseed: set[int] = set()  # samplers whose random state a seed set
        self._prefill_fn = None

    # --- the asyncio side ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the batcher on the running event loop."""
        self._queue = asyncio.Queue()
        self._event_loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._batcher(), name="minigpt-batcher")

    async def submit(self, job: Job) -> None:
        """Queue a job; read its ``events``."""
        if self._queue is None:
            raise RuntimeError("the engine is not started")
        job.loop, job.rows_left = asyncio.get_running_loop(), job.rows
        self.stats["requests"] += 1
        self.stats["in_flight"] += 1
        await self._queue.put(job)

    async def close(self) -> None:
        """Finish every queued and running job, then stop the batcher and the worker thread."""
        if self._queue is not None and self._task is not None:
            await self._queue.put(None)
            await self._task
        self._pool.shutdown(wait=True)

    @property
    def queued(self) -> int:
        return (self._queue.qsize() if self._queue else 0) + (self._held is not None)

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs, closing = await self._collect()
            live = [job for job in jobs if not job.cancelled]
            for job in jobs:
                if job.cancelled:  # its client left while it waited: answer its handler, run nothing
                    job.post("error", RequestError(400, None, "the client closed the connection", code="client_closed"))
                    job.post("end")
                    self._end(job, dropped=job.rows)
            groups: dict[Any, list[Job]] = {}
            for job in live:
                groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                await loop.run_in_executor(self._pool, self._run_batch, group)
            if closing:
                return

    async def _collect(self) -> tuple[list[Job], bool]:
        """The next batch's jobs (waiting up to ``batch_wait`` after the first), and whether to stop after it."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        first = self._held if self._held is not None else await self._queue.get()
        self._held = None
        if first is None:
            return [], True
        jobs, rows, deadline = [first], first.rows, loop.time() + self.batch_wait
        while rows < self.max_batch:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                job = self._queue.get_nowait()
            if job is None:
                return jobs, True
            if rows + job.rows > self.max_batch:
                self._held = job
                break
            jobs.append(job)
            rows += job.rows
        return jobs, False

    def _end(self, job: Job, dropped: int = 0) -> None:
        """A job that will get no more events (on the event loop)."""
        self.stats["dropped_rows"] += dropped
        self.stats["in_flight"] -= 1

    # --- the worker thread ---------------------------------------------------------------------------

    def warm(self, specs: list[SamplerSpec], controls: Controls) -> None:
        """Trace (and with ``xla``, compile per batch size) the loops of these settings before serving; blocks."""
        for spec in specs:
            job = Job([""], n=self.XLA_ROWS + 1, max_tokens=2, spec=replace(spec, seed=None), controls=controls)
            self._pool.submit(self._generate, [replace(job, rows_left=job.rows)]).result()  # the graph
            for size in self._buckets() if self.xla else []:
                if size <= self.max_batch or size == 1:
                    self._xla_shapes.add((job.key, size))
                    self._pool.submit(self._generate, [replace(job, n=size, rows_left=size)]).result()
        self._pinned |= set(self._recent)
        self.stats = dict.fromkeys(self.stats, 0)

    def _buckets(self) -> list[int]:
        """Row counts XLA compiles for: powers of two up to ``XLA_ROWS``."""
        return [2**i for i in range(self.XLA_ROWS.bit_length()) if 2**i <= self.XLA_ROWS]

    def _run_batch(self, jobs: list[Job]) -> None:
        try:
            self._generate(jobs)
        except Exception:  # a bug, not a bad request: the jobs still get an answer
            log.exception("generation failed")
            error = RequestError(500, None, "the server failed to generate this completion", kind="server_error")
            for job in jobs:
                if job.rows_left:
                    job.post("error", error)
                    job.rows_left = 0
                    job.post("end")
                    self._call_soon(self._end, job)

    def _call_soon(self, fn, *args) -> None:
        """Run ``fn`` on the event loop (the counters it keeps are the loop's); before ``start``, now."""
        if self._event_loop is None:
            fn(*args)
        else:
            self._event_loop.call_soon_threadsafe(fn, *args)

    def _encode(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt with the leading ``[BOS]`` (as ``Generator.encode``), in one tokenizer call."""
        import numpy as np

        ids = self.gen.tokenizer(prompts)  # a list of lists, a ragged tensor or (equal lengths) a tensor
        rows = ids.to_list() if hasattr(ids, "to_list") else ids if isinstance(ids, list) else np.asarray(ids)
        return [[self.gen.bos] + [int(i) for i in np.asarray(row).reshape(-1)] for row in rows]

    def _loop(self, spec: SamplerSpec, controls: Controls, xla: bool):
        key = (replace(spec, seed=None), replace(controls, stop=()), xla)
        if key not in self.gen._loops:
            self.stats["loops_compiled"] += 1
        self._recent[key] = None
        self._recent.move_to_end(key)
        for old in [k for k in self._recent if k not in self._pinned][: max(0, len(self._recent) - self.max_loops)]:
            del self._recent[old]
            self.gen._loops.pop(old, None)  # Generator keeps every loop it made: forget the oldest
        return self.gen._loop(spec, controls, xla)

    def _prefill(self):
        """A compiled ``prefill(token_ids, upto)``: the key/value cache of the first ``upto`` positions only.

        ``Generator._loop``'s prefill runs the whole buffer through the model,
        though the loop rewrites every position from the shortest prompt's end
        on before any query sees it (causal mask; ``[PAD]`` keys are masked).
        A batch's buffer is mostly room for new tokens, so this one runs only
        the positions the loop reads: the same cache where it matters, the
        same tokens, bit for bit, and about a quarter of the work. The cache
        layout is ``MiniGPTCausalLM._build_cache``'s; a plain graph, so that
        any shape goes (the XLA loop takes its output as it is).
        """
        if self._prefill_fn is None:
            import keras
            from keras import ops

            from minigpt_cli.backend import compiled

            model = self.gen.model
            backbone = model.backbone
            head_dim = backbone.embedding_dim // backbone.num_heads
            per_position = backbone.num_layers * 2 * backbone.num_heads * head_dim

            tensorflow = keras.config.backend() == "tensorflow"

            def fill(token_ids, upto):
                batch, length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
                cache = ops.zeros([batch, length * per_position], model.compute_dtype)
                # JAX compiles for static shapes: there the whole buffer goes through (the same cache up to
                # ``upto``, as each position's keys and values depend only on the tokens up to it).
                upto_ids = token_ids[:, :upto] if tensorflow else token_ids
                _, _, cache = model.call_with_cache(upto_ids, cache, 0, ops.not_equal(token_ids, 0))
                return cache

            signature = None
            if tensorflow:
                import tensorflow as tf

                signature = [tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([], tf.int32)]
            prefill = compiled(fill, model, [], xla=False, tf_signature=signature)
            self._prefill_fn = prefill
        return self._prefill_fn

    def _rows(self, jobs: list[Job]) -> list[_Row]:
        """The batch's rows; jobs with a prompt too long for the window get their error instead."""
        from minigpt_cli.generate import SettledText

        gen, window = self.gen, self.gen.seq_len
        encoded = iter(self._encode([p for job in jobs for p in job.prompts]))
        rows: list[_Row] = []
        for job in jobs:
            ids = [next(encoded) for _ in job.prompts]
            longest = max(len(e) for e in ids)
            if longest >= window:
                job.post("error", RequestError(
                    400, "prompt", f"the prompt is {longest - 1} tokens but the model's window is {window} tokens "
                    f"(room for {window - 2} prompt tokens and one new token); shorten it",
                    code="context_length_exceeded"))  # fmt: skip
                job.rows_left = 0
                job.post("end")
                self._call_soon(self._end, job)
                continue
            job.post("start", sum(len(e) - 1 for e in ids))
            for i, e in enumerate(ids):
                # A seeded job fits its new tokens to its longest prompt, as `minigpt generate` does.
                room = window - (longest if job.spec.seed is not None else len(e))
                for j in range(job.n):
                    rows.append(_Row(job, i * job.n + j, e, min(job.max_tokens, room), SettledText(gen, job.controls)))
        return rows

    def _generate(self, jobs: list[Job]) -> None:
        """Run these jobs (one compiled-loop key) as one batched call, handing out text as it settles."""
        import numpy as np
        from keras import ops

        from minigpt_cli.generate import _int

        rows = self._rows(jobs)
        if not rows:
            return
        gen, spec, seeded = self.gen, jobs[0].spec, jobs[0].spec.seed is not None
        size = next((b for b in self._buckets() if b >= len(rows)), 0)
        # JAX compiles for each shape: there every batch takes the bucketed shapes, compiled once each.
        xla = (jobs[0].key, size) in self._xla_shapes or (size > 0 and backend.name() == "jax")
        sampler, _, chunk = self._loop(spec, jobs[0].controls, xla)
        if seeded:
            gen._seed(sampler, spec)
            self._reseed.add(id(sampler))
        elif id(sampler) in self._reseed:  # it drew a seeded job's numbers: start it on fresh ones
            gen._seed(sampler, replace(spec, seed=random.SystemRandom().randrange(SEED_LIMIT)))
            self._reseed.discard(id(sampler))
        encoded = [r.encoded for r in rows]
        if xla:  # the shapes XLA compiled: rows padded to a power of two (copies of the first), the whole window
            encoded, length = encoded + [encoded[0]] * (size - len(rows)), gen.seq_len
        else:
            length = max(r.start + r.new_tokens for r in rows)
        token_ids, mask, probs = gen._buffers(encoded, length)
        index, last = min(r.start for r in rows), max(r.start + r.new_tokens for r in rows)
        cache = self._prefill()(token_ids, _int(index))
        self.stats["batches"] += 1
        self.stats["xla_batches"] += xla
        self.stats["rows"] += len(rows)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        self.stats["active_rows"] = len(rows)
        streaming = any(r.job.stream for r in rows)
        sizes = iter(gen.CHUNKS if streaming else ())
        size = gen.CHUNKS[0] if streaming else self.BATCH_CHUNK
        live = rows  # the rows at the tensors' positions (a padded XLA batch has more positions)
        try:
            while index < last and live:
                size = next(sizes, size)
                steps = min(size, last - index)
                token_ids, cache, end, probs = chunk(token_ids, cache, _int(index), mask, probs, _int(steps))
                end = int(ops.convert_to_numpy(end))
                block = ops.convert_to_numpy(token_ids[:, index:end])
                chosen = ops.convert_to_numpy(probs[:, index:end])
                stalled = end < index + steps  # every row wrote a [BOS]: the loop ended them all
                for pos, row in enumerate(live):
                    a, b = max(index, row.start), min(end, row.start + row.new_tokens)
                    if b > a:
                        row.pending_ids += [int(i) for i in block[pos, a - index : b - index]]
                        row.pending_probs += [float(x) for x in chosen[pos, a - index : b - index]]
                    self._settle(row, final=stalled or end >= row.start + row.new_tokens)
                index = end
                for row in live:
                    if row.job.cancelled and not row.settled.done:  # its client left
                        row.settled.done = True
                        self._finish(row, dropped=True)
                keep = [pos for pos, row in enumerate(live) if not row.settled.done]
                if not keep:
                    break
                # The rows left go on alone (a smaller batch costs less per step), except where that would
                # change the others' random numbers (a seeded batch) or the shapes XLA compiled.
                if len(keep) < len(live) and not seeded and not xla:
                    live = [live[pos] for pos in keep]
                    at = ops.convert_to_tensor(np.array(keep, dtype=np.int32))
                    token_ids, cache = ops.take(token_ids, at, axis=0), ops.take(cache, at, axis=0)
                    mask, probs = ops.take(mask, at, axis=0), ops.take(probs, at, axis=0)
                self.stats["active_rows"] = len(keep)
                if self.chunk_pause:
                    time.sleep(self.chunk_pause)
        finally:
            self.stats["active_rows"] = 0

    def _settle(self, row: _Row, final: bool) -> None:
        """Feed a row's new tokens to its text; post its piece and, once done, its answer."""
        if row.settled.done:
            return
        ids, controls = row.pending_ids, row.job.controls
        # A row nobody watches is rendered only when it ends, or when a stop text or [BOS] may end it now.
        if not (row.job.stream or final or controls.stop or (controls.end_at_paragraph and self.gen.bos in ids)):
            return
        piece = row.settled.add(ids, row.pending_probs, final)
        row.pending_ids, row.pending_probs = [], []
        if piece is not None and row.job.stream:
            row.job.post("piece", row.index, piece.text)
        if row.settled.done:
            self._finish(row)

    def _finish(self, row: _Row, dropped: bool = False) -> None:
        job = row.job
        if not dropped:
            reason = "length" if row.settled.stopped == "length" else "stop"
            job.post("done", row.index, row.settled.text, reason, len(row.settled.ids))
        job.rows_left -= 1
        if dropped:
            self._call_soon(self._count_dropped)
        if job.rows_left == 0:
            job.post("end")
            self._call_soon(self._end, job)

    def _count_dropped(self) -> None:
        self.stats["dropped_rows"] += 1
