"""Boundaries, defaults and overrides of atlantis/selection.py that the main tests do not reach (from the mutation
survivors of bench/mutation.py); every expected selection is worked out by hand in the comments."""

import json
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atlantis.selection import (
    DEFAULT_SCORERS,
    SelectConfig,
    SelectionError,
    ifd_scores,
    passing,
    read_subset,
    select,
    select_top,
    selection_scorers,
    write,
)


@pytest.fixture()
def files(tmp_path):
    """Losses s(y|x) = [1, 2, 0.5, 3] and s(y) = [2, 2, 2, 1]: loss IFD [0.5, 1.0, 0.25, 3.0], perplexity IFD
    exp([-1, 0, -1.5, 2])."""
    ids = ["a", "b", "c", "d"]
    cond, direct = tmp_path / "cond.parquet", tmp_path / "direct.parquet"
    pq.write_table(pa.table({"id": ids, "logp_mean_cond": [-1.0, -2.0, -0.5, -3.0]}), cond)
    pq.write_table(pa.table({"id": ids, "logp_mean_direct": [-2.0, -2.0, -2.0, -1.0]}), direct)
    return [str(cond), str(direct)]


def cfg(files, tmp_path, **kw):
    return SelectConfig(scores=files, out=str(tmp_path / "sel.parquet"), **{"rate": 1.0, **kw})


def test_rate_and_n_total_bounds():
    assert SelectConfig(scores=["a"], out="x", rate=1.0).rate == 1.0
    for rate in (1.5, 0.0):
        with pytest.raises(ValueError, match=r"rate must be in \(0, 1\]"):
            SelectConfig(scores=["a"], out="x", rate=rate)
    with pytest.raises(ValueError, match="n_total must be positive"):
        SelectConfig(scores=["a"], out="x", rate=0.5, n_total=0)
    assert SelectConfig(scores=["a"], out="x", rate=0.5, n_total=1).n_total == 1


def test_a_zero_direct_loss_has_no_loss_ratio():
    with pytest.raises(SelectionError, match="direct loss is <= 0"):
        ifd_scores(np.array([1.0, 1.0]), np.array([2.0, 0.0]), "loss")
    with pytest.raises(SelectionError, match="unknown ratio 'log'"):
        ifd_scores(np.array([1.0]), np.array([2.0]), "log")


def test_passing_defaults_keep_an_ifd_of_exactly_the_threshold():
    assert passing(np.array([0.5, 1.0, 1.5, np.inf])).tolist() == [0, 1]


def test_exactly_k_valid_samples_are_selected_without_a_warning(caplog):
    ids, ifd = np.array(["a", "b", "c"]), np.array([0.2, 0.9, 0.5])
    with caplog.at_level(logging.WARNING, logger="atlantis"):
        assert select_top(ids, ifd, 2, np.array([0, 2])).tolist() == [2, 0]
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="atlantis"):
        assert select_top(ids, ifd, 3, np.array([0, 2])).tolist() == [2, 0]
    assert "only 2 samples pass" in caplog.text


def test_the_rate_applies_to_the_records_of_the_report(files, tmp_path):
    # superfiltering: ppl IFD exp([-1, 0, -1.5, 2]); IFD >= 1 dropped -> a, c pass; count int(rate x n_total)
    (tmp_path / "cond.report.json").write_text(json.dumps({"n_records": 6}))
    (tmp_path / "direct.report.json").write_text(json.dumps({"n_records": 100}))
    table, summary = select(cfg(files, tmp_path, method="superfiltering", rate=0.34))
    assert summary["n_total"] == 6 and summary["n_scored"] == 4
    assert table["id"].tolist() == ["a", "c"]  # int(0.34 x 6) = 2, not int(0.34 x 4) = 1
    # a report without n_records: the scored count, int(0.34 x 4) = 1
    (tmp_path / "cond.report.json").write_text(json.dumps({"n_samples": 6}))
    table, summary = select(cfg(files, tmp_path, method="superfiltering", rate=0.34))
    assert summary["n_total"] == 4 and table["id"].tolist() == ["a"]
    # no report at all: the same
    (tmp_path / "cond.report.json").unlink()
    assert select(cfg(files, tmp_path, method="superfiltering", rate=0.34))[1]["n_total"] == 4
    # n_total given wins over any report
    (tmp_path / "cond.report.json").write_text(json.dumps({"n_records": 6}))
    assert select(cfg(files, tmp_path, method="superfiltering", rate=0.34, n_total=3))[1]["n_total"] == 3


def test_allow_missing_is_passed_to_the_reader(files, tmp_path):
    pq.write_table(pa.table({"id": ["a", "b", "c"], "logp_mean_direct": [-2.0, -2.0, -2.0]}), tmp_path / "d3.parquet")
    three = [files[0], str(tmp_path / "d3.parquet")]
    table, summary = select(cfg(three, tmp_path))  # allow_missing defaults to true: a, b, c
    assert summary["n_scored"] == 3 and table["id"].tolist() == ["b", "a", "c"]
    with pytest.raises(ValueError, match="disagree on ids"):  # read_scores' WeightsError
        select(cfg(three, tmp_path, allow_missing=False))


def test_ratio_and_drop_override_the_method(files, tmp_path):
    # ifd: loss IFD [0.5, 1.0, 0.25, 3.0], drop > 1: a, b, c pass; rate 1 keeps all three, highest first
    table, summary = select(cfg(files, tmp_path))
    assert table["id"].tolist() == ["b", "a", "c"] and table["ifd"].tolist() == [1.0, 0.5, 0.25]
    assert (summary["ratio"], summary["drop"], summary["count_of"]) == ("loss", "above", "passing")
    # drop >= 1 instead: b goes
    table, summary = select(cfg(files, tmp_path, drop="at_or_above"))
    assert table["id"].tolist() == ["a", "c"] and summary["drop"] == "at_or_above"
    # the perplexity ratio instead: the same order, IFD exp(lc - ld)
    table, summary = select(cfg(files, tmp_path, ratio="ppl"))
    assert table["id"].tolist() == ["b", "a", "c"] and summary["ratio"] == "ppl"
    np.testing.assert_allclose(table["ifd"], [1.0, math.exp(-1.0), math.exp(-1.5)], rtol=1e-12)
    # count_of=all: int(0.5 x 4) = 2 of the passing, not int(0.5 x 3) = 1
    table, _ = select(cfg(files, tmp_path, rate=0.5, count_of="all"))
    assert table["id"].tolist() == ["b", "a"]
    assert select(cfg(files, tmp_path, rate=0.5))[0]["id"].tolist() == ["b"]


def test_a_selection_is_not_overwritten_silently(files, tmp_path):
    out = write(cfg(files, tmp_path))
    with pytest.raises(SelectionError, match="never overwritten silently"):
        write(cfg(files, tmp_path))
    assert write(cfg(files, tmp_path, overwrite=True)) == out
    assert pq.read_table(out).column("id").to_pylist() == ["b", "a", "c"]


def test_selection_scorers_merge_over_the_defaults():
    assert selection_scorers({}) == DEFAULT_SCORERS == {"ifd": "large", "superfiltering": "openai-community/gpt2"}
    assert selection_scorers({"scorers": {"ifd": "small"}}) == {
        "ifd": "small",
        "superfiltering": "openai-community/gpt2",
    }


def test_a_zero_direct_loss_is_refused_naming_its_file_unless_the_ratio_is_ppl(files, tmp_path):
    zero = tmp_path / "zero.parquet"
    pq.write_table(pa.table({"id": ["a", "b", "c", "d"], "logp_mean_direct": [-2.0, 0.0, -2.0, -1.0]}), zero)
    scores = [files[0], str(zero)]
    with pytest.raises(
        SelectionError, match=r"score file .*zero\.parquet: column logp_mean_direct is >= 0 .* ids \['b'\]"
    ):
        select(cfg(scores, tmp_path))
    # the perplexity ratio is defined for it: exp(2 - 0) for b
    table, _ = select(cfg(scores, tmp_path, method="superfiltering", ratio="ppl", drop="above", threshold=10.0))
    assert table["id"].tolist()[0] == "b" and table["ifd"].tolist()[0] == pytest.approx(math.exp(2.0))


def test_the_selection_table_and_summary_by_hand(files, tmp_path):
    table, summary = select(cfg(files, tmp_path))
    assert table.to_dict("list") == {
        "id": ["b", "a", "c"],
        "ifd": [1.0, 0.5, 0.25],
        "loss_conditioned": [2.0, 1.0, 0.5],
        "loss_direct": [2.0, 2.0, 2.0],
        "rank": [0, 1, 2],
    }
    assert (summary["method"], summary["rate"], summary["threshold"]) == ("ifd", 1.0, 1.0)
    assert (summary["n_scored"], summary["n_passing"], summary["n_selected"]) == (4, 3, 3)
    # IFD [0.25, 0.5, 1, 3], linear interpolation between order statistics
    assert summary["ifd_quantiles"] == {"0": 0.25, "0.25": 0.4375, "0.5": 0.75, "0.75": 1.5, "1": 3.0}


def test_write_into_a_new_folder_and_read_the_subset_back(files, tmp_path):
    out = tmp_path / "new" / "deeper" / "sel.parquet"
    assert write(SelectConfig(scores=files, out=str(out), rate=1.0)) == out
    assert pq.read_schema(out).names == ["id", "ifd", "loss_conditioned", "loss_direct", "rank"]  # no index column
    summary = json.loads((out.parent / "sel.summary.json").read_text())
    assert summary["n_selected"] == 3 and summary["method"] == "ifd"
    assert read_subset(out) == ["b", "a", "c"]
    (tmp_path / "ids.txt").write_text("b\n\n  a \nc\n")
    assert read_subset(tmp_path / "ids.txt") == ["b", "a", "c"]
    with pytest.raises(SelectionError, match="does not exist"):
        read_subset(tmp_path / "none.txt")
