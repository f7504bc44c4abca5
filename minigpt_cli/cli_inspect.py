"""``minigpt inspect``: views inside a tokenizer and a trained model (CLI layer only).

The numbers come from ``minigpt_cli.inspection``; this module reads the
input, checks the options and draws the views with rich (or prints
``--json``).

    minigpt inspect tokens "The old king's xylophone"
    minigpt inspect next --prompt "the old king" --k 10 --p 0.5 --temperature 0.8
    minigpt inspect surprise --file books/valid.txt --windows packed
    minigpt inspect attention "the old king walked to the castle" --out attention.png
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Annotated

import typer

inspect_app = typer.Typer(
    help="Look inside: how text splits into tokens, what the model predicts, where it attends.", no_args_is_help=True
)

# After inspect_app: cli.py imports this module at its end, and this module may be imported first.
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402

from minigpt_cli.cli import ConfigOpt, RunDirOpt, SetOpt, _load_run, _setup, out  # noqa: E402
from minigpt_cli.config import Windows  # noqa: E402
from minigpt_cli.errors import MinigptError  # noqa: E402

TextArg = Annotated[str | None, typer.Argument(help="The text ('-' reads standard input).", show_default=False)]
FileOpt = Annotated[str | None, typer.Option("--file", "-f", help="Read the text from a file ('-': standard input).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the view.")]


def _read_text(text: str | None, file: str | None) -> tuple[str, Path | None]:
    """The text to inspect, and the file it came from (None for an argument or standard input)."""
    if text is not None and file is not None:
        raise MinigptError("give a text or --file, not both")
    if text is None and file is None:
        raise MinigptError("give a text: an argument, --file FILE, or '-' for standard input")
    source = file if file is not None else text
    if source == "-":
        return sys.stdin.read(), None
    if file is None:
        return text or "", None
    try:
        return Path(file).read_text(encoding="utf-8"), Path(file)
    except FileNotFoundError:
        raise MinigptError(f"--file: no such file: {file}") from None
    except UnicodeDecodeError:
        raise MinigptError(f"--file: {file} is not UTF-8 text; convert it to UTF-8") from None
    except OSError as e:
        raise MinigptError(f"--file: cannot read {file}: {e.strerror or e}") from None


def _percent(x: float | None) -> str:
    """A probability as a percentage, with two significant digits below 0.1%."""
    if x is None:
        return ""
    if x >= 0.001:
        return f"{x:.1%}"
    return f"{100 * x:.2g}%" if x >= 1e-6 else "<0.0001%"


# --- tokens ---------------------------------------------------------------------------------------------------


@inspect_app.command()
def tokens(
    text: TextArg = None,
    file: FileOpt = None,
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    limit: Annotated[int, typer.Option(help="Words shown in the table (--json has all).")] = 60,
    as_json: JsonOpt = False,
) -> None:
    """How a text splits into word pieces: pieces, ids, [UNK]s, tokens per word (needs only vocab.txt)."""
    body, _ = _read_text(text, file)
    cfg, run = _setup(config, run_dir, set_, find_trained=True)
    vocab, _ = _load_run(run, cfg, need_model=False)
    from minigpt_cli.inspection import split_tokens
    from minigpt_cli.vocab import UNK

    split = split_tokens(body, vocab)
    if as_json:
        print(json.dumps(split.to_dict()))
        return
    line = Text()
    shades = ("rgb(120,190,255)", "rgb(255,200,120)")
    n = 0
    for w, word in enumerate(split.words):
        if w:
            line.append(" ")
        for i, piece in enumerate(word.pieces):
            if i:
                line.append("·", style="dim")
            style = "bold white on red" if piece == UNK else shades[n % 2]
            line.append(piece[2:] if piece.startswith("##") and len(piece) > 2 else piece, style=style)
            n += 1
    out.print(line)
    table = Table(show_edge=False, pad_edge=False)
    for name, justify in (("word", "left"), ("pieces", "left"), ("ids", "left"), ("tokens", "right")):
        table.add_column(name, justify=justify)
    for word in split.words[:limit]:
        pieces = Text()
        for i, piece in enumerate(word.pieces):
            pieces.append(("  " if i else "") + piece, style="bold red" if piece == UNK else "")
        count = Text(str(len(word.ids)), style="yellow" if len(word.ids) > 2 else "")
        table.add_row(Text(word.word), pieces, Text(" ".join(map(str, word.ids)), style="dim"), count)
    out.print(table)
    if len(split.words) > limit:
        out.print(Text(f"({len(split.words) - limit} more words; --limit or --json shows them)", style="dim"))
    unknown = Text(f"{split.unknown} [UNK]", style="bold red" if split.unknown else "")
    out.print(
        Text.assemble(
            f"{split.tokens:,} tokens for {len(split.words):,} words ({split.tokens_per_word:.2f} tokens/word, "
            f"{split.characters_per_token:.2f} characters/token); ",
            unknown,
            f"; vocabulary of {split.vocab_size:,} tokens{', lowercased' if split.lowercase else ''}",
        )
    )


# --- next -----------------------------------------------------------------------------------------------------


@inspect_app.command("next")
def next_(
    prompt: Annotated[str, typer.Option(help="Text to continue (default: none, predict after [BOS]).")] = "",
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    k: Annotated[int | None, typer.Option(help="Top-k's k (default: generate.k).")] = None,
    p: Annotated[float | None, typer.Option(help="Top-p's p (default: generate.p).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Temperature (default: generate.temperature).")] = None,
    top: Annotated[int, typer.Option(help="Likeliest tokens shown.")] = 15,
    as_json: JsonOpt = False,
) -> None:
    """The likeliest next tokens after a prompt, and what greedy, top-k, top-p and temperature do with them."""
    cfg, run = _setup(config, run_dir, set_, find_trained=True)
    g = cfg.generate
    k = g.k if k is None else k
    p = g.p if p is None else p
    temperature = g.temperature if temperature is None else temperature
    from minigpt_cli.samplers import SamplerSpec

    SamplerSpec("topk", k=k, temperature=temperature).check()  # before TensorFlow loads; k's ceiling below
    SamplerSpec("topp", p=p).check()
    if top < 1:
        raise MinigptError(f"--top must be at least 1, got {top}")
    vocab, model = _load_run(run, cfg, need_model=True)
    from minigpt_cli.inspection import next_tokens

    view = next_tokens(model, vocab, prompt, k=k, p=p, temperature=temperature, top=top)
    if as_json:
        print(json.dumps(view.to_dict()))
        return
    t_key = f"{temperature:g}"
    at = "" if t_key == "1" else f" at T={t_key}"
    out.print(Text.assemble("after ", (" ".join(view.context), "bold"), f"  ({len(view.context_ids)} tokens)"))
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("token", no_wrap=True, max_width=16)
    table.add_column("id", justify="right", style="dim")
    table.add_column("p", justify="right")
    if at:
        table.add_column(f"T={t_key}", justify="right", no_wrap=True)
    table.add_column("", no_wrap=True)
    table.add_column("greedy", justify="center")
    table.add_column(f"top-{k}", justify="right", style="cyan", no_wrap=True)
    table.add_column(f"top-p {p:g}", justify="right", style="magenta", no_wrap=True)
    best = view.candidates[0].tempered if view.candidates else 1.0
    for c in view.candidates:
        bar = "█" * max(1, round(8 * c.tempered / best)) if best > 0 else ""
        table.add_row(
            str(c.rank),
            Text(c.token, style="bold" if c.greedy else ""),
            str(c.id),
            _percent(c.probability),
            *([_percent(c.tempered)] if at else []),
            Text(bar, style="green"),
            Text("✓", style="bold green") if c.greedy else "",
            _percent(c.top_k),
            _percent(c.top_p),
        )
    out.print(table)
    out.print(Text.assemble("greedy picks ", (view.greedy_token, "bold green"), " (the likeliest at any temperature)"))
    for name, kept, style in ((f"top-k (k={k})", view.top_k, "cyan"), (f"top-p (p={p:g})", view.top_p, "magenta")):
        more = len(kept.ids) - sum(1 for c in view.candidates if c.id in set(kept.ids))
        hidden = f"; {more} of them below the table (--top {len(kept.ids)} shows them)" if more > 0 else ""
        out.print(
            Text.assemble(
                (name, style),
                f" draws from {len(kept.ids):,} token{'' if len(kept.ids) == 1 else 's'} holding "
                f"{kept.mass:.1%} of the probability{at}, "
                f"renormalized to 100%{hidden}",
            )
        )
    shown = view.candidates[:4]
    reshape = Table(title="temperature reshapes the distribution", show_edge=False, pad_edge=False)
    reshape.add_column("T", justify="right")
    reshape.add_column("entropy", justify="right")
    for c in shown:
        reshape.add_column(c.token, justify="right", no_wrap=True, max_width=12)
    for t, v in view.temperatures.items():
        reshape.add_row(
            t + ("*" if t == t_key else ""),
            f"{v['entropy_bits']:.2f} bits",
            *(_percent(c.by_temperature[t]) for c in shown),
            style="bold" if t == t_key else "",
        )
    out.print(reshape)


# --- surprise -------------------------------------------------------------------------------------------------


def _heat(bits: float, cap: float) -> str:
    """A color for a surprise: green (expected) through yellow to red (at or past a uniform guess, ``cap``)."""
    x = min(max(bits / cap, 0.0), 1.0) if cap > 0 else 1.0
    if x < 0.5:
        r, g, b = 70 + (230 - 70) * x * 2, 190 + (200 - 190) * x * 2, 90 - 40 * x * 2
    else:
        r, g, b = 230, 200 - (200 - 60) * (x - 0.5) * 2, 50 + 10 * (x - 0.5) * 2
    return f"rgb({round(r)},{round(g)},{round(b)})" + (" dim" if x < 0.15 else "")


@inspect_app.command()
def surprise(
    text: TextArg = None,
    file: FileOpt = None,
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    windows: Annotated[
        Windows | None, typer.Option(help="How to cut the text (default: data.windows, as evaluate).")
    ] = None,
    top: Annotated[int, typer.Option(help="Most surprising tokens listed.")] = 10,
    lines: Annotated[int, typer.Option(help="Lines of the text shown colored (0: all).")] = 40,
    as_json: JsonOpt = False,
) -> None:
    """A text colored token by token by the model's surprise (bits), its most surprising tokens, bits/char."""
    body, path = _read_text(text, file)
    if top < 0:
        raise MinigptError(f"--top must be at least 0, got {top}")
    if lines < 0:
        raise MinigptError(f"--lines must be at least 0 (0 shows all), got {lines}")
    if not body.strip():
        raise MinigptError("the text is empty; give some text (an argument, --file FILE, or '-' for standard input)")
    cfg, run = _setup(config, run_dir, set_, find_trained=True)
    vocab, model = _load_run(run, cfg, need_model=True)
    windows = windows or cfg.data.windows
    from minigpt_cli.inspection import join_pieces, surprise_text
    from minigpt_cli.inspection import surprise as score
    from minigpt_cli.vocab import BOS

    args = (windows, cfg.data.min_string_len, cfg.data.batch_size)
    view = score(model, vocab, [path], *args) if path else surprise_text(model, vocab, body, *args)
    if as_json:
        print(json.dumps(view.to_dict(top)))
        return
    cap = math.log2(view.vocab_size)
    line = Text()
    last = None
    shown_lines = 0
    for t in view.tokens:
        if t.token == BOS and t.bits is None:
            continue
        if last is None or t.line != last:
            shown_lines += 1
            if lines and shown_lines > lines:
                break
        if last is not None and t.line != last:
            line.append("\n")
        elif last is not None and not t.token.startswith("##"):
            line.append(" ")
        last = t.line
        shown = "↵" if t.token == BOS else t.token[2:] if t.token.startswith("##") else t.token
        line.append(shown, style="grey50 italic" if t.bits is None else _heat(t.bits, cap))
    out.print(line)
    total_lines = len({t.line for t in view.tokens if t.bits is not None})
    if lines and total_lines > lines:
        out.print(Text(f"… ({total_lines - lines:,} more lines; --lines 0 shows them all)", style="dim"))
    legend = Text.assemble(
        "bits: ",
        *[(f" {b:g} ", _heat(b, cap).replace(" dim", "") + " reverse") for b in (0, 1, 2, 4, 6, round(cap, 1))],
        f"  (red: no better than a uniform guess, log2 {view.vocab_size:,} = {cap:.1f} bits)",
        ("  ↵: a new line", "dim") if any(t.token == BOS and t.bits is not None for t in view.tokens) else "",
        ("  grey: not scored", "grey50 italic") if len(view.scored()) < len(view.tokens) - 1 else "",
    )
    out.print(legend)
    if top:
        table = Table(title=f"the {top} most surprising tokens", show_edge=False, pad_edge=False)
        table.add_column("#", justify="right", style="dim")
        table.add_column("token")
        table.add_column("bits", justify="right")
        table.add_column("p", justify="right")
        table.add_column("seen", justify="right", style="dim")
        table.add_column("after (the end of the context the model saw)", style="dim")
        for i, t in enumerate(view.most_surprising(top), 1):
            seen = view.context(t)
            context = ("… " if t.context_tokens > len(seen) else "") + join_pieces(seen)
            table.add_row(
                str(i), Text(t.token, style=_heat(t.bits, cap)), f"{t.bits:.2f}", _percent(t.probability),
                str(t.context_tokens), Text(context),
            )  # fmt: skip
        out.print(table)
    scored = len(view.scored())
    out.print(
        f"{view.bits_per_token:.3f} bits/token, {view.bits_per_character:.4f} bits/char over {scored:,} tokens "
        f"({view.characters:,} characters; {view.bits:,.1f} bits in all)"
    )
    e = view.evaluation()
    if e is None:
        why = (
            f"the text is shorter than one packed window of {view.seq_len + 1} tokens"
            if windows == "packed"
            else f"no line is longer than data.min_string_len={cfg.data.min_string_len} bytes"
        )
        out.print(Text(f"minigpt evaluate --windows {windows} scores none of it: {why}", style="dim"))
    else:
        same = " (all of them)" if e["tokens"] == scored else ""
        out.print(
            Text(
                f"minigpt evaluate --windows {windows} scores {e['tokens']:,} of them{same}: loss {e['loss']:.4f}  "
                f"perplexity {e['perplexity']:.2f}  bits/char {e['bits_per_character']:.4f}",
                style="dim",
            )
        )
    unscored = len(view.tokens) - scored - (1 if windows == "packed" else 0)
    if unscored > 0:
        out.print(
            Text(
                f"{unscored:,} tokens not scored: reference windows see only the first {view.seq_len} tokens "
                "of each line (--windows packed scores every token)",
                style="dim",
            )
        )


# --- attention ------------------------------------------------------------------------------------------------


@inspect_app.command("attention")
def attention_(
    text: TextArg = None,
    file: FileOpt = None,
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    out_png: Annotated[
        Path | None, typer.Option("--out", "-o", help="PNG to write (default: <run>/attention.png).")
    ] = None,
    top: Annotated[int, typer.Option(help="Strongest links listed per head.")] = 3,
    as_json: JsonOpt = False,
) -> None:
    """Attention weights of every layer and head for a short text: a PNG grid of heatmaps, the strongest links."""
    body, _ = _read_text(text, file)
    if top < 0:
        raise MinigptError(f"--top must be at least 0, got {top}")
    if not body.strip():
        raise MinigptError("the text is empty; give some text (an argument, --file FILE, or '-' for standard input)")
    cfg, run = _setup(config, run_dir, set_, find_trained=True)
    vocab, model = _load_run(run, cfg, need_model=True)
    from minigpt_cli.inspection import attention
    from minigpt_cli.plots import draw_attention

    view = attention(model, vocab, body.strip())
    png = out_png or run.root / "attention.png"
    draw_attention(view.tokens, view.weights, png, title=f"attention of {run.root.name}: {body.strip()[:80]}")
    if as_json:
        print(json.dumps({**view.to_dict(top), "png": str(png)}))
        return
    table = Table(show_edge=False, pad_edge=False)
    table.add_column("layer.head")
    table.add_column("strongest links (most above an even spread; [BOS] apart)")
    for name in ("on [BOS]", "on itself", "on the previous"):
        table.add_column(name, justify="right")
    for s in view.summaries(top):
        links = Text()
        for i, link in enumerate(s.links):
            links.append("   " if i else "")
            links.append(f"{link.query_token}", style="bold")
            links.append(f"@{link.query} → ", style="dim")
            links.append(f"{link.key_token}", style="bold cyan")
            links.append(f"@{link.key} {link.weight:.2f}", style="dim")
        table.add_row(f"{s.layer}.{s.head}", links, *(f"{x:.0%}" for x in (s.on_bos, s.on_self, s.on_previous)))
    out.print(
        Text.assemble(
            f"{len(view.tokens)} tokens: ",
            (" ".join(view.tokens), "bold"),
            f"  ({view.layers} layers × {view.heads} heads; a query's weights sum to 1 over itself and the tokens "
            "before it)",
        )  # fmt: skip
    )
    out.print(table)
    out.print(f"heatmaps -> {png}")
