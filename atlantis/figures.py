"""Figures for review: analogues of the paper's Fig. 2, 3 and 4 for a profile, as PNG and PDF.

- Fig. 2: the influence-weight distribution of each model family (paper: "similar distributions of influence
  weights across different models", red = highest density, blue = lowest): a histogram of log w per family whose
  bars are coloured by their density on the same red-blue scale.
- Fig. 3: SFT vs ATLANTIS for each main large model over the profile's benchmark dimensions (paper: a radar of the
  six Open LLM Leaderboard 2 tasks, "scales stretched in different dimensions", which makes a 0.2-point difference
  fill the radius): here each metric's Δ with its 95% interval paired by seed, in the metric's own units around
  zero (`fig3`), and the radar on one common 0-100 scale (`fig3-radar`).
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
from atlantis.stats import paired_ci  # noqa: E402
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


def save(fig, out: Path, stem: str, pdf_dpi: float | str = "figure", **savefig) -> list[Path]:
    """`<stem>.png` at 150 dpi and `<stem>.pdf` (`pdf_dpi` sets its raster parts), then close the figure: the
    paper figures and the map's. The PDF carries no creation date: the same data writes the same bytes, so
    provenance's hashes compare runs."""
    paths = [out / f"{stem}.png", out / f"{stem}.pdf"]
    fig.savefig(paths[0], dpi=150, **savefig)
    fig.savefig(paths[1], dpi=pdf_dpi, metadata={"CreationDate": None}, **savefig)
    plt.close(fig)
    return paths


def _save(fig, out: Path, stem: str) -> list[Path]:
    return save(fig, out, stem, bbox_inches="tight")


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


def _per_seed(metrics_dir: Path, matrix: dict, large: str, method: str, metric: str) -> dict[int, float]:
    """seed -> the metric of this model's plain run of `method` with that seed (runs not evaluated yet: left out; a
    broken metrics file still raises)."""
    from atlantis.report import read_metrics

    out = {}
    for rid, r in matrix["runs"].items():
        if not plain_run(r, large, method):
            continue
        if not (metrics_dir / f"{rid}.json").is_file() and not (metrics_dir / rid).is_dir():
            continue
        m = read_metrics(metrics_dir, rid)["metrics"]
        if metric in m:
            out[int(r.get("seed", 0))] = float(m[metric])
    return out


def paired_deltas(metrics_dir: Path, matrix: dict, large: str, metrics: list[str]) -> list[dict]:
    """Per metric: SFT's mean, and ATLANTIS − SFT paired by seed with its 95% t-interval (atlantis.stats)."""
    rows = []
    for metric in metrics:
        sft = _per_seed(metrics_dir, matrix, large, "sft", metric)
        atl = _per_seed(metrics_dir, matrix, large, "atlantis", metric)
        seeds = sorted(set(sft) & set(atl))
        if not seeds:
            continue
        delta, lo, hi = paired_ci(np.asarray([atl[s] - sft[s] for s in seeds]))
        sft_mean = float(np.mean([sft[s] for s in seeds]))
        atl_mean = float(np.mean([atl[s] for s in seeds]))
        rows.append(dict(metric=metric, sft=sft_mean, atlantis=atl_mean, delta=delta, lo=lo, hi=hi, n=len(seeds)))
    return rows


# The radar's common 0-100 scale: percentages as they are, MT-Bench's 1-10 grade x10, a metric given as a fraction
# (every value in [0, 1], e.g. the leaderboard's raw accuracies) x100. A metric on another scale is left off it.
RADAR_FACTOR = {"mtbench_single": 10.0}


def _radar_factor(metric: str, values: list[float]) -> float | None:
    if metric in RADAR_FACTOR:
        return RADAR_FACTOR[metric]
    if all(0.0 <= v <= 1.0 for v in values):
        return 100.0
    return 1.0 if all(0.0 <= v <= 100.0 for v in values) else None


def fig3(cfg: FiguresConfig, matrix: dict, metrics: list[str], labels: dict[str, str], out: Path) -> list[Path]:
    """Fig. 3 analogue. The paper's radar stretches each axis to its own range, so a 0.2-point difference fills
    the radius; the primary figure here is each metric's Δ (ATLANTIS − SFT) with its 95% interval paired by seed,
    one panel per metric in its own units with zero marked (`fig3`); the radar is kept on one common 0-100 scale
    for every axis (`fig3-radar`)."""
    larges = matrix["config"]["experiments"]["main"]["large"]
    stands = matrix.get("report", {}).get("stands_for", {})
    deltas = {
        large: {r["metric"]: r for r in paired_deltas(Path(cfg.metrics), matrix, large, metrics)} for large in larges
    }
    shown = [m for m in metrics if any(m in deltas[large] for large in larges)]
    names = [f"{lg}" + (f"\n({stands[lg]})" if lg in stands else "") for lg in larges]
    ncols = min(3, max(1, len(shown)))
    nrows = max(1, math.ceil(len(shown) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 0.9 + 0.55 * len(larges) * nrows + 0.9 * nrows))
    axes = np.atleast_1d(axes).ravel()
    for ax, metric in zip(axes, shown):
        span = 0.0
        for y, large in enumerate(larges):
            r = deltas[large].get(metric)
            if r is None:
                continue
            has_ci = not math.isnan(r["lo"])
            colour = "grey"
            if has_ci and r["lo"] > 0:
                colour = "tab:red"
            elif has_ci and r["hi"] < 0:
                colour = "tab:blue"
            if has_ci:
                ax.errorbar(r["delta"], y, xerr=[[r["delta"] - r["lo"]], [r["hi"] - r["delta"]]], fmt="o",
                            color=colour, capsize=3)  # fmt: skip
            else:
                ax.plot(r["delta"], y, "o", color=colour)
            ax.annotate(f"SFT {r['sft']:.3g}", (0, y), xytext=(0, 7), textcoords="offset points", ha="center",
                        fontsize=6, color="dimgrey")  # fmt: skip
            span = max(span, abs(r["delta"]), *(abs(v) for v in (r["lo"], r["hi"]) if not math.isnan(v)))
        span = span * 1.15 or 1.0
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlim(-span, span)  # symmetric about 0: a gain and a loss of the same size look the same
        ax.set_ylim(-0.7, len(larges) - 0.3)
        ax.set_yticks(range(len(larges)))
        ax.set_yticklabels(names, fontsize=7)
        ax.set_title(f"Δ {labels.get(metric, metric)}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
    for ax in axes[len(shown) :]:
        ax.set_axis_off()
    n_seeds = sorted({r["n"] for d in deltas.values() for r in d.values()})
    fig.suptitle(
        "Fig. 3 analogue: ATLANTIS − SFT per metric, 95% interval paired by seed "
        f"(n = {', '.join(map(str, n_seeds)) or '-'}; red/blue: the interval excludes 0)",
        fontsize=10,
    )
    fig.tight_layout()
    written = _save(fig, out, "fig3")
    return written + _radar(matrix, deltas, shown, labels, names, out)


def _radar(matrix, deltas, metrics, labels, names, out: Path) -> list[Path]:
    larges = matrix["config"]["experiments"]["main"]["large"]
    fig, axes = plt.subplots(
        1, len(larges), figsize=(5.6 * len(larges), 5.6), subplot_kw={"projection": "polar"}, squeeze=False
    )
    for ax, large, name in zip(axes[0], larges, names):
        rows = [deltas[large][m] for m in metrics if m in deltas[large]]
        factors = [_radar_factor(r["metric"], [r["sft"], r["atlantis"]]) for r in rows]
        rows = [(r, f) for r, f in zip(rows, factors) if f is not None]
        if len(rows) < 3:
            ax.set_axis_off()
            ax.set_title(f"{name}\nfewer than 3 metrics on a 0-100 scale", fontsize=9)
            continue
        angles = list(np.linspace(0, 2 * np.pi, len(rows), endpoint=False))
        for key, style in (("sft", dict(color="tab:blue", ls="--")), ("atlantis", dict(color="tab:red", ls="-"))):
            vals = [r[key] * f for r, f in rows]
            ax.plot(angles + angles[:1], vals + vals[:1], label="SFT" if key == "sft" else "ATLANTIS", **style)
            ax.fill(angles + angles[:1], vals + vals[:1], alpha=0.1, color=style["color"])
        ax.set_xticks(angles)
        ax.set_xticklabels(
            [labels.get(r["metric"], r["metric"]) + (f" x{f:g}" if f != 1 else "") for r, f in rows], fontsize=7
        )
        ax.set_ylim(0, 100)  # one scale for every axis
        ax.set_yticks([25, 50, 75, 100])
        ax.tick_params(axis="y", labelsize=6)
        ax.set_title(name, fontsize=10, pad=24)
    handles = [ax.get_legend_handles_labels() for ax in axes[0] if ax.get_legend_handles_labels()[0]]
    if handles:
        fig.legend(*handles[0], loc="lower center", ncol=2)
    fig.suptitle("Fig. 3 analogue as a radar, every axis on one 0-100 scale (means over seeds)", y=1.0)
    return _save(fig, out, "fig3-radar")


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
