"""Figures for review: analogues of the paper's Fig. 2, 3 and 4 for a profile, as PNG and PDF.

- Fig. 2: the influence-weight distribution of each model family (paper: "similar distributions of influence
  weights across different models", red = highest density, blue = lowest): a histogram of log w per family whose
  bars are coloured by their density on the same red-blue scale.
- Fig. 3: SFT vs ATLANTIS for each main large model on a radar over the profile's benchmark dimensions (paper:
  the six Open LLM Leaderboard 2 tasks, "scales stretched in different dimensions"): each axis is stretched to the
  range of the values drawn on it, and the axis label gives that range, so the chart shows direction, not size.
- Fig. 4: two families' weights on the same random samples (paper: Qwen2-1.5B vs Gemma2-2B on 2,000 samples):
  their distributions, the per-sample scatter, and the rate at which they disagree about the border 1.0 (one
  weight above, the other below), written to `fig4.json` too.

Weights are the workflow's `weights/<family>.parquet` (`weight`: normalised to mean 1 over the SFT set, the
border 1.0 then separates up- from down-weighted samples; `log_weight_raw`: log p_r/p_S before normalisation,
whose border is 0, i.e. a raw ratio of 1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a cluster node
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from atlantis.config import field  # noqa: E402
from atlantis.log import get_logger  # noqa: E402
from atlantis.report import plain_run  # noqa: E402
from atlantis.weights import disagreement_rate, read_weights  # noqa: E402

log = get_logger(__name__)


class FigureError(ValueError):
    pass


@dataclass
class FiguresConfig:
    matrix: str = field(help="The profile's matrix JSON (written by the workflow's `matrix` rule).")
    weights: str = field(help="Folder of weights/<family>.parquet.")
    metrics: str = field(help="Folder of metrics/<run>.json.")
    out: str = field(help="Folder for fig2/fig3/fig4 .png and .pdf, and fig4.json.")
    samples: int = field(2000, help="Fig. 4: random samples compared (paper: 2,000).")
    seed: int = field(0, help="Fig. 4: seed of the random sample.")
    border: float = field(1.0, help="Fig. 4: the weight border of the disagreement rate (paper: 1.0).")

    def __post_init__(self):
        if self.samples < 2:
            raise ValueError(f"samples must be at least 2, got {self.samples}")


def _save(fig, out: Path, stem: str) -> list[Path]:
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    plt.close(fig)
    return paths


def _weights(cfg: FiguresConfig, family: str) -> pd.DataFrame:
    path = Path(cfg.weights) / f"{family}.parquet"
    if not path.is_file():
        raise FigureError(f"{path}: no weights for family {family!r} (run the workflow's weights rule)")
    return read_weights(path)


def fig2(cfg: FiguresConfig, families: list[str], names: dict[str, str], out: Path) -> list[Path]:
    fig, axes = plt.subplots(
        1, len(families), figsize=(4.6 * len(families) + 1, 3.8), squeeze=False, layout="constrained"
    )
    cmap = plt.get_cmap("coolwarm")
    for ax, fam in zip(axes[0], families):
        w = _weights(cfg, fam)["weight"].to_numpy()
        logw = np.log(w[w > 0])  # a zero weight (clipped, or a sample left out) has no log; it is not drawn
        counts, edges = np.histogram(logw, bins=40, density=True)
        colours = cmap(counts / counts.max())
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color=colours, edgecolor="none")
        ax.axvline(0.0, color="black", lw=0.8, ls="--")
        ax.set_title(f"{names.get(fam, fam)} (p_r / p_S)")
        ax.set_xlabel("log weight (normalised to mean 1)")
        ax.set_ylabel("density")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=axes[0].tolist(), label="relative density (red highest, blue lowest)")
    fig.suptitle("Fig. 2 analogue: influence-weight distributions per model family")
    return _save(fig, out, "fig2")


def _run_mean(metrics_dir: Path, runs: list[str], metric: str) -> float:
    from atlantis.report import read_metrics

    vals = []
    for run in runs:
        if not (metrics_dir / f"{run}.json").is_file() and not (metrics_dir / run).is_dir():
            continue  # a run not evaluated (yet): left out; a broken metrics file still raises
        m = read_metrics(metrics_dir, run)["metrics"]
        if metric in m:
            vals.append(float(m[metric]))
    return float(np.mean(vals)) if vals else math.nan


def fig3(cfg: FiguresConfig, matrix: dict, metrics: list[str], labels: dict[str, str], out: Path) -> list[Path]:
    larges = matrix["config"]["experiments"]["main"]["large"]
    stands = matrix.get("report", {}).get("stands_for", {})
    fig, axes = plt.subplots(
        1, len(larges), figsize=(6.2 * len(larges), 6.0), subplot_kw={"projection": "polar"}, squeeze=False
    )
    fig.subplots_adjust(wspace=0.7, top=0.78, bottom=0.14)
    for ax, large in zip(axes[0], larges):
        arms = {}
        for method in ("sft", "atlantis"):
            runs = [rid for rid, r in matrix["runs"].items() if plain_run(r, large, method)]
            arms[method] = [_run_mean(Path(cfg.metrics), runs, m) for m in metrics]
        shown = [i for i, m in enumerate(metrics) if all(not math.isnan(arms[a][i]) for a in arms)]
        title = f"{large}" + (f" (stands for {stands[large]})" if large in stands else "")
        if len(shown) < 3:
            ax.set_axis_off()
            ax.set_title(f"{title}\nfewer than 3 metrics evaluated", fontsize=9)
            continue
        angles = np.linspace(0, 2 * np.pi, len(shown), endpoint=False)
        axis_labels = []
        scaled = {a: [] for a in arms}
        for i in shown:
            lo, hi = min(arms[a][i] for a in arms), max(arms[a][i] for a in arms)
            pad = max((hi - lo) * 0.5, 1e-3 * max(abs(hi), 1.0))
            lo_s, hi_s = lo - pad, hi + pad
            for a in arms:
                scaled[a].append((arms[a][i] - lo_s) / (hi_s - lo_s))
            axis_labels.append(f"{labels.get(metrics[i], metrics[i])}\n[{lo_s:.3g}, {hi_s:.3g}]")
        for a, style in (("sft", dict(color="tab:blue", ls="--")), ("atlantis", dict(color="tab:red", ls="-"))):
            vals = scaled[a] + scaled[a][:1]
            ang = list(angles) + [angles[0]]
            ax.plot(ang, vals, label="SFT" if a == "sft" else "ATLANTIS", **style)
            ax.fill(ang, vals, alpha=0.12, color=style["color"])
        ax.set_xticks(angles)
        ax.set_xticklabels(axis_labels, fontsize=7)
        ax.set_yticklabels([])
        ax.set_ylim(0, 1)
        ax.set_title(title, fontsize=10, pad=34)
    drawn = [ax.get_legend_handles_labels() for ax in axes[0] if ax.get_legend_handles_labels()[0]]
    if drawn:
        fig.legend(*drawn[0], loc="lower center", ncol=2)
    fig.suptitle("Fig. 3 analogue: SFT vs ATLANTIS per dimension (each axis stretched to its own range)", y=0.98)
    return _save(fig, out, "fig3")


def fig4(cfg: FiguresConfig, pair: list[str], names: dict[str, str], out: Path) -> list[Path]:
    if len(pair) != 2:
        raise FigureError(f"report.fig4_pair must name two families, got {pair}")
    a, b = (_weights(cfg, f).set_index("id") for f in pair)
    common = a.index.intersection(b.index)
    if len(common) < 2:
        raise FigureError(f"families {pair} weigh fewer than 2 common samples")
    rng = np.random.default_rng(cfg.seed)
    ids = np.sort(rng.choice(np.asarray(common), size=min(cfg.samples, len(common)), replace=False))
    wa, wb = a.loc[ids, "weight"].to_numpy(), b.loc[ids, "weight"].to_numpy()
    na, nb = (names.get(f, f) for f in pair)
    stats = {
        "families": pair,
        "samples": len(ids),
        "seed": cfg.seed,
        "border": cfg.border,
        "mean": {pair[0]: float(wa.mean()), pair[1]: float(wb.mean())},
        "std": {pair[0]: float(wa.std()), pair[1]: float(wb.std())},
        "disagreement_normalised": disagreement_rate(wa, wb, cfg.border),
        "disagreement_raw_ratio": disagreement_rate(
            np.exp(a.loc[ids, "log_weight_raw"].to_numpy()), np.exp(b.loc[ids, "log_weight_raw"].to_numpy()), 1.0
        ),
        "paper_disagreement": 0.4678,  # Qwen2-1.5B vs Gemma2-2B, §4.4
    }
    (out / "fig4.json").write_text(json.dumps(stats, indent=1) + "\n")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    bins = np.linspace(min(wa.min(), wb.min()), max(wa.max(), wb.max()), 40)
    ax1.hist(
        wa,
        bins=bins,
        alpha=0.55,
        density=True,
        color="tab:blue",
        label=f"{na}: mean {wa.mean():.2f}, sd {wa.std():.2f}",
    )
    ax1.hist(
        wb, bins=bins, alpha=0.55, density=True, color="tab:red", label=f"{nb}: mean {wb.mean():.2f}, sd {wb.std():.2f}"
    )
    ax1.axvline(cfg.border, color="black", lw=0.8, ls="--")
    ax1.set_xlabel("influence weight (normalised to mean 1)")
    ax1.set_ylabel("density")
    ax1.legend(fontsize=8)
    ax1.set_title(f"{len(ids)} random samples (seed {cfg.seed})")
    ax2.scatter(wa, wb, s=6, alpha=0.4, color="tab:purple")
    ax2.axvline(cfg.border, color="black", lw=0.8, ls="--")
    ax2.axhline(cfg.border, color="black", lw=0.8, ls="--")
    ax2.set_xlabel(f"weight under {na}")
    ax2.set_ylabel(f"weight under {nb}")
    ax2.set_title(
        f"disagreement at border {cfg.border:g}: {stats['disagreement_normalised']:.1%} normalised, "
        f"{stats['disagreement_raw_ratio']:.1%} raw p_r/p_S\n(paper, Qwen2 vs Gemma2: 46.78%)",
        fontsize=10,
    )
    fig.suptitle(f"Fig. 4 analogue: influence weights of {na} vs {nb}")
    return [*_save(fig, out, "fig4"), out / "fig4.json"]


def render(cfg: FiguresConfig) -> list[Path]:
    """`atlantis figures`: Fig. 2, 3 and 4 analogues of one profile."""
    matrix = json.loads(Path(cfg.matrix).read_text())
    rep = matrix.get("report") or {}
    names = rep.get("family_names", {})
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = {}
    if matrix["config"].get("world"):
        from atlantis.world.metrics import METRICS

        labels = {k: v[0] for k, v in METRICS.items()}
    families = rep.get("fig2_families") or sorted(names)
    written = fig2(cfg, families, names, out)
    written += fig3(cfg, matrix, rep.get("fig3_metrics", []), labels, out)
    written += fig4(cfg, rep.get("fig4_pair", families[:2]), names, out)
    log.info("wrote %d figure files to %s", len(written), out)
    return written
