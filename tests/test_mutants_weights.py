"""Boundaries and branches of atlantis/weights.py that the main tests do not reach (from the mutation survivors of
bench/mutation.py): each value here is worked out by hand in the comment beside it."""

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atlantis.weights import (
    WeightsConfig,
    WeightsError,
    _log_quantile,
    compute,
    diagnostics,
    disagreement_rate,
    excluded_ids,
    postprocess,
    read_scores,
    read_weights,
    renormalize,
    water_fill,
    weight_bounds,
    weights_for,
    write,
)

E = math.e


def score_file(path, role, ids, mean):
    pq.write_table(pa.table({"id": ids, f"logp_mean_{role}": np.asarray(mean, float)}), path)
    return str(path)


@pytest.fixture()
def influence(tmp_path):
    """Four samples whose influence log weights (ref − small) are [0.5, −0.2, 2.0, 0.0]."""
    ids = ["a", "b", "c", "d"]
    return [
        score_file(tmp_path / "s.parquet", "small", ids, [-2.0, -1.0, -3.0, -0.5]),
        score_file(tmp_path / "r.parquet", "ref", ids, [-1.5, -1.2, -1.0, -0.5]),
    ]


# ---------------------------------------------------------------------------------------------- config


def test_config_bounds_on_clip_max_and_clip_quantile():
    with pytest.raises(ValueError, match="clip_max must be positive"):
        WeightsConfig(scores=["a"], out="x", normalize=False, clip_max=0.0)
    for q in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"clip_quantile must be in \(0, 1\]"):
            WeightsConfig(scores=["a"], out="x", clip_quantile=q)
    assert WeightsConfig(scores=["a"], out="x", clip_quantile=1.0).clip_quantile == 1.0
    assert WeightsConfig(scores=["a"], out="x", clip_quantile=0.01).clip_quantile == 0.01


def test_floor_of_one_is_feasible_and_gives_every_weight_one():
    w, stats = postprocess(np.array([0.3, -1.0, 2.0]), floor=1.0, clip_max=None)
    np.testing.assert_array_equal(w, [1.0, 1.0, 1.0])
    assert WeightsConfig(scores=["a"], out="x", floor=1.0).floor == 1.0
    w, _, floored = water_fill(np.array([0.3, -1.0, 2.0]), math.inf, 1.0)
    np.testing.assert_array_equal(w, [1.0, 1.0, 1.0])
    with pytest.raises(WeightsError, match="floor must be <= 1"):
        water_fill(np.array([0.3, -1.0]), math.inf, 1.0 + 1e-12)


def test_a_single_sample_gets_weight_one():
    w, stats = postprocess(np.array([-3.7]))
    assert w.tolist() == [1.0] and stats["mean"] == 1.0
    assert water_fill(np.array([5.0]), 2.0, 0.5)[0].tolist() == [1.0]
    with pytest.raises(WeightsError, match="no log weights"):
        postprocess(np.array([]))
    with pytest.raises(WeightsError, match="no weights to normalise"):
        water_fill(np.array([]))


# ---------------------------------------------------------------------------------------------- normalize=False


def test_unnormalised_weights_that_overflow_or_are_all_zero_raise():
    with pytest.raises(WeightsError, match="overflow or are all zero"), np.errstate(over="ignore"):
        postprocess(np.array([800.0, 0.0]), normalize=False)  # e^800 = inf
    with pytest.raises(WeightsError, match="overflow or are all zero"):
        postprocess(np.array([-800.0, -800.0]), normalize=False)  # e^-800 = 0 for both


def test_unnormalised_weights_keep_an_absolute_floor():
    w, stats = postprocess(np.log([0.1, 2.0, 40.0]), normalize=False, floor=0.5, clip_max=10.0)
    np.testing.assert_allclose(w, [0.5, 2.0, 10.0], rtol=1e-12)
    assert stats["n_floored"] == 1 and stats["n_clipped"] == 1 and stats["clip_at"] == 10.0


# ---------------------------------------------------------------------------------------------- renormalize


def test_renormalize_refuses_negative_and_nan_weights():
    for bad in ([1.0, -0.5], [1.0, float("nan")], [1.0, float("inf")]):
        with pytest.raises(WeightsError, match="must be finite and >= 0"):
            renormalize(np.array(bad))


def test_renormalize_keeps_the_floor():
    # the zero rises to the floor 0.5; the other two share 3 − 0.5 = 2.5 as 1:3 -> 0.625, 1.875
    np.testing.assert_allclose(renormalize(np.array([0.0, 1.0, 3.0]), floor=0.5), [0.5, 0.625, 1.875], rtol=1e-12)
    np.testing.assert_allclose(renormalize(np.array([0.0, 1.0, 3.0])), [0.0, 0.75, 2.25], rtol=1e-12)


# ---------------------------------------------------------------------------------------------- quantile, water_fill


def test_log_quantile_in_both_branches():
    # median of [1, 2] is 1.5 (linear interpolation of the weights, not of their logs)
    assert _log_quantile(np.log([1.0, 2.0]), 0.5) == pytest.approx(math.log(1.5), rel=1e-12)
    # exp(z − max) = [1, 0, 0] after underflow: the median of the weights is 0, so the logs are interpolated
    assert _log_quantile(np.array([0.0, -1e4, -2e4]), 0.5) == -1e4
    # through postprocess: the top sample is tied at the median e^-1e4, the bottom one has no share left
    w, stats = postprocess(np.array([0.0, -1e4, -2e4]), clip_quantile=0.5, clip_max=None)
    np.testing.assert_array_equal(w, [1.5, 1.5, 0.0])
    assert stats["n_clipped"] == 1


def test_water_fill_refuses_nan():
    with pytest.raises(WeightsError, match="finite or -inf"):
        water_fill(np.array([np.nan, 0.0]))
    with pytest.raises(WeightsError, match="finite or -inf"):
        water_fill(np.array([np.inf, 0.0]))


def test_zero_weights_at_a_floor_close_to_the_cap():
    # two zeros stay at 0.9 (1.8 of the total 3); the only positive sample must carry 1.2 = the cap: feasible
    np.testing.assert_allclose(water_fill(np.array([-np.inf, -np.inf, 0.0]), 1.2, 0.9)[0], [0.9, 0.9, 1.2])
    # a cap of 1.1 leaves 1.8 + 1.1 = 2.9 < 3: infeasible
    with pytest.raises(WeightsError, match="2 of 3 weights are zero"):
        water_fill(np.array([-np.inf, -np.inf, 0.0]), 1.1, 0.9)


def test_water_fill_of_huge_log_weights_stays_finite():
    # exp(1e308 − 0) is inf but only differences matter: weights ∝ [1, e^-1e308 = 0] with mean 1
    np.testing.assert_array_equal(water_fill(np.array([1e308, 0.0]))[0], [2.0, 0.0])
    # 2e²/(e² + 1) = 1.76 is above a cap of 1.5: [1.5, 0.5]
    np.testing.assert_allclose(water_fill(np.array([800.0, 798.0]), 1.5)[0], [1.5, 0.5], rtol=1e-12)
    np.testing.assert_allclose(water_fill(np.array([800.0, 799.0]))[0], [2 * E / (E + 1), 2 / (E + 1)], rtol=1e-12)


# ---------------------------------------------------------------------------------------------- statistics


def test_disagreement_rate_at_the_border():
    # w > 1: [F, T, F] vs [T, F, F]; a weight of exactly 1 is not above the border
    assert disagreement_rate(np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.2])) == pytest.approx(2 / 3)
    assert disagreement_rate(np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.2]), border=1.6) == pytest.approx(1 / 3)


def test_diagnostics_by_hand():
    d = diagnostics(np.array([0.5, 1.5]), np.log([0.5, 2.0]))
    assert d["n"] == 2
    assert d["ess"] == pytest.approx(1.6)  # (Σw)² / Σw² = 4 / 2.5
    assert d["ess_over_n"] == pytest.approx(0.8)
    assert d["mean"] == 1.0 and d["std"] == pytest.approx(0.5)
    assert d["frac_raw_above_1"] == 0.5
    keys = ["0.0", "0.01", "0.05", "0.25", "0.5", "0.75", "0.95", "0.99", "1.0"]
    assert list(d["quantiles"]) == keys and list(d["raw_weight_quantiles"]) == keys
    # linear between 0.5 and 1.5
    np.testing.assert_allclose(list(d["quantiles"].values()), [0.5, 0.51, 0.55, 0.75, 1.0, 1.25, 1.45, 1.49, 1.5])
    # exp of the linear interpolation of the logs between −ln 2 and ln 2: 2^(2q − 1)
    qs = np.array([0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0])
    np.testing.assert_allclose(list(d["raw_weight_quantiles"].values()), 2.0 ** (2 * qs - 1), rtol=1e-12)
    assert set(d) == {"n", "ess", "ess_over_n", "mean", "std", "quantiles", "raw_weight_quantiles", "frac_raw_above_1"}


# ---------------------------------------------------------------------------------------------- files


def test_score_files_whose_ids_differ_on_one_side_only_raise(tmp_path):
    abc = score_file(tmp_path / "abc.parquet", "small", ["a", "b", "c"], [-1.0, -1.0, -1.0])
    ab = score_file(tmp_path / "ab.parquet", "ref", ["a", "b"], [-1.0, -1.0])
    with pytest.raises(WeightsError, match="1 only in earlier files.*0 only in"):
        read_scores([abc, ab])
    with pytest.raises(WeightsError, match="0 only in earlier files.*1 only in"):
        read_scores([ab, abc])
    assert read_scores([abc, ab], allow_missing=True).index.tolist() == ["a", "b"]


def test_compute_applies_clip_quantile_and_floor(influence, tmp_path):
    raw = np.exp([0.5, -0.2, 2.0, 0.0])
    table, diag = compute(WeightsConfig(scores=influence, out="x", clip_quantile=0.5, clip_max=None))
    # the median of the raw weights is (1 + e^0.5)/2; the two above it are tied there, then mean 1
    tied = np.minimum(raw, (1 + math.exp(0.5)) / 2)
    np.testing.assert_allclose(table["weight"], tied / tied.mean(), rtol=1e-12)
    assert diag["n_clipped"] == 2 and diag["clip_quantile"] == 0.5
    table, diag = compute(WeightsConfig(scores=influence, out="x", floor=0.5, clip_max=None))
    # weights e^.5, e^-.2, e^2, 1 over their mean: b and d fall below 0.5 and sit there; a and c share 4 − 1 = 3
    share = 3 / (math.exp(0.5) + math.exp(2.0))
    np.testing.assert_allclose(table["weight"], [math.exp(0.5) * share, 0.5, math.exp(2.0) * share, 0.5], rtol=1e-12)
    assert diag["n_floored"] == 2


def test_compare_with_a_file_of_fewer_ids(influence, tmp_path):
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": ["a", "c"], "log_weight_raw": [0.0, 3.0], "weight": [0.5, 1.5]}), other)
    _, diag = compute(WeightsConfig(scores=influence, out="x", compare=str(other)))
    # common a, c: raw e^0.5, e^2 (both > 1) vs 1, e^3 (F, T) -> 1 of 2 disagree
    assert diag["compare"]["n_common"] == 2 and diag["compare"]["disagreement_rate"] == 0.5
    assert diag["compare"]["spearman"] == pytest.approx(1.0)
    # at border 2: e^0.5 = 1.65 is below, e^2 above; 1 below, e^3 above -> none disagree
    _, diag = compute(WeightsConfig(scores=influence, out="x", compare=str(other), border=2.0))
    assert diag["compare"]["disagreement_rate"] == 0.0


def test_read_weights_needs_the_weight_column_and_reads_a_zero(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "w": [1.0, 1.0]}), tmp_path / "no.parquet")
    with pytest.raises(WeightsError, match=r"missing column\(s\) \['weight'\]"):
        read_weights(tmp_path / "no.parquet")
    pq.write_table(pa.table({"id": ["a", "b"], "weight": [0.0, 2.0]}), tmp_path / "zero.parquet")
    assert read_weights(tmp_path / "zero.parquet")["weight"].tolist() == [0.0, 2.0]


def test_weight_bounds_from_the_diagnostics(tmp_path):
    out = tmp_path / "w.parquet"
    assert weight_bounds(out) == {}
    (tmp_path / "w.diagnostics.json").write_text(json.dumps({"clip_at": 10.0, "floor": 0.5}))
    assert weight_bounds(out) == {"clip_max": 10.0, "floor": 0.5}
    (tmp_path / "w.diagnostics.json").write_text(json.dumps({"clip_at": math.inf, "floor": None}))
    assert weight_bounds(out) == {"clip_max": None, "floor": 0.0}
    (tmp_path / "w.diagnostics.json").write_text(json.dumps({"floor": 0.0}))
    assert weight_bounds(out) == {"clip_max": None, "floor": 0.0}


def test_unnormalised_floor_equal_to_the_cap_is_allowed():
    w, stats = postprocess(np.log([0.1, 2.0, 40.0]), normalize=False, floor=2.0, clip_max=2.0)
    np.testing.assert_array_equal(w, [2.0, 2.0, 2.0])
    with pytest.raises(WeightsError, match="above the cap"):
        postprocess(np.log([0.1, 2.0]), normalize=False, floor=2.5, clip_max=2.0)


def test_excluded_ids_of_diagnostics_without_the_list(tmp_path):
    (tmp_path / "w.diagnostics.json").write_text(json.dumps({"n": 3}))
    assert excluded_ids(tmp_path / "w.parquet") == set()
    (tmp_path / "w.diagnostics.json").write_text(json.dumps({"excluded": [{"id": "b", "reason": "x"}]}))
    assert excluded_ids(tmp_path / "w.parquet") == {"b"}


def test_write_into_a_new_folder_records_the_settings(influence, tmp_path):
    other = tmp_path / "other.parquet"
    pq.write_table(pa.table({"id": ["a", "c"], "log_weight_raw": [0.0, 3.0], "weight": [0.5, 1.5]}), other)
    out = tmp_path / "new" / "deeper" / "w.parquet"
    cfg = WeightsConfig(scores=influence, out=str(out), reduction="mean", normalize=True, compare=str(other))
    assert write(cfg) == out
    assert pq.read_schema(out).names == ["id", "log_weight_raw", "weight"]  # no index column
    diag = json.loads((out.parent / "w.diagnostics.json").read_text())
    assert (diag["formula"], diag["reduction"], diag["normalize"]) == ("influence", "mean", True)
    assert diag["compare"]["file"] == str(other) and diag["compare"]["border"] == 1.0


def test_weights_that_are_all_zero_are_refused_and_small_ones_read(tmp_path):
    pq.write_table(pa.table({"id": ["a", "b"], "weight": [0.0, 0.0]}), tmp_path / "zero.parquet")
    with pytest.raises(WeightsError, match="column weight is 0 for all 2"):
        read_weights(tmp_path / "zero.parquet")
    pq.write_table(pa.table({"id": ["a", "b", "c"], "weight": [0.5, 0.5, 0.0]}), tmp_path / "w.parquet")
    assert read_weights(tmp_path / "w.parquet")["weight"].tolist() == [0.5, 0.5, 0.0]
    np.testing.assert_array_equal(weights_for(["b", "a"], tmp_path / "w.parquet"), [0.5, 0.5])
    with pytest.raises(WeightsError, match="0 for every one of the 1 training sample"):
        weights_for(["c"], tmp_path / "w.parquet")
