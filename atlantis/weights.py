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

Post-processing (defaults in `WeightsConfig`):
1. exponent (a temperature): log w ← exponent · log w; 1 is the paper, 0 gives plain SFT;
2. `clip_quantile`: the samples above that quantile are tied at it (by rank: scaling does not change
   which samples it clips, so the share clipped is 1 − clip_quantile, whatever the spread);
3. with `normalize` (the default): self-normalisation to mean 1, so the weighted loss keeps SFT's scale
   and hyper-parameters (Table 6), under the cap `clip_max` and the `floor`, both in units of the mean
   weight. Clipping and normalising are solved together (`water_fill`): w_i = clip(s·exp(log w_i), floor,
   clip_max) with the one scale s that gives mean 1. That has a solution iff floor ≤ 1 ≤ clip_max; else
   the run stops with the reason. Renormalising after a clip instead would lift the clipped weights above
   the cap again, and alternating the two need not converge in any fixed number of rounds (with
   `reduction=sum` the log weights spread by hundreds: 100 rounds ended at mean 0.55);
4. without `normalize`: w = exp(log w), clipped to [floor, clip_max] as absolute values.
The diagnostics report how many weights were clipped and floored and the final mean.
"""

from __future__ import annotations

import json
import math
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
    overwrite: bool = field(False, help="Replace an existing output file (never done silently).")
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
        help="Cap on the weights in mean weights (>= 1 with normalize; absolute without; none: no cap). Rarely "
        "binds with mean reduction; guards against one sample dominating a step.",
    )
    clip_quantile: float | None = field(
        None, help="Tie the weights above this quantile at it (by rank, before normalising), e.g. 0.99."
    )
    floor: float = field(0.0, help="Lowest weight, in mean weights (<= 1 with normalize; absolute without); 0: none.")
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
        if self.normalize:
            check_feasible(self.clip_max, self.floor)


def check_feasible(clip_max: float | None, floor: float) -> None:
    """Weights with mean 1 can lie in [floor, clip_max] iff floor <= 1 <= clip_max; else `WeightsError`."""
    if clip_max is not None and clip_max < 1:
        raise WeightsError(
            f"no weights with mean 1 fit under a cap of {clip_max:g} times the mean weight: clip_max must be >= 1"
        )
    if floor > 1:
        raise WeightsError(
            f"no weights with mean 1 stay above a floor of {floor:g} times the mean weight: floor must be <= 1"
        )


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
    """Weights from log weights (see the module docstring for the order); returns (w, stats).

    With `normalize` the result always meets its contract, or this raises `WeightsError` with the reason:
    mean exactly 1 (to rounding), every weight in [floor, clip_max], and the order of the log weights kept
    (`water_fill`). Without it, `clip_max` and `floor` are absolute bounds on exp(exponent · log w).
    stats: n_clipped / n_floored (samples lowered to the cap / raised to the floor), their fractions,
    `clip_at` (the weight the clipped samples end at), and the final `mean`.
    """
    z = exponent * np.asarray(log_w, dtype=np.float64)
    if z.size == 0:
        raise WeightsError("no log weights to post-process")
    if not np.all(np.isfinite(z)):
        raise WeightsError(f"non-finite log weights for {int((~np.isfinite(z)).sum())} sample(s)")
    cap = math.inf if clip_max is None else float(clip_max)
    if not normalize:
        w = np.exp(z)
        if not np.all(np.isfinite(w)) or not np.any(w > 0):
            raise WeightsError("weights overflow or are all zero; use normalize=true or reduction=mean")
        upper = cap if clip_quantile is None else min(cap, float(np.quantile(w, clip_quantile)))
        if floor > upper:
            raise WeightsError(f"floor={floor} is above the cap {upper:g}: no weight can meet both")
        clipped, floored = w > upper, w < floor
        w = np.clip(w, floor, upper)
        clip_at = upper
    else:
        quantile_clipped = np.zeros(z.shape, dtype=bool)
        if clip_quantile is not None:
            # By rank, before scaling: the samples above the quantile are tied at it. Scaling keeps the order,
            # so the same samples stay clipped and the clip never needs redoing. (Capping at the quantile's
            # value in units of the mean instead can put the cap below 1, where no mean-1 weights exist.)
            z_q = _log_quantile(z, clip_quantile)
            quantile_clipped = z > z_q
            z = np.minimum(z, z_q)
        w, capped, floored = water_fill(z, cap, floor)
        clipped = capped | quantile_clipped
        clip_at = float(w[clipped].max()) if clipped.any() else cap
        if clipped.any() and float(w[clipped].sum()) >= 0.5 * w.size:
            log.warning(
                "%d of %d weights (%.1f%%) sit at the cap %.4g and carry %.0f%% of the total weight: the clip, "
                "not the log weights, decides the weighting (reduction=sum? try reduction=mean or a lower exponent)",
                int(clipped.sum()),
                w.size,
                100 * clipped.mean(),
                clip_at,
                100 * float(w[clipped].sum()) / w.size,
            )
    return w, {
        "n_clipped": int(clipped.sum()),
        "n_floored": int(floored.sum()),
        "frac_clipped": float(clipped.mean()),
        "frac_floored": float(floored.mean()),
        "clip_at": float(clip_at),
        "mean": float(w.mean()),
    }


def renormalize(w: np.ndarray, clip_max: float | None = None, floor: float = 0.0) -> np.ndarray:
    """Weights rescaled to mean 1 over a subset of the samples they were computed for, keeping the cap.

    Dividing by the subset's mean instead would lift the weights clipped at `clip_max` (and the floored
    ones) above (below) the bound whenever that mean is below (above) 1. Zero weights stay zero (or rise
    to the floor); all-zero weights raise `WeightsError`.
    """
    w = np.asarray(w, dtype=np.float64)
    if np.any(~np.isfinite(w) | (w < 0)):
        raise WeightsError("weights must be finite and >= 0")
    with np.errstate(divide="ignore"):
        return water_fill(np.log(w), math.inf if clip_max is None else clip_max, floor)[0]


def _log_quantile(z: np.ndarray, q: float) -> float:
    """log of `np.quantile(exp(z), q)` (linear interpolation), computed without overflow or underflow."""
    m = float(z.max())
    u = float(np.quantile(np.exp(z - m), q))
    # u is 0 only if the order statistics around the quantile underflow: interpolate their logs instead
    return m + math.log(u) if u > 0 else float(np.quantile(z, q))


def _logsumexp(z: np.ndarray) -> float:
    m = float(z.max())
    return m + math.log(float(np.exp(z - m).sum()))


def water_fill(
    log_w: np.ndarray, cap: float = math.inf, floor: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights w_i = clip(s·exp(log_w_i), floor, cap) with mean 1 exactly; returns (w, capped, floored).

    g(s) = mean(clip(s·exp(log_w), floor, cap)) is continuous and non-decreasing in s, from `floor` (s → 0)
    to `cap` (s → ∞), so a scale s with g(s) = 1 exists iff floor ≤ 1 ≤ cap; with it, the weights are
    unique. It is found in log space, t = log s: t ↦ g is piecewise `k·cap + j·floor + e^t·Σ_mid e^{log_w}`
    between the breakpoints log(cap) − log_w_i and log(floor) − log_w_i, so a binary search over the sorted
    breakpoints finds the piece that holds the solution (which samples sit at the cap, k, and at the floor,
    j), and the piece gives it in closed form: the middle samples share n − k·cap − j·floor in proportion to
    exp(log_w_i) (a softmax, exact for any spread of log_w). No alternating clip-and-renormalise rounds, no
    iteration limit, and no underflow: a sample whose exp(log_w) would be 0 after a naive exp still gets its
    share. `log_w = -inf` (a zero weight) is allowed and ends at the floor.

    `capped`/`floored`: the samples lowered to the cap / raised to the floor (a sample that lands on the cap
    exactly counts as neither). Raises `WeightsError` when no solution exists.
    """
    z = np.asarray(log_w, dtype=np.float64)
    n = z.size
    if n == 0:
        raise WeightsError("no weights to normalise")
    if np.isnan(z).any() or np.isposinf(z).any():
        raise WeightsError("log weights must be finite or -inf (a zero weight)")
    finite = np.isfinite(z)
    check_feasible(cap, floor)
    if not finite.any() and floor == 0:
        raise WeightsError(f"all {n} weights are zero: there is nothing to normalise to mean 1")
    n_zero = n - int(finite.sum())
    top = ((n - n_zero) * cap if n > n_zero else 0.0) + n_zero * floor  # n·g(s → ∞); zeros stay at the floor
    if top < n:
        raise WeightsError(
            f"{n_zero} of {n} weights are zero and stay at the floor {floor:g}: under a cap of {cap:g} the mean "
            "cannot reach 1"
        )
    if finite.any():
        z = z - z[finite].max()  # the solution is invariant to a shift; this keeps e^z <= 1
    log_cap = math.log(cap) if math.isfinite(cap) else math.inf
    log_floor = math.log(floor) if floor > 0 else -math.inf

    def g(t: float) -> float:
        with np.errstate(over="ignore"):  # without a cap, e^(z+t) may overflow: then g = inf >= 1, as it should
            return float(np.exp(np.clip(z + t, log_floor, log_cap)).mean())

    cap_bp = log_cap - z[finite] if math.isfinite(cap) else np.empty(0)
    floor_bp = log_floor - z[finite] if floor > 0 else np.empty(0)
    bps = np.unique(np.concatenate([cap_bp, floor_bp]))
    lo, hi = -1, len(bps)  # smallest hi with g(bps[hi]) >= 1; g(-inf) = floor <= 1 <= cap = g(+inf)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if g(bps[mid]) >= 1:
            hi = mid
        else:
            lo = mid
    t_lo = bps[lo] if lo >= 0 else -math.inf
    t_hi = bps[hi] if hi < len(bps) else math.inf
    # On the open piece (t_lo, t_hi) no sample changes side: sample i is capped iff its cap breakpoint is
    # <= t_lo, floored iff its floor breakpoint is >= t_hi (the same float expressions as the breakpoints).
    with np.errstate(invalid="ignore"):
        capped = (log_cap - z <= t_lo) if math.isfinite(cap) else np.zeros(n, dtype=bool)
        floored = (log_floor - z >= t_hi) if floor > 0 else np.zeros(n, dtype=bool)
    middle = ~capped & ~floored
    k, j = int(capped.sum()), int(floored.sum())
    rest = n - (k * cap if k else 0.0) - j * floor  # what the middle samples must add up to (0·inf is 0)
    w = np.where(capped, cap, floor)
    share = middle & finite
    if share.any() and rest > 0:
        w[share] = rest * np.exp(z[share] - _logsumexp(z[share]))
    w[middle & ~finite] = 0.0  # zero weights with no floor stay zero
    w = np.clip(w, floor, cap)  # rounding only: a middle sample exceeds the cap by at most a few ulps
    mean = float(w.mean())
    if not abs(mean - 1) <= 1e-9:  # NaN fails too
        raise WeightsError(
            f"normalising to mean 1 under cap {cap:g} and floor {floor:g} ended at mean {mean!r} "
            f"({k} capped, {j} floored of {n}): please report this"
        )
    return w, capped, floored


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


LOGP_PREFIXES = ("logp_sum_", "logp_mean_")


def _read_score_file(path: str) -> pd.DataFrame:
    """One score file indexed by id; refuses what `atlantis score` never writes (no rows, a missing or duplicated
    id, a non-finite log-prob), naming the file, the column and the first ids."""
    if not Path(path).is_file():
        raise WeightsError(f"score file {path} does not exist")
    df = pq.read_table(path).to_pandas()
    if "id" not in df.columns:
        raise WeightsError(f"score file {path} has no 'id' column (columns: {sorted(df.columns)})")
    if df.empty:
        raise WeightsError(f"score file {path} has no rows")
    dup = df["id"][df["id"].duplicated()].unique()
    if len(dup):
        raise WeightsError(
            f"score file {path}: {len(dup)} id(s) appear more than once, e.g. {dup[:3].tolist()}; one row per "
            "sample is expected (two score files concatenated?)"
        )
    for col in [c for c in df.columns if c.startswith(LOGP_PREFIXES)]:
        bad = ~np.isfinite(df[col].to_numpy(dtype=np.float64, na_value=np.nan))
        if bad.any():
            raise WeightsError(
                f"score file {path}: column {col} is NaN or infinite for {int(bad.sum())} sample(s), e.g. ids "
                f"{df['id'][bad].head(3).tolist()}; `atlantis score` never writes such values: rescore them"
            )
    return df.set_index("id")


def read_scores(paths: list[str], allow_missing: bool = False) -> pd.DataFrame:
    """Join score files on id; differing id sets are an error unless `allow_missing`, and no common id always is.

    Every file is checked first (`_read_score_file`): duplicated ids or a NaN/inf log-prob stop the run."""
    frames = [(p, _read_score_file(p)) for p in paths]
    joined = frames[0][1]
    for i, (p, df) in enumerate(frames[1:], start=1):
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
        common = joined.join(df, how="inner")
        if common.empty:
            raise WeightsError(
                f"no id is common to the score files {[q for q, _ in frames[: i + 1]]}: e.g. "
                f"{sorted(joined.index)[:3]} in the earlier files, {sorted(df.index)[:3]} in {p} (scores of "
                "different data?)"
            )
        joined = common
    return joined.sort_index()


def same_response(scores: pd.DataFrame, roles: list[str]) -> list[dict]:
    """Samples whose `roles` scored different response strings ({"id", "reason"}); score files without the
    y_sha columns (written before they existed) are not checked."""
    cols = [f"y_sha_{r}" for r in dict.fromkeys(roles)]
    missing = [c for c in cols if c not in scores.columns]
    if missing:
        log.warning("score files without %s: cannot check that the models scored the same y", missing)
        return []
    if len(cols) < 2:
        return []
    differ = scores[cols].nunique(axis=1) > 1
    out = []
    for sid in scores.index[differ]:
        trunc = [r for r in dict.fromkeys(roles) if scores.at[sid, f"truncated_{r}"]]
        why = f"truncated under {trunc}" if trunc else "another string (e.g. a template that strips the response)"
        out.append({"id": str(sid), "reason": f"the models scored different response text: {why}"})
    return out


def weight_bounds(path: str | Path) -> dict:
    """The cap and floor the weights were made with (their diagnostics), for `renormalize` on a subset."""
    diag = diagnostics_path(Path(path))
    if not diag.is_file():
        return {}
    d = json.loads(diag.read_text())
    cap = d.get("clip_at")  # clip_max, or the quantile's cap in units of the mean
    return {"clip_max": cap if cap is not None and math.isfinite(cap) else None, "floor": d.get("floor") or 0.0}


def excluded_ids(path: str | Path) -> set[str]:
    """Ids the weights step left out (their models scored different y), from the diagnostics beside the file."""
    diag = diagnostics_path(Path(path))
    if not diag.is_file():
        return set()
    return {e["id"] for e in json.loads(diag.read_text()).get("excluded", [])}


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
    # One y per sample: every model of the formula must have scored the same response string (each score file
    # carries the sha256 of its decoded scored tokens). A sample where they differ (a template that strips the
    # response's leading whitespace, a response cut at another token by max_length) would compare log-probs of
    # different text: it gets no weight and is listed by id; training leaves it out (`excluded_ids`).
    excluded = same_response(scores, [roles[k] for k in plus + minus])
    if excluded:
        scores = scores.drop(index=[e["id"] for e in excluded])
        log.warning(
            "%d sample(s) excluded: their models scored different response strings (first: %s, %s)",
            len(excluded),
            excluded[0]["id"],
            excluded[0]["reason"],
        )
        if scores.empty:
            raise WeightsError("no sample was scored on the same response string by every model")
        logp = {k: scores[f"{kind}_{roles[k]}"].to_numpy() for k in logp}
    log_w = log_weight(logp, cfg.formula)
    w, stats = postprocess(log_w, cfg.exponent, cfg.normalize, cfg.clip_max, cfg.clip_quantile, cfg.floor)
    table = pd.DataFrame({"id": scores.index.to_numpy(), "log_weight_raw": log_w, "weight": w})
    diag: dict[str, object] = {
        "formula": cfg.formula,
        "reduction": cfg.reduction,
        "exponent": cfg.exponent,
        "normalize": cfg.normalize,
        "clip_max": cfg.clip_max,
        "clip_quantile": cfg.clip_quantile,
        "floor": cfg.floor,
        **stats,
        **diagnostics(w, log_w),
        "n_excluded": len(excluded),
        "excluded": excluded,
    }
    if cfg.compare:
        other = read_weights(cfg.compare).set_index("id")
        common = table.set_index("id").join(other, how="inner", rsuffix="_other")
        if common.empty:  # the comparison would be NaN, written without a word
            raise WeightsError(
                f"compare: the weights file {cfg.compare} and the score files {cfg.scores} share no id (e.g. "
                f"{sorted(other.index)[:3]} vs {sorted(table['id'])[:3]}); compare weights of the same data"
            )
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
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise WeightsError(f"{out} exists; weights are never overwritten silently (pass overwrite=true)")
    table, diag = compute(cfg)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), out)
    diagnostics_path(out).write_text(json.dumps(diag, indent=1))
    log.info(
        "wrote %s: n=%d, mean %.6f, ESS/N=%.3f, %d clipped (%.2f%%) at %.4g, %d floored",
        out,
        diag["n"],
        diag["mean"],
        diag["ess_over_n"],
        diag["n_clipped"],
        100 * diag["frac_clipped"],
        diag["clip_at"],
        diag["n_floored"],
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
    if len(df) and not (df["weight"] > 0).any():  # `atlantis weights` never writes these: mean 1, or refused
        raise WeightsError(
            f"{path}: column weight is 0 for all {len(df)} sample(s), so the weights cannot be normalised (and "
            "training would learn nothing); recompute them with `atlantis weights`"
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
    w = df.loc[ids, "weight"].to_numpy(dtype=np.float64)
    if len(w) and not (w > 0).any():  # renormalising would divide by 0; plain weighting would learn nothing
        raise WeightsError(
            f"{path}: column weight is 0 for every one of the {len(ids)} training sample(s) (e.g. ids {ids[:3]}), "
            "so they cannot be normalised; these weights leave nothing to train on (recompute them, or train "
            "on other samples)"
        )
    return w
