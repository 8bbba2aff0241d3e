"""Table 3: ATLANTIS weights on a selected subset are water-filled to mean 1 over that subset, by sample id.

The weights file is the full dataset's (mean 1 over all ten scored samples, made with cap 3 and floor 0.1, as its
diagnostics say); a selection Parquet, as `atlantis select` writes it, keeps six of them. The training config is
read as the workflow's `train` rule builds it (`atlantis train data=... out=... model=... method=atlantis
weights=... subset=...` and a shipped profile's `train_extra`), and the real `build_dataset` makes the training
set. Expected weights are worked out by hand below (complementing test_train_data_path's cap-only case with the
floor, a subset whose mean is above 1, and the command-line path).
"""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_jsonl

from atlantis import config as config_lib
from atlantis.models import load_tokenizer
from atlantis.train import TrainConfig, build_dataset

ROOT = Path(__file__).parents[1]

# Weights of s0..s9 over the full dataset: mean exactly 1; s0 sits at the cap (3), s1 at the floor (0.1).
FULL = {"s0": 3.0, "s1": 0.1, "s2": 0.5, "s3": 1.0, "s4": 1.5, "s5": 0.5, "s6": 1.0, "s7": 0.9, "s8": 0.6, "s9": 0.9}
CAP, FLOOR = 3.0, 0.1

# Water-filling: w_i = clip(s * raw_i, FLOOR, CAP) with the scale s that gives mean 1 over the kept samples.
# A: keeps s0..s5, raw sum 6.6 (mean 1.1 > 1), so s < 1: s1 stays at the floor (0.1 s < 0.1), s0 stays below the
#    cap (3 s < 3); 3 s + 0.1 + (0.5 + 1 + 1.5 + 0.5) s = 6  ->  6.5 s = 5.9  ->  s = 59/65.
#    (Dividing by the mean would put s1 at 0.1/1.1 = 0.0909, under the floor.)
SA = 59 / 65
SUBSET_A = {"s0": 3 * SA, "s1": 0.1, "s2": 0.5 * SA, "s3": 1.0 * SA, "s4": 1.5 * SA, "s5": 0.5 * SA}
# B: keeps s0, s1, s2, s5, s7, s8, raw sum 5.6 (mean 0.933 < 1), so s > 1: s0 stays at the cap, s1 rises off the
#    floor; 3 + (0.1 + 0.5 + 0.5 + 0.9 + 0.6) s = 6  ->  2.6 s = 3  ->  s = 15/13.
#    (Dividing by the mean would lift s0 to 3.214, over the cap.)
SB = 15 / 13
SUBSET_B = {"s0": 3.0, "s1": 0.1 * SB, "s2": 0.5 * SB, "s5": 0.5 * SB, "s7": 0.9 * SB, "s8": 0.6 * SB}


def _train_extra(profile: str | None) -> list[str]:
    if profile is None:
        return []
    return yaml.safe_load((ROOT / "config" / profile).read_text()).get("train_extra", [])


@pytest.fixture()
def files(tmp_path):
    records = [
        {"id": i, "conversations": [{"from": "human", "value": f"Say {i}."}, {"from": "gpt", "value": "sea fox"}]}
        for i in FULL
    ]
    data = write_jsonl(tmp_path / "sft.jsonl", records)
    weights = tmp_path / "weights" / "fam.parquet"
    weights.parent.mkdir()
    pq.write_table(pa.table({"id": list(FULL), "weight": list(FULL.values())}), weights)
    (weights.parent / "fam.diagnostics.json").write_text(json.dumps({"clip_at": CAP, "floor": FLOOR, "excluded": []}))
    return data, weights


def _selection(path: Path, ids: list[str]) -> Path:
    """A selection file in `atlantis select`'s layout (ranked, not in the data's order)."""
    ids = ids[::-1]
    n = len(ids)
    table = {"id": ids, "ifd": [1.0 - k / 10 for k in range(n)], "loss_conditioned": [1.0] * n}
    table |= {"loss_direct": [1.2] * n, "rank": list(range(n))}
    pq.write_table(pa.table(table), path)
    return path


@pytest.mark.parametrize("profile", [None, "config.yaml", "smoke.yaml"])
@pytest.mark.parametrize(("name", "expected"), [("A", SUBSET_A), ("B", SUBSET_B)])
def test_subset_weights_by_id(models, files, tmp_path, monkeypatch, profile, name, expected):
    assert sum(FULL.values()) == pytest.approx(10.0)
    assert sum(expected.values()) / len(expected) == pytest.approx(1.0, abs=1e-12)
    assert all(FLOOR - 1e-12 <= w <= CAP + 1e-12 for w in expected.values())
    data, weights = files
    subset = _selection(tmp_path / f"sel-{name}.parquet", list(expected))
    monkeypatch.chdir(ROOT)  # train_extra's paths (render.template) are relative to the workflow's folder
    args = [f"data={data}", f"out={tmp_path / 'run'}", f"model={models['llama']}", "method=atlantis"]
    args += [f"weights={weights}", f"subset={subset}", *_train_extra(profile)]
    cfg = config_lib.load(TrainConfig, None, args)
    ds = build_dataset(cfg, load_tokenizer(models["llama"]))
    got = dict(zip(ds.ids, ds.weights))
    assert sorted(got) == sorted(expected)
    for sid, w in expected.items():
        assert got[sid] == pytest.approx(w, rel=1e-9, abs=1e-12), (name, sid, got[sid], w)
    assert sum(ds.weights) / len(ds.weights) == pytest.approx(1.0, abs=1e-9)


def test_sft_on_the_same_subset_has_unit_weights(models, files, tmp_path):
    data, _ = files
    subset = _selection(tmp_path / "sel.parquet", list(SUBSET_A))
    args = [f"data={data}", f"out={tmp_path / 'run'}", f"model={models['llama']}", "method=sft", f"subset={subset}"]
    ds = build_dataset(config_lib.load(TrainConfig, None, args), load_tokenizer(models["llama"]))
    assert dict(zip(ds.ids, ds.weights)) == dict.fromkeys(SUBSET_A, 1.0)
