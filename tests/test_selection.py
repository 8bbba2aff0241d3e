import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atlantis.data import DataConfig
from atlantis.render import RenderConfig
from atlantis.scoring import ScoreConfig, score
from atlantis.selection import SelectConfig, SelectionError, ifd_scores, passing, read_subset, select_top, write


def test_ifd_loss_and_ppl_ratio():
    lc, ld = np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 1.5])
    np.testing.assert_allclose(ifd_scores(lc, ld, "loss"), [0.5, 1.0, 2.0])
    np.testing.assert_allclose(ifd_scores(lc, ld, "ppl"), np.exp([-1.0, 0.0, 1.5]))


def test_filters_and_counts_follow_each_released_code():
    ids = np.array(["a", "b", "c", "d", "e", "f", "g", "h", "i", "j"])
    ifd = np.array([0.9, 1.0, 0.5, 0.95, 1.3, 0.2, 0.95, 0.7, np.nan, 0.1])
    # Cherry_LLM: drop IFD > 1 (1.0 stays), keep int(0.3 x 8 passing) = 2, highest first, ties by id
    cherry = passing(ifd, 1.0, "above")
    assert ids[cherry].tolist() == ["a", "b", "c", "d", "f", "g", "h", "j"]
    assert ids[select_top(ids, ifd, int(0.3 * len(cherry)), cherry)].tolist() == ["b", "d"]
    # Superfiltering: drop IFD >= 1 and NaN, keep int(0.3 x 10 in the dataset) = 3
    sf = passing(ifd, 1.0, "at_or_above")
    assert ids[select_top(ids, ifd, int(0.3 * 10), sf)].tolist() == ["d", "g", "a"]
    assert ids[select_top(ids, ifd, 20, sf)].tolist() == ["d", "g", "a", "h", "c", "f", "j"]  # all there are


def test_select_from_score_files(tmp_path):
    ids = ["a", "b", "c", "d"]
    pq.write_table(pa.table({"id": ids, "logp_mean_cond": [-1.0, -2.0, -0.5, -3.0]}), tmp_path / "c.parquet")
    pq.write_table(pa.table({"id": ids, "logp_mean_direct": [-2.0, -2.5, -2.0, -1.0]}), tmp_path / "d.parquet")
    cfg = SelectConfig(
        scores=[str(tmp_path / "c.parquet"), str(tmp_path / "d.parquet")], out=str(tmp_path / "sel.parquet"), rate=0.5
    )
    write(cfg)
    sel = pd.read_parquet(tmp_path / "sel.parquet")
    assert sel["id"].tolist() == ["b"]  # IFD a=.5, b=.8, c=.25, d=3 (dropped); int(0.5 x 3 passing) = 1
    np.testing.assert_allclose(sel["ifd"], [0.8])
    summary = json.loads((tmp_path / "sel.summary.json").read_text())
    assert summary["n_selected"] == 1 and summary["n_passing"] == 3 and summary["ratio"] == "loss"
    assert summary["count_of"] == "passing" and summary["drop"] == "above"
    assert read_subset(tmp_path / "sel.parquet") == ["b"]
    cfg.count_of = "all"  # Superfiltering's count: int(0.5 x 4 in the dataset) = 2
    cfg.out = str(tmp_path / "all.parquet")
    write(cfg)
    assert read_subset(tmp_path / "all.parquet") == ["b", "a"]
    cfg.out = str(tmp_path / "none.parquet")
    cfg.rate = 0.2
    with pytest.raises(SelectionError, match="keeps no sample"):
        write(cfg)
    cfg.scores = [str(tmp_path / "c.parquet")]
    with pytest.raises(SelectionError, match="needs column 'logp_mean_direct'"):
        write(cfg)


def test_ifd_end_to_end_with_the_one_scorer(models, data_file, tmp_path):
    """Conditioned and direct scores both come from `atlantis score`, only the rendering differs."""
    for role, context in (("cond", "full"), ("direct", "response_only")):
        score(
            ScoreConfig(
                model=models["qwen2"],
                role=role,
                out=str(tmp_path / f"{role}.parquet"),
                data=DataConfig(path=str(data_file)),
                render=RenderConfig(context=context, template="alpaca"),
            )
        )
    cond, direct = pd.read_parquet(tmp_path / "cond.parquet"), pd.read_parquet(tmp_path / "direct.parquet")
    assert cond["id"].tolist() == direct["id"].tolist()
    write(
        SelectConfig(
            scores=[str(tmp_path / "cond.parquet"), str(tmp_path / "direct.parquet")],
            out=str(tmp_path / "sel.parquet"),
            rate=0.5,
            method="superfiltering",
        )
    )
    sel = pd.read_parquet(tmp_path / "sel.parquet")
    expected = np.exp(-cond["logp_mean_cond"] + direct["logp_mean_direct"])
    expected.index = cond["id"]
    assert len(sel) <= 3 and (sel["ifd"] < 1).all()
    np.testing.assert_allclose(sel["ifd"], expected.loc[sel["id"]].to_numpy())
    assert sel["ifd"].is_monotonic_decreasing


def test_rate_validation():
    with pytest.raises(ValueError, match="rate"):
        SelectConfig(scores=["a"], out="x.parquet", rate=0.0)
