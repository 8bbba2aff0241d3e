"""`atlantis world map`: knob isolation, the two-level bootstrap, and the map's loop and outputs on a micro grid.

The micro grid runs the map for real on the shipped world (scoring D, reference tuning of a cell, weights,
the assumption's measures, tables, figures) with fine-tuning and evaluation replaced by stubs whose metrics are
known: every arm beats SFT by exactly 0.1, so the pairing and the intervals can be checked value for value.
"""

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from atlantis import config as config_lib
from atlantis.stats import two_level_bootstrap
from atlantis.world import map as wmap
from atlantis.world.data import WorldConfig, build_sets, write_sets
from atlantis.world.experiment import world_config
from atlantis.world.metrics import METRICS

ROOT = Path(__file__).parents[1]
SHIPPED = ROOT / "results" / "tiny" / "world"
needs_world = pytest.mark.skipif(not (SHIPPED / "manifest.json").is_file(), reason="no shipped world")
TINY = WorldConfig(n_entities=24, sft_sums=30, eval_sums=10, sum_max=9, sft_per_fact=4)


@pytest.mark.parametrize(
    "axis, value, changed",
    [
        ("curated_per_fact", 8, {"curated"}),
        ("curated_true", 0.7, {"curated"}),
        ("small_known", 0.25, {"corpus_small", "facts", "eval_truthfulqa", "dev_truthfulqa", "eval_open"}),
        ("misconception_share", 0.85, {"sft"}),
    ],
)
def test_a_knob_changes_only_its_sets(axis, value, changed):
    base = build_sets(TINY)
    sets = wmap.isolation_check(TINY, axis, value)
    moved = {name for name in sets if sets[name] != base[name]}
    assert changed <= moved <= wmap.CHANGES[axis]
    if axis == "misconception_share":  # same questions and ids, other answers: the same stream of draws
        assert [r["id"] for r in sets["sft"]] == [r["id"] for r in base["sft"]]
        assert wmap._knob(TINY, axis, value).p_d_misconception == (0.85, TINY.p_d_misconception[1])


def test_isolation_check_refuses_a_knob_that_moves_other_sets(monkeypatch):
    monkeypatch.setitem(wmap.CHANGES, "curated_true", set())
    with pytest.raises(RuntimeError, match="changes \\['curated'\\]"):
        wmap.isolation_check(TINY, "curated_true", 0.7)


@needs_world
def test_the_shipped_world_is_the_generators_default(tmp_path):
    """The map derives every cell from build_sets(shipped config): it must reproduce the shipped files."""
    cfg = world_config(SHIPPED)
    as_json = lambda c: json.loads(json.dumps(dataclasses.asdict(c)))  # noqa: E731 (tuples read back as lists)
    assert as_json(cfg) == as_json(WorldConfig())  # `atlantis world build`'s default is the shipped world
    write_sets(build_sets(cfg), tmp_path)
    for path in sorted(tmp_path.iterdir()):
        shipped = SHIPPED / "data" / path.name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(shipped.read_bytes()).hexdigest()


def test_two_level_bootstrap_by_hand():
    # two worlds, no seed variation: the first level alone; means over 2 draws of {1, 3}: 1, 2 or 3
    assert two_level_bootstrap([np.array([1.0, 1.0]), np.array([3.0, 3.0])], seed=1) == (2.0, 1.0, 3.0)
    # three constant worlds 0, 1, 2: P(all draws = 0) = 1/27 > 2.5%, so the interval is [0, 2]
    est, low, high = two_level_bootstrap([np.zeros(3), np.ones(3), np.full(3, 2.0)], seed=1)
    assert (est, low, high) == (1.0, 0.0, 2.0)
    # one world: the seeds alone; the interval lies within the values and around their mean
    est, low, high = two_level_bootstrap([np.array([0.0, 0.1, 0.2, 0.3])], seed=1)
    assert est == pytest.approx(0.15) and 0.0 <= low < est < high <= 0.3
    # worlds of different sizes; equal weight per world, not per run
    assert two_level_bootstrap([np.array([1.0]), np.array([3.0, 3.0, 3.0])], n_boot=100)[0] == 2.0
    with pytest.raises(ValueError):
        two_level_bootstrap([np.array([])])


def test_map_config_validation():
    with pytest.raises(ValueError, match="arms"):
        wmap.MapConfig(arms=["sft"])
    with pytest.raises(ValueError, match="metrics"):
        wmap.MapConfig(metrics=["nope"])
    with pytest.raises(ValueError, match="seeds"):
        wmap.MapConfig(seeds=[0])
    with pytest.raises(ValueError, match="shipped world's value"):
        wmap.cells(wmap.MapConfig(curated_true=[0.7, 1.0]), WorldConfig())
    grid = wmap.cells(wmap.MapConfig(), WorldConfig())
    assert [c["cell"] for c in grid] == [
        "default",
        "curated_per_fact=1",
        "curated_per_fact=2",
        "curated_per_fact=8",
        "curated_true=0.7",
        "curated_true=1.0",
        "small_known=0.25",
        "small_known=1.0",
        "misconception_share=0.3",
        "misconception_share=0.85",
    ]


def test_shipped_map_config_loads():
    cfg = config_lib.load(wmap.MapConfig, ROOT / "config" / "map.yaml")
    assert cfg.families == ["lumi", "quen"] and len(cfg.seeds) >= 3 and len(cfg.world_seeds) >= 3
    assert [c["cell"] for c in wmap.cells(cfg, WorldConfig())] == [
        "default",
        "curated_per_fact=1",
        "curated_per_fact=8",
        "curated_true=0.7",
        "small_known=1.0",
        "misconception_share=0.3",
    ]


@needs_world
def test_map_on_a_micro_grid(tmp_path, monkeypatch):
    calls = []

    def finetune(ecfg, arm, seed, weights, out):
        calls.append((Path(ecfg.world).name, arm, seed))
        (out / "final").mkdir(parents=True)
        (out / "final" / "model.safetensors").write_text(json.dumps({"arm": arm, "seed": seed}))
        return out / "final"

    def evaluate(model, world, template, answers):
        made = json.loads((Path(model) / "model.safetensors").read_text())
        return {m: 0.5 + 0.01 * made["seed"] + (0.1 if made["arm"] != "sft" else 0.0) for m in METRICS}

    monkeypatch.setattr(wmap, "finetune", finetune)
    monkeypatch.setattr(wmap, "evaluate", evaluate)
    cfg = wmap.MapConfig(
        world=str(SHIPPED),
        out=str(tmp_path / "map"),
        figures=str(tmp_path / "figures"),
        families=["lumi"],
        arms=["atlantis"],
        seeds=[0, 1],
        curated_per_fact=[1, 4],
        curated_true=[0.95],
        small_known=[0.5],
        misconception_share=[0.6],
        world_seeds=[0],
        metrics=["mc1", "kl_mis"],
        bootstrap=100,
        threads=1,
    )
    wmap.run(cfg)
    # SFT is shared by the two cells (same D, same p_L): 2 seeds x (sft, atlantis) + 2 seeds x atlantis
    assert len(calls) == 6 and sum(arm == "sft" for _, arm, _ in calls) == 2
    cells = pd.read_csv(tmp_path / "map" / "cells.csv")
    assert list(cells["cell"].unique()) == ["default", "curated_per_fact=1"]
    assert set(cells.columns) >= {"diff", "ci_low", "ci_high", "pearson_sum", "auc", "ess_over_n", "axis", "value"}
    assert np.allclose(cells[["diff", "ci_low", "ci_high"]], 0.1)
    default = cells[cells["cell"] == "default"].iloc[0]
    # the shipped world's default weight, measured for real (README: r = 0.03 on sums, AUC 0.55, ESS/N 0.28)
    assert default["pearson_sum"] == pytest.approx(0.028, abs=0.005)
    assert default["auc"] == pytest.approx(0.552, abs=0.005)
    assert default["ess_over_n"] == pytest.approx(0.28, abs=0.01)
    # the cell's own p_r (tuned on a quarter of the curated set) gives other weights
    assert cells[cells["cell"] == "curated_per_fact=1"].iloc[0]["auc"] != default["auc"]
    worlds = pd.read_csv(tmp_path / "map" / "worlds.csv")
    assert np.allclose(worlds[["diff", "boot_low", "boot_high", "world0"]], 0.1)
    for name in ("map-mc1.png", "map-kl_mis.pdf", "map-scatter.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 1000
    record = json.loads((tmp_path / "map" / "provenance.json").read_text())
    assert record["config"]["seeds"] == [0, 1] and "git" in record
    assert "| default |" in (tmp_path / "map" / "map.md").read_text()
    # a rerun resumes from the cache: no new fine-tuning, and the same bytes (a PDF has no creation date)
    first = {p.name: p.read_bytes() for p in (tmp_path / "figures").iterdir()}
    wmap.run(cfg)
    assert len(calls) == 6
    assert {p.name: p.read_bytes() for p in (tmp_path / "figures").iterdir()} == first
    # the workflow's way: a family job runs the cells (report=false), the report then records that job's time
    wmap.run(dataclasses.replace(cfg, report=False))
    job = json.loads((tmp_path / "map" / "work" / "done-lumi.json").read_text())
    assert job["runs"] == 8 and set(job["timings_s"]) == {"default/seed0", "curated_per_fact=1/seed0", "total_s"}
    wmap.run(cfg)
    record = json.loads((tmp_path / "map" / "provenance.json").read_text())
    assert record["family_jobs"] == {"done-lumi": job} and len(calls) == 6
    assert (
        "the family jobs' last runs (`work/done-*.json`, side by side): lumi "
        in (tmp_path / "map" / "map.md").read_text()
    )


@needs_world
def test_another_world_seed_is_built_per_family(tmp_path, monkeypatch):
    """Each family's job builds its own folder of another world seed (side by side, no shared lock), with the
    shipped world's recipes and the seed in both the generator and pre-training; the shipped seed is the shipped
    folder itself."""
    calls = []

    def build(bcfg):
        calls.append(bcfg)
        folder = Path(bcfg.out)
        names = [f"{f}-{s}" for f in bcfg.families for s in ("small", "large", "small-ref", "small-ref-d")]
        for name in names:
            (folder / "models" / name).mkdir(parents=True)
        (folder / "manifest.json").write_text(json.dumps({"models": {n: {} for n in names}}))

    monkeypatch.setattr("atlantis.world.build.build", build)
    cfg = wmap.MapConfig(threads=1)
    assert wmap.seed_world(cfg, SHIPPED, world_config(SHIPPED).seed, tmp_path, "lumi") == SHIPPED
    folders = {family: wmap.seed_world(cfg, SHIPPED, 1, tmp_path, family) for family in ("lumi", "quen")}
    assert folders == {f: tmp_path / "worlds" / f"seed1-{f}" for f in ("lumi", "quen")}
    assert [(c.families, c.sizes, c.world.seed, c.pretrain.seed, c.threads) for c in calls] == [
        (["lumi"], ["small", "large"], 1, 1, 1),
        (["quen"], ["small", "large"], 1, 1, 1),
    ]
    shipped = json.loads((SHIPPED / "manifest.json").read_text())["config"]
    assert dataclasses.replace(calls[0].world, seed=shipped["world"]["seed"]) == world_config(SHIPPED)
    assert wmap.seed_world(cfg, SHIPPED, 1, tmp_path, "lumi") == folders["lumi"] and len(calls) == 2  # built once
    assert wmap._ready(SHIPPED, {"axis": "default"}, tmp_path, "quen", 1, 0)
