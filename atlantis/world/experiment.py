"""`atlantis world experiment`: SFT vs ATLANTIS on the tiny world, with controls, over seeds.

Per seed, the large base p_L is fine-tuned on D with identical hyper-parameters (same seed, same data order)
under each arm; only the per-sample weights differ:

- ``sft``: all weights 1;
- ``atlantis``: the influence weight p_r/p_S (per-token mean log-probs, §2.3), p_r = p_S tuned on the curated set;
- ``control_ref_d``: the same, with a reference tuned on D itself (theory: no systematic gain, since then
  p_r ≈ p_d and the weights undo nothing of D's distortion);
- ``control_permuted``: ATLANTIS's weights permuted across samples (same weight distribution and ESS, random
  assignment: it is the assignment that should help, not the variance);
- ``influence_sum``, ``algorithm1_{mean,sum}``, ``eq7_{mean,sum}``: the other weight formulas (Alg. 1, Eq. 7);
- ``oracle``: the exact importance ratio p*(y|x)/p_d(y|x) from the world's ground truth (0 for a wrong answer):
  what importance sampling could do with perfect weights, the ceiling for any estimate of them.

The weak reference p_r, the control reference, p_S and p_L are evaluated once (they do not depend on the seed).
Every arm is compared with SFT by the paired difference over seeds, with a 95% t-interval.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from atlantis.config import field
from atlantis.log import get_logger
from atlantis.stats import paired_ci
from atlantis.world import models as M
from atlantis.world.metrics import METRICS, evaluate

log = get_logger(__name__)

# arm -> (formula, reduction, reference role); None for plain SFT
ARMS: dict[str, tuple[str, str, str] | None] = {
    "sft": None,
    "atlantis": ("influence", "mean", "ref"),
    "control_ref_d": ("influence", "mean", "refd"),
    "control_permuted": ("influence", "mean", "ref"),
    "influence_sum": ("influence", "sum", "ref"),
    "algorithm1_mean": ("algorithm1", "mean", "ref"),
    "algorithm1_sum": ("algorithm1", "sum", "ref"),
    "eq7_mean": ("eq7", "mean", "ref"),
    "eq7_sum": ("eq7", "sum", "ref"),
    "oracle": ("oracle", "-", "-"),
}
# models evaluated once, by role -> folder suffix
FIXED = {"p_S": "small", "p_r": "small-ref", "p_r(D)": "small-ref-d", "p_L": "large"}


@dataclass
class FinetuneConfig:
    epochs: float = field(1.0, help="Epochs over D (gentle tuning keeps pre-trained knowledge: findings, lesson 2).")
    learning_rate: float = field(2e-4, help="Peak learning rate (linear decay).")
    batch_size: int = field(16, help="Samples per step.")
    max_steps: int = field(-1, help="Stop after this many steps (-1: all epochs); CI uses a few.")


@dataclass
class ExperimentConfig:
    world: str = field("results/tiny/world", help="World folder from `atlantis world build`.")
    out: str = field("results/tiny", help="Folder for the table (table.md, runs.csv) and work files (work/).")
    family: str = field("lumi", help="Model family: p_S, p_r from it, p_L is its large size.")
    large: str = field("large", help="Size of the fine-tuned model (large, or xl for the scale experiment).")
    seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2, 3, 4], help="Fine-tuning seeds (data order); >= 3 for an interval."
    )
    arms: list[str] = field(default_factory=lambda: list(ARMS), help=f"Arms to run, of {list(ARMS)}.")
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, help="Fine-tuning of p_L (every arm).")
    keep_models: bool = field(False, help="Keep every fine-tuned model (about 3.5 MB each).")
    threads: int = field(2, help="torch threads.")

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arms {unknown}; known: {list(ARMS)}")
        if "sft" not in self.arms:
            raise ValueError("arms must include sft: every arm is compared with it")
        if self.family not in M.FAMILIES or self.large not in M.FAMILIES[self.family]["sizes"]:
            raise ValueError(f"no model {self.family}-{self.large} in the world's families")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if "control_permuted" in self.arms and "atlantis" not in self.arms:
            raise ValueError("control_permuted permutes the atlantis arm's weights: include atlantis")


def _model(cfg: ExperimentConfig, suffix: str) -> Path:
    path = Path(cfg.world) / "models" / f"{cfg.family}-{suffix}"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model; run `atlantis world build` first")
    return path


def score_and_weigh(cfg: ExperimentConfig, work: Path) -> dict[str, Path]:
    """Score D once per model (atlantis score) and write every arm's weights (atlantis weights)."""
    from atlantis.data import DataConfig
    from atlantis.render import RenderConfig
    from atlantis.scoring import ScoreConfig, score
    from atlantis.weights import FORMULAS, WeightsConfig, read_weights
    from atlantis.weights import write as write_weights

    data = DataConfig(path=str(Path(cfg.world) / "data" / "sft.jsonl"))
    render = RenderConfig(template=str(M.TEMPLATE_PATH))
    roles = {"small": "small", "ref": "small-ref", "refd": "small-ref-d", "large": cfg.large}
    if not any(ARMS[a] is not None and ARMS[a][2] == "refd" for a in cfg.arms):
        del roles["refd"]  # only control 1 reads the reference tuned on D (a world of the map has none)
    scores = {}
    for role, suffix in roles.items():
        out = work / "scores" / f"{role}.parquet"
        if not out.is_file():
            score(ScoreConfig(model=str(_model(cfg, suffix)), role=role, out=str(out), data=data, render=render))
        scores[role] = out
    weights = {}
    for arm in cfg.arms:
        spec = ARMS[arm]
        if spec is None or arm in ("control_permuted", "oracle"):
            continue
        formula, reduction, ref = spec
        out = work / "weights" / f"{arm}.parquet"
        if not out.is_file():
            plus, minus = FORMULAS[formula]  # the roles the formula reads; `ref` may be the control's reference
            needed = [ref if role == "ref" else role for role in plus + minus]
            write_weights(
                WeightsConfig(
                    scores=[str(scores[r]) for r in needed],
                    out=str(out),
                    formula=formula,
                    reduction=reduction,
                    ref=ref,
                )
            )
        weights[arm] = out
    if "oracle" in cfg.arms:
        out = work / "weights" / "oracle.parquet"
        df = oracle_weights(Path(cfg.world))
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), out)
        weights["oracle"] = out
    if "control_permuted" in cfg.arms:
        source = weights.get("atlantis")
        if source is None:
            raise ValueError("control_permuted needs the atlantis arm")
        for seed in cfg.seeds:
            out = work / "weights" / f"control_permuted-seed{seed}.parquet"
            df = read_weights(source)
            perm = np.random.default_rng(seed).permutation(len(df))
            df = df.assign(weight=df["weight"].to_numpy()[perm], log_weight_raw=df["log_weight_raw"].to_numpy()[perm])
            pq.write_table(pa.Table.from_pandas(df, preserve_index=False), out)
            weights[f"control_permuted-seed{seed}"] = out
    return weights


def finetune(cfg: ExperimentConfig, arm: str, seed: int, weights: Path | None, out: Path) -> Path:
    from atlantis.data import DataConfig
    from atlantis.render import RenderConfig
    from atlantis.train import TrainConfig, train

    tcfg = TrainConfig(
        model=str(_model(cfg, cfg.large)),
        data=DataConfig(path=str(Path(cfg.world) / "data" / "sft.jsonl")),
        out=str(out),
        method="sft" if weights is None else "atlantis",
        weights=None if weights is None else str(weights),
        render=RenderConfig(template=str(M.TEMPLATE_PATH), include_end_of_turn=True),
        num_train_epochs=cfg.finetune.epochs,
        max_steps=cfg.finetune.max_steps,
        per_device_batch_size=cfg.finetune.batch_size,
        grad_accum=1,
        learning_rate=cfg.finetune.learning_rate,
        seed=seed,
        save_steps=10**9,
        logging_steps=50,
        resume="none",
    )
    train(tcfg)
    return out / "final"


def _done(path: Path) -> dict[tuple[str, str], dict]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["arm"], str(r["seed"])): r for r in rows}


def _check_settings(cfg: ExperimentConfig, work: Path) -> None:
    """Resume only work done under the same world and fine-tuning settings; refuse to mix, never delete."""
    manifest = Path(cfg.world) / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: no such file; run `atlantis world build` first")
    current = {
        "world_sha256": json.loads(manifest.read_text())["sha256"],
        "finetune": dataclasses.asdict(cfg.finetune),
    }
    path = work / "settings.json"
    if path.is_file() and json.loads(path.read_text()) != current:
        raise ValueError(
            f"{work} holds runs made with another world or other fine-tuning settings; they are kept. "
            "Use another out, or delete that folder to start over."
        )
    path.write_text(json.dumps(current, indent=1, sort_keys=True))


def run(cfg: ExperimentConfig) -> pd.DataFrame:
    """Run (or resume) every arm over every seed; write runs.jsonl, the table and its CSV; return all runs."""
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    work = out / "work" / f"{cfg.family}-{cfg.large}"
    work.mkdir(parents=True, exist_ok=True)
    _check_settings(cfg, work)
    runs_path = work / "runs.jsonl"
    done = _done(runs_path)
    t0 = time.perf_counter()
    weights = score_and_weigh(cfg, work)
    timings = {"score_and_weigh_s": time.perf_counter() - t0}

    def record(row: dict) -> None:
        with runs_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        done[(row["arm"], str(row["seed"]))] = row

    for name, suffix in FIXED.items():
        if (name, "-") not in done:
            t = time.perf_counter()
            metrics = evaluate(_model(cfg, suffix), cfg.world, str(M.TEMPLATE_PATH), work / "answers" / name)
            record({"arm": name, "seed": "-", **metrics, "seconds": time.perf_counter() - t})
    for seed in cfg.seeds:
        for arm in cfg.arms:
            if (arm, str(seed)) in done:
                continue
            t = time.perf_counter()
            w = weights.get(f"control_permuted-seed{seed}" if arm == "control_permuted" else arm)
            run_dir = work / "runs" / f"seed{seed}" / arm
            final = finetune(cfg, arm, seed, w, run_dir)
            metrics = evaluate(final, cfg.world, str(M.TEMPLATE_PATH), work / "answers" / f"seed{seed}" / arm)
            record({"arm": arm, "seed": seed, **metrics, "seconds": time.perf_counter() - t})
            if not cfg.keep_models:
                shutil.rmtree(run_dir)
    timings["total_s"] = time.perf_counter() - t0
    # the table reports exactly the configured arms and seeds (runs.jsonl may hold more from earlier calls)
    wanted = set(cfg.arms) | set(FIXED)
    seeds = {str(s) for s in cfg.seeds} | {"-"}
    runs = pd.DataFrame([r for r in done.values() if r["arm"] in wanted and str(r["seed"]) in seeds])
    cats = sample_categories(Path(cfg.world))
    write_table(cfg, runs, weight_diagnostics(cfg, weights, cats), timings, assumption_check(work, cats))
    return runs


def world_config(world: Path):
    """The WorldConfig a world folder was built with (from its manifest)."""
    from atlantis.world.data import WorldConfig

    manifest = json.loads((world / "manifest.json").read_text())
    return WorldConfig(**manifest["config"]["world"])


def oracle_weights(world: Path) -> pd.DataFrame:
    """The exact importance ratio p*(y|x)/p_d(y|x) of every sample of D, normalised to mean 1."""
    from atlantis.world.data import Fact, p_d, p_star

    cfg = world_config(world)
    facts = {}
    for line in (world / "data" / "facts.jsonl").read_text().splitlines():
        f = Fact(**json.loads(line))
        facts[f.question] = f
    ids, raw = [], []
    for line in (world / "data" / "sft.jsonl").read_text().splitlines():
        rec = json.loads(line)
        question, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        if question in facts:
            f = facts[question]
            ratio = p_star(f).get(answer, 0.0) / p_d(f, cfg)[answer]
        else:  # a sum: p* is the true total, p_d gives it probability 1 - p_d_sum_wrong
            a, _, b = question[3:-1].split()
            ratio = 1.0 / (1.0 - cfg.p_d_sum_wrong) if int(answer.strip(" .")) == int(a) + int(b) else 0.0
        ids.append(rec["id"])
        raw.append(ratio)
    raw = np.asarray(raw)
    with np.errstate(divide="ignore"):
        log_raw = np.log(raw)
    return pd.DataFrame({"id": ids, "log_weight_raw": log_raw, "weight": raw / raw.mean()})


def sample_categories(world: Path) -> pd.Series:
    """Each sample of D by what its answer is under p*: true, misconception, wrong value, sum right/wrong."""
    facts = {
        (f["entity"], f["attribute"]): f
        for f in (json.loads(line) for line in (world / "data" / "facts.jsonl").read_text().splitlines())
    }
    cats = {}
    for line in (world / "data" / "sft.jsonl").read_text().splitlines():
        rec = json.loads(line)
        question, answer = rec["conversations"][0]["value"], rec["conversations"][1]["value"].strip(" .")
        words = question[3:-1].split()
        if "+" in words:
            cats[rec["id"]] = "sum correct" if int(answer) == int(words[0]) + int(words[2]) else "sum wrong"
            continue
        f = facts[(words[0], words[1])]
        if answer == f["value"]:
            cats[rec["id"]] = "true (misconception fact)" if f["misconception"] else "true (normal fact)"
        elif answer == f["misconception"]:
            cats[rec["id"]] = "misconception"
        else:
            cats[rec["id"]] = "random wrong value"
    return pd.Series(cats, name="category")


def weight_diagnostics(cfg: ExperimentConfig, weights: dict[str, Path], cats: pd.Series) -> pd.DataFrame:
    """ESS/N and the mean weight of each sample category, per weight file."""
    from atlantis.weights import diagnostics_path, read_weights

    rows = []
    for arm, path in weights.items():
        if arm.startswith("control_permuted") and arm != f"control_permuted-seed{cfg.seeds[0]}":
            continue
        df = read_weights(path).set_index("id").join(cats)
        diag = json.loads(diagnostics_path(path).read_text()) if diagnostics_path(path).is_file() else {}
        w = df["weight"].to_numpy()
        correct = (df["category"].str.startswith("true") | (df["category"] == "sum correct")).to_numpy()
        row = {
            "weights": arm.split("-seed")[0],
            "ESS/N": diag.get("ess_over_n", float(w.sum() ** 2 / (w**2).sum() / len(w))),
            "AUC correct>wrong": auc(w[correct], w[~correct]),
        }
        row.update(df.groupby("category")["weight"].mean().to_dict())
        rows.append(row)
    return pd.DataFrame(rows)


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """P(a random correct sample outweighs a random wrong one), ties counting half (Mann-Whitney)."""
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("AUC needs both correct and wrong samples")
    ranks = pd.Series(np.concatenate([pos, neg])).rank().to_numpy()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def assumption_check(work: Path, cats: pd.Series) -> dict[str, float]:
    """§2.2's proportional-change assumption, p*/p_L ∝ p_r/p_S, measured on D's correct samples.

    For a correct answer p*(y|x) = 1, so log(p*/p_L) = −log p_L(y|x); the assumption predicts it rises one
    for one with log(p_r/p_S). Wrong answers have p* = 0 and need p_r/p_S near 0 (the AUC column).
    """
    from atlantis.weights import read_scores

    scores = read_scores([str(work / "scores" / f"{r}.parquet") for r in ("small", "ref", "large")])
    df = scores.join(cats)
    correct = df["category"].str.startswith("true") | (df["category"] == "sum correct")
    out = {}
    for red in ("sum", "mean"):
        lhs = -df.loc[correct, f"logp_{red}_large"].to_numpy()
        rhs = (df.loc[correct, f"logp_{red}_ref"] - df.loc[correct, f"logp_{red}_small"]).to_numpy()
        out[f"pearson_{red}"] = float(np.corrcoef(lhs, rhs)[0, 1])
        out[f"slope_{red}"] = float(np.polyfit(rhs, lhs, 1)[0])
    return out


def summarise(runs: pd.DataFrame, arms: list[str]) -> pd.DataFrame:
    """One row per arm and metric: mean over seeds and the paired difference to SFT with its CI."""
    seeded = runs[runs["seed"] != "-"].copy()
    seeded["seed"] = seeded["seed"].astype(int)
    sft = seeded[seeded["arm"] == "sft"].set_index("seed")
    rows = []
    for arm in arms + list(FIXED):
        part = runs[runs["arm"] == arm]
        if part.empty:
            continue
        for metric in METRICS:
            row = {"arm": arm, "metric": metric, "value": float(part[metric].mean()), "n_seeds": 0}
            if arm in FIXED:
                diffs = np.asarray([float(part[metric].iloc[0]) - v for v in sft[metric]])
            else:
                mine = part.assign(seed=part["seed"].astype(int)).set_index("seed")[metric]
                common = sorted(set(mine.index) & set(sft.index))
                diffs = np.asarray([mine[s] - sft.loc[s, metric] for s in common])
                row["n_seeds"] = len(common)
            if arm != "sft" and len(diffs):
                row["diff"], row["ci_low"], row["ci_high"] = paired_ci(diffs)
            rows.append(row)
    return pd.DataFrame(rows)


def _fmt(x: float, digits: int = 3) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def write_table(
    cfg: ExperimentConfig, runs: pd.DataFrame, wdiag: pd.DataFrame, timings: dict, assumption: dict
) -> Path:
    summary = summarise(runs, cfg.arms)
    out = Path(cfg.out)
    stem = f"experiment-{cfg.family}-{cfg.large}"
    runs.to_csv(out / f"{stem}-runs.csv", index=False)
    summary.to_csv(out / f"{stem}-summary.csv", index=False)
    wdiag.to_csv(out / f"{stem}-weights.csv", index=False)
    lines = [
        f"# Tiny world: SFT vs ATLANTIS ({cfg.family}, p_L = {cfg.family}-{cfg.large}, seeds {cfg.seeds})",
        "",
        "Mean over seeds; Δ = arm − SFT, paired by seed, with a 95% t-interval (fixed models: their value − "
        "SFT's per seed). KL(p*‖p) = −log p(y*|x) in nats per answer (lower is better).",
        "",
    ]
    header = (
        "| arm | " + " | ".join(METRICS[m][0] + (" ↓" if METRICS[m][1] == "lower" else " ↑") for m in METRICS) + " |"
    )
    lines += [header, "|" + "---|" * (len(METRICS) + 1)]
    for arm in summary["arm"].unique():
        cells = []
        for metric in METRICS:
            r = summary[(summary["arm"] == arm) & (summary["metric"] == metric)].iloc[0]
            cell = _fmt(r["value"])
            if "diff" in r and not pd.isna(r.get("diff")):
                ci = f" [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if not pd.isna(r["ci_low"]) else ""
                cell += f"<br>Δ {r['diff']:+.3f}{ci}"
            cells.append(cell)
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "## Weights: ESS/N and mean weight per kind of sample in D", ""]
    cols = list(wdiag.columns)
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in wdiag.iterrows():
        lines.append("| " + " | ".join(str(r[c]) if c == "weights" else _fmt(float(r[c])) for c in cols) + " |")
    lines += [
        "",
        "## §2.2's proportional-change assumption on D's correct samples",
        "",
        "log(p*/p_L) = −log p_L(y|x) against log(p_r/p_S): the assumption predicts a positive relation.",
        "",
        "| log-probs | Pearson r | slope |",
        "|---|---|---|",
        f"| sequence sums | {assumption['pearson_sum']:.3f} | {assumption['slope_sum']:.3f} |",
        f"| per-token means | {assumption['pearson_mean']:.3f} | {assumption['slope_mean']:.3f} |",
    ]
    (out / f"{stem}-assumption.json").write_text(json.dumps(assumption, indent=1))
    lines += [
        "",
        f"Time: {timings.get('total_s', 0):.0f} s (scoring and weights {timings['score_and_weigh_s']:.0f} s).",
    ]
    path = out / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    log.info("wrote %s", path)
    return path
