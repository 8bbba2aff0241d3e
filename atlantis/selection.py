"""Data selection by Instruction-Following Difficulty (IFD) and Superfiltering (paper §3.4, Table 3).

IFD (Li et al. 2023a, Cherry_LLM) compares how hard a response is with and without its instruction:
    IFD = s(y|x) / s(y),   s = mean token cross-entropy of the response.
Superfiltering (Li et al. 2024a) computes the same quantity with a small model (GPT-2 in the original) and
its released code ranks by the perplexity ratio ppl(y|x)/ppl(y) = exp(s(y|x) − s(y)).
Both drop samples with IFD ≥ 1 (the instruction does not help: the pair is likely misaligned) and keep the
highest-IFD samples, `rate × N` of them, N being the size of the whole dataset (Superfiltering's
`select_data.py`: `int(len(data) * sample_rate)` after filtering `ifd < 1`).

Both terms come from the one scorer (`atlantis score`): s(y|x) with `render.context=full` and s(y) with
`render.context=response_only`; no second scoring code path.
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
from atlantis.weights import read_scores

log = get_logger(__name__)


class SelectionError(ValueError):
    """Selection cannot be made as asked."""


@dataclass
class SelectConfig:
    scores: list[str] = field(help="Score files holding the conditioned and the direct scores (by id).")
    out: str = field(help="Output Parquet of the selected ids: id, ifd, loss_conditioned, loss_direct, rank.")
    rate: float = field(help="Fraction of the whole dataset to keep (paper Table 3: 0.05, 0.10, 0.15).")
    method: Literal["ifd", "superfiltering"] = field(
        "ifd", help="Label of the method; decides the default ratio (ifd: loss, superfiltering: ppl)."
    )
    conditioned: str = field("cond", help="Role of the s(y|x) scores (render.context=full).")
    direct: str = field("direct", help="Role of the s(y) scores (render.context=response_only).")
    ratio: Literal["auto", "loss", "ppl"] = field(
        "auto", help="IFD as a loss ratio (Cherry_LLM paper) or perplexity ratio (Superfiltering code)."
    )
    threshold: float = field(1.0, help="Drop samples with IFD >= threshold (1.0 in both originals).")
    allow_missing: bool = field(
        True,
        help="Keep the ids scored in both files: direct scoring cannot score a one-token response without "
        "BOS, and truncation may drop others; the count dropped is reported in the summary.",
    )
    n_total: int | None = field(None, help="Dataset size N for rate x N (default: the number of scored samples).")

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 1:
            raise ValueError(f"rate must be in (0, 1], got {self.rate}")
        if self.n_total is not None and self.n_total <= 0:
            raise ValueError("n_total must be positive")


def ifd_scores(loss_conditioned: np.ndarray, loss_direct: np.ndarray, ratio: str) -> np.ndarray:
    """IFD from mean token losses (negative mean log-probs)."""
    lc, ld = np.asarray(loss_conditioned, np.float64), np.asarray(loss_direct, np.float64)
    if ratio == "loss":
        if np.any(ld <= 0):
            raise SelectionError("a direct loss is <= 0; the loss ratio is undefined for it")
        return lc / ld
    if ratio == "ppl":
        return np.exp(lc - ld)
    raise SelectionError(f"unknown ratio {ratio!r}")


def select_top(ids: np.ndarray, ifd: np.ndarray, rate: float, n_total: int, threshold: float = 1.0):
    """Indices of the kept samples, highest IFD first, among those with IFD < threshold (ties by id)."""
    k = int(n_total * rate)
    valid = np.flatnonzero(np.isfinite(ifd) & (ifd < threshold))
    order = sorted(valid, key=lambda i: (-ifd[i], ids[i]))
    if len(order) < k:
        log.warning("only %d samples have IFD < %s; keeping all of them (asked for %d)", len(order), threshold, k)
    return np.asarray(order[:k], dtype=np.int64)


def select(cfg: SelectConfig) -> tuple[pd.DataFrame, dict]:
    scores = read_scores(cfg.scores, cfg.allow_missing)
    cols = {r: f"logp_mean_{r}" for r in (cfg.conditioned, cfg.direct)}
    for role, col in cols.items():
        if col not in scores.columns:
            raise SelectionError(f"selection needs column {col!r} (role {role}); have {sorted(scores.columns)}")
    loss_c = -scores[cols[cfg.conditioned]].to_numpy()
    loss_d = -scores[cols[cfg.direct]].to_numpy()
    ratio = cfg.ratio if cfg.ratio != "auto" else ("loss" if cfg.method == "ifd" else "ppl")
    ifd = ifd_scores(loss_c, loss_d, ratio)
    ids = scores.index.to_numpy()
    n_total = cfg.n_total or len(ids)
    keep = select_top(ids, ifd, cfg.rate, n_total, cfg.threshold)
    table = pd.DataFrame(
        {
            "id": ids[keep],
            "ifd": ifd[keep],
            "loss_conditioned": loss_c[keep],
            "loss_direct": loss_d[keep],
            "rank": np.arange(len(keep)),
        }
    )
    summary = {
        "method": cfg.method,
        "ratio": ratio,
        "rate": cfg.rate,
        "threshold": cfg.threshold,
        "n_total": n_total,
        "n_scored": len(ids),
        "n_below_threshold": int(np.sum(ifd < cfg.threshold)),
        "n_selected": len(keep),
        "ifd_quantiles": {
            str(q): float(v) for q, v in zip((0, 0.25, 0.5, 0.75, 1), np.quantile(ifd, (0, 0.25, 0.5, 0.75, 1)))
        },
    }
    return table, summary


def write(cfg: SelectConfig) -> Path:
    table, summary = select(cfg)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(table, preserve_index=False), out)
    out.with_name(out.name.removesuffix(".parquet") + ".summary.json").write_text(json.dumps(summary, indent=1))
    log.info(
        "selected %d of %d samples (%s, rate %.2f) -> %s",
        summary["n_selected"],
        summary["n_total"],
        cfg.method,
        cfg.rate,
        out,
    )
    return out


def read_subset(path: str | Path) -> list[str]:
    """Selected ids from a selection file (Parquet with an `id` column) or a text file of ids."""
    path = Path(path)
    if not path.is_file():
        raise SelectionError(f"subset file {path} does not exist")
    if path.suffix == ".parquet":
        return pq.read_table(path, columns=["id"]).column("id").to_pylist()
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]
