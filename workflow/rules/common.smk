# The experiment matrix: every training run of Tables 2-5 named once, and every scoring pass it needs.
# Runs shared between tables (Table 3's and Table 4's baselines are Table 2's runs) are the same job.

import os
import re

from atlantis.launch import srun_prefix

RESULTS = f"results/{config['profile']}"
FIGURES = f"figures/{config['profile']}"
TABLES = ["table2", "table3", "table4", "table5", "table7"]
METHODS = ["sft", "atlantis"]


def _large_runs():
    runs = {}
    exp = config["experiments"]
    for large in exp["main"]["large"] + exp["scale"]["large"]:
        for method in METHODS:
            runs[f"{large}.{method}"] = {"large": large, "method": method, "family": config["large"][large]["family"]}
    sel = exp["selection"]
    for large in sel["large"]:
        for selector in sel["selectors"]:
            for rate in sel["rates"]:
                for method in METHODS:
                    runs[f"{large}.{method}.{selector}-{rate}"] = {
                        "large": large,
                        "method": method,
                        "family": config["large"][large]["family"],
                        "subset": f"{RESULTS}/selection/{large}/{selector}-{rate}.parquet",
                        "selector": selector,
                        "rate": rate,
                    }
    for large, family in exp["cross"].items():
        runs[f"{large}.atlantis.cross-{family}"] = {
            "large": large,
            "method": "atlantis",
            "family": family,
            "cross": True,
        }
    # Extra seeds of the main comparison give Table 2 its confidence intervals (the paper reports one run, seed 0).
    for seed in exp["main"].get("seeds", [0]):
        for large in exp["main"]["large"]:
            for method in METHODS:
                if seed != 0:
                    runs[f"{large}.{method}.seed{seed}"] = {**runs[f"{large}.{method}"], "seed": seed}
    return runs


RUNS = _large_runs()
# Table 7: proxy-tuning (Eq. 9) of these large models by their family's small/reference pair; nothing to train.
PROXIES = config["experiments"].get("proxy", {}).get("large", [])


def model_of(scorer):
    """`<family>.small`, `<family>.ref` or `<large>.large` -> the model id or folder."""
    name, part = scorer.rsplit(".", 1)
    return config["large"][name]["model"] if part == "large" else config["families"][name][part]


def selection_scorer(large, selector):
    # Superfiltering scores with a small model (its premise: weak-to-strong filtering); IFD (Cherry_LLM) with
    # the model that is fine-tuned.
    return f"{config['large'][large]['family']}.small" if selector == "superfiltering" else f"{large}.large"


def train_inputs(w):
    run = RUNS[w.run]
    inputs = {}
    if run["method"] == "atlantis":
        inputs["weights"] = f"{RESULTS}/weights/{run['family']}.parquet"
    if "subset" in run:
        inputs["subset"] = run["subset"]
    return inputs


def train_settings(w, input):
    run = RUNS[w.run]
    large = config["large"][run["large"]]
    parts = [f"model={large['model']}", f"method={run['method']}", f"preset={large['preset']}"]
    if "seed" in run:
        parts.append(f"seed={run['seed']}")
    parts += [f"{k}={v}" for k, v in input.items()]
    return " ".join(parts + config.get("train_extra", []))


def preset_of(run, key):
    return config["presets"][config["large"][RUNS[run]["large"]]["preset"]][key]


def preset(w, key):
    return preset_of(w.run, key)


def preset_keys(w):
    return config["presets"][config["large"][RUNS[w.run]["large"]]["preset"]].keys()


def processes(w):
    """Training processes of a run: one per GPU (Table 6), or the preset's `tasks` on CPU (at least one)."""
    p = config["presets"][config["large"][RUNS[w.run]["large"]]["preset"]]
    return int(p.get("tasks", p["gpus"]) or 1)


# What the runs need, each once (the plan counts these; Snakemake derives the same jobs from the rules).
WEIGHT_FAMILIES = sorted({r["family"] for r in RUNS.values() if r["method"] == "atlantis"})
SELECTIONS = sorted({r["subset"] for r in RUNS.values() if "subset" in r})
SCORE_PASSES = sorted(
    {(f"{f}.{part}", "weights") for f in WEIGHT_FAMILIES for part in ("small", "ref")}
    | {
        (selection_scorer(r["large"], r["selector"]), kind)
        for r in RUNS.values()
        if "subset" in r
        for kind in ("cond", "direct")
    }
)


# A benchmark package's own environment (workflow/envs/<name>.yaml, conflicting with the main one): built once as
# .envs/<name> from the file's pip list (rule pip_env), with or without conda; the rule itself runs `atlantis`
# in the main environment, which calls that environment's python.
def env_input(name):
    return [f".envs/{name}/atlantis-env.json"]


def env_python(name):
    return f".envs/{name}/bin/python"


# ---------------------------------------------------------------------------------------------- benchmarks
BENCH = config["benchmarks"]
QUESTION_SETS = BENCH["questions"]
WORLD = "world" in config
# Fixed models of the preference benchmarks (pairwise baselines, AlpacaEval references), by name -> folder/id
FIXED = BENCH.get("models", {})
# Benchmark data fetched the way each package does on a networked machine (paper profile): path -> URL
DOWNLOADS = BENCH.get("downloads", {})
PROXY_MODELS = [f"{large}.proxy" for large in PROXIES]
EVALUATED = list(RUNS) + PROXY_MODELS
MODEL_PATTERN = "|".join(re.escape(m) for m in EVALUATED + list(FIXED))
# Table 2 (and Fig. 3) report every benchmark; Tables 3-5 and 7 only TruthfulQA and MT-Bench (as the paper)
MAIN_LARGE = config["experiments"]["main"]["large"]
TABLE2_MODELS = [r for r, v in RUNS.items() if v["large"] in MAIN_LARGE and "subset" not in v and not v.get("cross")]
MTBENCH_MODELS = EVALUATED


def model_path(model):
    """A model's folder (or Hub id): a run's `final`, or a fixed benchmark model."""
    return f"{RESULTS}/runs/{model}/final" if model in RUNS else FIXED[model]


def model_input(w):
    return {"model": f"{RESULTS}/runs/{w.model}/final"} if w.model in RUNS else {}


def proxy_triple(model):
    large = model.removesuffix(".proxy")
    family = config["families"][config["large"][large]["family"]]
    return config["large"][large]["model"], family["small"], family["ref"]


def lmeval_source(model):
    if model.endswith(".proxy") and model.removesuffix(".proxy") in PROXIES:
        large, small, ref = proxy_triple(model)
        return f"proxy_large={large} proxy_small={small} proxy_ref={ref}"
    return f"model={model_path(model)}"


def generate_source(model):
    if model in PROXY_MODELS:
        large, small, ref = proxy_triple(model)
        return f"large={large} small={small} ref={ref}"
    return f"model={model_path(model)}"


def answers_file(model, bench):
    return f"{RESULTS}/answers/{model}/{BENCH['answer_files'][bench]}.jsonl"


def baseline_answers(bench, name):
    """A fixed model's answers: fetched (paper: `benchmarks.<bench>.answers_of`), or generated like any model's."""
    fetched = BENCH[bench].get("answers_of", {})
    return fetched[name] if name in fetched else answers_file(name, bench)


# (benchmark, level) of every judged benchmark, for the judge check
JUDGED = [("mtbench", None), ("alpacaeval", "easy"), ("alpacaeval", "hard"), ("arena", None)]


def judge_settings(bench, level=None):
    """The judge of a benchmark (and level: AlpacaEval 2.0's annotator calls another model than 1.0's): the world
    judge (tiny), or the configured endpoint; the key stays in its variable, only the variable's name is passed."""
    j = {**BENCH.get("judge", {}), **BENCH[bench].get("judge", {})}
    j.update(BENCH[bench][level].get("judge", {}) if level else {})
    parts = [f"judge.{k}={v}" for k, v in j.items()]
    return " ".join(parts + ([f"world={config['world']}"] if WORLD else []))


METRICS_FILES = [f"{RESULTS}/metrics/{m}.json" for m in EVALUATED] if WORLD else []
METRICS_FILES += [f"{RESULTS}/metrics/{m}/lmeval.json" for m in EVALUATED]
METRICS_FILES += [f"{RESULTS}/metrics/{m}/mtbench.json" for m in MTBENCH_MODELS]
METRICS_FILES += [f"{RESULTS}/metrics/{m}/alpacaeval_{lv}.json" for m in TABLE2_MODELS for lv in ("easy", "hard")]
METRICS_FILES += [f"{RESULTS}/metrics/{m}/arena_hard.json" for m in TABLE2_MODELS]
