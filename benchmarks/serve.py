"""Serving under load: requests/s and latency at 1, 8 and 64 concurrent clients, batched and one at a time.

    python benchmarks/serve.py --run runs/books
    python benchmarks/serve.py --run runs/books --requests 256 --max-tokens 32 --clients 1 8 64

Starts two ``minigpt serve`` processes on 127.0.0.1 on the same run:
batched (``--max-batch 64 --batch-wait-ms 5``, the defaults) and one
request at a time (``--max-batch 1``: every request its own compiled call,
as a server without batching runs them). Both are warmed; then, for each
client count, the clients send ``--requests`` completions in all (each
client one after the other on a kept-alive connection; a measurement stops
issuing new ones after ``--time-limit`` seconds; at least 8 per client), each ``--max-tokens`` new
tokens with the run's default sampler from one of a few short prompts. The
two servers take turns, ``--rounds`` times, and the best round counts (the
machine is shared and noisy). Reported: requests/s (completed / wall time),
p50 and p99 latency, new tokens/s, requests per batched call, and at the
top client count the batched server's requests/s over the one-at-a-time
server's. Clients and servers share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPTS = [
    "the old king", "once upon a time", "she opened the door", "the little boy ran to", "in the morning the",
    "the ship sailed", "he looked at the", "there was a", "the dog barked at", "my mother said",
    "the forest was dark and", "they walked along the", "when the sun rose", "the children played",
    "the queen of the", "a long time ago",
]  # fmt: skip


class Server:
    """``minigpt serve`` in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, run: Path, *args: str):
        cmd = [sys.executable, "-m", "minigpt_cli", "serve", "-r", str(run), "--port", "0", *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                if "serving on" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(300)
        found = re.search(r"serving on http://127\.0\.0\.1:(\d+)", "".join(self.lines))
        if not found:
            self.proc.kill()
            raise SystemExit("the server did not start:\n" + "".join(self.lines))
        self.port = int(found.group(1))

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(60)

    def get(self, path: str) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())


def load(server: Server, clients: int, requests: int, max_tokens: int, time_limit: float) -> dict:
    """Send ``requests`` completions from ``clients`` concurrent clients; wall time, latencies, new tokens.

    The clients are coroutines on one event loop speaking plain HTTP/1.1 on
    kept-alive connections: light, so that they take little of the CPU the
    server shares with them.
    """
    return asyncio.run(_load(server.port, clients, requests, max_tokens, time_limit))


async def _load(port: int, clients: int, requests: int, max_tokens: int, time_limit: float) -> dict:
    latencies: list[float] = []
    tokens = 0
    issued = 0
    t0 = time.perf_counter()

    async def client() -> None:
        nonlocal tokens, issued
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while issued < requests and time.perf_counter() - t0 < time_limit:
                body = json.dumps({"prompt": PROMPTS[issued % len(PROMPTS)], "max_tokens": max_tokens}).encode()
                issued += 1
                start = time.perf_counter()
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                status = await reader.readline()
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                answer = json.loads(await reader.readexactly(length))
                latencies.append(time.perf_counter() - start)
                if b" 200 " not in status:
                    raise SystemExit(f"{status.decode().strip()}: {answer}")
                tokens += answer["usage"]["completion_tokens"]
        finally:
            writer.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"clients": clients, "requests": len(latencies), "seconds": wall, "rps": len(latencies) / wall,
            "p50": q[49], "p99": q[98], "tokens_per_second": tokens / wall}  # fmt: skip


def machine() -> str:
    from hardware import cpu_name  # benchmarks/, on the path as the script's folder

    cpu = cpu_name()
    from importlib.metadata import version

    libs = ", ".join(f"{name} {version(name)}" for name in ("tensorflow", "keras", "keras-hub", "starlette", "uvicorn"))
    return f"{cpu}, {os.cpu_count()} cores; Python {platform.python_version()}, {libs}"


def model_size(run: Path) -> str:
    config = (run / "config.toml").read_text()
    keys = {k: v for k, v in re.findall(r"^(seq_len|embed_dim|num_layers|num_heads|feed_forward_dim) = (\d+)", config,
                                        re.M)}  # fmt: skip
    vocab = sum(1 for _ in (run / "vocab.txt").open(encoding="utf-8"))
    return f"vocabulary {vocab:,}, " + ", ".join(f"{k} {v}" for k, v in keys.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained run directory")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--requests", type=int, default=256, help="requests per measurement, at least 8 per client")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of them counts")
    parser.add_argument("--time-limit", type=float, default=120, help="seconds per measurement before it stops")
    parser.add_argument("--batch-wait-ms", type=float, default=5)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--xla", action="store_true", help="serve with --xla (both servers)")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    print(f"model: {args.run} ({model_size(args.run)}); {args.max_tokens} new tokens per request, "
          f"the run's default sampler{', --xla' if args.xla else ''}; {args.requests} requests per measurement, "
          f"best of {args.rounds} interleaved rounds")  # fmt: skip
    setups = {
        "batched": ["--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms)],
        "one at a time": ["--max-batch", "1", "--batch-wait-ms", "0"],
    }
    servers = {label: Server(args.run, *flags, *(["--xla"] if args.xla else [])) for label, flags in setups.items()}
    results: dict[tuple[str, int], dict] = {}
    try:
        for server in servers.values():
            load(server, max(args.clients), max(args.clients), args.max_tokens, args.time_limit)  # warm-up
        for round_ in range(args.rounds):
            for clients in args.clients:
                for label, server in servers.items():
                    before = server.get("/health")
                    requests = max(args.requests, 8 * clients)  # enough for a steady state
                    r = load(server, clients, requests, args.max_tokens, args.time_limit)
                    after = server.get("/health")
                    r["per_call"] = r["requests"] / max(after["batches"] - before["batches"], 1)
                    print(f"round {round_ + 1}: {label:13} {clients:3} clients: {r['requests']:4} requests in "
                          f"{r['seconds']:6.1f} s, {r['rps']:7.1f} req/s, p50 {r['p50'] * 1000:6.0f} ms, "
                          f"p99 {r['p99'] * 1000:6.0f} ms, {r['per_call']:5.1f} requests per batched call",
                          flush=True)  # fmt: skip
                    if (label, clients) not in results or r["rps"] > results[label, clients]["rps"]:
                        results[label, clients] = r
    finally:
        for label, server in servers.items():
            if (code := server.stop()) != 0:
                print(f"warning: the {label} server exited with {code}")
    top, one = max(args.clients), min(args.clients)
    print()
    print("| server | clients | requests/s | p50 latency | p99 latency | new tokens/s | requests per call |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label in setups:
        for clients in args.clients:
            r = results[label, clients]
            print(f"| {label} | {clients} | {r['rps']:.1f} | {r['p50'] * 1000:.0f} ms | {r['p99'] * 1000:.0f} ms | "
                  f"{r['tokens_per_second']:,.0f} | {r['per_call']:.1f} |")  # fmt: skip
    ratio = results["batched", top]["rps"] / results["one at a time", top]["rps"]
    single = results["batched", top]["rps"] / results["one at a time", one]["rps"]
    print(f"\nat {top} clients: batched {ratio:.1f}x the one-at-a-time server's requests/s at {top} clients, "
          f"{single:.1f}x its requests/s at {one} client")  # fmt: skip


if __name__ == "__main__":
    main()
