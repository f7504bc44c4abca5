"""``minigpt serve``: OpenAI's completions API over a trained run (CLI layer only; the server is ``minigpt_cli.serve``).

minigpt serve -r runs/books                                  # http://127.0.0.1:8000/v1/completions
MINIGPT_API_KEY=secret minigpt serve -r runs/books --host 0.0.0.0 --port 8080
minigpt serve -r runs/books --port 0 --max-batch 32 --batch-wait-ms 10   # port 0: a free one, printed
"""

from __future__ import annotations

import ipaddress
from typing import Annotated

import typer

from minigpt_cli.errors import MinigptError


def serve(
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    host: Annotated[
        str, typer.Option(help="Address to listen on: 127.0.0.1 is this machine only, 0.0.0.0 every interface.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one, printed).")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="MINIGPT_API_KEY",
            show_default=False,
            help="Require 'Authorization: Bearer KEY' on /v1/ requests (default: the MINIGPT_API_KEY variable).",
        ),
    ] = None,
    max_batch: Annotated[int, typer.Option(help="Most rows (prompts x n) in one batched generation call.")] = 64,
    batch_wait_ms: Annotated[
        float, typer.Option(help="How long a batch's first request waits for others to join it, in ms.")
    ] = 5.0,
    xla: Annotated[
        bool | None,
        typer.Option(
            "--xla/--no-xla",
            help="Compile small batches (up to 4 rows) with XLA at start-up: slower start, faster small batches "
            "(default: on when generate.jit_compile is true).",
        ),
    ] = None,
    chunk_pause_ms: Annotated[
        float, typer.Option(hidden=True, help="Sleep between generation chunks (tests and demos of streaming).")
    ] = 0.0,
    best: BestOpt = False,
) -> None:
    """Serve the run's model over HTTP with OpenAI's completions API; batches requests that arrive together.

    POST /v1/completions (prompt, max_tokens, temperature, top_p, top_k, n,
    stop, seed, stream), GET /v1/models, GET /health. Listens on 127.0.0.1
    unless --host says otherwise. SIGTERM or Ctrl-C stops accepting, finishes
    the requests in flight and exits.
    """
    cfg, run = _setup(config, run_dir, set_, find_trained=True)
    if not 0 <= port <= 65535:
        raise MinigptError(f"--port must be in [0, 65535], got {port}")
    if max_batch < 1:
        raise MinigptError(f"--max-batch must be at least 1, got {max_batch}")
    if not 0 <= batch_wait_ms <= 1000:
        raise MinigptError(f"--batch-wait-ms must be in [0, 1000], got {batch_wait_ms}")
    if chunk_pause_ms < 0:
        raise MinigptError(f"--chunk-pause-ms must be 0 or more, got {chunk_pause_ms}")
    if api_key is not None and not api_key.strip():
        raise MinigptError("--api-key (or MINIGPT_API_KEY) is empty; give a key or leave it unset")
    from minigpt_cli.samplers import SamplerSpec, controls
    from minigpt_cli.serve import default_spec

    g = cfg.generate
    specs = [default_spec(g), SamplerSpec("greedy", temperature=g.temperature)]  # refuses beam search
    decoding = controls(g)
    run.require_vocab()
    model_file = _model_file(run, best)
    from minigpt_cli.serve import bind

    sock = bind(host, port)  # before the model loads: a port in use fails at once
    vocabulary, model = _load_run(run, cfg, best=best)
    from minigpt_cli.batching import Engine
    from minigpt_cli.generate import Generator
    from minigpt_cli.serve import create_app
    from minigpt_cli.serve import run as run_server

    generator = Generator(model, vocabulary.tokenizer(), jit_compile=g.jit_compile)
    xla = g.jit_compile == "true" if xla is None else xla
    engine = Engine(generator, max_batch=max_batch, batch_wait=batch_wait_ms / 1000,
                    chunk_pause=chunk_pause_ms / 1000, xla=xla)  # fmt: skip
    with err.status("compiling the generation loop..."):
        engine.warm(specs, decoding)  # the loops most requests use: temperature 0, the run's defaults
    name = run.root.resolve().name
    app = create_app(engine, name, g, api_key=api_key, created=int(model_file.stat().st_mtime))
    if not _loopback(host) and api_key is None:
        err.print(f"warning: listening on {host} without --api-key: anyone who can reach this port can use it")
    err.print(
        f"model '{name}' ({run.root}): window {generator.seq_len} tokens, sampler {specs[0].name}; "
        f"batches of up to {max_batch} rows, {batch_wait_ms:g} ms wait{', XLA for small ones' if xla else ''}; "
        f"API key {'required' if api_key else 'not required'}; SIGTERM or Ctrl-C stops"
    )
    run_server(app, sock, on_ready=lambda url: err.print(f"serving on {url}"))
    stats = engine.stats
    err.print(f"stopped: {stats['requests']} requests in {stats['batches']} batched calls ({stats['rows']} rows)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# At the end: cli.py imports this module at its end, and this module may be imported first.
from minigpt_cli.cli import BestOpt, ConfigOpt, RunDirOpt, SetOpt, _load_run, _model_file, _setup, err  # noqa: E402
