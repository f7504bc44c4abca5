"""Export a trained run for use outside minigpt: a KerasHub preset, a TensorFlow SavedModel, ONNX or LiteRT.

Each export is built in a temporary folder beside ``out`` and renamed into place once it is complete, with
``minigpt-export.json`` (format, source run, model digest, vocabulary size, window, how to call it) at its top.

- ``keras-hub``: the task's ``save_to_preset`` (model, preprocessor, tokenizer). After ``import minigpt_cli.model``
  (which registers the classes), ``keras_hub.models.CausalLM.from_preset(DIR)`` loads it and ``generate("text")``
  runs our cached loop; ``keras_hub.upload_preset(URI, DIR)`` publishes it.
- ``saved-model``: text in, text out, for any TensorFlow program (the format TF Serving consumes; it needs
  the tensorflow_text ops, and is not tested under TF Serving here): WordPiece tokenization as the run's
  tokenizer (lowercased when the run's ``vocab.lowercase`` is true, with KerasHub's punctuation splitting),
  the cached generation loop and detokenization all in the graph (see ``serving_module``); loading it needs
  only ``tensorflow`` and ``tensorflow_text``.
- ``onnx`` and ``litert``: the forward pass (``token_ids``, ``padding_mask`` -> logits) through Keras'
  ``model.export``, checked with onnxruntime / LiteRT's interpreter (ai-edge-litert) when installed: the
  largest |difference| from Keras' own logits must be at most ``TOLERANCE`` (1e-4), or nothing is written.

The ``saved-model``, ``onnx`` and ``litert`` exports hold float32 copies of the weights: from a mixed-precision
(bf16/fp16) run their tokens can differ from those ``minigpt generate`` gives. ``keras-hub`` keeps the run's.

>>> run = RunDir(Path("runs/simplebooks"))                                          # doctest: +SKIP
>>> export(run, load_config(run.config), "saved-model", Path("exports/simplebooks"))  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path

from minigpt_cli.errors import MinigptError
from minigpt_cli.native import quiet_native_stderr
from minigpt_cli.runs import (
    RunDir,
    WriteError,
    _fix_for,
    _os_error_in,
    file_digest,
    fsync_dir,
    fsync_file,
    write_text,
)

FORMATS = ("keras-hub", "saved-model", "onnx", "litert")
MANIFEST = "minigpt-export.json"
#: Largest |difference| allowed between a converted model's logits and Keras' (a plain max-abs check).
TOLERANCE = 1e-4
#: A sampling temperature below this (0 included) is greedy: dividing logits by it would overflow float32.
GREEDY_BELOW = 1e-6
#: Modules a format's converter needs beyond minigpt's own dependencies, with the package that brings each.
CONVERTERS = {"onnx": (("tf2onnx", "tf2onnx"), ("onnx", "onnx"))}


@dataclass
class ExportResult:
    """What ``export`` wrote: the folder, its files and size, the time it took, the runtime check (if any)."""

    format: str
    out: Path
    files: list[str]
    size: int
    seconds: float
    check: dict | None = None
    manifest: dict = field(default_factory=dict)


# --- checks made before any work --------------------------------------------------------------------------


def check_request(run: RunDir, format: str, out: Path, force: bool) -> None:
    """Refuse, in one line and before TensorFlow loads, what cannot be exported to ``out``."""
    if format not in FORMATS:
        raise MinigptError(f"unknown export format '{format}'; choose one of {', '.join(FORMATS)}")
    missing = [package for module, package in CONVERTERS.get(format, ()) if find_spec(module) is None]
    if missing:
        raise MinigptError(f"the {format} export needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    run.require_vocab()
    run.require_model()
    out = Path(os.path.abspath(out))  # "--out .", "..", "a/.." name the folder itself
    root = run.root.resolve()
    if out.resolve() == root or out.resolve() in root.parents:
        raise MinigptError(f"--out {out} holds the run {run.root} itself; choose a folder outside it")
    check_out(out, force)


#: What the top of a run folder holds: a folder with one of them is never replaced, manifest or not.
RUN_FILES = ("model.keras", "config.toml")


def not_an_export(folder: Path) -> str | None:
    """Why ``folder`` is not an earlier export that ``--force`` may replace; ``None`` when it is one.

    An export has a ``minigpt-export.json`` holding a JSON object whose ``format`` is one of ``FORMATS``
    (an empty file or ``{}`` is not one), and no ``model.keras`` or ``config.toml`` at its top.
    """
    for name in RUN_FILES:
        if os.path.lexists(folder / name):
            return f"it holds {name}, as a run does"
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"it has no {MANIFEST}"
    except (OSError, ValueError):  # unreadable, a folder, not UTF-8, not JSON
        return f"its {MANIFEST} is not an export's"
    if not isinstance(manifest, dict) or manifest.get("format") not in FORMATS:
        return f"its {MANIFEST} names no export format"
    return None


def check_out(out: Path, force: bool) -> None:
    """``out`` must be absent, an empty folder, or (with ``force``) an earlier export to replace.

    ``force`` never replaces a folder that ``not_an_export`` rejects: a mistyped ``--out`` (a home folder,
    a parent of the run) would otherwise be deleted whole. A symbolic link or a mount point is refused
    outright (renaming it would move the link, or fail).
    """
    out = Path(os.path.abspath(out))
    try:
        try:
            os.lstat(out)
        except FileNotFoundError:
            return
        if out.is_symlink():
            raise MinigptError(f"--out {out} is a symbolic link; give the folder it points to, or another --out")
        if not out.is_dir():
            raise MinigptError(f"--out {out} exists and is not a folder; choose another --out")
        if os.path.ismount(out):
            raise MinigptError(f"--out {out} is a mount point, which cannot be replaced; choose a folder inside it")
        if next(out.iterdir(), None) is None:
            return
        why = not_an_export(out)
    except OSError as e:
        raise MinigptError(f"cannot use --out {out}: {e.strerror or e}; choose another --out") from None
    if not force:
        fix = "add --force to replace it" if why is None else "empty it yourself"
        raise MinigptError(f"--out {out} exists and is not empty; choose another folder, or {fix}")
    if why is not None:
        raise MinigptError(
            f"--out {out} is not an earlier export ({why}) and --force replaces only those; "
            "choose another folder, or empty this one yourself"
        )


# --- building in a temporary folder, then renaming it into place -------------------------------------------


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


@contextlib.contextmanager
def staged_folder(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``out`` to build in; on success it becomes ``out``.

    When ``out`` is absent or an empty folder, the temporary folder is renamed onto it in one step. An
    earlier export to replace (``force``, see ``check_out``) is renamed aside, the new folder renamed to
    ``out``, and then the old one deleted if it still holds an export's manifest (else it is left where it
    is). The new folder takes an existing ``out``'s permission bits.

    An error or an interruption (KeyboardInterrupt too) before the new folder is in place at ``out`` puts
    the earlier export back at ``out``, then removes the temporary folder: ``out`` is left as it was. What
    follows the last rename (fsync of the parent, deleting the old folder) is best-effort and never fails
    the export.
    """
    out = Path(os.path.abspath(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export-tmp", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the export is an ordinary folder
    except OSError as e:
        raise WriteError(out, e, then="run 'minigpt export' again") from e
    try:
        yield tmp
        _fsync_tree(tmp)
        check_out(out, force)  # again: something may have been written there meanwhile
        _move_into_place(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)  # after _move_into_place put any earlier export back
        error = None if isinstance(e, MinigptError) else _os_error_in(e)
        if error is not None:
            raise WriteError(out, error, then="run 'minigpt export' again") from e
        raise


def _move_into_place(tmp: Path, out: Path) -> None:
    replacing = False
    if out.is_dir():
        tmp.chmod(stat.S_IMODE(out.stat().st_mode))  # --out keeps its permission bits
        replacing = next(out.iterdir(), None) is not None
    if not replacing:
        os.replace(tmp, out)  # one step, also over an empty folder
    else:
        old = out.parent / f".{out.name}.{secrets.token_hex(4)}.export-old"
        try:
            os.rename(out, old)
            os.rename(tmp, out)
        except BaseException:
            _put_back(tmp, old, out)
            raise
    # The new export is in place: from here on nothing may fail it.
    with contextlib.suppress(OSError):
        fsync_dir(out.parent)
    if replacing:
        _discard(old)


def _put_back(tmp: Path, old: Path, out: Path) -> None:
    """After an error or interrupt during the swap: the earlier export back at ``out``, unless the new is there."""
    if not os.path.lexists(tmp):  # the second rename was done: the new export is in place
        _discard(old)
    elif os.path.lexists(old) and not os.path.lexists(out):
        try:
            os.rename(old, out)
        except OSError as e:
            raise MinigptError(
                f"the export failed and the earlier export could not be put back ({e.strerror or e}); "
                f"it is at {old}: rename it to {out}"
            ) from e


def _discard(old: Path) -> None:
    """Delete the earlier export renamed aside, best-effort, and only if it still is one."""
    if os.path.isdir(old) and not os.path.islink(old) and not_an_export(old) is None:
        shutil.rmtree(old, ignore_errors=True)


# --- the formats ------------------------------------------------------------------------------------------


def export_keras_hub(model, vocab, folder: Path) -> dict:
    """``save_to_preset`` of the task with our preprocessor and tokenizer; returns the manifest's details."""
    from minigpt_cli.model import MiniGPTCausalLMPreprocessor

    seq_len = model.backbone.sequence_length
    previous = model.preprocessor
    model.preprocessor = MiniGPTCausalLMPreprocessor(vocab.tokenizer(), sequence_length=seq_len)
    try:
        model.save_to_preset(str(folder))
    finally:
        model.preprocessor = previous
    return {
        "usage": (
            "import keras_hub, minigpt_cli.model  # minigpt registers the preset's classes\n"
            "lm = keras_hub.models.CausalLM.from_preset(DIR)\n"
            'lm.compile(sampler="greedy")  # or "top_k", "top_p", a keras_hub.samplers.Sampler...\n'
            f'lm.generate("the old king", max_length={seq_len})  # max_length counts [BOS] and the prompt'
        ),
        "upload": 'keras_hub.upload_preset("kaggle://USER/MODEL/keras/VARIATION", DIR)  # or "hf://USER/MODEL"',
    }


def serving_module(model, vocab):
    """A ``tf.Module`` whose functions run the model from text, with nothing but TensorFlow ops.

    - ``generate(prompt, max_tokens, temperature, top_k, top_p, seed)`` -> ``{"text", "token_ids"}``:
      ``prompt`` a batch of strings; each row gets ``n = min(max_tokens, window - longest prompt)`` new
      tokens, as ``minigpt generate`` gives them. ``temperature`` 0 (or any below ``GREEDY_BELOW``, 1e-6) is
      greedy (argmax); from there on the logits are divided by it, cut to the ``top_k`` likeliest (0: off)
      and to the smallest set holding ``top_p`` of the probability (1: off), and sampled with a stateless
      generator keyed by ``(seed, position)``: the same seed gives the same tokens for the same batch of
      prompts, though not the ones ``minigpt generate --seed`` draws. An empty ``prompt`` batch is an
      error (``InvalidArgumentError``: "prompt must hold at least one text").
      ``token_ids`` (int32, ``[batch, n]``) are the new tokens; ``text`` their detokenization: wordpieces
      joined by spaces, ``##`` pieces glued to the word before, ``[PAD]``/``[BOS]`` left out (this is
      ``minigpt generate --json``'s ``raw_text``; its ``text`` also removes the spaces around punctuation).
    - ``tokenize(text)`` -> ``{"token_ids", "length"}``: ``[BOS]`` and the WordPiece ids, ``[PAD]``-padded.
    - ``forward(token_ids)`` -> ``{"logits"}``: the uncached forward pass (``[PAD]`` = 0 masked).
    """
    import numpy as np
    import tensorflow as tf
    from keras import ops

    from minigpt_cli.vocab import BOS, PAD

    tokenizer = vocab.tokenizer()
    window = model.backbone.sequence_length
    bos, pad = tokenizer.token_to_id(BOS), tokenizer.token_to_id(PAD)

    def encode(prompt):
        """``[BOS]`` and the tokens of each prompt: a ragged ``[batch, None]`` int32 tensor."""
        pieces = tokenizer.tokenize(prompt)  # in a tf.function: KerasHub's tensorflow_text graph
        starts = tf.fill(tf.stack([pieces.nrows(out_type=tf.int32), 1]), tf.constant(bos, tf.int32))
        return tf.concat([tf.RaggedTensor.from_tensor(starts), tf.cast(pieces, tf.int32)], axis=1)

    def choose(logits, index, temperature, top_k, top_p, seed):
        def sample():
            scaled = logits / temperature
            vocab_size = tf.shape(scaled)[-1]

            def cut_top_k(x):
                kth = tf.math.top_k(x, k=tf.minimum(top_k, vocab_size)).values[:, -1:]
                return tf.where(x < kth, -np.inf, x)

            def cut_top_p(x):
                ordered = tf.sort(x, axis=-1, direction="DESCENDING")
                before = tf.math.cumsum(tf.nn.softmax(ordered), axis=-1, exclusive=True)
                cutoff = tf.reduce_min(tf.where(before < top_p, ordered, np.inf), axis=-1, keepdims=True)
                return tf.where(x < cutoff, -np.inf, x)

            scaled = tf.cond(top_k > 0, lambda: cut_top_k(scaled), lambda: scaled)
            scaled = tf.cond(top_p < 1, lambda: cut_top_p(scaled), lambda: scaled)
            key = tf.stack([seed, tf.cast(index, tf.int64)])
            return tf.random.stateless_categorical(scaled, 1, seed=key, dtype=tf.int32)[:, 0]

        def greedy():  # as KerasHub's GreedySampler: the argmax of the softmax
            return tf.argmax(tf.nn.softmax(logits), axis=-1, output_type=tf.int32)

        return tf.cond(temperature >= GREEDY_BELOW, sample, greedy)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string, name="prompt"),
            tf.TensorSpec([], tf.int32, name="max_tokens"),
            tf.TensorSpec([], tf.float32, name="temperature"),
            tf.TensorSpec([], tf.int32, name="top_k"),
            tf.TensorSpec([], tf.float32, name="top_p"),
            tf.TensorSpec([], tf.int64, name="seed"),
        ],
        autograph=False,
    )
    def generate(prompt, max_tokens, temperature, top_k, top_p, seed):
        ids = encode(prompt)
        lengths = tf.cast(ids.row_lengths(axis=1), tf.int32)
        longest, shortest = tf.reduce_max(lengths), tf.reduce_min(lengths)
        checks = [
            tf.debugging.assert_positive(tf.size(prompt), message="prompt must hold at least one text"),
            tf.debugging.assert_less(longest, window, message=f"a prompt is too long for the {window}-token window"),
            tf.debugging.assert_positive(max_tokens, message="max_tokens must be at least 1"),
            tf.debugging.assert_non_negative(temperature, message="temperature must be 0 (greedy) or more"),
            tf.debugging.assert_non_negative(top_k, message="top_k must be 0 (off) or more"),
            tf.debugging.assert_positive(top_p, message="top_p must be in (0, 1]"),
            tf.debugging.assert_less_equal(top_p, 1.0, message="top_p must be in (0, 1]"),
        ]
        with tf.control_dependencies(checks):
            new = tf.minimum(max_tokens, window - longest)
        total = longest + new
        token_ids = tf.pad(ids.to_tensor(default_value=pad), [[0, 0], [0, new]], constant_values=pad)
        in_prompt = tf.sequence_mask(lengths, total)
        cache = model._build_cache(token_ids)[1]

        def step(token_ids, cache, index):
            logits, _, cache = model.next_logits(token_ids, cache, index)
            token = choose(logits, index, temperature, top_k, top_p, seed)
            token = tf.where(in_prompt[:, index], token_ids[:, index], token)  # rows whose prompt goes on
            return ops.slice_update(token_ids, [0, index], token[:, None]), cache, index + 1

        token_ids, _, _ = tf.while_loop(lambda t, c, index: index < total, step, (token_ids, cache, shortest))
        new_ids = tf.gather(token_ids, lengths[:, None] + tf.range(new)[None, :], batch_dims=1)
        shown = tf.ragged.boolean_mask(new_ids, tf.logical_and(new_ids != pad, new_ids != bos))
        return {"text": tokenizer.detokenize(shown), "token_ids": new_ids}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")], autograph=False)
    def tokenize(text):
        ids = encode(text)
        return {"token_ids": ids.to_tensor(default_value=pad), "length": tf.cast(ids.row_lengths(axis=1), tf.int32)}

    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32, name="token_ids")], autograph=False)
    def forward(token_ids):
        mask = tf.cast(token_ids != pad, tf.int32)
        return {"logits": model({"token_ids": token_ids, "padding_mask": mask}, training=False)}

    module = tf.Module()
    module.model_variables = list(model.variables)
    module.generate, module.tokenize, module.forward = generate, tokenize, forward
    return module


def export_saved_model(model, vocab, folder: Path) -> dict:
    """A SavedModel with ``serving_default`` (text in, text out), ``tokenize`` and ``forward`` signatures.

    The format TF Serving consumes (it needs the tensorflow_text ops); tested here with ``tf.saved_model.load``.
    """
    import tensorflow as tf

    module = serving_module(model, vocab)
    signatures = {
        "serving_default": module.generate.get_concrete_function(),
        "tokenize": module.tokenize.get_concrete_function(),
        "forward": module.forward.get_concrete_function(),
    }
    tf.saved_model.save(module, str(folder), signatures=signatures)
    return {
        "signatures": {
            "serving_default": {
                "inputs": {
                    "prompt": "string [batch]",
                    "max_tokens": "int32 []",
                    "temperature": "float32 [] (below 1e-6, 0 included: greedy)",
                    "top_k": "int32 [] (0: off)",
                    "top_p": "float32 [] (1: off)",
                    "seed": "int64 [] (same seed, same tokens for the same batch)",
                },
                "outputs": {"text": "string [batch]", "token_ids": "int32 [batch, new tokens]"},
            },
            "tokenize": {"inputs": {"text": "string [batch]"}, "outputs": {"token_ids": "int32", "length": "int32"}},
            "forward": {"inputs": {"token_ids": "int32 [batch, <= seq_len]"}, "outputs": {"logits": "float32"}},
        },
        "usage": (
            "import tensorflow as tf, tensorflow_text  # tensorflow_text registers the tokenizer's ops\n"
            'generate = tf.saved_model.load(DIR).signatures["serving_default"]\n'
            'generate(prompt=tf.constant(["the old king"]), max_tokens=tf.constant(40), '
            "temperature=tf.constant(0.0), top_k=tf.constant(0), top_p=tf.constant(1.0), "
            'seed=tf.constant(0, tf.int64))["text"]'
        ),
    }


def _forward_signature(model) -> list:
    import tensorflow as tf

    seq_len = model.backbone.sequence_length
    return [
        {
            "token_ids": tf.TensorSpec([None, seq_len], tf.int32, name="token_ids"),
            "padding_mask": tf.TensorSpec([None, seq_len], tf.int32, name="padding_mask"),
        }
    ]


def _probe(model):
    """Two rows of token ids over the whole window (the second half ``[PAD]``) and their padding mask."""
    import numpy as np

    seq_len, vocab_size = model.backbone.sequence_length, model.backbone.vocabulary_size
    ids = np.random.default_rng(0).integers(3, vocab_size, size=(2, seq_len), dtype="int32")
    ids[1, seq_len // 2 :] = 0
    return ids, (ids != 0).astype("int32")


def _compare(format: str, runtime: str, got, model, ids, mask) -> dict:
    """The largest |difference| between ``got`` and Keras' logits; more than ``TOLERANCE`` (or NaN) refuses."""
    import numpy as np

    want = np.asarray(model({"token_ids": ids, "padding_mask": mask}, training=False))
    got = np.asarray(got)
    if got.shape != want.shape:
        raise MinigptError(
            f"the {format} model's logits have shape {list(got.shape)} under {runtime}, Keras' "
            f"{list(want.shape)}; nothing was written (report this, with the versions in use)"
        )
    diff = float(np.max(np.abs(got.astype("float64") - want)))
    if not np.isfinite(diff) or diff > TOLERANCE:
        raise MinigptError(
            f"the {format} model's logits differ from Keras' by up to {diff:.3g} under {runtime} "
            f"(more than {TOLERANCE:g}); nothing was written (report this, with the versions in use)"
        )
    return {"runtime": runtime, "max_abs_logit_diff": diff}


@contextlib.contextmanager
def _step(format: str, what: str, package: str, check: bool = False) -> Iterator[None]:
    """One line naming ``format`` for whatever fails in ``what`` (a converter, or the runtime that checks it).

    ``package`` is the one to reinstall when an import of it fails; an optional checker (``check``) may
    also be uninstalled, which skips its check. A ``MinigptError`` and an interrupt go through as they are.
    """
    try:
        yield
    except MinigptError:
        raise
    except Exception as e:
        text = str(e).strip()
        reason = f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__
        os_error = _os_error_in(e)
        tf = sys.modules.get("tensorflow")
        if isinstance(e, ImportError):
            fix = f"reinstall it (pip install --force-reinstall {package})"
            if check:
                fix += ", or uninstall it to export without this check"
            message = f"the {format} export cannot import {package} ({reason}); {fix}"
        elif os_error is not None:
            where = f" {os_error.filename}" if os_error.filename else ""
            folder = Path(os_error.filename).parent if os_error.filename else Path.cwd()
            message = (
                f"the {format} export failed while {what}: {os_error.strerror or os_error}{where}; "
                f"{_fix_for(os_error, folder)}, then run 'minigpt export' again"
            )
        elif check:
            message = (
                f"the {format} file failed to run under {package} while {what} ({reason}); nothing was written; "
                f"reinstall {package} (pip install --force-reinstall {package}), or uninstall it to export "
                "without this check"
            )
        else:
            kind = "TensorFlow " if tf is not None and isinstance(e, tf.errors.OpError) else ""
            message = (
                f"the {format} export failed while {what} ({kind}{reason}); nothing was written; check that "
                f"{package} is installed as minigpt needs it (pip install --force-reinstall {package}), then "
                "try again, or report this with the versions in use"
            )
        raise MinigptError(message) from e


#: The inputs of the forward-pass exports (onnx, litert), as their manifests describe them.
FORWARD_INPUTS = {"token_ids": "int32 [batch, seq_len]", "padding_mask": "int32 [batch, seq_len] (token_ids != 0)"}


def export_onnx(model, folder: Path) -> dict:
    """``model.onnx``: Keras' ``model.export(format="onnx")`` (tf2onnx), checked with onnxruntime if installed."""
    import logging
    import warnings

    path = folder / "model.onnx"
    logging.getLogger("tf2onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf2onnx and Keras' numpy-2 patch of it
        with _step("onnx", "converting the model (tf2onnx)", "tf2onnx"):
            model.export(str(path), format="onnx", input_signature=_forward_signature(model), verbose=False)
    details = {
        "file": path.name,
        "inputs": FORWARD_INPUTS,
        "outputs": {"Identity:0": "float32 [batch, seq_len, vocab_size]: the logits"},
        "usage": (
            "import onnxruntime\n"
            f'session = onnxruntime.InferenceSession("DIR/{path.name}")\n'
            'logits = session.run(None, {"token_ids": ids, "padding_mask": (ids != 0).astype("int32")})[0]'
        ),
    }
    if find_spec("onnxruntime") is not None:
        with _step("onnx", "checking its logits", "onnxruntime", check=True):
            import onnxruntime

            ids, mask = _probe(model)
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            got = session.run(None, {"token_ids": ids, "padding_mask": mask})[0]
            details["check"] = _compare("onnx", f"onnxruntime {onnxruntime.__version__}", got, model, ids, mask)
    return details


def export_litert(model, folder: Path) -> dict:
    """``model.tflite``: Keras' ``model.export(format="litert")``, checked with LiteRT's interpreter if installed."""
    path = folder / "model.tflite"
    with _step("litert", "converting the model (TensorFlow's LiteRT converter)", "tensorflow"):
        model.export(str(path), format="litert", input_signature=_forward_signature(model), verbose=False)
    details = {
        "file": path.name,
        "inputs": FORWARD_INPUTS,
        "outputs": {"output_0": "float32 [batch, seq_len, vocab_size]: the logits"},
        "usage": (
            "from ai_edge_litert.interpreter import Interpreter\n"
            f'runner = Interpreter(model_path="DIR/{path.name}").get_signature_runner()\n'
            'logits = runner(token_ids=ids, padding_mask=(ids != 0).astype("int32"))["output_0"]'
        ),
    }
    if find_spec("ai_edge_litert") is not None:
        with _step("litert", "checking its logits", "ai-edge-litert", check=True):
            from ai_edge_litert import __version__ as version
            from ai_edge_litert.interpreter import Interpreter

            ids, mask = _probe(model)
            with quiet_native_stderr():  # the interpreter's "INFO: Created TensorFlow Lite XNNPACK delegate" line
                runner = Interpreter(model_path=str(path)).get_signature_runner()
                (got,) = runner(token_ids=ids, padding_mask=mask).values()
            details["check"] = _compare("litert", f"ai_edge_litert {version}", got, model, ids, mask)
    return details


# --- the whole export -------------------------------------------------------------------------------------


def _float32(model):
    """The model as float32 (converters and the serving graph want it); a float32 model as it is."""
    if model.dtype_policy.name == "float32":
        return model
    from minigpt_cli.model import MiniGPTBackbone, MiniGPTCausalLM

    config = {k: v for k, v in model.backbone.get_config().items() if k not in ("name", "dtype", "trainable")}
    copy = MiniGPTCausalLM(MiniGPTBackbone(**config, dtype="float32"))
    copy.set_weights(model.get_weights())
    return copy


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("tensorflow", "tensorflow-text", "keras", "keras-hub", "tf2onnx", "onnx"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


def load_unchanged(path: Path, load):
    """``load(path)`` and the size and sha256 of what it read: ``path``'s digest, the same before and after.

    A digest that changed (a train saving a new ``model.keras`` meanwhile) refuses, in one line, since the
    manifest's checksum would not be that of the weights exported.
    """
    try:
        before = file_digest(path)
        model = load(path)
        after = file_digest(path)
    except OSError as e:
        raise MinigptError(
            f"cannot read {path}: {e.strerror or e}; make it readable, then run 'minigpt export' again"
        ) from None
    if after != before:
        raise MinigptError(f"{path} changed while it was read (is a train running?); try again")
    return model, before


#: The package to reinstall when a format's converter fails to import.
CONVERTER_PACKAGE = {"keras-hub": "keras-hub", "saved-model": "tensorflow", "onnx": "tf2onnx", "litert": "tensorflow"}


def export(run: RunDir, cfg, format: str, out: Path, force: bool = False) -> ExportResult:
    """Export the run's model (and vocabulary) to ``out`` in ``format``; see the module docstring.

    ``out`` must not exist, be an empty folder, or (with ``force``) be an earlier export to replace once the
    new export is complete (see ``check_out`` and ``staged_folder``). Nothing is left in ``out`` by a failed
    export. A mixed-precision run's model is exported as a float32 copy of its weights (all formats but
    ``keras-hub``), so its tokens can differ from those of a bf16/fp16 ``minigpt generate``.
    """
    from minigpt_cli import __version__

    out = Path(os.path.abspath(out))
    check_request(run, format, out, force)
    t0 = time.perf_counter()
    from minigpt_cli.model import load_model
    from minigpt_cli.vocab import BOS, PAD, UNK, read_vocabulary

    vocab = read_vocabulary(run.vocab, cfg.vocab)
    model, (model_bytes, model_sha256) = load_unchanged(run.model, lambda path: load_model(path, len(vocab)))
    with staged_folder(out, force) as folder:
        with _step(format, "exporting the model", CONVERTER_PACKAGE[format]):
            if format == "keras-hub":
                details = export_keras_hub(model, vocab, folder)
            else:
                model = _float32(model)
                shutil.copyfile(run.vocab, folder / "vocab.txt")
                if format == "saved-model":
                    details = export_saved_model(model, vocab, folder)
                elif format == "onnx":
                    details = export_onnx(model, folder)
                else:
                    details = export_litert(model, folder)
        manifest = {
            "format": format,
            "source": {
                "run": str(run.root.resolve()),
                "model_sha256": model_sha256,
                "model_bytes": model_bytes,
                "vocab_sha256": vocab.digest(),
            },
            "vocab_size": len(vocab),
            "seq_len": model.backbone.sequence_length,
            "lowercase": vocab.lowercase,
            "special_tokens": {token: vocab.tokens.index(token) for token in (PAD, UNK, BOS)},
            "prepend": BOS,
            "weights": "float32" if format != "keras-hub" else "as trained",
            **details,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "minigpt": __version__,
            "versions": _versions(),
        }
        write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        # Listed now: once the folder is in place, nothing may fail the export.
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        size = sum((folder / f).stat().st_size for f in files)
    return ExportResult(format, out, files, size, time.perf_counter() - t0, details.get("check"), manifest)
