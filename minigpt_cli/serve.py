"""An HTTP server speaking OpenAI's completions API over a trained run (``minigpt serve``'s library).

Starlette (routing, requests, server-sent events) served by uvicorn, with
pydantic checking each request: the ASGI stack FastAPI itself is built on,
without FastAPI's layer of dependency injection and OpenAPI pages, which
this one fixed endpoint does not need; all three are widely used and
actively released. The model work is done by ``minigpt_cli.batching.Engine``
on one worker thread, requests that arrive together batched into one
compiled call. Usable without the CLI::

    engine = Engine(Generator(model, tokenizer), max_batch=64, batch_wait=0.005)
    engine.warm([SamplerSpec("greedy")], Controls())  # optional: trace before the first request
    app = create_app(engine, "books", defaults=GenerateConfig())
    run(app, bind("127.0.0.1", 8000), on_ready=print)

From a shell, with ``minigpt serve -r runs/books`` running::

    curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"prompt": "the old king", "max_tokens": 30, "temperature": 0}'
    curl -sN http://127.0.0.1:8000/v1/completions -d '{"prompt": "the old king", "stream": true}'

With OpenAI's Python client (not a dependency of minigpt)::

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="the --api-key, or anything without one")
    print(client.completions.create(model="books", prompt="the old king", max_tokens=30).choices[0].text)
    for chunk in client.completions.create(model="books", prompt="the old king", stream=True):
        print(chunk.choices[0].text, end="", flush=True)

Endpoints: ``POST /v1/completions``, ``GET /v1/models`` (the run, by its
directory name), ``GET /v1/models/{id}``, ``GET /health`` (status and the
batching counters: requests, batches, rows, ...).

How OpenAI's parameters map onto minigpt's samplers (``job_for``):
``temperature`` 0 is greedy; else ``top_k`` (an extension) is top-k, and
``top_p`` below 1 is top-p, at ``temperature`` (default: the run's); else
the run's ``[generate]`` sampler, ``k``, ``p`` and ``temperature`` as
``minigpt generate`` uses them. ``stop`` (a string or up to 4) replaces
``generate.stop``; the run's other decoding controls (repetition penalty,
n-gram ban, min-p, end at paragraph) apply to every request.
``max_tokens`` defaults to ``generate.max_tokens``; a row makes at most what
fits the model's window after its prompt (``finish_reason`` "length").
``finish_reason`` is "stop" for a stop text or a ``[BOS]`` the model wrote
(with ``end_at_paragraph``). ``seed`` gives exactly the tokens of
``minigpt generate --seed S`` (``--num-samples n`` for ``n``; the request
runs in a batch of its own). ``echo``, ``logprobs``, ``best_of``,
``suffix``, ``logit_bias`` and the two penalties are accepted at their
neutral values only (what clients send by default). The text is minigpt's
readable text (as ``minigpt generate`` prints it: no leading space).

Refusals, in OpenAI's error shape ``{"error": {"message", "type", "param",
"code"}}``, never a 500: malformed JSON, a body that is not an object, an
unknown field, a wrong type or an out-of-range value, a prompt too long for
the window: 400 naming the field (OpenAI answers these with 400, and its
clients raise ``BadRequestError``); a body over ``Limits.body_bytes``: 413;
a missing or wrong API key: 401; another model name: 404.

Auth: with an API key, every ``/v1/`` request needs ``Authorization: Bearer
KEY``; ``/health`` stays open (for probes; it tells counters, not text).

Shutdown (``run``): SIGTERM or Ctrl-C closes the listening socket, lets the
requests in flight finish (streams included), drains the engine and returns.
A client that leaves before its answer frees its rows at the next chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from minigpt_cli.batching import Engine, Job, RequestError
from minigpt_cli.config import GenerateConfig
from minigpt_cli.errors import MinigptError
from minigpt_cli.samplers import SEED_LIMIT, SamplerSpec, controls


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (beyond these: 400 naming the field, or 413 for the body).

    The model's window sets two more: ``max_tokens`` at most window - 1, and a
    prompt at most window - 2 tokens (it needs its ``[BOS]`` and one new token).
    """

    body_bytes: int = 64 * 1024
    prompts: int = 32  # prompts in a list
    n: int = 16  # completions per prompt
    rows: int = 64  # prompts x n
    stops: int = 4  # stop texts, as OpenAI allows
    stop_chars: int = 200


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of ``POST /v1/completions``: OpenAI's fields that minigpt serves, plus ``top_k``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | list[str] = ""
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


#: OpenAI fields minigpt does not implement, accepted at their neutral values (clients send some by default).
NEUTRAL: dict[str, tuple] = {
    "echo": (False,),
    "logprobs": (0,),
    "best_of": (1,),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "suffix": ("",),
    "logit_bias": ({},),
}


def _neutral(value: Any, allowed: tuple) -> bool:
    return value is None or any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


#: Temperatures below this are greedy (0 is greedy; dividing logits by less overflows float32).
GREEDY_BELOW = 1e-6


def parse_request(body: bytes) -> CompletionRequest:
    """The checked request, or ``RequestError`` naming what is wrong."""

    def no_constants(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(body, parse_constant=no_constants)
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise RequestError(400, None, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(400, None, f"the request body must be a JSON object, got {type(data).__name__}")
    try:  # JSON may spell lone surrogates (\ud800), which are not text: nothing downstream could encode them
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(400, None, "the request holds a string that is not text (a lone surrogate)") from None
    for name, allowed in NEUTRAL.items():
        if name in data and not _neutral(data.pop(name), allowed):
            raise RequestError(400, name, f"'{name}' is not supported by this server; leave it out")
    try:
        return CompletionRequest.model_validate(data)
    except ValidationError as e:
        raise _field_error(e) from None


def _field_error(e: ValidationError) -> RequestError:
    """The first problem pydantic found, as a 400 naming its field."""
    error = e.errors()[0]
    name = str(error["loc"][0]) if error["loc"] else None
    if error["type"] == "extra_forbidden":
        return RequestError(400, name, f"Unrecognized request argument supplied: {name}")
    if name == "prompt" and len({err["loc"][0] for err in e.errors()}) == 1:
        return RequestError(400, name, "'prompt' must be a string or a list of strings (token ids are not supported)")
    if name == "stop" and len({err["loc"][0] for err in e.errors()}) == 1:
        return RequestError(400, name, "'stop' must be a string or a list of strings")
    where = ".".join(str(part) for part in error["loc"])
    return RequestError(400, name, f"invalid '{where}': {error['msg']}")


def job_for(req: CompletionRequest, defaults: GenerateConfig, window: int, vocab_size: int, limits: Limits) -> Job:
    """The engine's ``Job`` for a checked request: limits applied, OpenAI's parameters mapped (module docstring)."""
    prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
    if not prompts:
        raise RequestError(400, "prompt", "'prompt' is an empty list; give a string or a list of strings")
    if len(prompts) > limits.prompts:
        raise RequestError(400, "prompt", f"'prompt' has {len(prompts)} prompts; at most {limits.prompts}")
    if req.n > limits.n:
        raise RequestError(400, "n", f"'n' is {req.n}; at most {limits.n}")
    if len(prompts) * req.n > limits.rows:
        raise RequestError(400, "n", f"{len(prompts)} prompts x n={req.n} completions; at most {limits.rows} in all")
    room = window - 1  # new tokens after an empty prompt's [BOS]
    if req.max_tokens is not None and req.max_tokens > room:
        raise RequestError(400, "max_tokens", f"'max_tokens' is {req.max_tokens}; the model's window allows {room}")
    if req.top_k is not None and req.top_k > vocab_size:
        raise RequestError(400, "top_k", f"'top_k' is {req.top_k}; the vocabulary has {vocab_size} tokens")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > limits.stops:
        raise RequestError(400, "stop", f"'stop' has {len(stops)} texts; at most {limits.stops}")
    if any(not s or len(s) > limits.stop_chars for s in stops):
        raise RequestError(400, "stop", f"each 'stop' text needs 1 to {limits.stop_chars} characters")
    if req.stream_options is not None and not req.stream:
        raise RequestError(400, "stream_options", "'stream_options' needs 'stream': true")
    if req.top_k is not None and req.top_p is not None and req.top_p < 1:
        raise RequestError(400, "top_p", "give 'top_k' or 'top_p' below 1, not both: the server samples with one rule")
    t = req.temperature
    if t is not None and t < GREEDY_BELOW:  # 0, or so small that logits / t overflow: the likeliest token
        t = 0
    if t == 0:
        spec = SamplerSpec("greedy", temperature=defaults.temperature)
    elif req.top_k is not None:
        spec = SamplerSpec("topk", k=req.top_k, temperature=t or defaults.temperature, seed=req.seed)
    elif req.top_p is not None and req.top_p < 1:
        spec = SamplerSpec("topp", p=req.top_p, temperature=t or defaults.temperature, seed=req.seed)
    else:
        spec = default_spec(defaults, temperature=t, seed=req.seed)
    if spec.name == "greedy":
        spec = replace(spec, seed=None)  # greedy draws nothing: a seed must not keep it out of batches
    try:
        spec.check(vocab_size=vocab_size)
        ctl = controls(defaults, stop=stops or None)
    except MinigptError as e:  # the run's own [generate] settings; checked at start-up too
        raise RequestError(400, None, str(e)) from None
    max_tokens = req.max_tokens if req.max_tokens is not None else min(defaults.max_tokens, room)
    return Job(prompts, req.n, max_tokens, spec, ctl, stream=req.stream)


def default_spec(defaults: GenerateConfig, temperature: float | None = None, seed: int | None = None) -> SamplerSpec:
    """The run's ``[generate]`` sampler as ``minigpt generate`` makes it; beam search is refused (it cannot batch)."""
    if defaults.sampler == "beam":
        raise MinigptError(
            "generate.sampler is beam, which the server cannot batch or stream; "
            "choose another with --set generate.sampler=topk (or greedy, random, topp)"
        )
    t = defaults.temperature if temperature is None else temperature
    return SamplerSpec(defaults.sampler, k=defaults.k, p=defaults.p, temperature=t, seed=seed)


# --- the app ------------------------------------------------------------------------------------------


def _error(e: RequestError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (before reading it, when its length is declared)."""
    declared = request.headers.get("content-length")
    too_big = RequestError(413, None, f"the request body is over {limit:,} bytes", code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise too_big
    return bytes(body)


def create_app(engine: Engine, model_id: str, defaults: GenerateConfig, api_key: str | None = None,
               limits: Limits = Limits(), created: int | None = None) -> Starlette:  # fmt: skip
    """The ASGI app: routes, auth, limits; the engine starts and stops with it (finishing what is queued)."""
    gen = engine.gen
    window, vocab_size = gen.seq_len, gen.model.backbone.vocabulary_size
    default_spec(defaults)  # refuse beam search now, not per request
    created = int(time.time()) if created is None else created
    model_card = {"id": model_id, "object": "model", "created": created, "owned_by": "minigpt"}

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise RequestError(401, None, "missing API key: send 'Authorization: Bearer KEY'", code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode("latin-1", "replace"), api_key.strip().encode()):
            raise RequestError(401, None, "incorrect API key", code="invalid_api_key")

    async def completions(request: Request) -> Response:
        authorize(request)
        req = parse_request(await read_body(request, limits.body_bytes))
        if req.model is not None and req.model != model_id:
            raise RequestError(404, "model", f"the model '{req.model}' does not exist; this server has '{model_id}'",
                               code="model_not_found")  # fmt: skip
        job = job_for(req, defaults, window, vocab_size, limits)
        await engine.submit(job)
        watch = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            first = await job.events.get()
        except BaseException:
            job.cancelled = True
            watch.cancel()
            raise
        if first[0] == "error":
            watch.cancel()
            raise first[1]
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}  # fmt: skip
        prompt_tokens = first[1]
        if req.stream:
            watch.cancel()  # the stream watches for itself (Starlette cancels it on a disconnect)
            usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(_events(job, head, prompt_tokens, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        try:
            choices, error = await _collect(job)
        except BaseException:  # cancelled (the client left, or shutdown ran out of time): free the job's rows
            job.cancelled = True
            raise
        finally:
            watch.cancel()
        if error is not None:
            raise error
        tokens = sum(c.pop("tokens") for c in choices)
        return JSONResponse({**head, "choices": choices, "usage": _usage(prompt_tokens, tokens)})

    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [model_card]})

    async def model(request: Request) -> Response:
        authorize(request)
        if request.path_params["model_id"] != model_id:
            raise RequestError(404, "model", f"the model '{request.path_params['model_id']}' does not exist",
                               code="model_not_found")  # fmt: skip
        return JSONResponse(model_card)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_id, **engine.stats, "queued": engine.queued})

    async def request_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, RequestError)
        return _error(e, {"WWW-Authenticate": "Bearer"} if e.status == 401 else None)

    async def http_error(request: Request, e: Exception) -> Response:
        assert isinstance(e, HTTPException)
        kind = "invalid_request_error" if e.status_code < 500 else "server_error"
        message = f"{request.method} {request.url.path}: {e.detail}"
        return _error(RequestError(e.status_code, None, message, kind=kind), e.headers)

    async def server_error(request: Request, e: Exception) -> Response:
        return _error(RequestError(500, None, "internal server error", kind="server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.close()  # uvicorn has let every open request finish by now

    return Starlette(
        routes=[
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", model, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
        ],
        exception_handlers={RequestError: request_error, HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    total = prompt_tokens + completion_tokens
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total}


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Drop a job's rows when its client goes away before the answer (the body is read by now)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancelled = True
            return


async def _collect(job: Job) -> tuple[list[dict], RequestError | None]:
    """Every row's answer, by choice index, and the error that ended the job early (if one did)."""
    choices: list[dict] = []
    error = None
    while (event := await job.events.get())[0] != "end":
        if event[0] == "done":
            _, index, text, reason, tokens = event
            choices.append({"text": text, "index": index, "logprobs": None, "finish_reason": reason, "tokens": tokens})
        elif event[0] == "error":
            error = event[1]
    return sorted(choices, key=lambda c: c["index"]), error


async def _events(job: Job, head: dict, prompt_tokens: int, usage: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per piece of text, one with each row's ``finish_reason``, then ``[DONE]``."""

    def chunk(index: int, text: str, reason: str | None) -> str:
        choice = {"text": text, "index": index, "logprobs": None, "finish_reason": reason}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    tokens = 0
    try:
        while (event := await job.events.get())[0] != "end":
            if event[0] == "piece":
                yield chunk(event[1], event[2], None)
            elif event[0] == "done":
                tokens += event[4]
                yield chunk(event[1], "", event[3])
            elif event[0] == "error":
                yield f"data: {json.dumps(event[1].body())}\n\n"
        if usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': _usage(prompt_tokens, tokens)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled = True  # a no-op once the job has ended; otherwise the client left: free its rows


# --- running it ---------------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one), IPv4 or IPv6."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found.sort(key=lambda info: info[0] != socket.AF_INET)  # "localhost": 127.0.0.1, where clients look first
    family, kind, proto, _, address = found[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise MinigptError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(2048)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run(app: Starlette, sock: socket.socket, on_ready: Callable[[str], Any], graceful_seconds: float = 60) -> None:
    """Serve ``app`` on ``sock`` until SIGTERM or Ctrl-C; ``on_ready(url)`` once requests are accepted.

    On either, uvicorn stops accepting (the socket closes), lets the requests
    in flight finish (up to ``graceful_seconds``; a second Ctrl-C cuts them
    off), then the app's lifespan drains the engine; this returns normally,
    so the process can exit 0.
    """
    import uvicorn

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=graceful_seconds)  # fmt: skip
    server = uvicorn.Server(config)

    async def main() -> None:
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        if server.started:
            on_ready(url_of(sock))
        await serving

    # uvicorn re-raises the signal it caught once it has shut down gracefully: that must not kill us now.
    previous = {sig: signal.signal(sig, lambda signum, frame: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        asyncio.run(main())
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
