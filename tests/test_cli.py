"""End to end through the real CLI: vocab -> train -> generate, and user errors."""

from __future__ import annotations

import csv
import json
import shutil
import tomllib

import pytest
from conftest import CORPUS, assert_user_error, minigpt, samples_json, tiny_sets

from minigpt_cli.generate import tidy

SAMPLERS = ["greedy", "beam", "random", "topk", "topp"]


@pytest.mark.cli
def test_pipeline_artifacts(trained_run):
    for name in ("config.toml", "vocab.txt", "model.keras", "history.json", "history.csv", "samples.txt"):
        assert (trained_run / name).is_file(), name
    vocab = (trained_run / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert vocab[:3] == ["[PAD]", "[UNK]", "[BOS]"]
    assert 50 < len(vocab) <= 300
    config = tomllib.loads((trained_run / "config.toml").read_text())
    assert config["model"]["seq_len"] == 32 and config["vocab"]["size"] == 300
    rows = list(csv.DictReader((trained_run / "history.csv").open()))
    assert len(rows) == 1
    row = rows[0]
    assert set(row) >= {"loss", "perplexity", "val_loss", "val_perplexity", "seconds", "tokens_per_second"}
    # 6 steps of training from a uniform start: below the vocabulary size, yet far from trained.
    assert 0.3 * len(vocab) < float(row["val_perplexity"]) < 0.95 * len(vocab)
    assert float(row["tokens_per_second"]) > 0
    history = json.loads((trained_run / "history.json").read_text())
    assert history[0]["epoch"] == 1 and history[0]["steps"] == 6
    # The epoch's sample uses the config's [generate] sampler (top-k, k=10 by default).
    assert (trained_run / "samples.txt").read_text().startswith("epoch 1 (topk, k=10): ")
    assert not list(trained_run.glob(".*tmp*")), "temporary files left behind"


@pytest.mark.cli
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_generate_each_sampler(trained_run, sampler):
    result = minigpt("generate", "--run-dir", trained_run, "--sampler", sampler, "--seed", "7", "--json")
    [sample] = samples_json(result)
    vocab_size = len((trained_run / "vocab.txt").read_text(encoding="utf-8").splitlines())
    assert sample["sampler"] == sampler
    assert len(sample["token_ids"]) == 12  # generate.max_tokens from the run's config
    assert all(0 <= i < vocab_size for i in sample["token_ids"])
    # The text is the tokenizer's own reading of the ids, less [PAD] and [BOS], made readable.
    assert sample["raw_text"] == _detokenize(trained_run, sample["token_ids"])
    assert sample["text"] == tidy(sample["raw_text"])
    assert sample["seconds"] > 0 and sample["compile_seconds"] > 0  # a trace takes time: it must be measured
    plain = minigpt("generate", "--run-dir", trained_run, "--sampler", sampler, "--seed", "7")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.strip() == sample["text"]


def _detokenize(run, ids: list[int]) -> str:
    """KerasHub's WordPiece tokenizer on the run's vocab.txt, apart from minigpt's code."""
    import keras_hub

    vocab = (run / "vocab.txt").read_text(encoding="utf-8").splitlines()
    kept = [i for i in ids if vocab[i] not in ("[PAD]", "[BOS]")]
    if not kept:
        return ""
    text = keras_hub.tokenizers.WordPieceTokenizer(vocabulary=vocab).detokenize(kept)
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def test_no_seed_draws_one_that_repeats_the_text(trained_run):
    args = ("generate", "--run-dir", trained_run, "--sampler", "random", "--json", "--max-tokens", "10")
    [first] = samples_json(minigpt(*args))
    seed = first["settings"]["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**32
    [again] = samples_json(minigpt(*args, "--seed", str(seed)))
    assert again["token_ids"] == first["token_ids"]


@pytest.mark.cli
@pytest.mark.parametrize("sampler", ["random", "topk", "topp"])
def test_same_seed_same_text(trained_run, sampler):
    args = ("generate", "--run-dir", trained_run, "--sampler", sampler, "--json", "--max-tokens", "10")
    first = samples_json(minigpt(*args, "--seed", "3"))
    again = samples_json(minigpt(*args, "--seed", "3"))
    other = samples_json(minigpt(*args, "--seed", "4", "--num-samples", "3"))
    assert first[0]["token_ids"] == again[0]["token_ids"]
    assert len(other) == 3
    # Three samples from a 10-token continuation cannot all equal the seed-3 sample by chance.
    assert any(o["token_ids"] != first[0]["token_ids"] for o in other)


@pytest.mark.cli
def test_prompts_from_stdin_and_show_prompt(trained_run):
    result = minigpt(
        "generate",
        "--run-dir",
        trained_run,
        "--prompt-file",
        "-",
        "--json",
        "--sampler",
        "greedy",
        stdin="the old fisherman\n\nthe white goose said\n",
    )
    samples = samples_json(result)
    assert [s["prompt"] for s in samples] == ["the old fisherman", "the white goose said"]
    shown = minigpt(
        "generate", "--run-dir", trained_run, "--prompt", "the baker", "--show-prompt", "--sampler", "greedy"
    )
    assert shown.returncode == 0 and shown.stdout.startswith("the baker ")


def test_sampler_all_table(trained_run):
    result = minigpt("generate", "--run-dir", trained_run, "--sampler", "all", "--seed", "1", "--prompt", "the king")
    assert result.returncode == 0, result.stderr
    for name in SAMPLERS + ["tok/s", "repeated 4-grams", "distinct bigrams"]:
        assert name in result.stdout


def test_python_dash_m_help():
    result = minigpt("--help")
    assert result.returncode == 0
    for command in ("vocab", "train", "generate"):
        assert command in result.stdout


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--sampler", "topp", "--p", "0"], "--p must be in (0, 1]"),
        (["--sampler", "topp", "--p", "1.5"], "--p must be in (0, 1]"),
        (["--sampler", "topk", "--k", "0"], "--k must be at least 1"),
        (["--sampler", "beam", "--num-beams", "0"], "--num-beams must be at least 1"),
        (["--sampler", "nucleus"], "'nucleus' is not one of 'greedy', 'beam'"),
        (["--prompt", "the king " * 40], "shorten it"),
        (["--prompt-file", "/nonexistent/prompts.txt"], "prompt file not found"),
        (["--set", "generate.k=-1"], "out of range"),
        (["--sampler", "topk", "--k", "100000"], "--k is 100000 but the vocabulary has only"),
        (["--sampler", "all", "--set", "generate.k=100000"], "--k is 100000 but the vocabulary has only"),
        (["--sampler", "random", "--seed", str(2**32)], "--seed must be in [0, 4294967295]"),
        (["--sampler", "topk", "--seed", "-1"], "--seed must be in [0, 4294967295]"),
    ],
)
def test_generate_bad_arguments(trained_run, args, fragment):
    assert_user_error(minigpt("generate", "--run-dir", trained_run, *args), fragment)


def test_generate_without_model(tmp_path, trained_run):
    shutil.copy(trained_run / "vocab.txt", tmp_path / "vocab.txt")
    assert_user_error(minigpt("generate", "--run-dir", tmp_path), "no trained model", "minigpt train")


def test_train_without_vocab(tmp_path):
    result = minigpt("train", "--run-dir", tmp_path / "empty", *tiny_sets())
    assert_user_error(result, "no vocabulary", "minigpt vocab")
    assert not (tmp_path / "empty" / "model.keras").exists()


def test_model_vocab_mismatch(tmp_path, trained_run):
    shutil.copytree(trained_run, tmp_path / "run")
    vocab = (tmp_path / "run" / "vocab.txt").read_text(encoding="utf-8")
    (tmp_path / "run" / "vocab.txt").write_text(vocab + "extratoken\n", encoding="utf-8")
    # vocab.json's digest no longer matches vocab.txt ...
    assert_user_error(minigpt("generate", "--run-dir", tmp_path / "run"), "does not describe", "minigpt vocab")
    # ... and without vocab.json, the model's size does not.
    (tmp_path / "run" / "vocab.json").unlink()
    assert_user_error(minigpt("generate", "--run-dir", tmp_path / "run"), "vocab.txt has 184", "minigpt train")


@pytest.mark.cli
def test_corrupt_model(tmp_path, trained_run):
    shutil.copytree(trained_run, tmp_path / "run")
    (tmp_path / "run" / "model.keras").write_bytes(b"not a zip file at all")
    assert_user_error(minigpt("generate", "--run-dir", tmp_path / "run"), "cannot load", "minigpt train")


def test_bad_text_is_refused(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 ".encode("latin-1") * 100 + b"\n")
    assert_user_error(minigpt("vocab", "--run-dir", tmp_path / "r", *tiny_sets(train=bad)), "not valid UTF-8")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert_user_error(minigpt("vocab", "--run-dir", tmp_path / "r", *tiny_sets(train=empty)), "is empty")
    short = tmp_path / "short.txt"
    short.write_text("a short line\nanother one\n")
    assert_user_error(minigpt("vocab", "--run-dir", tmp_path / "r", *tiny_sets(train=short)), "min_string_len")
    missing = tmp_path / "nope.txt"
    assert_user_error(minigpt("vocab", "--run-dir", tmp_path / "r", *tiny_sets(train=missing)), "no such file")
    assert not (tmp_path / "r" / "vocab.txt").exists()


def test_folder_and_glob_as_data(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    lines = (CORPUS / "train.txt").read_text(encoding="utf-8").splitlines()
    (folder / "a.txt").write_text("\n".join(lines[:200]) + "\n", encoding="utf-8")
    (folder / "b.txt").write_text("\n".join(lines[200:]) + "\n", encoding="utf-8")
    run = tmp_path / "run"
    result = minigpt("vocab", "--run-dir", run, *tiny_sets(train=folder, valid=f"{folder}/*.txt"))
    assert result.returncode == 0, result.stderr
    assert "400 lines" in result.stdout
    assert (run / "vocab.txt").is_file()


def test_config_errors_name_the_key(tmp_path):
    assert_user_error(minigpt("config", "--set", "model.embed_dims=3"), "model.embed_dims", "model.embed_dim")
    assert_user_error(minigpt("config", "--set", "train.epochs=many"), "train.epochs", "integer")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nnum_layers = 0\n")
    assert_user_error(minigpt("config", "--config", bad), "model.num_layers", "out of range")
    assert_user_error(minigpt("config", "--config", tmp_path / "missing.toml"), "config file not found")
