"""The config loader: defaults, files, overrides, and refusals."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from minigpt_cli.config import Config, all_keys, dumps, load_config, parse_override
from minigpt_cli.errors import MinigptError

CONFIGS = Path(__file__).parent.parent / "configs"

REFERENCE = {
    "data.batch_size": 64,
    "data.min_string_len": 512,
    "model.seq_len": 128,
    "model.embed_dim": 256,
    "model.feed_forward_dim": 128,
    "model.num_heads": 3,
    "model.num_layers": 2,
    "vocab.size": 5000,
    "vocab.lowercase": True,
    "vocab.reserved_tokens": ["[PAD]", "[UNK]", "[BOS]"],
    "train.epochs": 5,
    "train.learning_rate": 1e-3,
    "generate.max_tokens": 80,
    "generate.k": 10,
    "generate.p": 0.5,
    "generate.num_beams": 10,
    "data.url": "https://dldata-public.s3.us-east-2.amazonaws.com/simplebooks.zip",
    "data.subset": "simplebooks-92-raw",
}


def _get(cfg: Config, key: str):
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


@pytest.mark.parametrize("key, value", REFERENCE.items())
def test_simplebooks_config_is_the_reference(key, value):
    assert _get(load_config(CONFIGS / "simplebooks.toml"), key) == value


def test_every_shipped_config_loads():
    names = sorted(p.name for p in CONFIGS.glob("*.toml"))
    assert "quickstart.toml" in names and "simplebooks.toml" in names
    for path in CONFIGS.glob("*.toml"):
        load_config(path)
    assert load_config(CONFIGS / "quickstart.toml").data.subset == "simplebooks-2-raw"


@pytest.mark.parametrize(
    "text, key, value",
    [
        ("model.num_layers=4", "model.num_layers", 4),
        ("train.learning_rate=3e-4", "train.learning_rate", 3e-4),
        ("train.learning_rate=1", "train.learning_rate", 1.0),
        ("vocab.lowercase=false", "vocab.lowercase", False),
        ("data.train=books/train.txt", "data.train", "books/train.txt"),
        ('data.train="a b.txt"', "data.train", "a b.txt"),
        (
            'vocab.reserved_tokens=["[PAD]", "[UNK]", "[BOS]", "[SEP]"]',
            "vocab.reserved_tokens",
            ["[PAD]", "[UNK]", "[BOS]", "[SEP]"],
        ),
        ("train.steps_per_epoch=10", "train.steps_per_epoch", 10),
    ],
)
def test_overrides(text, key, value):
    cfg = load_config(None, [text])
    assert _get(cfg, key) == value
    assert type(_get(cfg, key)) is type(value)


def test_override_beats_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("seed = 7\n[model]\nnum_layers = 3\nembed_dim = 64\n")
    cfg = load_config(path, ["model.num_layers=5"])
    assert (cfg.seed, cfg.model.num_layers, cfg.model.embed_dim) == (7, 5, 64)
    assert cfg.model.seq_len == 128  # untouched keys keep their defaults


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("model.embed_dims=3", ["unknown config key 'model.embed_dims'", "did you mean 'model.embed_dim'"]),
        ("modle.seq_len=3", ["unknown config key 'modle.seq_len'", "model.seq_len"]),
        ("model=3", ["unknown config key 'model'"]),
        ("train.epochs=2.5", ["'train.epochs' must be an integer"]),
        ("train.epochs=true", ["'train.epochs'"]),
        ("vocab.lowercase=1", ["'vocab.lowercase' must be a boolean"]),
        ("train.epochs=0", ["'train.epochs' = 0 is out of range"]),
        ("generate.p=0", ["'generate.p' = 0.0 is out of range"]),
        ("generate.p=1.5", ["'generate.p' = 1.5 is out of range"]),
        ("generate.sampler=nucleus", ["'generate.sampler' must be one of"]),
        ('vocab.reserved_tokens=["[UNK]", "[PAD]", "[BOS]"]', ["vocab.reserved_tokens"]),
        ("novalue", ["--set expects section.key=value"]),
        ("data.windows=sliding", ["'data.windows' must be one of reference, packed"]),
        ("data.packing=true", ["'data.packing' is retired", 'data.windows: "packed"']),
        ("data.shuffle_buffer=256", ["'data.shuffle_buffer' is retired"]),
        ("generate.top_p_candidates=128", ["'generate.top_p_candidates' is retired"]),
        ('generate.stop=[""]', ["'generate.stop' must not hold an empty string"]),
        ("train.weight_decay=0.1", ["'train.weight_decay' only applies to train.optimizer = \"adamw\""]),
        ('train.devices=["/cpu:0", "/cpu:1"]', ["'train.devices' only applies to train.distribution = \"mirrored\""]),
    ],
)
def test_refusals_name_the_key(override, fragments):
    with pytest.raises(MinigptError) as info:
        load_config(None, [override])
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_bad_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[model\nnum_layers = 3\n")
    with pytest.raises(MinigptError, match="not valid TOML"):
        load_config(path)
    path.write_text("[modle]\nnum_layers = 3\n")
    with pytest.raises(MinigptError, match="unknown config key 'modle'"):
        load_config(path)
    with pytest.raises(MinigptError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(CONFIGS / "quickstart.toml", ["train.steps_per_epoch=3", "seed=1"])
    text = dumps(cfg)
    assert "steps_per_epoch = 3" in text
    path = tmp_path / "resolved.toml"
    path.write_text(text)
    assert load_config(path) == cfg
    assert "validation_steps" not in tomllib.loads(text)["train"]  # unset optional keys are left out


def test_parse_override_keeps_equals_in_value():
    assert parse_override("data.train=a=b.txt") == ("data.train", "a=b.txt")


def test_all_keys_cover_the_issue_list():
    keys = set(all_keys())
    wanted = {
        "data.train",
        "data.valid",
        "data.url",
        "data.min_string_len",
        "data.batch_size",
        "vocab.size",
        "model.seq_len",
        "model.embed_dim",
        "model.feed_forward_dim",
        "model.num_heads",
        "model.num_layers",
        "train.epochs",
        "train.steps_per_epoch",
        "train.learning_rate",
        "seed",
    }
    assert wanted <= keys


def test_combinations_that_apply_are_accepted():
    cfg = load_config(None, ["train.optimizer=adamw", "train.weight_decay=0.1"])
    assert cfg.train.weight_decay == 0.1
    cfg = load_config(None, ["train.distribution=mirrored", 'train.devices=["/cpu:0", "/cpu:1"]'])
    assert cfg.train.devices == ["/cpu:0", "/cpu:1"]
    assert load_config(None, ["train.optimizer=adamw"]).train.weight_decay is None  # AdamW's default, 0.01


def test_a_run_config_written_with_top_p_candidates_still_loads(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text("[generate]\nsampler = \"topp\"\ntop_p_candidates = 128\n")
    assert load_config(path).generate.sampler == "topp"
