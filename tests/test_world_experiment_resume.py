"""`atlantis world experiment` resumes: a rerun after a crash does only the cells that had not finished.

The experiment's loop, its progress file (work/<family>-<size>/runs.jsonl), its settings check and its tables run
for real on a world's data sets (no models: the world's model folders are empty). Fine-tuning and evaluation
are replaced by counters that return metrics derived from the cell, so each call is visible and an interrupted
then resumed experiment can be compared with an uninterrupted one value for value.
"""

import dataclasses
import json
import zlib

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atlantis.world import experiment
from atlantis.world.data import WorldConfig, build_sets, write_sets
from atlantis.world.metrics import METRICS

TINY = WorldConfig(n_entities=16, sft_sums=30, eval_sums=10, sum_max=9, sft_per_fact=4)
ARMS = ["sft", "atlantis"]
SEEDS = [0, 1, 2]
CELLS = [(seed, arm) for seed in SEEDS for arm in ARMS]  # the loop's order: seeds outer, arms inner


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    write_sets(build_sets(TINY), root / "data")
    for suffix in ("small", "small-ref", "small-ref-d", "large"):
        (root / "models" / f"lumi-{suffix}").mkdir(parents=True)
    manifest = {"sha256": {"data/sft.jsonl": "0" * 64}, "config": {"world": dataclasses.asdict(TINY)}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    weights = root / "atlantis.parquet"
    pq.write_table(pa.Table.from_pandas(experiment.oracle_weights(root), preserve_index=False), weights)
    return root


class Calls:
    """Fake fine-tuning and evaluation, counting calls; `fail_at`: the fine-tuning call that crashes (1-based)."""

    def __init__(self, world, fail_at=None):
        self.world, self.fail_at = world, fail_at
        self.finetuned, self.evaluated, self.scored = [], [], 0

    def score_and_weigh(self, cfg, work):
        self.scored += 1
        return {"atlantis": self.world / "atlantis.parquet"}

    def finetune(self, cfg, arm, seed, weights, out):
        if self.fail_at is not None and len(self.finetuned) + 1 == self.fail_at:
            raise RuntimeError(f"killed while fine-tuning seed {seed} {arm}")
        assert (weights is None) == (arm == "sft")
        self.finetuned.append((seed, arm))
        (out / "final").mkdir(parents=True)
        return out / "final"

    def evaluate(self, model, world, template, answers):
        # the cell: "lumi-small" for a fixed model, "seed1/atlantis" for a fine-tuned one
        cell = model.name if model.name != "final" else f"{model.parent.parent.name}/{model.parent.name}"
        self.evaluated.append(cell)
        return {m: (zlib.crc32(f"{cell}:{m}".encode()) % 1000) / 100 for m in METRICS}


def _run(world, out, monkeypatch, calls):
    for name in ("score_and_weigh", "finetune", "evaluate"):
        monkeypatch.setattr(experiment, name, getattr(calls, name))
    monkeypatch.setattr(
        experiment,
        "assumption_check",
        lambda work, cats: dict.fromkeys(("pearson_sum", "slope_sum", "pearson_mean", "slope_mean"), 0.5),
    )
    cfg = experiment.ExperimentConfig(world=str(world), out=str(out), seeds=SEEDS, arms=ARMS, threads=1)
    return experiment.run(cfg)


FIXED_CELLS = ["lumi-small", "lumi-small-ref", "lumi-small-ref-d", "lumi-large"]


def test_interrupted_experiment_resumes_where_it_stopped(world, tmp_path, monkeypatch):
    full_calls = Calls(world)
    full = _run(world, tmp_path / "full", monkeypatch, full_calls)
    assert full_calls.finetuned == CELLS
    assert full_calls.evaluated == FIXED_CELLS + [f"seed{s}/{a}" for s, a in CELLS]

    out = tmp_path / "resumed"
    first = Calls(world, fail_at=3)  # dies during the third cell (seed 1, sft): two cells finished
    with pytest.raises(RuntimeError, match="killed"):
        _run(world, out, monkeypatch, first)
    assert first.finetuned == CELLS[:2]
    progress = out / "work" / "lumi-large" / "runs.jsonl"
    written = [(r["arm"], r["seed"]) for r in map(json.loads, progress.read_text().splitlines())]
    assert written == [(name, "-") for name in experiment.FIXED] + [(a, s) for s, a in CELLS[:2]]

    second = Calls(world)
    resumed = _run(world, out, monkeypatch, second)
    # only the unfinished cells are done again: no fixed model re-evaluated, no finished cell re-trained
    assert second.finetuned == CELLS[2:]
    assert second.evaluated == [f"seed{s}/{a}" for s, a in CELLS[2:]]
    rows = [json.loads(line) for line in progress.read_text().splitlines()]
    assert len(rows) == len(experiment.FIXED) + len(CELLS)  # each cell recorded once

    # the result is the uninterrupted run's (timings aside), and so are the written tables
    def values(df):
        return df.drop(columns="seconds").astype({"seed": str}).reset_index(drop=True)

    pd.testing.assert_frame_equal(values(resumed), values(full))
    for name in ("summary", "weights"):
        a = (tmp_path / "full" / f"experiment-lumi-large-{name}.csv").read_text()
        assert (out / f"experiment-lumi-large-{name}.csv").read_text() == a, name

    # a third call has nothing left to do
    third = Calls(world)
    again = _run(world, out, monkeypatch, third)
    assert third.finetuned == [] and third.evaluated == []
    pd.testing.assert_frame_equal(values(again), values(full))
    assert len(progress.read_text().splitlines()) == len(rows)
