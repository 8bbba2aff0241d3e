from pathlib import Path

import pytest

from atlantis import config as config_lib
from atlantis.config import ConfigError, parse_overrides
from atlantis.generate import GenerateConfig
from atlantis.scoring import ScoreConfig
from atlantis.selection import SelectConfig
from atlantis.train import TrainConfig
from atlantis.weights import WeightsConfig

ROOT = Path(__file__).resolve().parents[1]
KINDS = {
    "score": ScoreConfig,
    "weights": WeightsConfig,
    "select": SelectConfig,
    "train": TrainConfig,
    "generate": GenerateConfig,
}


@pytest.mark.parametrize("path", sorted((ROOT / "config" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_example_yaml_loads(path):
    cfg = config_lib.load(KINDS[path.stem], path)
    assert cfg.out


def test_overrides_nested_and_typed():
    assert parse_overrides(["a.b=3", "c=x", "d=true", "e=null"]) == {"a": {"b": 3}, "c": "x", "d": True, "e": None}
    assert config_lib.load(WeightsConfig, None, ["scores=a", "out=o", "floor=1e-3"]).floor == 1e-3
    cfg = config_lib.load(
        ScoreConfig,
        ROOT / "config/examples/score.yaml",
        ["render.max_length=64", "role=ref", "data=other.jsonl", "max_batch_size=2"],
    )
    assert cfg.render.max_length == 64 and cfg.role == "ref" and cfg.data.path == "other.jsonl"
    assert cfg.data.format == "auto" and cfg.max_batch_size == 2
    w = config_lib.load(WeightsConfig, None, ["scores=a.parquet,b.parquet", "out=w.parquet", "clip_max=null"])
    assert w.scores == ["a.parquet", "b.parquet"] and w.clip_max is None
    assert config_lib.load(WeightsConfig, None, ["scores=a", "out=o", "floor=1e-3"]).floor == 1e-3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["bogus=1"], r"unknown config key\(s\) \['bogus'\]"),
        (["render.bogus=1"], r"unknown config key\(s\) \['render.bogus'\]"),
        (["max_batch_size=two"], "max_batch_size: expected an integer"),
        (["dtype=float8"], "dtype: 'float8' is not one of"),
        (["role=not valid"], "role must be an identifier"),
        (["render.max_length=1"], "max_length must be >= 2"),
        (["nokey"], "not of the form key=value"),
    ],
)
def test_bad_settings_are_named(overrides, message):
    base = ["model=m", "role=small", "out=o.parquet", "data=d.jsonl"]
    with pytest.raises((ConfigError, ValueError), match=message):
        config_lib.load(ScoreConfig, None, base + overrides)


def test_missing_required_setting():
    with pytest.raises(ConfigError, match="model"):
        config_lib.load(ScoreConfig, None, ["role=small", "out=o.parquet", "data=d.jsonl"])


def test_partial_section_keeps_the_fields_own_defaults():
    base = ["model=m", "data=d.jsonl", "out=o", "method=sft"]
    cfg = config_lib.load(TrainConfig, None, [*base, "render.max_length=64"])
    assert cfg.render.max_length == 64 and cfg.render.include_end_of_turn  # training's default survives
    assert not config_lib.load(
        TrainConfig, None, [*base, "render.include_end_of_turn=false"]
    ).render.include_end_of_turn
