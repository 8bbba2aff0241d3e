"""`atlantis world map`: where does weak-to-strong importance sampling work in the tiny world?

ATLANTIS rests on §2.2's assumption that p_r/p_S changes in proportion to p*/p_L: the small reference is
close to p* where it matters, and the large model knows what the small one does not. The map moves the
world's knobs that decide that premise, one at a time around the shipped world (the *default cell*, shared by
every axis; not a full factorial):

- ``curated_per_fact``: the curated set's size (how much p_r learns from it);
- ``curated_true``: the curated set's accuracy (how close p_r's tuning data is to p*);
- ``small_known``: the share of facts the small models' corpus states (the knowledge gap between p_S and p_L);
- ``misconception_share``: P(misconception) in D's answers on misconception facts (how distorted p_d is).

Each cell fine-tunes p_L on D under SFT and under each configured weighting, paired by seed (Algorithm 1's
line 4: the same data, order and hyper-parameters, only the weights differ), on both families, and measures
the assumption itself: the correlation of log(p*/p_L) with log(p_r/p_S) on D's correct samples, the weights'
AUC for correct vs wrong samples, and ESS/N. A cell reuses everything its knob does not change (the world's
generator draws D's answers, then the curated set, from one stream, and the small models' share from
another): the curated knobs need only a new p_r; the knowledge gap a new p_S and p_r; the distortion a new D.
``isolation_check`` enforces that, file by file, before any model is made. Pre-training variance: the default
cell is repeated on independently pre-trained worlds (other world seeds, same recipe), and summarised with a
two-level bootstrap (worlds, then seeds within each world).

The grid, seeds, arms and metrics come from the config (``config/map.yaml``) and are fixed before any cell
runs. Every fine-tuned model and evaluation is cached by the content of what made it, so a rerun resumes and
an SFT run is shared by every cell whose D and p_L are the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from atlantis import config as config_lib
from atlantis import provenance
from atlantis.config import field
from atlantis.log import get_logger
from atlantis.stats import paired_ci, two_level_bootstrap
from atlantis.world import models as M
from atlantis.world.data import WorldConfig, build_sets, write_sets
from atlantis.world.experiment import (
    ARMS,
    ExperimentConfig,
    FinetuneConfig,
    assumption_check,
    finetune,
    sample_categories,
    score_and_weigh,
    weight_diagnostics,
    world_config,
)
from atlantis.world.metrics import METRICS, evaluate

log = get_logger(__name__)

# axis -> the data sets its knob may change (every other set must stay byte-identical to the base world's)
CHANGES: dict[str, set[str]] = {
    "curated_per_fact": {"curated"},
    "curated_true": {"curated"},
    # the small models' share also flags facts in the evaluation records (`known_by_small`)
    "small_known": {"corpus_small", "facts", "eval_truthfulqa", "dev_truthfulqa", "eval_open", "eval_mtbench"},
    "misconception_share": {"sft"},
}
AXES = list(CHANGES)
EVAL_SETS = ("eval_truthfulqa", "eval_skill", "eval_open", "eval_mtbench")
ROLES = {"small": "small", "ref": "small-ref", "large": "large"}  # what a map cell scores D with


@dataclass
class MapConfig:
    world: str = field("results/tiny/world", help="The shipped world (the default cell; never modified).")
    out: str = field("results/tiny/map", help="Folder for the tables and provenance; work files in out/work.")
    figures: str = field("figures/tiny", help="Folder for the map's figures (map-*.png/pdf).")
    families: list[str] = field(default_factory=lambda: ["lumi", "quen"], help="Model families (every cell).")
    arms: list[str] = field(
        default_factory=lambda: ["atlantis", "algorithm1_sum"],
        help="Weightings compared with SFT in every cell (of `atlantis world experiment`'s arms).",
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], help="Fine-tuning seeds (paired across arms).")
    curated_per_fact: list[int] = field(
        default_factory=lambda: [1, 2, 4, 8], help="Curated-set sizes (pairs per curated fact); 4 is shipped."
    )
    curated_true: list[float] = field(
        default_factory=lambda: [0.7, 0.95, 1.0], help="Curated-set accuracies (P(true)); 0.95 is shipped."
    )
    small_known: list[float] = field(
        default_factory=lambda: [0.25, 0.5, 1.0], help="Shares of facts the small models see; 0.5 is shipped."
    )
    misconception_share: list[float] = field(
        default_factory=lambda: [0.3, 0.6, 0.85],
        help="P(misconception) in D on misconception facts (P(random wrong) stays as shipped); 0.6 is shipped.",
    )
    world_seeds: list[int] = field(
        default_factory=lambda: [0, 1, 2],
        help="Worlds for the default cell: the shipped world's seed, and others pre-trained with the same recipe.",
    )
    metrics: list[str] = field(
        default_factory=lambda: ["mc1", "mc2", "kl_mis", "kl_normal", "truth_em", "truth_em_mis", "skill_acc"],
        help=f"p*-metrics reported (of {list(METRICS)}).",
    )
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig, help="Fine-tuning of p_L (every arm).")
    bootstrap: int = field(10_000, help="Replicates of the two-level bootstrap over worlds and seeds.")
    threads: int = field(2, help="torch threads.")
    only_cached: bool = field(
        False,
        help="Report only the runs already cached (no fine-tuning, no world built): a partial map, stated as such.",
    )
    report: bool = field(
        True,
        help="Write the tables, figures and provenance; false: only run and cache (one family's job of the "
        "workflow, which then writes work/done-<families>.json).",
    )

    def __post_init__(self) -> None:
        bad = [a for a in self.arms if a not in ARMS or a in ("sft", "control_ref_d", "control_permuted")]
        if bad or not self.arms:
            raise ValueError(f"arms {bad}: choose weightings of {[a for a in ARMS if a.split('_')[0] != 'control']}")
        if [m for m in self.metrics if m not in METRICS]:
            raise ValueError(f"unknown metrics; known: {list(METRICS)}")
        if [f for f in self.families if f not in M.FAMILIES]:
            raise ValueError(f"unknown families; known: {list(M.FAMILIES)}")
        if len(self.seeds) < 2:
            raise ValueError("seeds: at least 2 for a paired interval (3 or more for a useful one)")
        if not self.world_seeds:
            raise ValueError("world_seeds must name the shipped world's seed")
        for axis in AXES:
            if not getattr(self, axis):
                raise ValueError(f"{axis}: give at least the shipped value")


# ------------------------------------------------------------------------------------ the grid


def _knob(base: WorldConfig, axis: str, value) -> WorldConfig:
    if axis == "misconception_share":
        return dataclasses.replace(base, p_d_misconception=(float(value), base.p_d_misconception[1]))
    return dataclasses.replace(base, **{axis: value})


def _value(base: WorldConfig, axis: str):
    return base.p_d_misconception[0] if axis == "misconception_share" else getattr(base, axis)


def cells(cfg: MapConfig, base: WorldConfig) -> list[dict]:
    """The map's cells: the default (the shipped world), then each axis's other values, one knob at a time."""
    out = [{"cell": "default", "axis": "default", "value": None, "world": base}]
    for axis in AXES:
        values = getattr(cfg, axis)
        if _value(base, axis) not in values:
            raise ValueError(f"{axis}: {values} must include the shipped world's value {_value(base, axis)}")
        for value in values:
            if value != _value(base, axis):
                out.append({"cell": f"{axis}={value}", "axis": axis, "value": value, "world": _knob(base, axis, value)})
    return out


def isolation_check(base: WorldConfig, axis: str, value) -> dict[str, list]:
    """The cell's data sets; raises if the knob changed a set outside CHANGES[axis] (then a shared model or
    score would be stale)."""
    ref, sets = build_sets(base), build_sets(_knob(base, axis, value))
    moved = sorted(name for name in sets if sets[name] != ref[name] and name not in CHANGES[axis])
    if moved:
        raise RuntimeError(f"{axis}={value} changes {moved}, which the map reuses from the base world")
    return sets


# ------------------------------------------------------------------------------------ models per cell


def _sha(path: Path) -> str:
    return provenance.cached_file_sha256(path)


def _key(parts: dict) -> str:
    return provenance.config_hash(parts)[:16]


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve(), target_is_directory=True)


def cell_world(base_dir: Path, cell: dict, work: Path, family: str) -> Path:
    """A world folder for a cell and family: its data sets, and models linked from the base world except those
    its knob changes (p_S re-pre-trained for `small_known`; p_r re-tuned for every knob but D's distortion).
    One folder per family, so the families' jobs can run side by side."""
    from atlantis.world.build import ReferenceConfig, tune_reference

    if cell["axis"] == "default":
        return base_dir
    folder = work / "cells" / cell["cell"] / f"world-{family}"
    manifest = folder / "manifest.json"
    if manifest.is_file():
        return folder
    base_manifest = json.loads((base_dir / "manifest.json").read_text())
    sets = isolation_check(world_config(base_dir), cell["axis"], cell["value"])
    write_sets(sets, folder / "data")
    pre = M.PretrainConfig(**base_manifest["config"]["pretrain"])
    refcfg = ReferenceConfig(**base_manifest["config"]["reference"])
    timings = {}
    models = folder / "models"
    _link(base_dir / "models" / f"{family}-large", models / f"{family}-large")
    small = models / f"{family}-small"
    if cell["axis"] == "small_known":
        # the same tokenizer (trained on the large corpus, which this knob leaves alone) and recipe
        t = time.perf_counter()
        tok = M.build_tokenizer(family, sets["corpus"])
        model = M.build_model(family, "small", tok, seed=pre.seed)
        M.pretrain(model, tok, sets["corpus_small"], pre)
        M.save(model, tok, small, instruct=False)
        timings[f"{family}-small"] = time.perf_counter() - t
    else:
        _link(base_dir / "models" / f"{family}-small", small)
    ref = models / f"{family}-small-ref"
    if cell["axis"] == "misconception_share":
        _link(base_dir / "models" / f"{family}-small-ref", ref)
    else:
        t = time.perf_counter()
        tune_reference(small, folder / "data" / "curated.jsonl", ref, refcfg, pre.seed)
        timings[f"{family}-small-ref"] = time.perf_counter() - t
    record = {
        "config": {**base_manifest["config"], "world": config_lib.to_dict(cell["world"])},
        "base_world": str(base_dir),
        "timings_s": timings,
        "sha256": {
            **{f"data/{p.name}": _sha(p) for p in sorted((folder / "data").iterdir())},
            **{f"models/{m.name}": _sha(m / "model.safetensors") for m in sorted((folder / "models").iterdir())},
        },
    }
    manifest.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")  # written last: the cell is ready
    return folder


def _seed_folder(work: Path, seed: int, family: str) -> Path:
    return work / "worlds" / f"seed{seed}-{family}"


def seed_world(cfg: MapConfig, shipped: Path, seed: int, work: Path, family: str) -> Path:
    """The world of another seed: the shipped generator and recipes, small and large of the family (and its
    references, as `atlantis world build` makes them). One folder per family, like a cell's world, so the
    families' jobs pre-train side by side (a shared folder made one wait for the other's build); the lock only
    keeps two runs of one family apart."""
    import fcntl

    from atlantis.world.build import BuildConfig, ReferenceConfig, build

    if seed == world_config(shipped).seed:
        return shipped
    recorded = json.loads((shipped / "manifest.json").read_text())["config"]
    folder = _seed_folder(work, seed, family)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        models = [folder / "models" / f"{family}-{size}" for size in ("small", "large", "small-ref", "small-ref-d")]
        recorded_models = (
            json.loads((folder / "manifest.json").read_text())["models"] if (folder / "manifest.json").is_file() else {}
        )
        if not all(m.is_dir() and m.name in recorded_models for m in models):
            build(
                BuildConfig(
                    out=str(folder),
                    world=dataclasses.replace(world_config(shipped), seed=seed),
                    pretrain=dataclasses.replace(M.PretrainConfig(**recorded["pretrain"]), seed=seed),
                    reference=ReferenceConfig(**recorded["reference"]),
                    families=[family],
                    sizes=["small", "large"],
                    threads=cfg.threads,
                )
            )
    return folder


# ------------------------------------------------------------------------------------ runs


def _cached_scores(work: Path, world: Path, family: str, cache: Path, store: bool) -> None:
    """Share D's scores between cells: a score file is keyed by its role, the model's weights and D."""
    d_sha = _sha(world / "data" / "sft.jsonl")
    for role, suffix in ROLES.items():
        key = _key(
            {"role": role, "model": _sha(world / "models" / f"{family}-{suffix}" / "model.safetensors"), "D": d_sha}
        )
        mine, shared = work / "scores" / f"{role}.parquet", cache / f"{key}.parquet"
        if store and mine.is_file() and not shared.is_file():
            cache.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(mine, shared)
        elif not store and shared.is_file() and not mine.is_file():
            mine.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(shared, mine)


def _weights_sha(path: Path | None) -> str | None:
    from atlantis.weights import read_weights

    if path is None:
        return None
    df = read_weights(path)
    return hashlib.sha256(df[["id", "weight"]].to_csv(index=False).encode()).hexdigest()


def run_cell(cfg: MapConfig, world: Path, family: str, work: Path, tag: dict) -> tuple[list[dict], dict]:
    """SFT and every arm over the seeds in one world folder; returns the runs and the weights' diagnostics."""
    ecfg = ExperimentConfig(
        world=str(world),
        out=str(work),
        family=family,
        seeds=cfg.seeds,
        arms=["sft", *cfg.arms],
        finetune=cfg.finetune,
        threads=cfg.threads,
    )
    cell_work = work / "cells" / tag["cell"] / f"seed{tag['world_seed']}" / family
    _cached_scores(cell_work, world, family, work / "scores", store=False)
    weights = score_and_weigh(ecfg, cell_work)
    _cached_scores(cell_work, world, family, work / "scores", store=True)
    cats = sample_categories(world)
    diag = {"assumption": assumption_check(cell_work, cats), "weights": weight_diagnostics(ecfg, weights, cats)}
    base = {
        "p_L": _sha(world / "models" / f"{family}-large" / "model.safetensors"),
        "D": _sha(world / "data" / "sft.jsonl"),
        "finetune": dataclasses.asdict(cfg.finetune),
    }
    eval_sha = {name: _sha(world / "data" / f"{name}.jsonl") for name in EVAL_SETS}
    rows = []
    for seed in cfg.seeds:
        for arm in ecfg.arms:
            train_key = _key({**base, "weights": _weights_sha(weights.get(arm)), "seed": seed})
            eval_key = _key({"train": train_key, "eval": eval_sha})
            run_dir, metrics_path = work / "train" / train_key, work / "eval" / f"{eval_key}.json"
            t = time.perf_counter()
            if cfg.only_cached and not metrics_path.is_file():
                continue
            if not metrics_path.is_file():
                if not (run_dir / "final" / "model.safetensors").is_file():
                    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run: start it again
                    finetune(ecfg, arm, seed, weights.get(arm), run_dir)
                metrics = evaluate(run_dir / "final", str(world), str(M.TEMPLATE_PATH), work / "answers" / eval_key)
                metrics_path.parent.mkdir(parents=True, exist_ok=True)
                metrics_path.write_text(json.dumps(metrics))
            metrics = json.loads(metrics_path.read_text())
            rows.append(
                {
                    **tag,
                    "family": family,
                    "arm": arm,
                    "seed": seed,
                    **{m: metrics[m] for m in METRICS},
                    "train_key": train_key,
                    "eval_key": eval_key,
                    "seconds": time.perf_counter() - t,
                }
            )
        log.info("%s, world seed %s, %s: seed %s done", tag["cell"], tag["world_seed"], family, seed)
    return rows, diag


def _ready(shipped: Path, cell: dict, work: Path, family: str, wseed: int, base_seed: int) -> bool:
    """Whether a cell's world folder is complete (only_cached: a report of what has run, nothing made)."""
    if wseed != base_seed:
        manifest = _seed_folder(work, wseed, family) / "manifest.json"
        return manifest.is_file() and f"{family}-small-ref" in json.loads(manifest.read_text())["models"]
    return cell["axis"] == "default" or (work / "cells" / cell["cell"] / f"world-{family}" / "manifest.json").is_file()


def run(cfg: MapConfig) -> pd.DataFrame:
    """Run (or resume) every cell on every family, then write the tables, figures and provenance."""
    from atlantis.world.mapreport import write_outputs

    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    shipped, out = Path(cfg.world), Path(cfg.out)
    work = out / "work"
    base = world_config(shipped)
    grid = cells(cfg, base)
    log.info(
        "map: %d cells x %d families, %d world seeds for the default cell",
        len(grid),
        len(cfg.families),
        len(cfg.world_seeds),
    )
    rows, diags, timings, worlds = [], [], {}, {}
    todo = [(cell, base.seed) for cell in grid] + [(grid[0], s) for s in cfg.world_seeds if s != base.seed]
    for cell, wseed in todo:
        t = time.perf_counter()
        tag = {
            "cell": cell["cell"],
            "axis": cell["axis"],
            "value": "" if cell["value"] is None else str(cell["value"]),
            "world_seed": wseed,
        }
        for family in cfg.families:
            if cfg.only_cached and not _ready(shipped, cell, work, family, wseed, base.seed):
                continue
            # a knob's cell derives from the shipped world; another world seed holds only the default cell
            if wseed == base.seed:
                world = cell_world(shipped, cell, work, family)
            else:
                world = seed_world(cfg, shipped, wseed, work, family)
            worlds[f"{cell['cell']}/seed{wseed}/{family}"] = world
            cell_rows, diag = run_cell(cfg, world, family, work, tag)
            rows += cell_rows
            for _, w in diag["weights"].iterrows():
                diags.append(
                    {
                        **tag,
                        "family": family,
                        "arm": w["weights"],
                        **diag["assumption"],
                        "ess_over_n": w["ESS/N"],
                        "auc": w["AUC correct>wrong"],
                    }
                )
        timings[f"{cell['cell']}/seed{wseed}"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    runs = pd.DataFrame(rows)
    if cfg.report:
        write_outputs(cfg, runs, pd.DataFrame(diags), timings, worlds)
    else:  # one family's job of the workflow: its runs are cached; the report job reads them back
        done = work / f"done-{'-'.join(cfg.families)}.json"
        done.write_text(json.dumps({"runs": len(runs), "timings_s": timings}, indent=1) + "\n")
    return runs


def summarise_cells(cfg: MapConfig, runs: pd.DataFrame, diags: pd.DataFrame) -> pd.DataFrame:
    """One row per (world seed, cell, family, arm, metric): Δ = arm − SFT paired by seed, its 95% t-interval
    over the seeds, and the cell's assumption measures (Pearson r, the arm's weight AUC and ESS/N)."""
    out = []
    keys = ["world_seed", "cell", "family"]
    for (wseed, cell, family), part in runs.groupby(keys, sort=False):
        sft = part[part["arm"] == "sft"].set_index("seed")
        for arm in cfg.arms:
            mine = part[part["arm"] == arm].set_index("seed")
            common = sorted(set(mine.index) & set(sft.index))
            if not common:  # only_cached: a cell not run yet
                continue
            d = diags[
                (diags["world_seed"] == wseed)
                & (diags["cell"] == cell)
                & (diags["family"] == family)
                & (diags["arm"] == arm)
            ]
            extra = (
                d.iloc[0][["pearson_sum", "pearson_mean", "slope_sum", "ess_over_n", "auc"]].to_dict() if len(d) else {}
            )
            for metric in cfg.metrics:
                diffs = np.asarray([mine.loc[s, metric] - sft.loc[s, metric] for s in common])
                diff, low, high = paired_ci(diffs)
                out.append(
                    {
                        "world_seed": wseed,
                        "cell": cell,
                        "axis": part["axis"].iloc[0],
                        "value": part["value"].iloc[0],
                        "family": family,
                        "arm": arm,
                        "metric": metric,
                        "sft": float(sft.loc[common, metric].mean()),
                        "diff": diff,
                        "ci_low": low,
                        "ci_high": high,
                        "n_seeds": len(common),
                        **extra,
                    }
                )
    return pd.DataFrame(out)


def across_worlds(cfg: MapConfig, runs: pd.DataFrame) -> pd.DataFrame:
    """The default cell over the world seeds: Δ pooled with a two-level bootstrap interval (worlds, then
    seeds within each), beside the per-world means."""
    default = runs[runs["cell"] == "default"]
    out = []
    for family in cfg.families:
        for arm in cfg.arms:
            for metric in cfg.metrics:
                groups, per_world = [], {}
                for wseed in cfg.world_seeds:
                    part = default[(default["family"] == family) & (default["world_seed"] == wseed)]
                    sft = part[part["arm"] == "sft"].set_index("seed")[metric]
                    mine = part[part["arm"] == arm].set_index("seed")[metric]
                    common = sorted(set(sft.index) & set(mine.index))
                    diffs = np.asarray([mine[s] - sft[s] for s in common])
                    if len(diffs):
                        groups.append(diffs)
                        per_world[f"world{wseed}"] = float(diffs.mean())
                if not groups:
                    continue
                est, low, high = two_level_bootstrap(groups, cfg.bootstrap, seed=0)
                out.append(
                    {
                        "family": family,
                        "arm": arm,
                        "metric": metric,
                        "diff": est,
                        "boot_low": low,
                        "boot_high": high,
                        "n_worlds": len(groups),
                        "n_runs": int(sum(len(g) for g in groups)),
                        **per_world,
                    }
                )
    return pd.DataFrame(out)
