"""Fine-tuning through the real CLI: ``minigpt train --init-from RUN|PRESET``."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest
from conftest import CORPUS, TINY, assert_user_error, minigpt

from minigpt_cli.config import load_config
from minigpt_cli.runs import RunDir
from minigpt_cli.train import train
from minigpt_cli.vocab import build_vocabulary

PARENT_STEPS, CHILD_STEPS = 40, 8


def _sets(train: Path, valid: Path, *extra: str, shape: bool = True) -> list[str]:
    """``--set`` pairs for a tiny run; without ``shape``, the model and vocab keys are left to the parent."""
    keys = [k for k in TINY if shape or not k.startswith(("model.", "vocab."))]
    return [f"data.train={train}", f"data.valid={valid}", *keys, "train.sample_each_epoch=false", *extra]


def _cli_sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def _val_loss(run: Path) -> float:
    return json.loads((run / "history.json").read_text())[-1]["val_loss"]


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    """The fixture corpus split in two: the parent trains on the first half, its children on the second."""
    folder = tmp_path_factory.mktemp("halves")
    lines = (CORPUS / "train.txt").read_text(encoding="utf-8").splitlines(keepends=True)
    half = len(lines) // 2
    paths = {
        "a": folder / "a.txt",
        "b": folder / "b.txt",
        "b_valid": folder / "b_valid.txt",
        "foreign": folder / "foreign.txt",
    }
    paths["a"].write_text("".join(lines[:half]), encoding="utf-8")
    paths["b"].write_text("".join(lines[half : half + 150]), encoding="utf-8")
    paths["b_valid"].write_text("".join(lines[half + 150 :]), encoding="utf-8")
    # Words in an alphabet the parent never saw: nearly every token is [UNK].
    foreign = " ".join(["жили были дед и баба и была у них курочка ряба"] * 12)
    paths["foreign"].write_text((foreign + "\n") * 40, encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def parent(tmp_path_factory, texts) -> Path:
    """A tiny model trained (in process) on the first half of the corpus only."""
    run = RunDir(tmp_path_factory.mktemp("parent")).create()
    cfg = load_config(
        None,
        _sets(texts["a"], CORPUS / "valid.txt", f"train.steps_per_epoch={PARENT_STEPS}", "train.learning_rate=5e-3",
              "train.jit_compile=false"),
    )  # fmt: skip
    build_vocabulary(cfg, run)
    train(cfg, run)
    return run.root


def test_fine_tuned_beats_scratch_on_new_text(tmp_path, texts, parent):
    """At equal steps on text the parent never saw, the fine-tuned run ends with a lower validation loss."""
    steps = f"train.steps_per_epoch={CHILD_STEPS}"
    child = tmp_path / "child"
    tuned = minigpt(
        "train", "-r", child, "--init-from", parent,
        *_cli_sets(*_sets(texts["b"], texts["b_valid"], steps, shape=False)),
    )  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr
    assert f"fine-tuning from {parent}" in tuned.stderr
    assert "warning" not in tuned.stderr  # the same kind of text: few [UNK]

    # From scratch, on the same vocabulary (so the losses compare token for token), the same steps and recipe.
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    for name in ("vocab.txt", "vocab.json"):
        shutil.copy(parent / name, scratch / name)
    fresh = minigpt("train", "-r", scratch, *_cli_sets(*_sets(texts["b"], texts["b_valid"], steps)))
    assert fresh.returncode == 0, fresh.stderr
    assert _val_loss(child) < _val_loss(scratch) - 0.2, (_val_loss(child), _val_loss(scratch))

    # The child's config records its parent and the parent model's checksum; its vocabulary is the parent's.
    recorded = tomllib.loads((child / "config.toml").read_text())
    assert recorded["train"]["init_from"] == str(parent)
    from minigpt_cli.runs import file_digest

    assert recorded["train"]["init_sha256"] == file_digest(parent / "model.keras")[1]
    assert (child / "vocab.txt").read_bytes() == (parent / "vocab.txt").read_bytes()
    parent_cfg = tomllib.loads((parent / "config.toml").read_text())
    assert recorded["model"] == parent_cfg["model"]
    assert recorded["vocab"] == parent_cfg["vocab"]

    # The child resumes like any run, from its own checkpoint.
    more = minigpt("train", "-r", child, "--resume", "--set", "train.epochs=2")
    assert more.returncode == 0, more.stderr
    assert len(json.loads((child / "history.json").read_text())) == 2


def test_preset_parent_gives_the_same_start_as_the_run(tmp_path, texts, parent):
    """A KerasHub preset of the parent (save_to_preset) starts a fine-tune from exactly the same weights."""
    import keras_hub

    from minigpt_cli.config import VocabConfig
    from minigpt_cli.model import MiniGPTCausalLMPreprocessor, load_model
    from minigpt_cli.vocab import read_vocabulary

    vocab = read_vocabulary(parent / "vocab.txt", VocabConfig())
    model = load_model(parent / "model.keras", len(vocab))
    model.preprocessor = MiniGPTCausalLMPreprocessor(vocab.tokenizer(), sequence_length=model.backbone.sequence_length)
    preset = tmp_path / "preset"
    model.save_to_preset(str(preset))
    assert isinstance(keras_hub.models.CausalLM.from_preset(str(preset)), type(model))

    sets = _cli_sets(*_sets(texts["b"], texts["b_valid"], "train.steps_per_epoch=2", shape=False))
    losses = []
    for source in (parent, preset):
        run = tmp_path / f"from-{source.name}"
        result = minigpt("train", "-r", run, "--init-from", source, *sets)
        assert result.returncode == 0, result.stderr
        losses.append(_val_loss(run))
        assert (run / "vocab.txt").read_bytes() == (parent / "vocab.txt").read_bytes()
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert "(preset, sha256" in result.stderr


def test_unknown_share_warning(tmp_path, texts, parent):
    """Text in an alphabet the parent never saw: one warning line; a key set to the parent's own value is fine."""
    result = minigpt(
        "train", "-r", tmp_path / "foreign", "--init-from", parent,
        *_cli_sets(*_sets(texts["foreign"], texts["foreign"], "train.steps_per_epoch=1", "train.validation_steps=1",
                          "data.batch_size=4", "model.embed_dim=16", shape=False)),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "[UNK]" in warnings[0], result.stderr
    share = float(warnings[0].split("warning: ")[1].split("%")[0])
    assert share > 50


def test_contradicting_keys_are_refused(tmp_path, texts, parent):
    sets = _sets(texts["b"], texts["b_valid"], shape=False)
    result = minigpt("train", "-r", tmp_path / "c", "--init-from", parent,
                     *_cli_sets(*sets, "model.embed_dim=32", "vocab.lowercase=false"))  # fmt: skip
    assert_user_error(result, "model.embed_dim = 32 (in --set; the parent has 16)", "vocab.lowercase", "drop those")
    assert not (tmp_path / "c" / "vocab.txt").exists()
    # From a config file: the message names the file.
    config = tmp_path / "mine.toml"
    config.write_text("[model]\nnum_layers = 3\n", encoding="utf-8")
    result = minigpt("train", "-c", config, "-r", tmp_path / "c", "--init-from", parent, *_cli_sets(*sets))
    assert_user_error(result, f"model.num_layers = 3 (in {config}; the parent has 1)")


def test_bad_parents_and_flags(tmp_path, texts, parent):
    sets = _cli_sets(*_sets(texts["b"], texts["b_valid"], shape=False))
    assert_user_error(minigpt("train", "-r", tmp_path / "x", "--init-from", tmp_path / "nowhere", *sets),
                      "no such folder")  # fmt: skip
    assert_user_error(minigpt("train", "-r", tmp_path / "x", "--init-from", texts["a"].parent, *sets),
                      "neither a run with a model.keras nor a KerasHub preset")  # fmt: skip
    assert_user_error(minigpt("train", "-r", tmp_path / "x", "--init-from", parent, "--resume", *sets),
                      "--init-from starts a new run")  # fmt: skip
    # A recorded checksum that is not the parent model's: the parent changed since.
    assert_user_error(
        minigpt("train", "-r", tmp_path / "x", *sets, "--set", f"train.init_from={parent}",
                "--set", "train.init_sha256=0123456789abcdef"),
        "changed since",
    )  # fmt: skip
    # Fine-tuning into the parent's own folder would overwrite it.
    assert_user_error(minigpt("train", "-c", parent / "config.toml", "--init-from", parent, *sets),
                      "would overwrite its parent")  # fmt: skip
    # A failure after the checks (no training text) leaves no vocabulary behind.
    missing = _cli_sets(*_sets(tmp_path / "missing.txt", texts["b_valid"], shape=False))
    assert_user_error(minigpt("train", "-r", tmp_path / "y", "--init-from", parent, *missing), "missing.txt")
    assert not (tmp_path / "y" / "vocab.txt").exists() and not (tmp_path / "y" / "config.toml").exists()
    # A run that already has another vocabulary is not overwritten.
    other = tmp_path / "other"
    other.mkdir()
    (other / "vocab.txt").write_text("[PAD]\n[UNK]\n[BOS]\nzebra\n", encoding="utf-8")
    assert_user_error(minigpt("train", "-r", other, "--init-from", parent, *sets), "another vocabulary")
    assert (other / "vocab.txt").read_text(encoding="utf-8") == "[PAD]\n[UNK]\n[BOS]\nzebra\n"


def test_unknown_share_counts_text_tokens_only():
    """Counted over the labels, without [PAD] and [BOS]: one [UNK] among two text tokens is half."""
    import numpy as np

    from minigpt_cli.finetune import unknown_share

    tokens = ["[PAD]", "[UNK]", "[BOS]", "the"]
    assert unknown_share(np.array([[2, 1, 3, 0, 0], [2, 0, 0, 0, 0]]), tokens) == 0.5
    assert unknown_share(np.array([[2, 0]]), tokens) == 0.0
    # Packed windows overlap by one token: each label counts once.
    assert unknown_share(np.array([[3, 3, 1], [1, 3, 3]]), tokens) == 0.25
