"""Nothing stale, nothing lost: `atlantis weights` and `atlantis select` on outputs that exist and score files
that `atlantis score` never writes (duplicated ids, NaN or infinite log-probs, no id in common). Each stops with
one line naming the file (and column) and the first ids."""

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
from atlantis.weights import WeightsConfig, WeightsError, read_scores
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


# --------------------------------------------------------------------------------------- duplicated ids


def test_a_duplicated_id_is_refused_naming_the_file_and_the_id(weight_scores, select_scores, tmp_path):
    dup = score_file(tmp_path / "dup.parquet", "ref", ["a", "b", "c", "d", "c"], [-1.5, -1.2, -1.0, -0.5, -1.0])
    message = rf"^score file {q(dup)}: 1 id\(s\) appear more than once, e.g. \['c'\]"
    with pytest.raises(WeightsError, match=message):
        write_weights(WeightsConfig(scores=[weight_scores[0], dup], out=str(tmp_path / "w.parquet")))
    assert not (tmp_path / "w.parquet").exists()
    cond = score_file(tmp_path / "dup_cond.parquet", "cond", ["a", "a", "b", "c", "d"], [-1.0, -1.0, -2.0, -0.5, -3.0])
    with pytest.raises(WeightsError, match=rf"^score file {q(cond)}: 1 id\(s\) appear more than once, e.g. \['a'\]"):
        write_selection(SelectConfig(scores=[cond, select_scores[1]], out=str(tmp_path / "s.parquet"), rate=0.5))


# ------------------------------------------------------------------------------------------ NaN and inf


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("column", ["logp_mean_ref", "logp_sum_ref"])
def test_a_non_finite_log_prob_is_refused_naming_the_file_column_and_id(weight_scores, tmp_path, bad, column):
    table = pq.read_table(weight_scores[1]).to_pandas()
    table.loc[table["id"] == "c", column] = bad
    bad_file = tmp_path / "bad_ref.parquet"
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), bad_file)
    message = rf"^score file {q(bad_file)}: column {column} is NaN or infinite for 1 sample\(s\), e.g. ids \['c'\]"
    with pytest.raises(WeightsError, match=message):
        write_weights(WeightsConfig(scores=[weight_scores[0], str(bad_file)], out=str(tmp_path / "w.parquet")))
    assert not (tmp_path / "w.parquet").exists()


def test_a_null_log_prob_is_refused_too(tmp_path):
    path = tmp_path / "null.parquet"
    pq.write_table(
        pa.table({"id": ["a", "b", "c"], "logp_mean_small": pa.array([-1.0, None, None], pa.float64())}), path
    )
    with pytest.raises(
        WeightsError, match=rf"^score file {q(path)}: column logp_mean_small .* 2 sample\(s\), e.g. ids \['b', 'c'\]"
    ):
        read_scores([str(path)])


@pytest.mark.parametrize("role", ["cond", "direct"])
def test_selection_stops_on_a_nan_score_instead_of_dropping_the_sample(select_scores, tmp_path, role):
    path = select_scores[0] if role == "cond" else select_scores[1]
    table = pq.read_table(path).to_pandas()
    table.loc[table["id"].isin(["b", "d"]), f"logp_mean_{role}"] = np.nan
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), path)
    message = (
        rf"^score file {q(path)}: column logp_mean_{role} is NaN or infinite for 2 sample\(s\), e.g. ids \['b', 'd'\]"
    )
    with pytest.raises(WeightsError, match=message):
        write_selection(SelectConfig(scores=select_scores, out=str(tmp_path / "sel.parquet"), rate=0.5))
    assert not (tmp_path / "sel.parquet").exists()


# ------------------------------------------------------------------------------------- no id in common


def test_allow_missing_with_no_common_id_is_refused(tmp_path):
    small = score_file(tmp_path / "small.parquet", "small", ["a", "b"], [-1.0, -2.0])
    ref = score_file(tmp_path / "ref.parquet", "ref", ["x", "y", "z"], [-1.0, -2.0, -3.0])
    message = (
        rf"^no id is common to the score files \['{q(small)}', '{q(ref)}'\]: "
        rf"e.g. \['a', 'b'\] in the earlier files, \['x', 'y', 'z'\] in {q(ref)} "
    )
    with pytest.raises(WeightsError, match=message):
        write_weights(WeightsConfig(scores=[small, ref], out=str(tmp_path / "w.parquet"), allow_missing=True))
    cond = score_file(tmp_path / "cond.parquet", "cond", ["a", "b"], [-1.0, -2.0])
    direct = score_file(tmp_path / "direct.parquet", "direct", ["x", "y"], [-2.0, -2.5])
    with pytest.raises(WeightsError, match=rf"^no id is common to the score files \['{q(cond)}', '{q(direct)}'\]"):
        write_selection(SelectConfig(scores=[cond, direct], out=str(tmp_path / "s.parquet"), rate=0.5))  # allow_missing


def test_a_score_file_without_ids_or_rows_is_refused(tmp_path):
    no_id = tmp_path / "no_id.parquet"
    pq.write_table(pa.table({"logp_mean_small": [-1.0]}), no_id)
    with pytest.raises(WeightsError, match=rf"^score file {q(no_id)} has no 'id' column"):
        read_scores([str(no_id)])
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "logp_mean_small": pa.array([], pa.float64())}), empty)
    with pytest.raises(WeightsError, match=rf"^score file {q(empty)} has no rows$"):
        read_scores([str(empty)])
