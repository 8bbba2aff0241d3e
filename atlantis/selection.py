"""Data selection by Instruction-Following Difficulty (IFD) and Superfiltering (paper §3.4, Table 3).

IFD (Li et al. 2023a) compares how hard a response is with and without its instruction; Superfiltering
(Li et al. 2024a) computes it with a small model. Each method follows its released code (read at
tianyi-lab/Cherry_LLM 01fac8d `cherry_seletion/data_analysis.py` + `data_by_IFD.py`, and
tianyi-lab/Superfiltering f0764af `code_ifd/data_analysis.py` + `put_analysis_to_data.py` + `select_data.py`):

| | `method=ifd` (Cherry_LLM) | `method=superfiltering` |
|---|---|---|
| s(y given x) | Alpaca prompt + y (`render.template=alpaca`) | `"{instruction}\n" + y` (`template=superfiltering`) |
| s(y) | `"### Response:" + y` (`direct_prefix=alpaca`) | y alone (its first token is not scored) |
| max length | 512 (its scripts) | 1024 |
| same span | the direct pass scores as many response tokens as the conditioned one keeps (`+4`, `+1`) | same |
| IFD | mean loss ratio s(y|x)/s(y) | perplexity ratio exp(s(y|x) − s(y)) |
| dropped | IFD > 1 (`mean_rate > 1: continue`) | IFD ≥ 1 (kept: `ifd < 1`) |
| kept | `int(rate × number passing)` | `int(rate × dataset size)` (`52002 × rate` for Alpaca) |

s = mean token cross-entropy of the response. The scoring side (prompt, prefix, max length, same span) is
`atlantis score`'s render settings (the workflow's `score` passes); this module computes the ratio, the filter
and the count. Deviations, all deliberate: ties are broken by sample id (upstream: by position), a count of 0 is
an error (Cherry's `[-0:]` would keep everything), and the output lists ids highest IFD first (Cherry writes them
in dataset order; training order comes from the trainer's shuffle either way).
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
from atlantis.data import read_text
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
    overwrite: bool = field(False, help="Replace an existing output file (never done silently).")
    method: Literal["ifd", "superfiltering"] = field(
        "ifd", help="Whose released code to follow: the ratio, the filter and the count (module docstring)."
    )
    conditioned: str = field("cond", help="Role of the s(y|x) scores (render.context=full).")
    direct: str = field("direct", help="Role of the s(y) scores (render.context=response_only).")
    ratio: Literal["auto", "loss", "ppl"] = field(
        "auto", help="IFD as a loss ratio (Cherry_LLM paper) or perplexity ratio (Superfiltering code)."
    )
    threshold: float = field(1.0, help="The IFD filter's border (1.0 in both originals).")
    drop: Literal["auto", "above", "at_or_above"] = field(
        "auto", help="Drop IFD > threshold (`above`, Cherry_LLM) or >= threshold (`at_or_above`, Superfiltering)."
    )
    count_of: Literal["auto", "passing", "all"] = field(
        "auto",
        help="Keep int(rate x the samples passing the filter) (`passing`, Cherry_LLM) or int(rate x n_total) "
        "(`all`, Superfiltering).",
    )
    allow_missing: bool = field(
        True,
        help="Keep the ids scored in both files: direct scoring cannot score a one-token response without "
        "BOS, and truncation may drop others; the count dropped is reported in the summary.",
    )
    n_total: int | None = field(
        None,
        help="Dataset size for count_of=all (default: the records of the data scored, from the conditioned "
        "score file's report; else the number of scored samples).",
    )

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


# Who scores each selector's IFD by default: the released code's choices (Cherry_LLM scores with the model it trains;
# Superfiltering's code_ifd/ with `gpt2`). A profile's `experiments.selection.scorers` overrides them: `large` (the
# base being fine-tuned), `small` (the family's small base) or a model id or folder.
DEFAULT_SCORERS = {"ifd": "large", "superfiltering": "openai-community/gpt2"}


def selection_scorers(selection: dict) -> dict[str, str]:
    """The scorer of each selector under a profile's `experiments.selection` section."""
    return {**DEFAULT_SCORERS, **selection.get("scorers", {})}


METHODS = {  # (ratio, drop, count_of) of each released code
    "ifd": ("loss", "above", "passing"),
    "superfiltering": ("ppl", "at_or_above", "all"),
}


def passing(ifd: np.ndarray, threshold: float = 1.0, drop: str = "above") -> np.ndarray:
    """Indices that pass the filter: finite IFD, not above (or not at or above) the threshold."""
    ifd = np.asarray(ifd, np.float64)
    ok = ifd <= threshold if drop == "above" else ifd < threshold
    return np.flatnonzero(np.isfinite(ifd) & ok)


def select_top(ids: np.ndarray, ifd: np.ndarray, k: int, valid: np.ndarray) -> np.ndarray:
    """The k highest-IFD indices among `valid`, highest first (ties by id)."""
    order = sorted(valid, key=lambda i: (-ifd[i], ids[i]))
    if len(order) < k:
        log.warning("only %d samples pass the IFD filter; keeping all of them (asked for %d)", len(order), k)
    return np.asarray(order[:k], dtype=np.int64)


def _dataset_size(cfg: SelectConfig, n_scored: int) -> int:
    if cfg.n_total:
        return cfg.n_total
    from atlantis.scoring import report_path  # here: scoring imports torch, which selecting does not need

    report = report_path(Path(cfg.scores[0]))
    if report.is_file():
        return int(json.loads(report.read_text()).get("n_records") or n_scored)
    return n_scored


def _file_with(paths: list[str], column: str) -> str:
    """The score file holding `column` (for error messages)."""
    return next((p for p in paths if column in pq.read_schema(p).names), " or ".join(paths))


def select(cfg: SelectConfig) -> tuple[pd.DataFrame, dict]:
    # read_scores refuses a NaN/inf log-prob naming the file, the column and the ids, rather than letting `passing`
    # drop the sample without a word. Upstream gives a NaN IFD no meaning to follow: Cherry_LLM's `mean_rate > 1`
    # keeps it and sorts it anywhere, Superfiltering's `ifd < 1` drops it, and the transcription in
    # test_selection_upstream never meets one. From finite losses IFD is finite or +inf (an overflow), which the
    # filter drops as both released codes do; a direct loss <= 0 is refused below.
    scores = read_scores(cfg.scores, cfg.allow_missing)
    cols = {r: f"logp_mean_{r}" for r in (cfg.conditioned, cfg.direct)}
    for role, col in cols.items():
        if col not in scores.columns:
            raise SelectionError(f"selection needs column {col!r} (role {role}); have {sorted(scores.columns)}")
    loss_c = -scores[cols[cfg.conditioned]].to_numpy()
    loss_d = -scores[cols[cfg.direct]].to_numpy()
    ids = scores.index.to_numpy()
    ratio, drop, count_of = METHODS[cfg.method]
    ratio = cfg.ratio if cfg.ratio != "auto" else ratio
    drop = cfg.drop if cfg.drop != "auto" else drop
    count_of = cfg.count_of if cfg.count_of != "auto" else count_of
    if ratio == "loss" and np.any(loss_d <= 0):
        col = cols[cfg.direct]
        raise SelectionError(
            f"score file {_file_with(cfg.scores, col)}: column {col} is >= 0 (a loss <= 0) for "
            f"{int((loss_d <= 0).sum())} sample(s), e.g. ids {ids[loss_d <= 0][:3].tolist()}; IFD as a loss ratio is "
            "undefined for them (ratio=ppl is not)"
        )
    ifd = ifd_scores(loss_c, loss_d, ratio)
    valid = passing(ifd, cfg.threshold, drop)
    n_total = _dataset_size(cfg, len(ids))
    k = int(cfg.rate * (len(valid) if count_of == "passing" else n_total))
    if k == 0:
        raise SelectionError(
            f"rate {cfg.rate} x {len(valid) if count_of == 'passing' else n_total} ({count_of}) keeps no sample"
        )
    keep = select_top(ids, ifd, k, valid)
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
        "drop": drop,
        "count_of": count_of,
        "rate": cfg.rate,
        "threshold": cfg.threshold,
        "n_total": n_total,
        "n_scored": len(ids),
        "n_passing": len(valid),
        "n_selected": len(keep),
        "ifd_quantiles": {
            str(q): float(v) for q, v in zip((0, 0.25, 0.5, 0.75, 1), np.quantile(ifd, (0, 0.25, 0.5, 0.75, 1)))
        },
    }
    return table, summary


def write(cfg: SelectConfig) -> Path:
    out = Path(cfg.out)
    if out.exists() and not cfg.overwrite:
        raise SelectionError(f"{out} exists; a selection is never overwritten silently (pass overwrite=true)")
    table, summary = select(cfg)
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
    return [line.strip() for line in read_text(path).splitlines() if line.strip()]
