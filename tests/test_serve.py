"""``minigpt serve``: a real server process on 127.0.0.1 and a real HTTP client (``http.client``).

One server runs for the module (``--port 0``, an API key from the
environment, a long batch wait so that requests sent together share a
batch, and a pause between chunks so that a stream is slow enough to leave
or to stop midway); the shutdown test starts its own.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import assert_user_error, minigpt, samples_json

KEY = "test-key-5e2d"
PROMPT = "the king"
LONG_PROMPT = "the old fisherman walked to the"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str

    @property
    def json(self):
        return json.loads(self.text)


class Server:
    """``minigpt serve`` in a subprocess; its standard error is collected as it comes."""

    def __init__(self, run: Path, *args: str, env: dict[str, str] | None = None):
        cmd = [sys.executable, "-m", "minigpt_cli", "serve", "-r", str(run), "--port", "0", *args]
        environ = {k: v for k, v in os.environ.items() if k != "MINIGPT_API_KEY"}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**environ, "PYTHONUNBUFFERED": "1", **(env or {})})  # fmt: skip
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                if line.startswith("serving on "):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(120)
        found = re.search(r"^serving on http://127\.0\.0\.1:(\d+)$", self.stderr, re.M)
        if not found:
            self.proc.kill()
            pytest.fail("the server did not start:\n" + self.stderr)
        self.port = int(found.group(1))

    @property
    def stderr(self) -> str:
        return "".join(self.lines)

    def connection(self, timeout: float = 60) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None, key: str | None = KEY,
                headers: dict | None = None) -> Reply:  # fmt: skip
        conn = self.connection()
        try:
            conn.request(method, path, body, _headers(key, headers))
            response = conn.getresponse()
            return Reply(response.status, dict(response.getheaders()), response.read().decode())
        finally:
            conn.close()

    def post(self, body: dict | bytes, key: str | None = KEY, headers: dict | None = None) -> Reply:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", "/v1/completions", raw, key, headers)

    def health(self) -> dict:
        return self.request("GET", "/health", key=None).json

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)


def _headers(key: str | None, extra: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return {**headers, **(extra or {})}


def sse(lines) -> list:
    """The ``data:`` payloads of a server-sent event stream: JSON objects, and the final ``"[DONE]"``."""
    events = []
    for line in lines:
        line = line.decode() if isinstance(line, bytes) else line
        if line.startswith("data: "):
            payload = line[len("data: ") :].strip()
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@pytest.fixture(scope="module")
def generated(trained_run, tmp_path_factory):
    """Start the ``minigpt generate`` commands the server's answers are compared with (they run as it starts)."""
    prompts = tmp_path_factory.mktemp("serve") / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n{LONG_PROMPT}\n")
    run = ("generate", "-r", trained_run, "--json")
    commands = {
        "greedy": (*run, "--sampler", "greedy", "--prompt", PROMPT, "--max-tokens", "10"),
        "topp": (
            *run,
            "--prompt-file",
            prompts,
            *"--sampler topp --p 0.6 --temperature 0.9 --seed 3".split(),
            *"--num-samples 2 --max-tokens 10".split(),
        ),  # fmt: skip
        "default": (*run, "--seed", "11", "--prompt", "the old", "--max-tokens", "12"),
    }
    with ThreadPoolExecutor(len(commands)) as pool:
        yield {name: pool.submit(minigpt, *args) for name, args in commands.items()}


@pytest.fixture(scope="module")
def reference(generated) -> dict[str, list[dict]]:
    """What ``minigpt generate`` gives for the prompts and settings the tests send the server."""
    return {name: samples_json(future.result()) for name, future in generated.items()}


@pytest.fixture(scope="module")
def server(trained_run, generated):
    s = Server(trained_run, "--batch-wait-ms", "150", "--chunk-pause-ms", "100", env={"MINIGPT_API_KEY": KEY})
    yield s
    assert s.stop() == 0, s.stderr


@pytest.fixture(scope="module")
def xla_server(trained_run):
    """A second server: XLA for small batches, one request at a time, a key from --api-key; SIGTERM ends it."""
    s = Server(trained_run, "--xla", "--max-batch", "1", "--batch-wait-ms", "0", "--chunk-pause-ms", "150",
               "--api-key", KEY)  # fmt: skip
    yield s
    if s.proc.poll() is None:
        s.proc.kill()


def texts(reply: Reply) -> list[str]:
    assert reply.status == 200, reply.text
    return [c["text"] for c in sorted(reply.json["choices"], key=lambda c: c["index"])]


# --- endpoints --------------------------------------------------------------------------------------------


def test_health_and_models(server, trained_run):
    health = server.health()
    assert health["status"] == "ok" and health["model"] == trained_run.name
    assert {"requests", "batches", "rows", "in_flight", "dropped_rows"} <= set(health)
    models = server.request("GET", "/v1/models")
    assert models.status == 200
    assert models.json["object"] == "list"
    assert [m["id"] for m in models.json["data"]] == [trained_run.name]
    assert server.request("GET", f"/v1/models/{trained_run.name}").json["id"] == trained_run.name
    missing = server.request("GET", "/v1/models/gpt-4")
    assert missing.status == 404 and missing.json["error"]["param"] == "model"
    assert server.request("GET", "/nowhere").status == 404
    wrong_method = server.request("GET", "/v1/completions")
    assert wrong_method.status == 405 and "error" in wrong_method.json


def test_greedy_answer_is_minigpt_generates(server, reference, trained_run):
    reply = server.post({"model": trained_run.name, "prompt": PROMPT, "max_tokens": 10, "temperature": 0})
    body = reply.json
    assert reply.status == 200
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == trained_run.name
    assert isinstance(body["created"], int)
    expected = reference["greedy"][0]
    assert body["choices"] == [{"text": expected["text"], "index": 0, "logprobs": None, "finish_reason": "length"}]
    usage = body["usage"]
    assert usage["completion_tokens"] == len(expected["token_ids"]) == 10
    assert usage["total_tokens"] == usage["prompt_tokens"] + 10 and usage["prompt_tokens"] >= 2


def test_seeded_answers_are_minigpt_generates(server, reference):
    body = {"prompt": [PROMPT, LONG_PROMPT], "n": 2, "seed": 3, "top_p": 0.6, "temperature": 0.9, "max_tokens": 10}
    reply = server.post(body)
    assert texts(reply) == [s["text"] for s in reference["topp"]]
    assert reply.json["usage"]["completion_tokens"] == sum(len(s["token_ids"]) for s in reference["topp"])
    assert texts(server.post(body)) == texts(reply)
    # No sampler named: the run's [generate] defaults (top-k, k=10), as `minigpt generate` uses them.
    assert texts(server.post({"prompt": "the old", "seed": 11, "max_tokens": 12})) == [reference["default"][0]["text"]]


def test_openai_fields_at_their_neutral_values_are_accepted(server):
    body = {"prompt": PROMPT, "max_tokens": 3, "echo": False, "logprobs": None, "best_of": 1, "user": "u1",
            "frequency_penalty": 0, "presence_penalty": 0.0, "suffix": None, "logit_bias": {}}  # fmt: skip
    reply = server.post(body)
    assert reply.status == 200, reply.text
    assert reply.json["usage"]["completion_tokens"] == 3


def test_stream_pieces_add_up_to_the_answer(server):
    body = {"prompt": PROMPT, "max_tokens": 20, "temperature": 0}
    whole = texts(server.post(body))[0]
    conn = server.connection()
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    conn.request("POST", "/v1/completions", json.dumps(streamed), _headers(KEY))
    response = conn.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type").startswith("text/event-stream")
    events = sse(response.read().splitlines())
    conn.close()
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
    pieces = [c["choices"][0]["text"] for c in chunks if c["choices"]]
    assert "".join(pieces) == whole
    assert sum(1 for p in pieces if p) >= 3  # token by token as the chunks come, not all at the end
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20


def test_stop_text_ends_the_answer(server):
    whole = texts(server.post({"prompt": PROMPT, "max_tokens": 20, "temperature": 0}))[0]
    word = whole.split()[2]
    reply = server.post({"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stop": [word, "zzz"]})
    choice = reply.json["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == whole[: whole.index(word)]


# --- batching ---------------------------------------------------------------------------------------------


def test_concurrent_requests_share_one_batched_call(server, reference):
    before = server.health()
    together = threading.Barrier(2)

    def ask(prompt: str) -> Reply:
        together.wait()
        return server.post({"prompt": prompt, "max_tokens": 10, "temperature": 0})

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(ask, [PROMPT, LONG_PROMPT])
    after = server.health()
    assert after["requests"] - before["requests"] == 2
    assert after["rows"] - before["rows"] == 2
    assert after["batches"] - before["batches"] == 1  # both in ONE compiled call
    assert texts(first) == [reference["greedy"][0]["text"]]
    assert texts(second) == texts(server.post({"prompt": LONG_PROMPT, "max_tokens": 10, "temperature": 0}))
    assert server.health()["batches"] - after["batches"] == 1  # alone, it made a call of its own


def test_a_seeded_request_runs_in_a_batch_of_its_own(server, reference):
    before = server.health()
    together = threading.Barrier(2)
    seeded = {"prompt": "the old", "seed": 11, "max_tokens": 12}

    def ask(body: dict) -> Reply:
        together.wait()
        return server.post(body)

    with ThreadPoolExecutor(2) as pool:
        first, _ = pool.map(ask, [seeded, {"prompt": "the old", "max_tokens": 12}])
    assert server.health()["batches"] - before["batches"] == 2
    assert texts(first) == [reference["default"][0]["text"]]


def test_a_client_leaving_mid_stream_frees_its_slot(server):
    before = server.health()
    conn = server.connection()
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "", "max_tokens": 31, "stream": True}), _headers(KEY))
    response = conn.getresponse()
    assert response.status == 200
    while not response.readline().startswith(b"data: "):
        pass
    response.close()
    conn.close()  # gone, with most of the 31 tokens still to come
    deadline = time.monotonic() + 20
    while (health := server.health())["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health["in_flight"] == 0 and health["active_rows"] == 0
    assert health["dropped_rows"] - before["dropped_rows"] == 1
    assert texts(server.post({"prompt": PROMPT, "max_tokens": 4})) != []  # and it keeps serving


# --- auth -------------------------------------------------------------------------------------------------


def test_api_key_is_required_on_v1(server):
    body = {"prompt": PROMPT, "max_tokens": 2}
    for key, headers in ((None, None), ("wrong-key", None), (None, {"Authorization": f"Basic {KEY}"})):
        reply = server.post(body, key=key, headers=headers)
        assert reply.status == 401, reply.text
        assert reply.json["error"]["code"] == "invalid_api_key"
        assert reply.headers.get("www-authenticate", reply.headers.get("WWW-Authenticate")) == "Bearer"
    assert server.request("GET", "/v1/models", key=None).status == 401
    assert server.post(body).status == 200
    assert server.request("GET", "/health", key=None).status == 200  # probes need no key


# --- bad requests -----------------------------------------------------------------------------------------

BAD = [
    (b"{not json", None),
    (b'{"prompt": "a", "temperature": NaN}', None),
    (b"[1, 2]", None),
    ({"prompt": "a", "frobnicate": 1}, "frobnicate"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": 100_000}, "top_k"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**32}, "seed"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"n": True}, "n"),
    ({"prompt": ["a"] * 8, "n": 16}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 1000}, "max_tokens"),
    ({"max_tokens": "5"}, "max_tokens"),
    ({"prompt": [1, 2]}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": ["a"] * 33}, "prompt"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"stop": ""}, "stop"),
    ({"stop": 5}, "stop"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"logprobs": 3}, "logprobs"),
    ({"echo": True}, "echo"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "\ud800 king"}, None),  # a lone surrogate: no text at all
    ({"model": "\udfff"}, None),
    ({"top_k": 5, "top_p": 0.5}, "top_p"),
]


@pytest.mark.parametrize("body, param", BAD, ids=[str(b)[:40] for b, _ in BAD])
def test_bad_request_gets_400_naming_the_field(server, body, param):
    reply = server.post(body)
    assert reply.status == 400, reply.text
    error = reply.json["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param, error
    if param:
        assert param in error["message"]


def test_a_tiny_temperature_is_greedy(server):
    """Below 1e-6 the logits / temperature would overflow: the server picks the likeliest token, as at 0."""
    answers = [server.post({"prompt": PROMPT, "max_tokens": 8, "temperature": t}) for t in (0, 1e-30)]
    assert all(a.status == 200 for a in answers), [a.text for a in answers]
    assert answers[0].json["choices"][0]["text"] == answers[1].json["choices"][0]["text"]


def test_prompt_longer_than_the_window(server):
    reply = server.post({"prompt": ["a", "the king " * 40], "max_tokens": 4})
    assert reply.status == 400
    assert reply.json["error"]["param"] == "prompt" and reply.json["error"]["code"] == "context_length_exceeded"
    assert "window is 32 tokens" in reply.json["error"]["message"]


def test_too_large_body_and_unknown_model(server):
    big = server.post({"prompt": "word " * 20_000})
    assert big.status == 413 and big.json["error"]["message"].startswith("the request body is over")
    conn = server.connection()  # no Content-Length: the body is counted as it comes
    parts = [b'{"prompt": "', *[b"word " * 1000] * 20, b'"}']
    conn.request("POST", "/v1/completions", iter(parts), _headers(KEY), encode_chunked=True)
    chunked = conn.getresponse()
    assert chunked.status == 413 and json.loads(chunked.read())["error"]["message"].startswith("the request body")
    conn.close()
    unknown = server.post({"model": "gpt-4", "prompt": PROMPT})
    assert unknown.status == 404 and unknown.json["error"]["param"] == "model"
    health = server.health()
    assert health["status"] == "ok" and health["in_flight"] == 0


# --- the command and shutdown -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--port", "70000"], "--port must be in [0, 65535]"),
        (["--max-batch", "0"], "--max-batch must be at least 1"),
        (["--set", "generate.sampler=beam"], "generate.sampler is beam"),
        (["--api-key", " "], "--api-key (or MINIGPT_API_KEY) is empty"),
    ],
)
def test_serve_bad_options(trained_run, args, fragment):
    assert_user_error(minigpt("serve", "-r", trained_run, *args), fragment)


def test_xla_server_answers_as_minigpt_generate(xla_server, reference):
    reply = xla_server.post({"prompt": PROMPT, "max_tokens": 10, "temperature": 0})
    assert texts(reply) == [reference["greedy"][0]["text"]]
    assert xla_server.health()["xla_batches"] == 1
    seeded = {"prompt": [PROMPT, LONG_PROMPT], "n": 2, "seed": 3, "top_p": 0.6, "temperature": 0.9, "max_tokens": 10}
    assert texts(xla_server.post(seeded)) == [s["text"] for s in reference["topp"]]
    assert xla_server.health()["xla_batches"] == 1  # a seeded request runs the graph, at generate's shapes
    assert xla_server.post({"prompt": PROMPT}, key=None).status == 401


def test_sigterm_finishes_requests_in_flight_and_exits_0(xla_server):
    s = xla_server
    conn = s.connection()
    body = {"prompt": "", "max_tokens": 31, "stream": True, "temperature": 0}
    conn.request("POST", "/v1/completions", json.dumps(body), _headers(KEY))
    streamed = conn.getresponse()
    first = streamed.readline()
    assert first.startswith(b"data: ")
    with ThreadPoolExecutor(1) as pool:  # a second request, queued behind the stream
        queued = pool.submit(s.post, {"prompt": PROMPT, "max_tokens": 20, "temperature": 0})
        deadline = time.monotonic() + 10
        while s.health()["in_flight"] < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        s.proc.send_signal(signal.SIGTERM)
        refused, deadline = False, time.monotonic() + 5
        while not refused and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
                time.sleep(0.02)
            except ConnectionRefusedError:
                refused = True
        rest = sse([first, *streamed.read().splitlines()])
        second = queued.result(timeout=30)
    assert refused, "the server still accepted connections after SIGTERM"
    assert rest[-1] == "[DONE]"
    assert [c["choices"][0]["finish_reason"] for c in rest[:-1]][-1] == "length"
    assert second.status == 200 and second.json["usage"]["completion_tokens"] == 20
    assert s.proc.wait(30) == 0, s.stderr
    assert "stopped: 4 requests" in s.stderr
