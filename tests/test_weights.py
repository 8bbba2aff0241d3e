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
    disagreement_rate,
    ess,
    log_weight,
    postprocess,
    rank_correlation,
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
    # mean-1 weights [0.25, 0.5, 0.75, 2.5], clipped at 1.2 and renormalised until both hold. Fixed point: the
    # two largest sit at the cap and the rest keep their ratio: [a, 2a, 1.2, 1.2] with (2.4 + 3a) / 4 = 1
    w, stats = postprocess(np.log([1.0, 2.0, 3.0, 10.0]), clip_max=1.2)
    a = 1.6 / 3
    np.testing.assert_allclose(w, [a, 2 * a, 1.2, 1.2])
    assert stats["frac_clipped"] == 0.5
    w, stats = postprocess(np.log([1.0, 2.0, 3.0, 10.0]), clip_max=10.0, floor=0.4)
    raw = np.array([0.4, 0.5, 0.75, 2.5])
    np.testing.assert_allclose(w, raw / raw.mean())
    assert stats["frac_floored"] == 0.25 and stats["frac_clipped"] == 0.0
    w, stats = postprocess(np.log(np.arange(1.0, 101.0)), clip_quantile=0.9, normalize=False)
    assert w.max() == pytest.approx(np.quantile(np.arange(1.0, 101.0), 0.9)) and stats["frac_clipped"] == 0.1
    # huge sequence-level log ratios do not overflow once normalised
    w, _ = postprocess(np.array([800.0, 799.0, 0.0]))
    np.testing.assert_allclose(w, np.array([1, math.exp(-1), math.exp(-800)]) / ((1 + math.exp(-1)) / 3))


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
