import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atlantis.weights import (
    WeightsConfig,
    WeightsError,
    compute,
    diagnostics_path,
    disagreement_rate,
    ess,
    excluded_ids,
    log_weight,
    postprocess,
    rank_correlation,
    read_weights,
    renormalize,
    water_fill,
    weights_for,
    write,
)


def score_file(path, role, ids, mean, ntok):
    mean, ntok = np.asarray(mean, float), np.asarray(ntok)
    pq.write_table(
        pa.table({"id": ids, f"logp_sum_{role}": mean * ntok, f"ntok_{role}": ntok, f"logp_mean_{role}": mean}), path
    )
    return str(path)


@pytest.fixture()
def files(tmp_path):
    ids = ["a", "b", "c", "d"]
    return {
        "small": score_file(tmp_path / "s.parquet", "small", ids, [-2.0, -1.0, -3.0, -0.5], [10, 4, 2, 8]),
        "ref": score_file(tmp_path / "r.parquet", "ref", ids, [-1.5, -1.2, -1.0, -0.5], [10, 4, 2, 8]),
        "large": score_file(tmp_path / "l.parquet", "large", ids, [-1.0, -0.8, -2.0, -0.4], [10, 4, 2, 8]),
    }


def test_formulas_equal_hand_computation():
    a_s, a_r, a_l = np.array([-2.0, -1.0]), np.array([-1.5, -1.2]), np.array([-1.0, -0.8])
    lp = {"small": a_s, "ref": a_r, "large": a_l}
    np.testing.assert_allclose(log_weight(lp, "influence"), [0.5, -0.2])
    np.testing.assert_allclose(log_weight(lp, "algorithm1"), [-1.0 - 1.5 + 2.0, -0.8 - 1.2 + 1.0])
    np.testing.assert_allclose(log_weight(lp, "eq7"), [1.0, 0.2])
    with pytest.raises(WeightsError, match="needs the 'large' model"):
        log_weight({"small": a_s, "ref": a_r}, "eq7")
    with pytest.raises(WeightsError, match="non-finite"):
        log_weight({"small": a_s, "ref": np.array([-1.0, np.nan])}, "influence")


def test_postprocess_normalise_clip_floor():
    w, stats = postprocess(np.log([1.0, 2.0, 3.0, 10.0]), normalize=True)
    np.testing.assert_allclose(w, np.array([1, 2, 3, 10]) / 4.0)
    w, _ = postprocess(np.log([1.0, 4.0]), exponent=0.5, normalize=False)
    np.testing.assert_allclose(w, [1.0, 2.0])
    w, _ = postprocess(np.log([5.0, 5.0, 5.0]), exponent=0.0, normalize=False)
    np.testing.assert_allclose(w, [1.0, 1.0, 1.0])  # exponent 0 is plain SFT
    # mean-1 weights [0.25, 0.5, 0.75, 2.5] under a cap of 1.2: the two largest sit at the cap and the rest
    # keep their ratio: [a, 2a, 1.2, 1.2] with (2.4 + 3a) / 4 = 1
    w, stats = postprocess(np.log([1.0, 2.0, 3.0, 10.0]), clip_max=1.2)
    a = 1.6 / 3
    np.testing.assert_allclose(w, [a, 2 * a, 1.2, 1.2])
    assert stats["frac_clipped"] == 0.5 and stats["n_clipped"] == 2 and stats["mean"] == pytest.approx(1, abs=1e-15)
    # a floor of 0.4 (units of the mean) raises the smallest, and the rest share 4 - 0.4 = 3.6 as s·[2, 3, 10]:
    # s = 0.24, and the floored weight stays at the floor (no renormalisation pushes it below)
    w, stats = postprocess(np.log([1.0, 2.0, 3.0, 10.0]), clip_max=10.0, floor=0.4)
    np.testing.assert_allclose(w, [0.4, 0.48, 0.72, 2.4])
    assert stats["n_floored"] == 1 and stats["frac_floored"] == 0.25 and stats["n_clipped"] == 0
    w, stats = postprocess(np.log(np.arange(1.0, 101.0)), clip_quantile=0.9, normalize=False)
    assert w.max() == pytest.approx(np.quantile(np.arange(1.0, 101.0), 0.9)) and stats["frac_clipped"] == 0.1
    # normalised, the quantile clip is by rank (scaling does not change which samples it clips): the top 10%
    # tie at the 0.9 quantile, then everything is scaled to mean 1
    x = np.arange(1.0, 101.0)
    w, stats = postprocess(np.log(x), clip_quantile=0.9)
    q = np.quantile(x, 0.9)
    np.testing.assert_allclose(w, np.minimum(x, q) / np.minimum(x, q).mean())
    assert stats["n_clipped"] == 10 and stats["clip_at"] == pytest.approx(q / np.minimum(x, q).mean())
    # huge sequence-level log ratios do not overflow once normalised
    w, _ = postprocess(np.array([800.0, 799.0, 0.0]))
    np.testing.assert_allclose(w, np.array([1, math.exp(-1), math.exp(-800)]) / ((1 + math.exp(-1)) / 3))


def test_water_filling_by_hand():
    # raw weights ∝ [1, 2, 3, 10], cap 2, floor 0.5, n = 4 so the weights must sum to 4. Guess: 10 at the cap,
    # 1 at the floor, the middle two share the rest: 2 + 0.5 + s·(2 + 3) = 4, s = 0.3. Consistent: 10·0.3 =
    # 3 >= 2 (capped), 1·0.3 = 0.3 <= 0.5 (floored), 0.6 and 0.9 inside [0.5, 2].
    w, capped, floored = water_fill(np.log([1.0, 2.0, 3.0, 10.0]), cap=2.0, floor=0.5)
    np.testing.assert_allclose(w, [0.5, 0.6, 0.9, 2.0], rtol=1e-14)
    assert capped.tolist() == [False, False, False, True] and floored.tolist() == [True, False, False, False]
    # without bounds it is plain self-normalisation; with cap 1 every weight is 1
    np.testing.assert_allclose(water_fill(np.log([1.0, 3.0]))[0], [0.5, 1.5])
    np.testing.assert_allclose(water_fill(np.log([1.0, 3.0, 7.0]), cap=1.0)[0], [1.0, 1.0, 1.0])
    # the scale is found in log space: samples whose exp(log w - max) underflows to 0 still get their share.
    # One sample 2000 nats above 999 others, cap 10: it sits at 10 and the others share 990 equally.
    w, capped, _ = water_fill(np.r_[0.0, np.full(999, -2000.0)], cap=10.0)
    assert w[0] == 10.0 and capped.sum() == 1
    np.testing.assert_allclose(w[1:], 990 / 999, rtol=1e-13)
    # ...and keep their ratios: [0, -1000, -1001] under cap 2 gives [2, 1/(1+e^-1), e^-1/(1+e^-1)]
    w, _, _ = water_fill(np.array([0.0, -1000.0, -1001.0]), cap=2.0)
    np.testing.assert_allclose(w, [2.0, 1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))], rtol=1e-13)
    # a zero weight (log w = -inf) stays 0, or rises to the floor
    np.testing.assert_allclose(water_fill(np.array([-np.inf, 0.0, 0.0]))[0], [0.0, 1.5, 1.5])
    np.testing.assert_allclose(water_fill(np.array([-np.inf, 0.0, 0.0]), floor=0.3)[0], [0.3, 1.35, 1.35])


def test_sum_reduction_with_huge_spread_meets_the_contract(tmp_path):
    """Issue 11: log weights of sd 100 (reduction=sum) used to end at mean 0.55 after 100 clip/renormalise rounds."""
    rng = np.random.default_rng(0)
    n, ntok = 5000, np.full(5000, 200)
    ids = [f"s{i:05d}" for i in range(n)]
    small = rng.normal(-1.0, 0.3, n)
    ref = small + rng.normal(0.0, 0.5, n)  # per-token mean difference of sd 0.5 over 200 tokens: sd 100 in the sum
    scores = [score_file(tmp_path / "s.parquet", "small", ids, small, ntok)]
    scores.append(score_file(tmp_path / "r.parquet", "ref", ids, ref, ntok))
    out = write(WeightsConfig(scores=scores, out=str(tmp_path / "w.parquet"), reduction="sum", clip_max=10.0))
    table, diag = pd.read_parquet(out), json.loads((tmp_path / "w.diagnostics.json").read_text())
    log_w, w = table["log_weight_raw"].to_numpy(), table["weight"].to_numpy()
    assert 80 < log_w.std() < 120
    assert abs(w.mean() - 1) <= 1e-12 and w.max() <= 10.0 and w.min() >= 0
    assert diag["mean"] == pytest.approx(w.mean(), abs=1e-15) and diag["n_clipped"] == int((w == 10.0).sum()) > 0
    assert diag["clip_at"] == 10.0 and diag["n_floored"] == 0 and diag["frac_clipped"] == diag["n_clipped"] / n
    w, stats = postprocess(log_w, clip_max=10.0)
    assert abs(w.mean() - 1) <= 1e-12 and stats["mean"] == w.mean()
    assert np.all(np.diff(w[np.argsort(log_w)]) >= 0)  # the order of the log weights is kept
    # the capped samples are exactly the top ones, and the rest keep their exact ratios exp(Δ log w)
    top = np.argsort(log_w)[::-1]
    k = stats["n_clipped"]
    assert set(top[:k]) == set(np.flatnonzero(w == 10.0))
    i, j = top[k], top[k + 1]
    assert w[j] / w[i] == pytest.approx(math.exp(log_w[j] - log_w[i]), rel=1e-12)
    # with a floor as well, and with a quantile cap that lies far below 1 in units of the mean
    w, stats = postprocess(log_w, clip_max=10.0, floor=0.01)
    assert abs(w.mean() - 1) <= 1e-12 and w.max() <= 10.0 and w.min() == 0.01 and stats["n_floored"] > 0
    w, stats = postprocess(log_w, clip_quantile=0.99)
    assert abs(w.mean() - 1) <= 1e-12 and stats["n_clipped"] == 50


def test_impossible_bounds_raise_with_the_reason():
    with pytest.raises(WeightsError, match="cap of 0.5 times the mean weight: clip_max must be >= 1"):
        postprocess(np.log([1.0, 2.0]), clip_max=0.5)
    with pytest.raises(WeightsError, match="floor of 1.5 times the mean weight: floor must be <= 1"):
        postprocess(np.log([1.0, 2.0]), floor=1.5)
    with pytest.raises(WeightsError, match="all 3 weights are zero"):
        water_fill(np.full(3, -np.inf))
    with pytest.raises(WeightsError, match="2 of 3 weights are zero and stay at the floor 0: under a cap of 2"):
        renormalize(np.array([0.0, 0.0, 5.0]), clip_max=2.0)  # the one nonzero weight can reach only 2/3
    with pytest.raises(WeightsError, match="clip_max must be >= 1"):
        WeightsConfig(scores=["a"], out="x.parquet", clip_max=0.8)
    WeightsConfig(scores=["a"], out="x.parquet", clip_max=0.8, normalize=False)  # absolute cap: fine
    with pytest.raises(WeightsError, match="floor=2.0 is above the cap 1"):
        postprocess(np.log([1.0, 2.0]), normalize=False, clip_max=1.0, floor=2.0)
    with pytest.raises(WeightsError, match="non-finite log weights"):
        postprocess(np.array([0.0, np.nan]))


def test_renormalize_a_subset_keeps_the_cap():
    """Training renormalises the weights of the samples it trains on; dividing by their mean would lift the cap."""
    w, _ = postprocess(np.random.default_rng(1).normal(0.0, 3.0, 400), clip_max=4.0)
    subset = np.sort(w)[:300]  # the lightest three quarters: mean well below 1
    assert subset.mean() < 0.5 and (subset / subset.mean()).max() > 4.0
    r = renormalize(subset, clip_max=4.0)
    assert abs(r.mean() - 1) <= 1e-12 and r.max() <= 4.0
    np.testing.assert_allclose(renormalize(np.array([1.0, 3.0])), [0.5, 1.5])
    with pytest.raises(WeightsError, match="all 2 weights are zero"):
        renormalize(np.zeros(2))


def test_ess_and_disagreement_and_rank_correlation():
    assert ess(np.ones(7)) == pytest.approx(7.0)
    assert ess(np.array([1.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert ess(np.array([1.0, 3.0])) == pytest.approx(16 / 10)
    assert disagreement_rate([0.5, 1.5, 2.0, 0.9], [0.6, 0.7, 3.0, 1.1]) == 0.5
    assert disagreement_rate([1.0, 1.0], [1.0, 1.0001]) == 0.5  # exactly at the border counts as "not above"
    assert rank_correlation(np.array([1, 2, 3, 4.0]), np.array([10, 20, 30, 40.0])) == pytest.approx(1.0)
    assert rank_correlation(np.array([1, 2, 3, 4.0]), np.array([4, 3, 2, 1.0])) == pytest.approx(-1.0)
    assert rank_correlation(np.array([1, 2, 3, 4.0]), np.array([1, 3, 2, 4.0])) == pytest.approx(0.8)


def test_compute_from_files(files, tmp_path):
    cfg = WeightsConfig(scores=[files["small"], files["ref"]], out=str(tmp_path / "w.parquet"), clip_max=None)
    table, diag = compute(cfg)
    raw = np.array([0.5, -0.2, 2.0, 0.0])
    np.testing.assert_allclose(table["log_weight_raw"], raw)
    np.testing.assert_allclose(table["weight"], np.exp(raw) / np.exp(raw).mean())
    assert diag["n"] == 4 and diag["ess"] == pytest.approx(ess(table["weight"].to_numpy()))
    assert diag["frac_raw_above_1"] == 0.5
    assert diag["n_clipped"] == 0 and diag["n_floored"] == 0 and diag["mean"] == pytest.approx(1, abs=1e-15)
    # sum reduction uses the literal sequence log-probabilities
    cfg.reduction = "sum"
    table, _ = compute(cfg)
    np.testing.assert_allclose(table["log_weight_raw"], [5.0, -0.8, 4.0, 0.0])
    cfg.reduction, cfg.formula = "mean", "algorithm1"
    cfg.scores.append(files["large"])
    table, _ = compute(cfg)
    np.testing.assert_allclose(table["log_weight_raw"], [-0.5, -1.0, 0.0, -0.4])


def test_write_and_compare(files, tmp_path):
    first = write(WeightsConfig(scores=[files["small"], files["ref"]], out=str(tmp_path / "w1.parquet")))
    second = write(
        WeightsConfig(
            scores=[files["small"], files["large"]], formula="eq7", out=str(tmp_path / "w2.parquet"), compare=str(first)
        )
    )
    diag = json.loads((tmp_path / "w2.diagnostics.json").read_text())
    assert {"n_clipped", "n_floored", "mean", "clip_max", "floor"} <= set(diag) and diag["clip_max"] == 10.0
    # raw influence [e^.5, e^-.2, e^2, 1] vs raw eq7 [e^1, e^.2, e^1, e^.1]: above 1 -> [T,F,T,F] vs [T,T,T,T]
    assert diag["compare"]["disagreement_rate"] == 0.5 and diag["compare"]["n_common"] == 4
    assert set(pd.read_parquet(second).columns) == {"id", "log_weight_raw", "weight"}


def test_missing_column_and_mismatched_ids(files, tmp_path):
    with pytest.raises(WeightsError, match="needs column 'logp_mean_ref'"):
        compute(WeightsConfig(scores=[files["small"], files["large"]], out="x.parquet"))
    other = score_file(tmp_path / "o.parquet", "ref", ["a", "b", "z"], [-1.0, -1.0, -1.0], [1, 1, 1])
    with pytest.raises(WeightsError, match="disagree on ids: 2 only in earlier files.*1 only in"):
        compute(WeightsConfig(scores=[files["small"], other], out="x.parquet"))
    table, _ = compute(WeightsConfig(scores=[files["small"], other], out="x.parquet", allow_missing=True))
    assert table["id"].tolist() == ["a", "b"]
    with pytest.raises(WeightsError, match="appear in two score files"):
        compute(WeightsConfig(scores=[files["small"], files["small"]], out="x.parquet"))


def test_weights_for_dataset_ids(files, tmp_path):
    path = write(WeightsConfig(scores=[files["small"], files["ref"]], out=str(tmp_path / "w.parquet")))
    w = weights_for(["d", "a"], path)
    table = pd.read_parquet(path).set_index("id")
    np.testing.assert_allclose(w, table.loc[["d", "a"], "weight"])
    with pytest.raises(WeightsError, match="no weight for 1 of 3 sample id"):
        weights_for(["a", "b", "zz"], path)
    pq.write_table(pa.table({"id": ["a"], "weight": [float("inf")]}), tmp_path / "bad.parquet")
    with pytest.raises(WeightsError, match="non-finite or negative"):
        weights_for(["a"], tmp_path / "bad.parquet")


@pytest.mark.parametrize(
    "bad", [{"clip_max": 0.0}, {"clip_quantile": 1.5}, {"floor": -1.0}, {"exponent": -1.0}, {"scores": []}]
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        WeightsConfig(**{"scores": ["a"], "out": "x.parquet", **bad})


def test_samples_whose_models_scored_different_text_get_no_weight(tmp_path):
    """One y per sample: where p_S and p_r scored different strings (their y_sha differ) the sample is excluded by
    name, never weighted from log-probs of different text; training reads the list (`excluded_ids`)."""
    ids = ["a", "b", "c", "d"]
    sha = ["1111", "2222", "3333", "4444"]
    small = {"id": ids, "logp_mean_small": [-1.0, -2.0, -1.5, -1.2], "truncated_small": [False, False, False, True]}
    ref = {"id": ids, "logp_mean_ref": [-0.5, -1.0, -1.5, -1.0], "truncated_ref": [False] * 4}
    pq.write_table(pa.table({**small, "y_sha_small": sha}), tmp_path / "s.parquet")
    pq.write_table(pa.table({**ref, "y_sha_ref": ["1111", "2222", "xxxx", "yyyy"]}), tmp_path / "r.parquet")
    out = tmp_path / "w.parquet"
    write(WeightsConfig(scores=[str(tmp_path / "s.parquet"), str(tmp_path / "r.parquet")], out=str(out)))
    table = read_weights(out)
    assert table["id"].tolist() == ["a", "b"]
    # the weights of the two kept samples: p_r/p_S = e^0.5 and e^1, normalised to mean 1 (cap 10 not reached)
    raw = np.exp([0.5, 1.0])
    np.testing.assert_allclose(table["weight"], raw / raw.mean())
    diag = json.loads(diagnostics_path(out).read_text())
    assert diag["n_excluded"] == 2 and [e["id"] for e in diag["excluded"]] == ["c", "d"]
    assert "truncated under ['small']" in diag["excluded"][1]["reason"]
    assert excluded_ids(out) == {"c", "d"}
