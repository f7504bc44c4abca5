"""``minigpt export``: a trained run as a KerasHub preset, a TensorFlow SavedModel, ONNX or LiteRT (CLI layer only;
the library is ``minigpt_cli.export``).

minigpt export -r runs/simplebooks --format saved-model --out exports/simplebooks-sm
minigpt export -r runs/simplebooks --format onnx --out exports/simplebooks-onnx --force   # replace an old one
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

ExportFormat = Literal["keras-hub", "saved-model", "onnx", "litert"]


def export(
    format: Annotated[
        ExportFormat,
        typer.Option(
            "--format",
            help="keras-hub: a KerasHub preset folder; saved-model: a TensorFlow SavedModel, text in and text out; "
            "onnx / litert: the forward pass (token ids -> logits).",
        ),
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder to write: new, empty, or an earlier export (--force).")
    ],
    config: ConfigOpt = None,
    run_dir: RunDirOpt = None,
    set_: SetOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an earlier export in --out (its minigpt-export.json names its format), once the new one is "
            "complete.",
        ),
    ] = False,
) -> None:
    """Export the run's trained model for use outside minigpt; writes --out and its minigpt-export.json."""
    from minigpt_cli.errors import MinigptError
    from minigpt_cli.export import check_request

    cfg, run = _setup(config, run_dir, set_, find_trained=True)
    check_request(run, format, out_dir, force)  # before TensorFlow loads
    _load_tensorflow(cfg)
    import keras

    if keras.config.backend() != "tensorflow":
        raise MinigptError(
            f"minigpt export runs on the TensorFlow backend (SavedModel, LiteRT and ONNX go through it), not "
            f"{keras.config.backend()}; run it with KERAS_BACKEND=tensorflow (model.keras is the same on every backend)"
        )
    from minigpt_cli.export import export as export_run

    with err.status(f"exporting {run.root} as {format}..."):
        result = export_run(run, cfg, format, out_dir, force)
    check = ""
    if result.check:
        check = f"; logits match Keras' within {result.check['max_abs_logit_diff']:.1e} ({result.check['runtime']})"
    out.print(
        f"exported {run.root} as {format} in {result.seconds:.1f}s -> {result.out} "
        f"({len(result.files)} files, {result.size / 1e6:.2f} MB{check}); how to load it: "
        f"{result.out / 'minigpt-export.json'}",
        markup=False,
    )


# At the end: cli.py imports this module at its end, and this module may be imported first.
from minigpt_cli.cli import (  # noqa: E402
    ConfigOpt,
    RunDirOpt,
    SetOpt,
    _load_tensorflow,
    _setup,
    err,
    out,
)
