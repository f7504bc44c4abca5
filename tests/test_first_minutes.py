"""A new user's first commands: which run a command acts on, and what it says when a step is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import assert_user_error, minigpt, samples_json, tiny_sets

CONFIGS = Path(__file__).parent.parent / "configs"


def _copy_run(trained_run: Path, to: Path) -> Path:
    shutil.copytree(trained_run, to, ignore=shutil.ignore_patterns("checkpoints", "cache", ".lock"))
    return to


def test_a_runs_own_config_acts_on_that_run(tmp_path, trained_run):
    _copy_run(trained_run, tmp_path / "runs" / "x")
    result = minigpt("generate", "-c", "runs/x/config.toml", "--sampler", "greedy", "--json", cwd=tmp_path)
    [sample] = samples_json(result)
    assert len(sample["token_ids"]) == 12  # generate.max_tokens of runs/x/config.toml
    assert not (tmp_path / "runs" / "config").exists()


def test_a_bare_generate_finds_the_one_trained_run(tmp_path, trained_run):
    _copy_run(trained_run, tmp_path / "runs" / "only")
    result = minigpt("generate", "--sampler", "greedy", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "using the trained run runs/only" in result.stderr
    assert result.stdout.strip()
    _copy_run(trained_run, tmp_path / "runs" / "second")
    assert_user_error(minigpt("generate", cwd=tmp_path), "2 trained runs under runs/", "only", "second", "-r")


def test_train_before_vocab_names_the_command_to_run(tmp_path):
    shutil.copytree(CONFIGS, tmp_path / "configs")
    result = minigpt("train", "-c", "configs/simplebooks-packed.toml", cwd=tmp_path)
    assert_user_error(
        result, "no vocabulary in runs/simplebooks-packed", "with: minigpt vocab -c configs/simplebooks-packed.toml"
    )
    assert not (tmp_path / "runs" / "simplebooks-packed" / "config.toml").exists()
    with_sets = minigpt("train", "-r", tmp_path / "r", "--set", "model.seq_len=64", "--set", "data.train=a b.txt")
    assert_user_error(with_sets, f"minigpt vocab -r {tmp_path / 'r'} --set model.seq_len=64 --set 'data.train=a b.txt'")


def test_train_refuses_a_vocab_section_the_vocabulary_was_not_learned_with(tmp_path, trained_run):
    run = _copy_run(trained_run, tmp_path / "run")
    result = minigpt("train", "-r", run, *tiny_sets("vocab.lowercase=false"))
    assert_user_error(result, "vocab.lowercase = False", "learned with vocab.lowercase = True", "minigpt vocab")


def test_generate_tokenizes_as_the_vocabulary_was_learned(trained_run):
    """vocab.json, not the config given later, says how to tokenize: an upper-case prompt is lowercased."""
    args = ("generate", "-r", trained_run, "--sampler", "greedy", "--json", "--show-prompt")
    [lower] = samples_json(minigpt(*args, "--prompt", "the king"))
    [upper] = samples_json(minigpt(*args, "--prompt", "THE KING", "--set", "vocab.lowercase=false"))
    assert upper["token_ids"] == lower["token_ids"]


def test_a_failed_vocab_leaves_the_runs_config_alone(tmp_path, trained_run):
    run = _copy_run(trained_run, tmp_path / "run")
    before = (run / "config.toml").read_text()
    result = minigpt("vocab", "-r", run, "--set", f"data.train={tmp_path / 'missing.txt'}", "--set", "vocab.size=200")
    assert_user_error(result, "no such file")
    assert (run / "config.toml").read_text() == before


def test_a_prompt_file_that_is_a_folder(trained_run, tmp_path):
    assert_user_error(minigpt("generate", "-r", trained_run, "--prompt-file", tmp_path), "cannot read prompt file")


def test_a_run_made_before_data_windows_still_loads(tmp_path, trained_run):
    """config.toml files written before data.packing became data.windows are read in today's keys."""
    run = _copy_run(trained_run, tmp_path / "run")
    text = (run / "config.toml").read_text().replace('windows = "reference"', "packing = false\nshuffle_buffer = 256")
    assert "packing = false" in text
    (run / "config.toml").write_text(text)
    result = minigpt("config", "-r", run)
    assert result.returncode == 0, result.stderr
    assert 'windows = "reference"' in result.stdout and "packing" not in result.stdout
