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
    given = {o.split("=", 1)[0] for o in overrides}
    base = [b for b in ["model=m", "role=small", "out=o.parquet", "data=d.jsonl"] if b.split("=")[0] not in given]
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


@pytest.mark.parametrize("given", [["data=a.jsonl", "data=b.jsonl"], ["data.path=a.jsonl", "data=b.jsonl"]])
def test_a_setting_given_twice_is_refused(given):
    """`data=A data=B` used B without a word; which one the user meant is a guess."""
    with pytest.raises(ConfigError, match=r"data(\.path)? is given twice \('a.jsonl', then 'b.jsonl'\)"):
        config_lib.load(ScoreConfig, None, ["model=m", "role=small", "out=o.parquet", *given])


@pytest.mark.parametrize("order", [["data.limit=5", "data=big.jsonl"], ["data=big.jsonl", "data.limit=5"]])
def test_a_sections_shorthand_merges_with_its_settings_in_either_order(order):
    """`data.limit=5 data=big.jsonl` scored all 400 records; the other order failed with "data is not a section"."""
    cfg = config_lib.load(ScoreConfig, None, ["model=m", "role=small", "out=o.parquet", *order])
    assert (cfg.data.path, cfg.data.limit) == ("big.jsonl", 5)


def test_the_command_line_shorthand_keeps_the_yaml_sections_other_settings(tmp_path):
    path = tmp_path / "score.yaml"
    path.write_text("model: m\nrole: small\nout: o.parquet\ndata: {path: a.jsonl, limit: 7}\n")
    cfg = config_lib.load(ScoreConfig, path, ["data=b.jsonl"])
    assert (cfg.data.path, cfg.data.limit) == ("b.jsonl", 7)


def test_a_comma_list_reads_its_items_as_values():
    """`seeds=0,1,2` (the --help example) stopped with "seeds: expected an integer, got '0'"."""
    from atlantis.world.experiment import ExperimentConfig

    assert config_lib.load(ExperimentConfig, None, ["seeds=0,1,2"]).seeds == [0, 1, 2]
    assert config_lib.load(ExperimentConfig, None, ["seeds=[0, 1, 2]"]).seeds == [0, 1, 2]
