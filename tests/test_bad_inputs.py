"""Nothing stale, nothing lost: `atlantis weights` and `atlantis select` on outputs that exist."""

import logging
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atlantis.cli import main
from atlantis.selection import SelectConfig, SelectionError
from atlantis.selection import write as write_selection
from atlantis.weights import WeightsConfig, WeightsError
from atlantis.weights import write as write_weights


def score_file(path, role, ids, mean):
    mean = np.asarray(mean, float)
    pq.write_table(
        pa.table({"id": ids, f"logp_sum_{role}": 4 * mean, f"ntok_{role}": [4] * len(ids), f"logp_mean_{role}": mean}),
        path,
    )
    return str(path)


IDS = ["a", "b", "c", "d"]


def q(path) -> str:
    """A path as a regular expression matching itself."""
    return re.escape(str(path))


@pytest.fixture()
def weight_scores(tmp_path):
    return [
        score_file(tmp_path / "small.parquet", "small", IDS, [-2.0, -1.0, -3.0, -0.5]),
        score_file(tmp_path / "ref.parquet", "ref", IDS, [-1.5, -1.2, -1.0, -0.5]),
    ]


@pytest.fixture()
def select_scores(tmp_path):
    return [
        score_file(tmp_path / "cond.parquet", "cond", IDS, [-1.0, -2.0, -0.5, -3.0]),
        score_file(tmp_path / "direct.parquet", "direct", IDS, [-2.0, -2.5, -2.0, -1.0]),
    ]


# ------------------------------------------------------------------------------------------- overwrite


def test_weights_never_overwrite_silently(weight_scores, tmp_path):
    out = tmp_path / "w.parquet"
    write_weights(WeightsConfig(scores=weight_scores, out=str(out)))
    before = pd.read_parquet(out)
    diag = (tmp_path / "w.diagnostics.json").read_text()
    with pytest.raises(
        WeightsError, match=rf"^{q(out)} exists; weights are never overwritten silently \(pass overwrite=true\)$"
    ):
        write_weights(WeightsConfig(scores=weight_scores, out=str(out), exponent=0.0))
    pd.testing.assert_frame_equal(pd.read_parquet(out), before)  # untouched, diagnostics too
    assert (tmp_path / "w.diagnostics.json").read_text() == diag
    write_weights(WeightsConfig(scores=weight_scores, out=str(out), exponent=0.0, overwrite=True))
    np.testing.assert_allclose(pd.read_parquet(out)["weight"], 1.0)  # exponent 0: plain SFT
    assert '"exponent": 0.0' in (tmp_path / "w.diagnostics.json").read_text()


def test_selection_never_overwrites_silently(select_scores, tmp_path):
    out = tmp_path / "sel.parquet"
    write_selection(SelectConfig(scores=select_scores, out=str(out), rate=0.5))
    assert pd.read_parquet(out)["id"].tolist() == ["b"]
    summary = (tmp_path / "sel.summary.json").read_text()
    with pytest.raises(SelectionError, match=rf"^{q(out)} exists; a selection is never overwritten silently"):
        write_selection(SelectConfig(scores=select_scores, out=str(out), rate=0.5, count_of="all"))
    assert pd.read_parquet(out)["id"].tolist() == ["b"] and (tmp_path / "sel.summary.json").read_text() == summary
    write_selection(SelectConfig(scores=select_scores, out=str(out), rate=0.5, count_of="all", overwrite=True))
    assert pd.read_parquet(out)["id"].tolist() == ["b", "a"]


def test_the_cli_refuses_in_one_line(weight_scores, tmp_path, caplog):
    out = tmp_path / "w.parquet"
    args = ["weights", f"scores={','.join(weight_scores)}", f"out={out}"]
    assert main(args) == 0
    with caplog.at_level(logging.ERROR):
        assert main(args) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [f"WeightsError: {out} exists; weights are never overwritten silently (pass overwrite=true)"]
    assert main([*args, "overwrite=true"]) == 0
