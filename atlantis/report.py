"""Tables for review: the paper's Tables 2, 3, 4, 5 and 7 beside what a profile reproduced.

Input is the workflow's *matrix* (`results/<profile>/matrix.json`: every run of the profile, what it is, and the
profile's `report` section) and one metrics file per run (`metrics/<run>.json`, written by the evaluation rules).
Each paper table is rebuilt in the paper's own schema (its key columns and metric columns, `results/paper/`):

- a row of the profile *stands for* a row of the paper (`report.stands_for`: `quen-large: Qwen2-7B`), so the two
  are joined on the paper's keys; rows on one side only are kept, with the other side empty;
- a value is the mean over the run's seeds, on the paper's scale (`report.metrics`: paper column -> metric name
  and factor); a 95% t-interval is given where there are two or more seeds;
- Δ tables compare each method with its table's baseline (SFT; Table 4's N/A) within a row group, in the paper
  and in the profile, paired by seed. For the tiny world the Δ is what compares: its absolute numbers are on
  another scale than the paper's (a made-up world, tiny models), so `difference` = reproduced − paper is given
  because reviewers ask for it, not because it should be near zero.

Outputs (per table N): `tableN.csv` (long: one row per table row and metric, with the runs behind it),
`tableN-delta.csv`, `tableN.md` and `tableN.tex`; `provenance.json` maps every run to its metrics file's SHA-256
and the provenance record the evaluation wrote (seed, training-config hash, git commit, package versions).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from atlantis import provenance
from atlantis.config import field
from atlantis.log import get_logger
from atlantis.selection import selection_scorers
from atlantis.stats import paired_ci

log = get_logger(__name__)

TABLES = {
    # table: (key columns, the column that names the compared arm, its baseline value, caption)
    "table2": (["model", "size", "method"], "method", "SFT", "Main results: SFT vs ATLANTIS (paper Table 2)"),
    "table3": (
        ["model", "selection", "rate", "method"],
        "method",
        "SFT",
        "Data selection with IFD and Superfiltering (paper Table 3)",
    ),
    "table4": (["model", "weights_from"], "weights_from", "N/A", "ATLANTIS-cross (paper Table 4)"),
    "table5": (["model", "size", "method"], "method", "SFT", "Scale (paper Table 5)"),
    "table7": (["model", "method"], "method", "SFT", "Proxy-tuning vs ATLANTIS (paper Table 7)"),
}
METHOD_NAMES = {"sft": "SFT", "atlantis": "ATLANTIS", "proxy": "proxy-tuning"}
# Reproduced-only columns, shown right after the paper column they qualify: AlpacaEval 2.0's length-controlled win
# rate (the package's headline metric, `<metric>_lc` in the metrics file) beside the raw win rate that the paper's
# "Hard" column is compared with (the paper: "the winning rate"; atlantis/evals/alpaca.py). A profile may name the
# column in `report.metrics` itself; otherwise it reads the paper column's metric + "_lc", on its scale.
BESIDE = {"alpacaeval_hard": "alpacaeval_hard_lc"}
LABELS = {
    "alpacaeval_easy": "alpacaeval_easy: win rate",
    "alpacaeval_hard": "alpacaeval_hard: raw win rate",
    "alpacaeval_hard_lc": "alpacaeval_hard_lc: length-controlled win rate, not in the paper",
}


class ReportError(ValueError):
    pass


@dataclass
class ReportConfig:
    matrix: str = field(help="The profile's matrix JSON (written by the workflow's `matrix` rule).")
    metrics: str = field(help="Folder of metrics/<run>.json files.")
    out: str = field(help="Folder for the tables (CSV, Markdown, LaTeX) and provenance.json.")
    paper: str = field("results/paper", help="Folder of the transcribed paper tables (tableN.csv).")


@dataclass(frozen=True)
class Spec:
    """A profile's `report` section, validated."""

    stands_for: dict[str, str]
    family_names: dict[str, str]
    metrics: dict[str, tuple[str, float]]

    @classmethod
    def from_matrix(cls, matrix: dict) -> Spec:
        rep = matrix.get("report")
        if not isinstance(rep, dict):
            raise ReportError("the profile has no `report` section (stands_for, family_names, metrics)")
        larges = set(matrix["config"]["large"])
        stands_for = dict(rep.get("stands_for", {}))
        unknown = sorted(set(stands_for) - larges)
        if unknown:
            raise ReportError(f"report.stands_for names unknown large models {unknown} (known: {sorted(larges)})")
        for name, paper in stands_for.items():
            if "-" not in paper:
                raise ReportError(f"report.stands_for.{name}: {paper!r} is not '<model>-<size>' (e.g. Qwen2-7B)")
        metrics = {}
        for col, m in dict(rep.get("metrics", {})).items():
            if not isinstance(m, dict) or "metric" not in m:
                raise ReportError(f"report.metrics.{col}: expected {{metric: <name>, scale: <factor>}}, got {m!r}")
            metrics[col] = (str(m["metric"]), float(m.get("scale", 1.0)))
        return cls(stands_for, dict(rep.get("family_names", {})), metrics)

    def paper_model(self, large: str) -> tuple[str, str] | None:
        """`Qwen2-7B` -> ("Qwen2", "7B"); None where the large model stands for no paper model."""
        name = self.stands_for.get(large)
        return None if name is None else tuple(name.rsplit("-", 1))  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------ the rows


def _seeded(matrix: dict, pred) -> list[str]:
    runs = [(r.get("seed", 0), rid) for rid, r in matrix["runs"].items() if pred(r)]
    return [rid for _, rid in sorted(runs)]


def plain_run(r: dict, large: str, method: str) -> bool:
    """A run of Table 2's kind: this model and method on all of D, with its own family's weights."""
    return r["large"] == large and r["method"] == method and "subset" not in r and not r.get("cross")


def reproduced_rows(matrix: dict, spec: Spec) -> dict[str, list[tuple[dict, list[str]]]]:
    """For each paper table: (key, metric files behind it) per row of the profile, keys in the paper's terms."""
    exp = matrix["config"]["experiments"]
    large_cfg = matrix["config"]["large"]
    rows: dict[str, list[tuple[dict, list[str]]]] = {t: [] for t in TABLES}

    def plain(large, method):
        return _seeded(matrix, lambda r: plain_run(r, large, method))

    for large in exp["main"]["large"] + exp.get("scale", {}).get("large", []):
        pm = spec.paper_model(large)
        if pm is None:
            continue
        for method in ("sft", "atlantis"):
            key = {"model": pm[0], "size": pm[1], "method": METHOD_NAMES[method]}
            runs = plain(large, method)
            if large in exp["main"]["large"]:
                rows["table2"].append((key, runs))
            rows["table5"].append((key, runs))
    sel = exp.get("selection", {})
    for large in sel.get("large", []):
        pm = spec.paper_model(large)
        if pm is None:
            continue
        for method in ("sft", "atlantis"):
            name = METHOD_NAMES[method]
            rows["table3"].append(
                ({"model": pm[0], "selection": "none", "rate": 1.0, "method": name}, plain(large, method))
            )
            for selector in sel["selectors"]:
                for rate in sel["rates"]:
                    runs = _seeded(
                        matrix,
                        lambda r, lg=large, s=selector, q=rate, m=method: (
                            r["large"] == lg
                            and r["method"] == m
                            and r.get("selector") == s
                            and float(r.get("rate", -1)) == float(q)
                        ),
                    )
                    rows["table3"].append(
                        ({"model": pm[0], "selection": selector, "rate": float(rate), "method": name}, runs)
                    )
    for large, family in exp.get("cross", {}).items():
        pm = spec.paper_model(large)
        if pm is None:
            continue
        own = spec.family_names.get(large_cfg[large]["family"], large_cfg[large]["family"])
        cross = _seeded(matrix, lambda r, lg=large: r["large"] == lg and r.get("cross"))
        rows["table4"] += [
            ({"model": pm[0], "weights_from": "N/A"}, plain(large, "sft")),
            ({"model": pm[0], "weights_from": own}, plain(large, "atlantis")),
            ({"model": pm[0], "weights_from": spec.family_names.get(family, family)}, cross),
        ]
    for large in exp.get("proxy", {}).get("large", []):
        pm = spec.paper_model(large)
        if pm is None:
            continue
        model = f"{pm[0]}-{pm[1]}"
        rows["table7"] += [
            ({"model": model, "method": "SFT"}, plain(large, "sft")),
            ({"model": model, "method": "proxy-tuning"}, [f"{large}.proxy"]),
            ({"model": model, "method": "ATLANTIS"}, plain(large, "atlantis")),
        ]
    return rows


def read_metrics(metrics_dir: Path, run: str) -> dict:
    """A run's metrics: `metrics/<run>.json` (the tiny world's p*-metrics) merged with every benchmark's
    `metrics/<run>/<benchmark>.json`; the provenance record is the world file's, else the first benchmark's.
    Per-example companions beside them (`alpacaeval_easy.annotations.json`) are not metrics files."""
    benchmarks = sorted(f for f in (metrics_dir / run).glob("*.json") if "." not in f.stem)
    files = [metrics_dir / f"{run}.json"] + benchmarks
    files = [f for f in files if f.is_file()]
    if not files:
        raise ReportError(f"{metrics_dir / run}.json: no metrics for run {run!r} (evaluate it first)")
    merged: dict = {"metrics": {}, "files": [str(f) for f in files]}
    for path in files:
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ReportError(f"{path}: not JSON ({err})") from None
        if not isinstance(record.get("metrics"), dict):
            raise ReportError(f"{path}: no `metrics` object")
        clash = set(record["metrics"]) & set(merged["metrics"])
        if clash:
            raise ReportError(f"{path}: metric(s) {sorted(clash)} already given by another file of run {run!r}")
        merged["metrics"].update(record["metrics"])
        if "provenance" in record and "provenance" not in merged:
            merged["provenance"] = record["provenance"]
    return merged


def source(spec: Spec, col: str) -> tuple[str, float] | None:
    """The metric (name, scale) behind a table column: the profile's `report.metrics`, or for a BESIDE column
    the metric of the column it qualifies + "_lc"."""
    if col in spec.metrics:
        return spec.metrics[col]
    base = next((b for b, extra in BESIDE.items() if extra == col), None)
    if base in spec.metrics:
        metric, scale = spec.metrics[base]
        return f"{metric}_lc", scale
    return None


def _norm_key(key: dict) -> tuple:
    return tuple(f"{float(v):.2f}" if k == "rate" else str(v) for k, v in key.items())


# ------------------------------------------------------------------------------------------ one table


def build_table(
    name: str, paper: pd.DataFrame, rows: list[tuple[dict, list[str]]], records: dict[str, dict], spec: Spec
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long value table and Δ table for one paper table."""
    keys, arm_col, baseline, _ = TABLES[name]
    metric_cols = [
        col
        for c in paper.columns
        if c not in keys
        for col in [c, *([BESIDE[c]] if c in BESIDE and source(spec, BESIDE[c]) else [])]
    ]
    paper_by_key = {_norm_key({k: r[k] for k in keys}): r for _, r in paper.iterrows()}
    ours_by_key = {_norm_key(k): (k, runs) for k, runs in rows}
    order = list(paper_by_key) + [k for k in ours_by_key if k not in paper_by_key]

    def per_seed(runs: list[str], col: str) -> dict[int, float]:
        if source(spec, col) is None:
            return {}
        metric, scale = source(spec, col)
        out = {}
        for run in runs:
            rec = records[run]
            if metric in rec["metrics"]:
                # the seed the workflow gave the run (its matrix entry), not whatever a metrics file recorded
                out[int(rec.get("seed", 0))] = float(rec["metrics"][metric]) * scale
        return out

    values = []
    for nk in order:
        prow = paper_by_key.get(nk)
        key, runs = ours_by_key.get(nk, (None, []))
        key = key or {k: prow[k] for k in keys}
        for col in metric_cols:
            seeds = per_seed(runs, col)
            vals = np.asarray(list(seeds.values()))
            mean = float(vals.mean()) if len(vals) else math.nan
            lo = hi = math.nan
            if len(vals) >= 2:
                _, lo, hi = paired_ci(vals)  # a one-sample t-interval of the mean
            p = float(prow[col]) if prow is not None and col in prow.index and not pd.isna(prow[col]) else math.nan
            values.append(
                {
                    **{k: key[k] for k in keys},
                    "metric": col,
                    "paper": p,
                    "reproduced": mean,
                    "difference": mean - p,
                    "ci_low": lo,
                    "ci_high": hi,
                    "n_seeds": len(vals),
                    "runs": ";".join(runs),
                    "_seeds": seeds,
                }
            )
    vdf = pd.DataFrame(values)

    group_keys = [k for k in keys if k != arm_col]
    deltas = []
    for _, grp in vdf.groupby(group_keys + ["metric"], sort=False):
        base = grp[grp[arm_col].astype(str) == baseline]
        if base.empty:
            continue
        b = base.iloc[0]
        for _, r in grp[grp[arm_col].astype(str) != baseline].iterrows():
            common = sorted(set(r["_seeds"]) & set(b["_seeds"]))
            diffs = np.asarray([r["_seeds"][s] - b["_seeds"][s] for s in common])
            d, lo, hi = paired_ci(diffs) if len(diffs) else (math.nan, math.nan, math.nan)
            pd_ = r["paper"] - b["paper"]
            deltas.append(
                {
                    **{k: r[k] for k in group_keys},
                    "arm": r[arm_col],
                    "baseline": baseline,
                    "metric": r["metric"],
                    "paper_delta": pd_,
                    "reproduced_delta": d,
                    "ci_low": lo,
                    "ci_high": hi,
                    "n_seeds": len(diffs),
                    "same_sign": (np.sign(pd_) == np.sign(d)) if not (math.isnan(pd_) or math.isnan(d)) else None,
                }
            )
    return vdf.drop(columns="_seeds"), pd.DataFrame(deltas)


# ------------------------------------------------------------------------------------------ rendering


def _num(x: float, digits: int = 2, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _ci(lo: float, hi: float, sign: bool = False) -> str:
    return "" if math.isnan(lo) else f" [{_num(lo, sign=sign)}, {_num(hi, sign=sign)}]"


def _wide(vdf: pd.DataFrame, keys: list[str]) -> tuple[list[str], list[list[str]]]:
    metrics = list(dict.fromkeys(vdf["metric"]))
    header = keys + [f"{LABELS.get(m, m)} (paper / ours)" for m in metrics]
    body = []
    for _, grp in vdf.groupby(keys, sort=False):
        cells = [str(grp.iloc[0][k]) if k != "rate" else f"{grp.iloc[0][k]:.2f}" for k in keys]
        for m in metrics:
            r = grp[grp["metric"] == m].iloc[0]
            cells.append(f"{_num(r['paper'])} / {_num(r['reproduced'])}{_ci(r['ci_low'], r['ci_high'])}")
        body.append(cells)
    return header, body


def _delta_wide(ddf: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    if ddf.empty:
        return [], []
    keys = [c for c in ddf.columns if c not in {"metric", "paper_delta", "reproduced_delta", "ci_low", "ci_high"}]
    keys = [k for k in keys if k not in {"n_seeds", "same_sign"}]
    metrics = list(dict.fromkeys(ddf["metric"]))
    header = keys + [f"Δ {LABELS.get(m, m)} (paper / ours)" for m in metrics] + ["seeds"]
    body = []
    for _, grp in ddf.groupby(keys, sort=False):
        cells = [str(grp.iloc[0][k]) if k != "rate" else f"{grp.iloc[0][k]:.2f}" for k in keys]
        for m in metrics:
            r = grp[grp["metric"] == m].iloc[0]
            cells.append(
                f"{_num(r['paper_delta'], sign=True)} / {_num(r['reproduced_delta'], sign=True)}"
                f"{_ci(r['ci_low'], r['ci_high'], sign=True)}"
            )
        body.append(cells + [str(int(grp["n_seeds"].max()))])
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    if not header:
        return "(no comparison in this profile)\n"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}"}


def _tex_escape(s: str) -> str:
    s = "".join(_TEX.get(ch, ch) for ch in s)
    return s.replace("Δ", r"$\Delta$").replace("–", "--")


def latex(header: list[str], body: list[list[str]], caption: str, label: str) -> str:
    if not header:
        return f"% {caption}: no comparison in this profile\n"
    lines = [
        r"\begin{table}[t]",
        r"\centering\small",
        rf"\caption{{{_tex_escape(caption)}}}",
        rf"\label{{{label}}}",
        r"\begin{tabular}{" + "l" * len(header) + "}",
        r"\toprule",
        " & ".join(_tex_escape(h) for h in header) + r" \\",
        r"\midrule",
        *(" & ".join(_tex_escape(c) for c in row) + r" \\" for row in body),
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def render(cfg: ReportConfig) -> list[Path]:
    """`atlantis report`: every paper table beside the profile's reproduction, plus provenance.json."""
    matrix = json.loads(Path(cfg.matrix).read_text())
    spec = Spec.from_matrix(matrix)
    metrics_dir, out = Path(cfg.metrics), Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = reproduced_rows(matrix, spec)
    needed = sorted({run for table in rows.values() for _, runs in table for run in runs})
    records = {run: read_metrics(metrics_dir, run) for run in needed}  # every missing file is reported first
    for run, rec in records.items():
        rec["seed"] = matrix["runs"].get(run, {}).get("seed", 0)
    written = []
    profile = matrix["config"]["profile"]
    for name, (keys, _, baseline, caption) in TABLES.items():
        # keep_default_na=False: Table 4's "N/A" (no weights) is a key, not a missing value
        paper = pd.read_csv(Path(cfg.paper) / f"{name}.csv", dtype={"size": str}, keep_default_na=False, na_values=[""])
        vdf, ddf = build_table(name, paper, rows[name], records, spec)
        vdf.to_csv(out / f"{name}.csv", index=False)
        ddf.to_csv(out / f"{name}-delta.csv", index=False)
        vh, vb = _wide(vdf, keys)
        dh, db = _delta_wide(ddf)
        note = _note(profile, spec, name, list(dict.fromkeys(vdf["metric"])))
        if name == "table3":
            note += "\n\n" + selection_note(matrix["config"])
        (out / f"{name}.md").write_text(
            f"# {caption}: paper vs `{profile}`\n\n{note}\n\n## Values\n\n{markdown(vh, vb)}\n"
            f"## Δ vs {baseline} (paired by seed; 95% t-interval where there are 2+ seeds)\n\n{markdown(dh, db)}"
        )
        (out / f"{name}.tex").write_text(
            latex(vh, vb, f"{caption}: paper / {profile}", f"tab:{profile}-{name}")
            + "\n"
            + latex(dh, db, f"{caption}: difference to {baseline}, paper / {profile}", f"tab:{profile}-{name}-delta")
        )
        written += [out / f"{name}{s}" for s in (".csv", "-delta.csv", ".md", ".tex")]
    if matrix["config"].get("world"):
        from atlantis.world.metrics import METRICS

        written.append(world_table(matrix, metrics_dir, out, METRICS))
        records.update({r: read_metrics(metrics_dir, r) for r in _world_runs(matrix)})
    prov = {
        "profile": profile,
        "config_sha256": provenance.config_hash(matrix["config"]),
        "report": provenance.environment(),
        "runs": {
            run: {
                "metrics_sha256": {f: provenance.file_sha256(f) for f in rec["files"]},
                **rec.get("provenance", {}),
                "seed": matrix["runs"].get(run, {}).get("seed", 0) if run in matrix["runs"] else None,
            }
            for run, rec in records.items()
        },
    }
    (out / "provenance.json").write_text(json.dumps(prov, indent=1, default=str) + "\n")
    written.append(out / "provenance.json")
    log.info("wrote %d tables to %s", len(TABLES), out)
    return written


def selection_note(config: dict) -> str:
    """Which model scored each selector's IFD in this profile (Table 3's rows depend on it)."""
    sel = config.get("experiments", {}).get("selection", {})
    scorers = selection_scorers(sel)
    said = {"large": "the base being fine-tuned", "small": "the family's small base"}
    parts = [
        f"{'IFD' if k == 'ifd' else 'Superfiltering'} ← {said.get(v, f'`{v}`')}"
        for k, v in scorers.items()
        if k in sel.get("selectors", [])
    ]
    return (
        f"Selection scorers: {'; '.join(parts)}. The released code scores IFD with the model being trained "
        "(Cherry_LLM) and Superfiltering with GPT-2 (code_ifd/); the ATLANTIS paper does not say which it used."
    )


def _note(profile: str, spec: Spec, name: str, columns: list[str] | None = None) -> str:
    stands = ", ".join(f"`{k}` → {v}" for k, v in spec.stands_for.items())
    cols = ", ".join(f"{c} ← `{m}`×{s:g}" for c, (m, s) in spec.metrics.items())
    note = (
        f"Profile `{profile}`: {stands}. Reproduced columns: {cols or 'none yet'}; other columns are the paper's "
        "only. Each reproduced cell is the mean over its runs' seeds (listed in the CSV's `runs` column; "
        "provenance.json has each run's seed, training-config hash, git commit and package versions)."
    )
    alpaca = [c for c in columns or [] if c.startswith("alpacaeval_") and source(spec, c)]
    if alpaca:
        note += (
            "\n\nAlpacaEval: the paper's Easy and Hard columns are compared with the package's raw win rate "
            "(`win_rate`, `get_winrate`): the paper reports \"the winning rate of the model's responses to a fixed "
            "baseline model's responses\" and does not say length-controlled."
        )
        if any(c in BESIDE.values() for c in alpaca):
            lc = ", ".join(f"`{c}` ← `{source(spec, c)[0]}`" for c in alpaca if c in BESIDE.values())
            note += (
                " AlpacaEval 2.0's length-controlled win rate (`length_controlled_winrate`, the package's headline "
                f"metric for 2.0) is shown beside Hard for review, ours only: {lc}; – where a metrics file "
                "records none (AlpacaEval 1.0's annotator, or the package could not compute it: the reason is in "
                "its `alpaca_eval.length_controlled.reason`)."
            )
    return note


def _world_runs(matrix: dict) -> list[str]:
    proxies = matrix["config"]["experiments"].get("proxy", {}).get("large", [])
    return list(matrix["runs"]) + [f"{lg}.proxy" for lg in proxies]


def world_table(matrix: dict, metrics_dir: Path, out: Path, metric_names: dict[str, Any]) -> Path:
    """Every run's p*-metrics in the tiny world (no paper counterpart): one row per metrics file."""
    rows = []
    for run in _world_runs(matrix):
        rec = read_metrics(metrics_dir, run)
        seed = matrix["runs"][run].get("seed", 0) if run in matrix["runs"] else None  # None: not a training run
        rows.append({"run": run, "seed": seed, **{m: rec["metrics"].get(m, math.nan) for m in metric_names}})
    df = pd.DataFrame(rows)
    df.to_csv(out / "world_metrics.csv", index=False)
    header = ["run", "seed"] + [
        f"{metric_names[m][0]} {'↓' if metric_names[m][1] == 'lower' else '↑'}" for m in metric_names
    ]
    body = [[r["run"], str(r["seed"])] + [_num(r[m], 3) for m in metric_names] for _, r in df.iterrows()]
    (out / "world_metrics.md").write_text(
        "# Every run's p*-metrics in the tiny world\n\nKL(p*‖p) = −log p(y*|x), nats per answer.\n\n"
        + markdown(header, body)
    )
    return out / "world_metrics.csv"
