"""ATLANTIS importance weights: pure functions over log-probability columns, plus their diagnostics.

Formulas (ā_m is the log-probability of the response under model m, per-token mean by default):

- ``influence`` (§2.3, Fig. 2/4): log w = ā_r − ā_S, the "influence weight" p_r/p_S. The default, because
  ATLANTIS-cross (§4.2) trains with weights "calculated by the reference and small models" alone.
- ``algorithm1`` (Algorithm 1, line 1): log w = ā_L + ā_r − ā_S, i.e. W = p_L/p_S · p_r.
- ``eq7`` (Eq. 7): log w = ā_L − ā_S, the importance ratio p_L/p_S estimating p*/p_r.

Why the per-token mean is the default: the literal sequence ratio exp(Σ_t log-ratio_t) grows
exponentially with response length, so over long responses a handful of samples take almost all the
weight (effective sample size near 1) and response length, not quality, decides the weight. The mean is the
geometric-mean per-token ratio, comparable across lengths. `reduction="sum"` gives the literal formula.

Post-processing (applied in this order; defaults in `WeightsConfig`):
1. exponent (a temperature): log w ← exponent · log w; 1 is the paper, 0 gives plain SFT;
2. self-normalisation to mean 1, so the weighted loss keeps SFT's scale and hyper-parameters (Table 6);
3. clipping from above, absolute (`clip_max`, in units of the mean weight) or at a quantile;
4. a floor; then renormalisation to mean 1 when `normalize` is on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from atlantis.config import field
from atlantis.log import get_logger

log = get_logger(__name__)

FORMULAS = {
    # formula: (roles with +1, roles with −1)
    "influence": (("ref",), ("small",)),
    "algorithm1": (("large", "ref"), ("small",)),
    "eq7": (("large",), ("small",)),
}


class WeightsError(ValueError):
    """Weights cannot be computed or applied as asked."""


@dataclass
class WeightsConfig:
    scores: list[str] = field(help="Score files (Parquet from `atlantis score`), joined by id.")
    out: str = field(help="Output Parquet: id, log_weight_raw, weight.")
    formula: Literal["influence", "algorithm1", "eq7"] = field(
        "influence", help="influence: p_r/p_S (§2.3); algorithm1: p_L·p_r/p_S (Alg. 1); eq7: p_L/p_S (Eq. 7)."
    )
    reduction: Literal["mean", "sum"] = field(
        "mean", help="Per-token mean log-prob (default; length-robust) or the literal sequence sum."
    )
    small: str = field("small", help="Role (column suffix) of the small base model p_S.")
    ref: str = field("ref", help="Role of the reference (instruct) model p_r.")
    large: str = field("large", help="Role of the large base model p_L (algorithm1, eq7).")
    exponent: float = field(1.0, help="Multiply log w by this (temperature); 1 = paper, 0 = plain SFT.")
    normalize: bool = field(True, help="Self-normalise to mean 1 (keeps SFT's loss scale).")
    clip_max: float | None = field(
        10.0,
        help="Clip weights above this many mean weights (none: no absolute clip). Rarely binds with "
        "mean reduction; guards against one sample dominating a step.",
    )
    clip_quantile: float | None = field(None, help="Clip weights above this quantile, e.g. 0.99.")
    floor: float = field(0.0, help="Raise weights below this value to it (0: no floor).")
    allow_missing: bool = field(
        False, help="Score files with different ids: error (default), or keep the ids common to all."
    )
    compare: str | None = field(None, help="Another weights file: report disagreement and rank correlation.")
    border: float = field(1.0, help="Border for the disagreement rate (paper §4.2 uses 1.0 on raw weights).")

    def __post_init__(self) -> None:
        if not self.scores:
            raise ValueError("weights: at least one score file is required")
        if self.clip_max is not None and self.clip_max <= 0:
            raise ValueError("clip_max must be positive")
        if self.clip_quantile is not None and not 0 < self.clip_quantile <= 1:
            raise ValueError("clip_quantile must be in (0, 1]")
        if self.floor < 0:
            raise ValueError("floor must be >= 0")
        if self.exponent < 0:
            raise ValueError("exponent must be >= 0 (a negative one reverses the weights)")


# ------------------------------------------------------------------------------------- pure functions


def log_weight(logp: dict[str, np.ndarray], formula: str) -> np.ndarray:
    """log w from per-role log-probabilities ({"small": ā_S, "ref": ā_r, "large": ā_L})."""
    plus, minus = FORMULAS[formula]
    for role in plus + minus:
        if role not in logp:
            raise WeightsError(f"formula {formula} needs the {role!r} model's log-probs")
    out = sum(np.asarray(logp[r], dtype=np.float64) for r in plus) - sum(
        np.asarray(logp[r], dtype=np.float64) for r in minus
    )
    if not np.all(np.isfinite(out)):
        raise WeightsError(f"non-finite log weights for {int((~np.isfinite(out)).sum())} sample(s)")
    return out


def postprocess(
    log_w: np.ndarray,
    exponent: float = 1.0,
    normalize: bool = True,
    clip_max: float | None = None,
    clip_quantile: float | None = None,
    floor: float = 0.0,
) -> tuple[np.ndarray, dict[str, float]]:
    """Weights from log weights (see the module docstring for the order); returns (w, stats)."""
    z = exponent * np.asarray(log_w, dtype=np.float64)
    if normalize:  # exp(z - logmeanexp(z)): mean 1 without overflow
        m = z.max()
        w = np.exp(z - m)
        w /= w.mean()
    else:
        w = np.exp(z)
    if not np.all(np.isfinite(w)) or not np.any(w > 0):
        raise WeightsError("weights overflow or are all zero; use normalize=true or reduction=mean")
    upper = np.inf
    if clip_max is not None:
        upper = min(upper, clip_max)
    if clip_quantile is not None:
        upper = min(upper, float(np.quantile(w, clip_quantile)))
    clipped = w > upper
    floored = w < floor
    w = np.clip(w, floor, upper)
    if normalize:
        # Renormalising lifts the clipped weights above the cap again: alternate until both hold (a few
        # rounds), so that `clip_max` really bounds the final weights in units of the mean weight.
        for _ in range(100):
            w /= w.mean()
            if w.max() <= upper * (1 + 1e-9) or not np.isfinite(upper):
                break
            w = np.clip(w, floor, upper)
    if np.isfinite(upper):  # the share at the cap after the final renormalisation
        clipped = w >= upper * (1 - 1e-6)
    return w, {
        "frac_clipped": float(clipped.mean()),
        "frac_floored": float(floored.mean()),
        "clip_at": float(upper),
    }


def ess(w: np.ndarray) -> float:
    """Effective sample size (Σw)² / Σw² (Kish)."""
    w = np.asarray(w, dtype=np.float64)
    return float(w.sum() ** 2 / np.square(w).sum())


def disagreement_rate(w1: np.ndarray, w2: np.ndarray, border: float = 1.0) -> float:
    """Fraction of samples on opposite sides of `border` (paper §4.2: 46.78% for Qwen2 vs Gemma2 at 1.0)."""
    return float(np.mean((np.asarray(w1) > border) != (np.asarray(w2) > border)))


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson correlation of average ranks."""
    rx = pd.Series(x).rank().to_numpy()
    ry = pd.Series(y).rank().to_numpy()
    return float(np.corrcoef(rx, ry)[0, 1])


def diagnostics(w: np.ndarray, log_w_raw: np.ndarray) -> dict[str, object]:
    qs = [0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0]
    n = len(w)
    e = ess(w)
    return {
        "n": n,
        "ess": e,
        "ess_over_n": e / n,
        "mean": float(np.mean(w)),
        "std": float(np.std(w)),
        "quantiles": {str(q): float(v) for q, v in zip(qs, np.quantile(w, qs))},
        "raw_weight_quantiles": {str(q): float(v) for q, v in zip(qs, np.exp(np.quantile(log_w_raw, qs)))},
        "frac_raw_above_1": float(np.mean(log_w_raw > 0)),
    }


# -------------------------------------------------------------------------------------------- files


def read_scores(paths: list[str], allow_missing: bool = False) -> pd.DataFrame:
    """Join score files on id; differing id sets are an error unless `allow_missing`."""
    frames = []
    for p in paths:
        if not Path(p).is_file():
            raise WeightsError(f"score file {p} does not exist")
        frames.append((p, pq.read_table(p).to_pandas().set_index("id")))
    joined = frames[0][1]
    for p, df in frames[1:]:
        overlap = sorted(set(joined.columns) & set(df.columns))
        if overlap:
            raise WeightsError(f"{p}: columns {overlap} appear in two score files (same role twice?)")
        only_a, only_b = joined.index.difference(df.index), df.index.difference(joined.index)
        if (len(only_a) or len(only_b)) and not allow_missing:
            raise WeightsError(
                f"score files disagree on ids: {len(only_a)} only in earlier files (e.g. {list(only_a[:3])}), "
                f"{len(only_b)} only in {p} (e.g. {list(only_b[:3])}); set allow_missing=true to keep the "
                "ids common to all"
            )
        joined = joined.join(df, how="inner")
    return joined.sort_index()


def compute(cfg: WeightsConfig) -> tuple[pd.DataFrame, dict]:
    """Weights and their diagnostics for a config (no file written)."""
    scores = read_scores(cfg.scores, cfg.allow_missing)
    kind = "logp_mean" if cfg.reduction == "mean" else "logp_sum"
    roles = {"small": cfg.small, "ref": cfg.ref, "large": cfg.large}
    logp = {}
    plus, minus = FORMULAS[cfg.formula]
    for key in plus + minus:
        col = f"{kind}_{roles[key]}"
        if col not in scores.columns:
            raise WeightsError(
                f"formula {cfg.formula} needs column {col!r} (the {key} model's scores); "
                f"the score files have {sorted(scores.columns)}"
            )
        logp[key] = scores[col].to_numpy()
    log_w = log_weight(logp, cfg.formula)
    trunc = [c for c in scores.columns if c.startswith("truncated_")]
    if len(trunc) > 1:
        # Each model may cut a long response at another token: its mean then covers other text.
        differ = int((scores[trunc].nunique(axis=1) > 1).sum())
        if differ:
            log.warning(
                "%d sample(s) are truncated under one model and not another; their log-probs cover "
                "different text (raise render.max_length when scoring)",
                differ,
            )
    w, stats = postprocess(log_w, cfg.exponent, cfg.normalize, cfg.clip_max, cfg.clip_quantile, cfg.floor)
    table = pd.DataFrame({"id": scores.index.to_numpy(), "log_weight_raw": log_w, "weight": w})
    diag: dict[str, object] = {
        "formula": cfg.formula,
        "reduction": cfg.reduction,
        "exponent": cfg.exponent,
        "normalize": cfg.normalize,
        **stats,
        **diagnostics(w, log_w),
    }
    if cfg.compare:
        other = read_weights(cfg.compare).set_index("id")
        common = table.set_index("id").join(other, how="inner", rsuffix="_other")
        raw, raw_other = np.exp(common["log_weight_raw"]), np.exp(common["log_weight_raw_other"])
        diag["compare"] = {
            "file": cfg.compare,
            "n_common": len(common),
            "border": cfg.border,
            "disagreement_rate": disagreement_rate(raw, raw_other, cfg.border),
            # on the raw log weights: clipping ties the top of `weight` and would blur the ranking
            "spearman": rank_correlation(
                common["log_weight_raw"].to_numpy(), common["log_weight_raw_other"].to_numpy()
            ),
        }
    return table, diag


def write(cfg: WeightsConfig) -> Path:
    table, diag = compute(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), out)
    diagnostics_path(out).write_text(json.dumps(diag, indent=1))
    log.info(
        "wrote %s: n=%d, ESS/N=%.3f, clipped %.2f%%",
        out,
        diag["n"],
        diag["ess_over_n"],
        100 * diag["frac_clipped"],
    )
    return out


def diagnostics_path(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".parquet") + ".diagnostics.json")


def read_weights(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    df = pq.read_table(path).to_pandas()
    missing = {"id", "weight"} - set(df.columns)
    if missing:
        raise WeightsError(f"{path}: missing column(s) {sorted(missing)}")
    if df["id"].duplicated().any():
        raise WeightsError(f"{path}: duplicate ids, e.g. {df['id'][df['id'].duplicated()].head(3).tolist()}")
    bad = ~np.isfinite(df["weight"].to_numpy()) | (df["weight"].to_numpy() < 0)
    if bad.any():
        raise WeightsError(
            f"{path}: {int(bad.sum())} non-finite or negative weight(s), e.g. ids {df['id'][bad].head(3).tolist()}"
        )
    return df


def weights_for(ids: list[str], path: str | Path) -> np.ndarray:
    """The weight of every id, in the given order; any id without a weight is an error (used by training)."""
    df = read_weights(path).set_index("id")
    missing = [i for i in ids if i not in df.index]
    if missing:
        raise WeightsError(
            f"{path}: no weight for {len(missing)} of {len(ids)} sample id(s), e.g. "
            f"{missing[:3]}; the weights were computed for another dataset or subset"
        )
    return df.loc[ids, "weight"].to_numpy(dtype=np.float64)
