"""``minigpt export``: every format, loaded back in a fresh process, gives ``minigpt generate``'s greedy tokens.

The four exports and the reference numbers (``minigpt generate --sampler greedy --json``, our tokenizer's ids,
Keras' logits) are made once per module; each format is then checked in one subprocess of its own that
imports only what a consumer of that format would.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error, minigpt, samples_json

from minigpt_cli import export as export_module
from minigpt_cli.errors import MinigptError
from minigpt_cli.export import FORMATS, MANIFEST, staged_folder
from minigpt_cli.runs import RunDir

#: Capitals and a comma (lowercasing, punctuation split), and a shorter prompt in the same batch.
PROMPTS = ["The old King,", "the"]
#: More than fit the tiny model's 32-token window: clipped to it, as ``minigpt generate`` clips it.
MAX_TOKENS = 40
#: A low sampling temperature: the logits divided by it make the likeliest token win at most steps.
COLD = 0.05
#: What the in-graph tokenizer must split exactly as ours does.
TEXTS = [
    "",
    'The old King said: "Hello!"',
    "CAFÉ naïve Straße İstanbul ΣΊΣΥΦΟΣ",
    "日本語 text",
    "  tabs\tand\nnewlines  ",
    "a" * 120,
    "don't--stop...(really)",
    "the littlest kings' orchards",
    "ﬁne ½ Ⅻ ＡＢＣ",
]


def _python(script: str, *args, timeout: int = 300) -> dict:
    """Run ``script`` in a fresh interpreter; it prints one JSON object as its last line."""
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _vocab_size(run: Path) -> int:
    return len((run / "vocab.txt").read_text(encoding="utf-8").splitlines())


def _probe(run: Path) -> list[list[int]]:
    """Two rows over the 32-token window, the second half of the second row [PAD]."""
    size = _vocab_size(run)
    rows = [[3 + (7 * i + 5 * r) % (size - 3) for i in range(32)] for r in range(2)]
    rows[1][16:] = [0] * 16
    return rows


@dataclass
class Exported:
    root: Path
    folders: dict[str, Path]
    #: ``minigpt generate --sampler greedy --json``'s sample for each of PROMPTS.
    greedy: list[dict]


def _earlier_export(out: Path, format: str = "onnx") -> None:
    """What an earlier ``minigpt export`` leaves: a manifest naming its format, and its files."""
    out.mkdir()
    (out / MANIFEST).write_text(json.dumps({"format": format, "vocab_size": 100, "seq_len": 32}))
    (out / "old.txt").write_text("old export")


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory) -> Exported:
    """Every format exported through the CLI, and the greedy samples: onnx over an earlier export (--force),
    litert as "--out ." from inside an empty folder of mode 0o750 (which the export keeps)."""
    root = tmp_path_factory.mktemp("exports")
    _earlier_export(root / "onnx")
    (root / "litert").mkdir(mode=0o750)
    (root / "litert").chmod(0o750)
    commands = {f: ["export", "-r", trained_run, "--format", f, "--out", root / f] for f in FORMATS}
    commands["onnx"].append("--force")
    commands["litert"][-1] = "."
    cwd = {"litert": root / "litert"}
    generate = ["generate", "-r", trained_run, "--sampler", "greedy", "--json", "--max-tokens", MAX_TOKENS]
    with ThreadPoolExecutor(max_workers=3) as pool:
        runs = {f: pool.submit(minigpt, *args, cwd=cwd.get(f)) for f, args in commands.items()}
        greedy = pool.submit(minigpt, *generate, "--prompt-file", "-", stdin="\n".join(PROMPTS))
        for f, future in runs.items():
            result = future.result()
            assert result.returncode == 0, (f, result.stderr)
            assert result.stderr.strip() == "", (f, result.stderr)  # no converter chatter
            assert f"exported {trained_run} as {f}" in result.stdout
            assert f"-> {root / f} (" in result.stdout  # "--out ." named the folder itself
        samples = samples_json(greedy.result())
    assert [s["prompt"] for s in samples] == PROMPTS
    assert len(samples[0]["token_ids"]) == 32 - 5  # the window's room after [BOS] and 4 prompt tokens
    return Exported(root, {f: root / f for f in FORMATS}, samples)


REFERENCE = """
import json, sys
from pathlib import Path
import numpy as np
from minigpt_cli.config import load_config
from minigpt_cli.generate import Generator
from minigpt_cli.model import load_model
from minigpt_cli.runs import RunDir
from minigpt_cli.vocab import read_vocabulary

run, texts, probe = RunDir(Path(sys.argv[1])), json.loads(sys.argv[2]), np.array(json.loads(sys.argv[3]), "int32")
vocab = read_vocabulary(run.vocab, load_config(run.config).vocab)
model = load_model(run.model, len(vocab))
logits = model({"token_ids": probe, "padding_mask": (probe != 0).astype("int32")})
encoded = [Generator(model, vocab.tokenizer()).encode(t) for t in texts]
print(json.dumps({"encoded": encoded, "logits": np.asarray(logits).tolist()}))
"""


@pytest.fixture(scope="module")
def reference(trained_run) -> dict:
    """What minigpt itself gives: ``Generator.encode`` of TEXTS and PROMPTS, and Keras' logits for the probe."""
    ref = _python(REFERENCE, trained_run, json.dumps(TEXTS + PROMPTS), json.dumps(_probe(trained_run)))
    ref["logits"] = np.array(ref["logits"], dtype="float32")
    ref["prompts"] = ref["encoded"][len(TEXTS) :]
    return ref


def test_each_export_is_complete_with_its_manifest_and_nothing_beside_it(exported, trained_run):
    root, folders = exported.root, exported.folders
    assert sorted(p.name for p in root.iterdir()) == sorted(FORMATS)  # no temporary or old folder left
    assert not (folders["onnx"] / "old.txt").exists()  # --force replaced the earlier export
    assert folders["litert"].stat().st_mode & 0o777 == 0o750  # an empty --out keeps its permission bits
    model_sha256 = hashlib.sha256((trained_run / "model.keras").read_bytes()).hexdigest()
    expected_files = {
        "keras-hub": {"config.json", "task.json", "preprocessor.json", "tokenizer.json", "model.weights.h5"},
        "saved-model": {"saved_model.pb", "vocab.txt"},
        "onnx": {"model.onnx", "vocab.txt"},
        "litert": {"model.tflite", "vocab.txt"},
    }
    for f, folder in folders.items():
        manifest = json.loads((folder / MANIFEST).read_text())
        assert manifest["format"] == f
        assert manifest["source"]["model_sha256"] == model_sha256
        assert manifest["source"]["run"] == str(trained_run.resolve())
        assert (manifest["vocab_size"], manifest["seq_len"]) == (_vocab_size(trained_run), 32)
        assert manifest["special_tokens"] == {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2}
        assert expected_files[f] <= {p.name for p in folder.iterdir()}, f
    for f in ("onnx", "litert"):  # the export's own check against Keras' logits
        assert json.loads((folders[f] / MANIFEST).read_text())["check"]["max_abs_logit_diff"] < 1e-4


KERAS_HUB = """
import json, sys
import keras_hub
import minigpt_cli.model  # registers the preset's classes with Keras
from keras_hub.src.utils.preset_utils import _validate_backbone  # what upload_preset checks before uploading

folder, prompts = sys.argv[1], json.loads(sys.argv[2])
_validate_backbone(folder)
lm = keras_hub.models.CausalLM.from_preset(folder)
lm.compile(sampler="greedy")
window = lm.preprocessor.sequence_length
text = lm.generate(prompts[0], max_length=window, strip_prompt=True)
packed = lm.preprocessor.generate_preprocess(prompts, sequence_length=window)
lm.preprocessor = None  # the same generate(), on token ids
ids = lm.generate(packed, stop_token_ids=None)["token_ids"]
lengths = packed["padding_mask"].numpy().sum(axis=1)
print(json.dumps({
    "classes": [type(lm).__name__, type(lm.backbone).__name__],
    "text": text,
    "packed": [row[:n].tolist() for row, n in zip(packed["token_ids"].numpy(), lengths)],
    "new": [row[n:].tolist() for row, n in zip(ids, lengths)],
}))
"""


def test_keras_hub_preset_loads_with_from_preset_and_generates_the_same_greedy_tokens(exported, reference):
    greedy = exported.greedy
    got = _python(KERAS_HUB, exported.folders["keras-hub"], json.dumps(PROMPTS))
    assert got["classes"] == ["MiniGPTCausalLM", "MiniGPTBackbone"]
    assert got["packed"] == reference["prompts"]  # [BOS] first, then our tokenizer's ids
    for new, sample in zip(got["new"], greedy, strict=True):
        assert new[: len(sample["token_ids"])] == sample["token_ids"]
    assert got["text"] == greedy[0]["raw_text"]


SAVED_MODEL = """
import importlib.abc, importlib.util, json, sys
from pathlib import Path

class Blocked(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    '''Any import of keras, keras_hub or minigpt_cli fails (TensorFlow tries keras and carries on).'''
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("keras", "keras_hub", "minigpt_cli", "tf_keras"):
            return importlib.util.spec_from_loader(name, self)
    def create_module(self, spec):
        raise ImportError(f"{spec.name} is blocked")
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, Blocked())
import numpy as np
import tensorflow as tf

# tensorflow_text's kernels, loaded without its Python package (which builds Keras layers on import).
ops = Path(importlib.util.find_spec("tensorflow_text").submodule_search_locations[0]) / "python" / "ops"
for library in sorted(ops.glob("_*.so")):
    tf.load_op_library(str(library))

args = json.loads(sys.argv[1])
COLD = args["cold"]
loaded = tf.saved_model.load(args["folder"])
serve, tokenize, forward = (loaded.signatures[k] for k in ("serving_default", "tokenize", "forward"))

def generate(temperature=0.0, top_k=0, top_p=1.0, seed=0, max_tokens=args["max_tokens"], prompts=args["prompts"]):
    out = serve(prompt=tf.constant(prompts, tf.string), max_tokens=tf.constant(max_tokens),
                temperature=tf.constant(temperature), top_k=tf.constant(top_k), top_p=tf.constant(top_p),
                seed=tf.constant(seed, tf.int64))
    return out["token_ids"].numpy().tolist(), [t.decode() for t in out["text"].numpy()]

def encode(texts):
    out = tokenize(text=tf.constant(texts))
    return [row[:n] for row, n in zip(out["token_ids"].numpy().tolist(), out["length"].numpy().tolist())]

def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()

def chosen(ids, temperature=1.0):
    '''Per new token: how many tokens had a higher logit, the probability of those, and (numpy's reference)
    the probability of the argmax at ``temperature``.'''
    ranks, above, argmax_p = [], [], []
    for prompt, new in zip(encode(args["prompts"]), ids):
        logits = forward(token_ids=tf.constant([prompt + new]))["logits"].numpy()[0].astype("float64")
        for i, token in enumerate(new):
            step = logits[len(prompt) + i - 1]
            ranks.append(int((step > step[token]).sum()))
            above.append(float(softmax(step)[step > step[token]].sum()))
            argmax_p.append(float(softmax(step / temperature).max()))
    return {"ranks": ranks, "above": above, "argmax_p": argmax_p}

def error(**kwargs):
    try:
        generate(**kwargs)
    except tf.errors.InvalidArgumentError as e:
        return e.message
    return None

greedy_ids, greedy_text = generate()
topk = [generate(1.0, 5, 1.0, seed)[0] for seed in (7, 7, 8)]
topp = [generate(1.0, 0, 0.5, seed)[0] for seed in (7, 8, 9)]
cold = [generate(COLD, 0, 1.0, seed)[0] for seed in (1, 2, 3)]
print(json.dumps({
    "greedy": greedy_ids, "text": greedy_text, "encoded": encode(args["texts"]),
    "three": generate(max_tokens=3)[0], "tiny": generate(temperature=1e-38, seed=5)[0],
    "probe_logits": forward(token_ids=tf.constant(args["probe"]))["logits"].numpy().tolist(),
    "topk": topk, "topk_ranks": chosen(topk[0])["ranks"], "topp": [chosen(ids) for ids in topp],
    "cold": [chosen(ids, COLD) for ids in cold],
    "empty_batch": error(prompts=[]),
    "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("keras", "keras_hub", "minigpt_cli")),
}))
"""


@pytest.fixture(scope="module")
def saved_model(exported, trained_run) -> dict:
    args = {
        "folder": str(exported.folders["saved-model"]),
        "prompts": PROMPTS,
        "max_tokens": MAX_TOKENS,
        "texts": TEXTS,
        "probe": _probe(trained_run),
        "cold": COLD,
    }
    return _python(SAVED_MODEL, json.dumps(args))


def test_saved_model_runs_without_keras_and_generates_the_same_greedy_tokens(saved_model, exported):
    greedy = exported.greedy
    assert saved_model["imported"] == []
    assert saved_model["greedy"] == [s["token_ids"] for s in greedy]
    assert saved_model["text"] == [s["raw_text"] for s in greedy]


def test_saved_model_tokenizes_exactly_as_our_tokenizer(saved_model, reference):
    assert saved_model["encoded"] == reference["encoded"][: len(TEXTS)]


def test_saved_model_forward_gives_keras_logits(saved_model, reference):
    np.testing.assert_allclose(np.array(saved_model["probe_logits"]), reference["logits"], atol=1e-4, rtol=1e-4)


def test_saved_model_gives_max_tokens_new_tokens(saved_model, exported):
    assert saved_model["three"] == [s["token_ids"][:3] for s in exported.greedy]


def test_saved_model_refuses_an_empty_batch_in_one_message(saved_model):
    assert "prompt must hold at least one text" in saved_model["empty_batch"]


def test_saved_model_top_k_and_top_p_sample_valid_reproducible_tokens(saved_model):
    first, again, other = saved_model["topk"]
    assert first == again  # same seed, same batch: same tokens
    assert first != other  # another seed, other tokens (27 tokens among 5 choices each)
    assert max(saved_model["topk_ranks"]) < 5  # each token among the 5 likeliest
    topp = saved_model["topp"]
    assert max(max(t["above"]) for t in topp) < 0.5  # each token inside the 0.5 nucleus
    assert max(max(t["ranks"]) for t in topp) > 0  # and not always the likeliest: top-p is not greedy


def test_saved_model_divides_the_logits_by_the_temperature(saved_model, exported):
    """At COLD, the argmax is chosen about as often as numpy's softmax(logits / COLD) says (within 4 sd)."""
    ranks = [r for t in saved_model["cold"] for r in t["ranks"]]
    p = np.array([q for t in saved_model["cold"] for q in t["argmax_p"]])
    observed, expected, sd = sum(r == 0 for r in ranks), p.sum(), np.sqrt((p * (1 - p)).sum())
    assert abs(observed - expected) <= 4 * sd + 2, (observed, expected, sd)
    # Below GREEDY_BELOW the temperature is greedy (dividing by 1e-38 would overflow float32).
    assert saved_model["tiny"] == [s["token_ids"] for s in exported.greedy]


RUNTIME = """
import json, sys
import numpy as np

args = json.loads(sys.argv[1])
if args["format"] == "onnx":
    import onnxruntime
    session = onnxruntime.InferenceSession(args["file"], providers=["CPUExecutionProvider"])
    def logits(ids):
        return session.run(None, {"token_ids": ids, "padding_mask": (ids != 0).astype("int32")})[0]
else:
    from ai_edge_litert.interpreter import Interpreter
    runner = Interpreter(model_path=args["file"]).get_signature_runner()
    def logits(ids):
        return runner(token_ids=ids, padding_mask=(ids != 0).astype("int32"))["output_0"]

def greedy(prompt, new):
    '''The whole window through the model for every token, argmax of the last position's logits.'''
    ids = np.zeros((1, args["window"]), "int32")
    ids[0, : len(prompt)] = prompt
    for i in range(len(prompt), len(prompt) + new):
        ids[0, i] = np.argmax(logits(ids)[0, i - 1])
    return ids[0, len(prompt) : len(prompt) + new].tolist()

print(json.dumps({
    "probe_logits": logits(np.array(args["probe"], "int32")).tolist(),
    "greedy": [greedy(p, n) for p, n in zip(args["prompts"], args["new"])],
    "imported": sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras", "minigpt_cli")),
}))
"""


@pytest.mark.parametrize("format, file", [("onnx", "model.onnx"), ("litert", "model.tflite")])
def test_forward_pass_export_gives_keras_logits_and_greedy_tokens(format, file, exported, reference, trained_run):
    greedy = exported.greedy
    args = {
        "format": format,
        "file": str(exported.folders[format] / file),
        "window": 32,
        "probe": _probe(trained_run),
        "prompts": reference["prompts"],
        "new": [len(s["token_ids"]) for s in greedy],
    }
    got = _python(RUNTIME, json.dumps(args))
    assert got["imported"] == []  # the runtime alone
    np.testing.assert_allclose(np.array(got["probe_logits"]), reference["logits"], atol=1e-4, rtol=1e-4)
    assert got["greedy"] == [s["token_ids"] for s in greedy]


# --- bad input: one line, exit 2, nothing written ------------------------------------------------------------


def test_unknown_format_is_refused_by_the_command_line(trained_run, tmp_path):
    result = minigpt("export", "-r", trained_run, "--format", "tflite", "--out", tmp_path / "out")
    assert_user_error(result, "'tflite' is not one of", "keras-hub", "saved-model", "onnx", "litert")
    assert not (tmp_path / "out").exists()


def test_run_without_a_model_is_refused(trained_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("vocab.txt", "vocab.json", "config.toml"):
        (run / name).write_bytes((trained_run / name).read_bytes())
    result = minigpt("export", "-r", run, "--format", "onnx", "--out", tmp_path / "out")
    assert_user_error(result, "no trained model in", "minigpt train")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_non_empty_out_is_refused_without_force_and_left_alone(trained_run, tmp_path):
    out = tmp_path / "out"
    _earlier_export(out, "saved-model")
    result = minigpt("export", "-r", trained_run, "--format", "saved-model", "--out", out)
    assert_user_error(result, f"--out {out} exists and is not empty", "add --force to replace it")
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_replaces_only_an_earlier_export(trained_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    result = minigpt("export", "-r", trained_run, "--format", "onnx", "--out", out, "--force")
    assert_user_error(result, f"--out {out} is not an earlier export", "--force replaces only those")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_out_holding_the_run_is_refused(trained_run, tmp_path):
    run = tmp_path / "runs" / "r"  # a copy: a broken check must not reach the shared run's folders
    run.mkdir(parents=True)
    for name in ("vocab.txt", "vocab.json", "config.toml", "model.keras"):
        (run / name).write_bytes((trained_run / name).read_bytes())
    for out in (run, run.parent):
        result = minigpt("export", "-r", run, "--format", "onnx", "--out", out)
        assert_user_error(result, "holds the run")
    assert sorted(p.name for p in run.iterdir()) == ["config.toml", "model.keras", "vocab.json", "vocab.txt"]


def test_a_failed_export_leaves_nothing_and_the_old_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    _earlier_export(out)
    with pytest.raises(RuntimeError, match="converter failed"), staged_folder(out, force=True) as folder:
        (folder / "half.bin").write_bytes(b"half written")
        raise RuntimeError("converter failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "old.txt"]


def test_force_replaces_the_old_folder_only_once_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    _earlier_export(out)
    with staged_folder(out, force=True) as folder:
        (folder / "model.onnx").write_bytes(b"new")
        assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "old.txt"]  # the old one while the new is built
    assert [p.name for p in out.iterdir()] == ["model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_missing_converter_is_named_before_any_work(trained_run, tmp_path, monkeypatch):
    monkeypatch.setitem(export_module.CONVERTERS, "onnx", (("no_such_converter", "no-such-converter"),))
    with pytest.raises(MinigptError, match="the onnx export needs no-such-converter: pip install no-such-converter"):
        export_module.check_request(RunDir(trained_run), "onnx", tmp_path / "out", force=False)
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_symlink_is_refused(trained_run, tmp_path):
    target = tmp_path / "target"
    _earlier_export(target)
    link = tmp_path / "link"
    link.symlink_to(target)
    result = minigpt("export", "-r", trained_run, "--format", "saved-model", "--out", link, "--force")
    assert_user_error(result, f"--out {link} is a symbolic link")
    assert link.is_symlink() and sorted(p.name for p in target.iterdir()) == [MANIFEST, "old.txt"]


# --- --out checks, the swap, and one-line failures, without TensorFlow --------------------------------------


def test_out_is_made_absolute_and_a_mount_point_is_refused(trained_run, tmp_path, monkeypatch):
    run, here = RunDir(trained_run), tmp_path / "here"
    _earlier_export(here)
    monkeypatch.chdir(here)
    for out in (Path("."), Path("sub/..")):  # the earlier export itself: refused without --force, not with it
        with pytest.raises(MinigptError, match=f"^--out {here} exists and is not empty"):
            export_module.check_request(run, "saved-model", out, force=False)
        export_module.check_request(run, "saved-model", out, force=True)
    monkeypatch.setattr(export_module.os.path, "ismount", lambda path: Path(path) == here)
    with pytest.raises(MinigptError, match=f"^--out {here} is a mount point"):
        export_module.check_request(run, "saved-model", Path("."), force=True)


def test_staged_folder_builds_dot_into_the_current_folder(tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with staged_folder(Path("."), force=False) as folder:
        (folder / "model.onnx").write_bytes(b"new")
    assert [p.name for p in here.iterdir()] == ["model.onnx"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


@pytest.mark.parametrize(
    "files, why",
    [
        ({MANIFEST: ""}, f"its {MANIFEST} is not an export's"),
        ({MANIFEST: "{}"}, f"its {MANIFEST} names no export format"),
        ({MANIFEST: '{"format": "zip"}'}, f"its {MANIFEST} names no export format"),
        ({MANIFEST: '["onnx"]'}, f"its {MANIFEST} names no export format"),
        ({MANIFEST: '{"format": "onnx"}', "model.keras": ""}, "it holds model.keras, as a run does"),
        ({MANIFEST: '{"format": "onnx"}', "config.toml": ""}, "it holds config.toml, as a run does"),
    ],
)
def test_force_replaces_only_a_folder_whose_manifest_names_an_export_format(tmp_path, files, why):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in files.items():
        (out / name).write_text(text)
    with pytest.raises(MinigptError, match=f"is not an earlier export \\({why}\\)"):
        export_module.check_out(out, force=True)
    with pytest.raises(MinigptError, match="is not an earlier export"), staged_folder(out, force=True) as folder:
        (folder / "model.onnx").write_bytes(b"new")
    assert sorted(p.name for p in out.iterdir()) == sorted(files)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_out_that_cannot_be_looked_at_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(MinigptError, match="^cannot use --out .*/file/out: Not a directory; choose another --out$"):
        export_module.check_out(tmp_path / "file" / "out", force=False)


def _failing_rename(monkeypatch, call: int, error: BaseException, after: bool = False) -> None:
    """``os.rename``'s ``call``-th call raises ``error``: before renaming, or (``after``) once renamed."""
    rename, calls = os.rename, []

    def failing(src, dst):
        calls.append(src)
        if len(calls) == call and not after:
            raise error
        rename(src, dst)
        if len(calls) == call:
            raise error

    monkeypatch.setattr(export_module.os, "rename", failing)


@pytest.mark.parametrize("error", [KeyboardInterrupt(), OSError(errno.EIO, "I/O error")])
def test_a_swap_interrupted_before_the_new_folder_is_in_place_puts_the_earlier_export_back(
    tmp_path, monkeypatch, error
):
    out = tmp_path / "out"
    _earlier_export(out)
    _failing_rename(monkeypatch, 2, error)  # the first renames out aside, the second fails
    expected = KeyboardInterrupt if isinstance(error, KeyboardInterrupt) else MinigptError
    with pytest.raises(expected), staged_folder(out, force=True) as folder:
        (folder / "model.onnx").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "old.txt"]


def test_a_swap_interrupted_once_the_new_folder_is_in_place_keeps_it(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _earlier_export(out)
    _failing_rename(monkeypatch, 2, KeyboardInterrupt(), after=True)
    with pytest.raises(KeyboardInterrupt), staged_folder(out, force=True) as folder:
        (folder / "model.onnx").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["model.onnx"]


def test_what_follows_the_swap_cannot_fail_the_export_nor_delete_a_non_export(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _earlier_export(out)

    def fsync_dir(folder):  # meanwhile the folder renamed aside stops being an export
        if Path(folder) == tmp_path:
            for old in tmp_path.glob(".out.*.export-old"):
                (old / MANIFEST).write_text("{}")
            raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(export_module, "fsync_dir", fsync_dir)
    with staged_folder(out, force=True) as folder:
        (folder / "model.onnx").write_bytes(b"new")
    assert [p.name for p in out.iterdir()] == ["model.onnx"]
    (kept,) = tmp_path.glob(".out.*.export-old")  # not deleted: no longer holds an export's manifest
    assert sorted(p.name for p in kept.iterdir()) == [MANIFEST, "old.txt"]


@pytest.mark.parametrize(
    "error, check, message",
    [
        (
            ImportError("cannot load libonnxruntime.so"),
            True,
            "the onnx export cannot import onnxruntime (ImportError: cannot load libonnxruntime.so); reinstall it "
            "(pip install --force-reinstall onnxruntime), or uninstall it to export without this check",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/x/model.onnx"),
            False,
            "the onnx export failed while converting: Permission denied /x/model.onnx; make /x writable, "
            "then run 'minigpt export' again",
        ),
        (
            RuntimeError("[ONNXRuntimeError] : 1 : FAIL : bad graph\nmore detail"),
            True,
            "the onnx file failed to run under onnxruntime while converting (RuntimeError: [ONNXRuntimeError] : "
            "1 : FAIL : bad graph); nothing was written; reinstall onnxruntime",
        ),
        (
            ValueError("unsupported op\nmore detail"),
            False,
            "the onnx export failed while converting (ValueError: unsupported op); nothing was written; check "
            "that onnxruntime is installed",
        ),
    ],
)
def test_a_failing_converter_or_runtime_is_one_line_naming_the_format(error, check, message):
    with pytest.raises(MinigptError) as raised, export_module._step("onnx", "converting", "onnxruntime", check):
        raise error
    assert str(raised.value).startswith(message), str(raised.value)
    assert "\n" not in str(raised.value)


def test_an_interrupt_during_a_converter_is_not_turned_into_an_error():
    with pytest.raises(KeyboardInterrupt), export_module._step("onnx", "converting", "tf2onnx"):
        raise KeyboardInterrupt


def test_logits_of_another_shape_or_nan_are_refused_before_any_subtraction():
    want = np.zeros((2, 32, 10), "float32")

    def model(inputs, training):
        return want

    with pytest.raises(MinigptError, match=r"have shape \[1, 32, 10\] under rt, Keras' \[2, 32, 10\]"):
        export_module._compare("onnx", "rt", np.zeros((1, 32, 10)), model, None, None)  # would broadcast
    with pytest.raises(MinigptError, match="differ from Keras' by up to nan"):
        export_module._compare("onnx", "rt", np.full((2, 32, 10), np.nan), model, None, None)
    assert export_module._compare("onnx", "rt", want + 1e-5, model, None, None)["max_abs_logit_diff"] < 1.1e-5


def test_a_model_that_changes_while_it_is_loaded_is_refused(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"old weights")

    def load(path):  # a train saving its model meanwhile
        path.write_bytes(b"new weights")
        return "model"

    with pytest.raises(MinigptError, match=r"model.keras changed while it was read \(is a train running\?\); try"):
        export_module.load_unchanged(path, load)
    path.write_bytes(b"same")
    assert export_module.load_unchanged(path, lambda path: "model") == (
        "model",
        (4, hashlib.sha256(b"same").hexdigest()),
    )


def test_an_unreadable_model_is_one_line(tmp_path, monkeypatch):
    path = tmp_path / "model.keras"

    def file_digest(path):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(export_module, "file_digest", file_digest)
    with pytest.raises(MinigptError, match=f"^cannot read {path}: Permission denied; make it readable"):
        export_module.load_unchanged(path, lambda path: "model")
