"""The map's outputs: the per-run and per-cell tables, the default cell across worlds, heatmaps of Δ per
metric, the assumption-vs-gain scatter, and a provenance record (see `atlantis.world.map`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from atlantis import config as config_lib
from atlantis import provenance
from atlantis.log import get_logger
from atlantis.world.metrics import METRICS

log = get_logger(__name__)

ARM_NAMES = {
    "atlantis": "ATLANTIS (influence, mean: the default)",
    "influence_sum": "influence, sum",
    "algorithm1_mean": "Algorithm 1, mean",
    "algorithm1_sum": "Algorithm 1, sum",
    "eq7_mean": "Eq. 7, mean",
    "eq7_sum": "Eq. 7, sum",
    "oracle": "oracle p*/p_d",
}
AXIS_NAMES = {
    "curated_per_fact": "curated pairs per fact",
    "curated_true": "curated accuracy",
    "small_known": "facts p_S sees",
    "misconception_share": "misconception share of D",
}
# the table's columns: metric -> digits
TABLE = {"mc1": 3, "kl_mis": 3, "truth_em": 3, "skill_acc": 3}


def sign_mark(low: float, high: float) -> str:
    """'+' where the 95% interval is above 0, '−' where below, '' where it includes 0 (or is undefined)."""
    if math.isnan(low) or math.isnan(high):
        return ""
    return "+" if low > 0 else "−" if high < 0 else ""


def _ci(diff: float, low: float, high: float) -> str:
    inner = "" if math.isnan(low) else f" [{low:+.3f}, {high:+.3f}]"
    return f"{diff:+.3f}{inner}"


def write_outputs(cfg, runs: pd.DataFrame, diags: pd.DataFrame, timings: dict, worlds: dict) -> None:
    from atlantis.world.map import across_worlds, summarise_cells

    out, figs = Path(cfg.out), Path(cfg.figures)
    out.mkdir(parents=True, exist_ok=True)
    figs.mkdir(parents=True, exist_ok=True)
    # the workflow's family jobs ran the cells (`report=false`) and left their timings beside the cache
    jobs = {p.stem: json.loads(p.read_text()) for p in sorted((out / "work").glob("done-*.json"))}
    summary = summarise_cells(cfg, runs, diags)
    worlds_table = across_worlds(cfg, runs)
    runs.to_csv(out / "runs.csv", index=False)
    summary.to_csv(out / "cells.csv", index=False)
    worlds_table.to_csv(out / "worlds.csv", index=False)
    written = [
        out / "runs.csv",
        out / "cells.csv",
        out / "worlds.csv",
        write_markdown(cfg, summary, worlds_table, timings, jobs),
    ]
    for metric in cfg.metrics:
        written += heatmap(cfg, summary, metric, figs)
    written += scatter(cfg, summary, figs)
    record = {
        "config": config_lib.to_dict(cfg),
        "config_sha256": provenance.config_hash(config_lib.to_dict(cfg)),
        "worlds": {
            name: {
                "folder": str(folder),
                "manifest_sha256": provenance.file_sha256(Path(folder) / "manifest.json"),
            }
            for name, folder in worlds.items()
        },
        "timings_s": timings,
        "family_jobs": jobs,
        "outputs_sha256": {str(p): provenance.file_sha256(p) for p in written},
        **provenance.environment(),
    }
    (out / "provenance.json").write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n")
    log.info("map written to %s and %s", out, figs)


def write_markdown(cfg, summary: pd.DataFrame, worlds_table: pd.DataFrame, timings: dict, jobs: dict) -> Path:
    lines = [
        "# Where does weak-to-strong importance sampling work? The tiny world's map",
        "",
        f"Δ = arm − SFT, paired by fine-tuning seed ({cfg.seeds}), mean and 95% t-interval over the seeds, on the "
        "shipped world (world seed 0). One knob moves at a time; the default cell is the shipped world. "
        "r: Pearson correlation of log(p*/p_L) with log(p_r/p_S) on D's correct samples (sequence sums; §2.2 "
        "predicts r > 0); AUC: P(a correct sample of D outweighs a wrong one) under the arm's weights; ESS/N of "
        "the arm's weights. ↓: lower is better.",
        "",
    ]
    seed0 = summary[summary["world_seed"] == summary["world_seed"].min()]
    for family in cfg.families:
        for arm in cfg.arms:
            part = seed0[(seed0["family"] == family) & (seed0["arm"] == arm)]
            if part.empty:
                continue
            metrics = [m for m in TABLE if m in cfg.metrics]
            lines += [f"## {family}: {ARM_NAMES.get(arm, arm)}", ""]
            head = ["cell"] + [METRICS[m][0] + (" ↓" if METRICS[m][1] == "lower" else "") for m in metrics]
            lines += ["| " + " | ".join(head + ["r", "AUC", "ESS/N"]) + " |", "|" + "---|" * (len(head) + 3)]
            for cell in part["cell"].unique():
                c = part[part["cell"] == cell].set_index("metric")
                cells = [_ci(c.loc[m, "diff"], c.loc[m, "ci_low"], c.loc[m, "ci_high"]) for m in metrics]
                first = c.iloc[0]
                lines.append(
                    f"| {cell} | "
                    + " | ".join(cells)
                    + f" | {first['pearson_sum']:+.2f} | {first['auc']:.2f} | {first['ess_over_n']:.2f} |"
                )
            lines.append("")
    lines += [
        "## The default cell across pre-trained worlds",
        "",
        f"Worlds {cfg.world_seeds} (0: the shipped world; the others: the same generator and recipes with another "
        "seed). Δ pooled over worlds and seeds; interval: two-level percentile bootstrap (resample worlds, then "
        f"seeds within each drawn world; {cfg.bootstrap} replicates). Per-world columns: that world's mean Δ.",
        "",
    ]
    wcols = [c for c in worlds_table.columns if c.startswith("world")]
    lines += [
        "| family | arm | metric | Δ [95% two-level] | " + " | ".join(wcols) + " |",
        "|" + "---|" * (4 + len(wcols)),
    ]
    for _, r in worlds_table.iterrows():
        lines.append(
            f"| {r['family']} | {r['arm']} | {r['metric']} | {_ci(r['diff'], r['boot_low'], r['boot_high'])} | "
            + " | ".join(f"{r[c]:+.3f}" for c in wcols)
            + " |"
        )
    lines += ["", "## Does the assumption's strength predict the gain?", ""]
    lines += assumption_vs_gain(cfg, summary)
    time_line = f"Time: {timings.get('total_s', 0):.0f} s for this call (work cached in `work/` is reused)"
    if jobs:  # what the cells cost when they last ran: a resumed job records only its own part
        ran = ", ".join(f"{n.removeprefix('done-')} {job['timings_s']['total_s']:.0f} s" for n, job in jobs.items())
        time_line += f"; the family jobs' last runs (`work/done-*.json`, side by side): {ran}"
    lines += ["", time_line + "."]
    path = Path(cfg.out) / "map.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def assumption_vs_gain(cfg, summary: pd.DataFrame) -> list[str]:
    """Across every cell and world: Pearson correlation of each assumption measure with Δ of each metric."""
    lines = [
        "Pearson correlation, across all cells and worlds of both families (n points), of each measure with Δ "
        "(arm − SFT; for a ↓ metric a negative correlation means the measure predicts a gain).",
        "",
        "| arm | metric | n | r (assumption) vs Δ | weights' AUC vs Δ | ESS/N vs Δ |",
        "|---|---|---|---|---|---|",
    ]
    for arm in cfg.arms:
        for metric in [m for m in TABLE if m in cfg.metrics]:
            part = summary[(summary["arm"] == arm) & (summary["metric"] == metric)]
            cells = [
                f"{np.corrcoef(part[x], part['diff'])[0, 1]:+.2f}" if len(part) > 2 and part[x].std() > 0 else ""
                for x in ("pearson_sum", "auc", "ess_over_n")
            ]
            lines.append(f"| {arm} | {metric} | {len(part)} | " + " | ".join(cells) + " |")
    return lines


def _grid(cfg, part: pd.DataFrame, metric: str):
    """Rows: the axes; columns: each axis's values in config order (NaN where an axis has fewer)."""
    width = max(len(getattr(cfg, a)) for a in AXIS_NAMES)
    diff = np.full((len(AXIS_NAMES), width), np.nan)
    marks = [[""] * width for _ in AXIS_NAMES]
    labels = [[""] * width for _ in AXIS_NAMES]
    from atlantis.world.experiment import world_config
    from atlantis.world.map import _value

    base = world_config(Path(cfg.world))
    default = part[part["cell"] == "default"].set_index("metric")
    for i, axis in enumerate(AXIS_NAMES):
        for j, value in enumerate(getattr(cfg, axis)):
            rows = part[(part["axis"] == axis) & (part["value"].astype(str) == str(value))]
            shipped = value == _value(base, axis)
            if rows.empty and (not shipped or default.empty):
                continue  # a cell not run (only_cached)
            r = rows.set_index("metric").loc[metric] if len(rows) else default.loc[metric]
            diff[i, j] = r["diff"]
            marks[i][j] = sign_mark(r["ci_low"], r["ci_high"])
            labels[i][j] = f"{value}" + (" (shipped)" if shipped else "")
    return diff, marks, labels


def heatmap(cfg, summary: pd.DataFrame, metric: str, folder: Path) -> list[Path]:
    """Δ per cell, one panel per family × arm; '(+)'/'(−)' where the seeds' 95% interval excludes 0."""
    from atlantis.figures import plt, save  # matplotlib on its file backend (Agg), as for the paper's figures

    seed0 = summary[summary["world_seed"] == summary["world_seed"].min()]
    part = seed0[seed0["metric"] == metric]
    lim = float(np.nanmax(np.abs(part["diff"]))) if len(part) else 1.0
    lim = lim or 1.0
    # blue is better on every figure: a lower-is-better metric reverses the colour map
    cmap = "RdBu" if METRICS[metric][1] == "higher" else "RdBu_r"
    fig, axes = plt.subplots(
        len(cfg.families), len(cfg.arms), figsize=(4.6 * len(cfg.arms), 2.6 * len(cfg.families)), squeeze=False
    )
    for fi, family in enumerate(cfg.families):
        for ai, arm in enumerate(cfg.arms):
            ax = axes[fi][ai]
            diff, marks, labels = _grid(cfg, part[(part["family"] == family) & (part["arm"] == arm)], metric)
            im = ax.imshow(diff, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
            for i in range(diff.shape[0]):
                for j in range(diff.shape[1]):
                    if not np.isnan(diff[i, j]):
                        mark = f" ({marks[i][j]})" if marks[i][j] else ""
                        ax.text(j, i, f"{labels[i][j]}\n{diff[i, j]:+.3f}{mark}", ha="center", va="center", fontsize=6)
            ax.set_yticks(range(len(AXIS_NAMES)), list(AXIS_NAMES.values()), fontsize=7)
            ax.set_xticks([])
            ax.set_title(f"{family}: {ARM_NAMES.get(arm, arm)}", fontsize=8)
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle(f"Δ {METRICS[metric][0]} (arm − SFT)\n(+)/(−): the 95% interval over seeds excludes 0", fontsize=9)
    fig.tight_layout()
    return save(fig, folder, f"map-{metric}", pdf_dpi=150)


def scatter(cfg, summary: pd.DataFrame, folder: Path) -> list[Path]:
    """Assumption strength (Pearson r; the arm's weight AUC) against Δ MC1, every cell and world."""
    from atlantis.figures import plt, save  # matplotlib on its file backend (Agg), as for the paper's figures

    metric = "mc1" if "mc1" in cfg.metrics else cfg.metrics[0]
    part = summary[summary["metric"] == metric]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = dict(zip(cfg.families, ["tab:blue", "tab:orange", "tab:green"]))
    markers = dict(zip(cfg.arms, ["o", "s", "^", "D", "v"]))
    for ax, x, name in (
        (axes[0], "pearson_sum", "Pearson r of log(p*/p_L) with log(p_r/p_S), D's correct samples"),
        (axes[1], "auc", "weights' AUC, correct vs wrong samples of D"),
    ):
        for (family, arm), g in part.groupby(["family", "arm"]):
            err = np.vstack([g["diff"] - g["ci_low"], g["ci_high"] - g["diff"]])
            ax.errorbar(
                g[x],
                g["diff"],
                yerr=np.nan_to_num(err),
                fmt=markers[arm],
                color=colors[family],
                alpha=0.75,
                elinewidth=0.6,
                capsize=0,
                label=f"{family}: {ARM_NAMES.get(arm, arm)}",
            )
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_xlabel(name, fontsize=8)
        ax.set_ylabel(f"Δ {METRICS[metric][0]} (arm − SFT)", fontsize=8)
    axes[0].legend(fontsize=6)
    fig.suptitle(
        "Does the assumption's strength predict the gain? (every cell, every world; 95% t-intervals)", fontsize=9
    )
    fig.tight_layout()
    return save(fig, folder, "map-scatter", pdf_dpi=150)
