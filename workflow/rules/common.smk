# The experiment matrix: every training run of Tables 2-5 named once, and every scoring pass it needs.
# Runs shared between tables (Table 3's and Table 4's baselines are Table 2's runs) are the same job.

import math
import os
import re
import subprocess
from pathlib import Path

import yaml

from atlantis.launch import srun_prefix
from atlantis.plan import JudgeWork, PlannedJob
from atlantis.selection import selection_scorers
from atlantis.resources import (
    Cluster,
    ResourceError,
    inference_resources,
    model_size,
    train_resources,
)
from atlantis.train import PRESETS, table6_schedule

RESULTS = f"results/{config['profile']}"
# CPU threads of a model job (torch's intra-op threads: Snakemake exports OMP_NUM_THREADS); the smoke profile uses 1,
# so that two jobs share a 2-core machine and one's Python start-up overlaps the other's compute
THREADS = int(config.get("threads", 2))
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
    """`<family>.small`, `<family>.ref`, `<large>.large` or `<selector>.scorer` -> the model id or folder."""
    name, part = scorer.rsplit(".", 1)
    if part == "scorer":
        return SELECTION_SCORERS[name]
    return config["large"][name]["model"] if part == "large" else config["families"][name][part]


# What p_S(y|x) and p_r(y|x) mean, the same for every family (README, "What p_S(y|x) means"). A base model reads the
# conversation as plain text (`plain`: "User: x / Assistant:" then y), whether or not its checkpoint ships a chat
# template (Qwen2 and Gemma-2 bases do, Llama-2's does not); an instruct model reads it through its own chat template.
ROLE_TEMPLATES = {"small": ["render.template=plain"], "ref": ["render.template=model"]}


def later_wins(*groups):
    """`key=value` settings from layers (rule, profile, family), each key once with its last layer's value: the CLI
    refuses a setting given twice."""
    merged = {}
    for item in (x for group in groups for x in group):
        key = item.split("=", 1)[0]
        merged.pop(key, None)
        merged[key] = item
    return list(merged.values())


def weight_pass_render(scorer):
    """Render settings of one role's weight pass, later ones winning: the role's rule (ROLE_TEMPLATES), the
    profile's `score_extra` (the tiny world reads everything through its own template), then what the family gives
    that role (`families.<f>.render.<role>`)."""
    name, part = scorer.rsplit(".", 1)
    family = config["families"].get(name, {}) if part != "large" else {}
    return later_wins(
        ROLE_TEMPLATES.get(part, []), config.get("score_extra", []), family.get("render", {}).get(part, [])
    )


def score_settings(w):
    """A pass's settings: the role's render settings (weight passes) or the profile's, then the pass's own."""
    base = weight_pass_render(w.scorer) if w.kind == "weights" else config.get("score_extra", [])
    return later_wins(base, SCORE_PASS[w.kind].split())


# The model that scores each selector's IFD (`experiments.selection.scorers`, defaults: the released code's choices;
# atlantis.selection.DEFAULT_SCORERS).
SELECTION_SCORERS = selection_scorers(config["experiments"].get("selection", {}))


def selection_scorer(large, selector):
    scorer = SELECTION_SCORERS[selector]
    if scorer == "large":
        return f"{large}.large"
    if scorer == "small":
        return f"{config['large'][large]['family']}.small"
    return f"{selector}.scorer"


def train_inputs(w):
    run = RUNS[w.run]
    inputs = {"made": local_inputs(config["large"][run["large"]]["model"], config["sft"])}
    inputs["settings"] = setting_inputs(config.get("train_extra", []))
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
    if TRAINING["zero"] != "none":
        parts.append(f"deepspeed={TRAINING['zero']}")  # Table 6: ZeRO-3 with optimizer and parameter offload
    schedule = run_schedule(w.run)
    parts += [f"{k}={schedule[k]}" for k in ("max_steps", "warmup_steps") if k in schedule]
    parts += [f"{k}={v}" for k, v in input.items() if k in ("weights", "subset")]
    return " ".join(later_wins(parts, config.get("train_extra", [])))


# DeepSpeed compiles its ops (CPU Adam for the offloaded optimizer) on first use: one cache for every job, kept
# between runs, on the shared file system of the workflow's folder.
TORCH_ENV = f"export TORCH_EXTENSIONS_DIR={os.path.abspath('.cache/torch_extensions')}; "


# What the runs need, each once (the plan counts these; Snakemake derives the same jobs from the rules).
WEIGHT_FAMILIES = sorted({r["family"] for r in RUNS.values() if r["method"] == "atlantis"})
SELECTIONS = sorted({r["subset"] for r in RUNS.values() if "subset" in r})
SCORE_PASSES = sorted(
    {(f"{f}.{part}", "weights") for f in WEIGHT_FAMILIES for part in ("small", "ref")}
    | {
        (selection_scorer(r["large"], r["selector"]), f"{r['selector']}_{kind}")
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


def made_here(path):
    """A model folder or data file that a rule of this workflow makes (the smoke profile's converted checkpoints and
    data): jobs that read it declare the path itself, so they wait for it."""
    return str(path).startswith(f"{RESULTS}/models/") or str(path).startswith(f"{RESULTS}/data/")


def local_inputs(*paths):
    """What a job reads from these models or data, as inputs: a path a rule makes, every file of a local folder
    (a model's weights, tokenizer and config), a local file; a Hub id is nothing to declare. A change of any of
    them (`atlantis world build force=true`, a model replaced in place) reruns exactly the jobs that read it."""
    found = []
    for path in map(str, paths):
        if made_here(path) or os.path.isfile(path):
            found.append(path)
        elif os.path.isdir(path):
            found += sorted(
                str(f)
                for f in Path(path).rglob("*")
                if f.is_file() and not f.relative_to(path).parts[0].startswith(".")
            )
    return found


def setting_inputs(settings):
    """Local files that `key=value` settings name (a chat template, lm-eval's TruthfulQA records)."""
    values = [s.split("=", 1)[1] for s in settings if "=" in s]
    return local_inputs(*[v for v in values if made_here(v) or os.path.isfile(v)])


def world_inputs():
    """What the tiny world's graders read: its data sets (questions, ground truth) and its question/answer format;
    not its models, so that a new model reruns only the jobs that load it."""
    return local_inputs(f"{config['world']}/data", "atlantis/world/qa.jinja") if WORLD else []


def lm_eval_inputs():
    """Files the lm-eval settings name: the smoke profile's TruthfulQA records (the proxy's job, which waits for no
    training, used to race `smoke_data`), the world's data (`world=`)."""
    return setting_inputs(BENCH.get("lm_eval", [])) + (world_inputs() if WORLD else [])


def lmeval_input(w):
    return {**model_input(w), "data": lm_eval_inputs()}


def model_input(w):
    if w.model in RUNS:
        return {"model": f"{RESULTS}/runs/{w.model}/final"}
    if w.model in PROXY_MODELS:
        return {"models": local_inputs(*proxy_triple(w.model))}
    return {"model": local_inputs(FIXED[w.model])} if w.model in FIXED else {}


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


# ---------------------------------------------------------------------------------------------- resources
# Every job's GPUs, nodes, tasks, CPUs per task, memory per node and time limit follow from its model's parameter
# count (config.json, or the architecture `model_sizes:` declares for a Hub id), the ZeRO mode, the data size and the
# cluster (`cluster:`), through atlantis.resources; `snakemake plan` prints the same estimates.
CLUSTER = Cluster.from_config(config.get("cluster"))
TRAINING = {
    "zero": "zero3_offload",
    "table6_steps": "micro",
    "subset_steps": "same_epochs",
    **config.get("training", {}),
}
ESTIMATES = config.get("estimates", {})
SFT_SAMPLES = ESTIMATES.get("sft", {}).get("samples", 0)
SFT_TOKENS = ESTIMATES.get("sft", {}).get("tokens_per_sample", 0)


def size_of(spec):
    return model_size(spec, config.get("model_sizes", {}))


def base_of(model):
    """The model a benchmark job loads: a run's large base (its fine-tuned copy has the same size), or a fixed one."""
    return config["large"][RUNS[model]["large"]]["model"] if model in RUNS else FIXED[model]


def run_schedule(run):
    """Optimizer steps, warm-up steps and samples seen by a run (Table 6 under the configured reading).

    Table 3's subsets train as many epochs as the full run (`subset_steps: same_epochs`: steps x rate), not Table 6's
    steps on 5% of the data (38 epochs under the micro-batch reading); `same_steps` keeps the steps.
    """
    r = RUNS[run]
    preset_name = config["large"][r["large"]]["preset"]
    rate = float(r.get("rate", 1.0))
    if preset_name not in PRESETS:  # tiny and smoke: epochs over the data, as their train_extra says
        epochs = float(TRAINING.get("epochs", 1))
        return {"samples": SFT_SAMPLES * rate * epochs}
    preset = PRESETS[preset_name]
    steps, warmup = table6_schedule(preset_name, TRAINING["table6_steps"])
    if "subset" in r and TRAINING["subset_steps"] == "same_epochs":
        steps, warmup = max(1, math.ceil(steps * rate)), math.ceil(warmup * rate)
    gpus = config["presets"][preset_name]["gpus"]
    batch = gpus * preset["per_device_batch_size"] * preset["grad_accum"]
    return {
        "max_steps": steps,
        "warmup_steps": warmup,
        "samples": steps * batch,
        "micro_steps": steps * preset["grad_accum"],
    }


def train_res(run):
    r = RUNS[run]
    large = config["large"][r["large"]]
    p = config["presets"][large["preset"]]
    batch = PRESETS[large["preset"]]["per_device_batch_size"] if large["preset"] in PRESETS else 1
    return train_resources(
        size_of(large["model"]),
        gpus=int(p.get("gpus", 0)),
        tokens=run_schedule(run)["samples"] * SFT_TOKENS,
        cluster=CLUSTER,
        zero=TRAINING["zero"],
        micro_batch_tokens=batch * int(TRAINING.get("max_length", 2048)),
        processes=int(p.get("tasks", 1)),
        micro_steps=run_schedule(run).get("micro_steps", 0),
        what=f"train {run}",
    )


def score_res(scorer):
    gpus = int(config["scoring"].get("gpus", 1))
    return inference_resources(
        [size_of(model_of(scorer))],
        CLUSTER,
        forward_tokens=SFT_SAMPLES * SFT_TOKENS,
        gpus=gpus,
        threads=THREADS,
        what=scorer,
    )


def score_tasks(scorer):
    """Data-parallel scoring (one task per GPU, each with the whole model) when the model fits one GPU."""
    res = score_res(scorer)
    one = inference_resources([size_of(model_of(scorer))], CLUSTER).gpus <= 1
    return res.gpus if (one and res.gpus > 1) else 1


def eval_sizes(model):
    if model in PROXY_MODELS:
        return [size_of(m) for m in proxy_triple(model)]
    return [size_of(base_of(model))]


def lmeval_batch():
    """lm-eval's batch size as the config passes it (`atlantis lmeval`'s default: 16)."""
    given = [x.split("=", 1)[1] for x in BENCH.get("lm_eval", []) if x.startswith("batch_size=")]
    return int(given[-1]) if given else 16


def lmeval_res(model):
    e = ESTIMATES.get("lmeval", {})
    return inference_resources(
        eval_sizes(model),
        CLUSTER,
        forward_tokens=float(e.get("forward_tokens", 0)),
        generated_tokens=float(e.get("generated_tokens", 0)),
        logits_tokens=lmeval_batch() * int(e.get("max_length", 2048)),
        threads=THREADS,
        what=f"lmeval {model}",
    )


def answers_res(model, qset):
    e = ESTIMATES.get("answers", {}).get(qset, {})
    generated = float(e.get("questions", 0)) * float(e.get("turns", 1)) * float(e.get("tokens", 0))
    return inference_resources(
        eval_sizes(model), CLUSTER, generated_tokens=generated, threads=THREADS, what=f"answers {model}"
    )


def slurm_resources(res_of):
    """The resources block of a rule from a function wildcards -> JobResources."""
    return {
        "gpu": lambda w: res_of(w).gpus,
        "nodes": 1,  # the GPUs of one sharded model: on one node
        "mem_mb": lambda w: res_of(w).mem_mb,
        "cpus_per_task": lambda w: res_of(w).cpus_per_task,
        "runtime": lambda w, attempt: res_of(w).runtime_minutes(CLUSTER, attempt),
    }


def sharding(res):
    """Settings that spread one model over the job's GPUs (transformers device_map / lm-eval parallelize)."""
    return res.gpus > 1


# The judge's API key reaches only the judge rules. The SLURM executor submits with `sbatch --export=ALL`, so every
# variable of this process would travel into every compute job: under a cluster executor the key is taken out of this
# process's environment before the first submission (`hide_judge_keys`, from the Snakefile's onstart) and handed back
# only to the judge commands (`run_judged`: local rules, run in this process). The local executor runs every job on
# this machine, and its `run:` jobs in fresh processes that read the key from the environment again.
def _judge_key_vars():
    names = {BENCH.get("judge", {}).get("api_key_env", "OPENAI_API_KEY")}
    for bench, level in JUDGED:
        j = {**BENCH.get("judge", {}), **BENCH.get(bench, {}).get("judge", {})}
        j.update(BENCH.get(bench, {}).get(level, {}).get("judge", {}) if level else {})
        names.add(j.get("api_key_env", "OPENAI_API_KEY"))
    return sorted(names)


_JUDGE_KEYS = {name: os.environ[name] for name in _judge_key_vars() if name in os.environ}


def hide_judge_keys():
    if not workflow.local_exec:
        for name in _JUDGE_KEYS:
            os.environ.pop(name, None)


def run_judged(command):
    """Run a judge rule's command with the judge keys in its environment (and only there)."""
    subprocess.run(["bash", "-euo", "pipefail", "-c", command], env={**os.environ, **_JUDGE_KEYS}, check=True)


# ---------------------------------------------------------------------------------------------- the plan


def _planned(rule, res):
    return PlannedJob(rule, res.gpus, res.nodes, res.hours, res.runtime_minutes(CLUSTER), res.mem_mb, res.note)


def plan_jobs():
    jobs = [_planned("train", train_res(r)) for r in RUNS]
    jobs += [_planned("score", score_res(scorer)) for scorer, _ in SCORE_PASSES]
    jobs += [PlannedJob("weights", 0, 1, 0.0, CLUSTER.min_minutes) for _ in WEIGHT_FAMILIES]
    jobs += [PlannedJob("select", 0, 1, 0.0, CLUSTER.min_minutes) for _ in SELECTIONS]
    if not WORLD:
        answered = [(m, "mtbench") for m in MTBENCH_MODELS] + [
            (m, b) for m in TABLE2_MODELS for b in ("alpacaeval", "arena")
        ]
        jobs += [_planned("answers", answers_res(m, BENCH["answer_files"][b])) for m, b in answered]
        jobs += [_planned("lmeval", lmeval_res(m)) for m in RUNS]
        jobs += [_planned("lmeval_proxy", lmeval_res(m)) for m in PROXY_MODELS]
    return jobs


def plan_judge():
    est = ESTIMATES.get("judge", {})
    prices = est.get("prices", {})
    work = []
    for bench, models in [
        ("mtbench_single", MTBENCH_MODELS),
        ("mtbench_pairwise", MTBENCH_MODELS),
        ("alpacaeval_easy", TABLE2_MODELS),
        ("alpacaeval_hard", TABLE2_MODELS),
        ("arena_hard", TABLE2_MODELS),
    ]:
        if bench not in est:
            continue
        e = est[bench]
        price = prices.get(e["judge"], [0.0, 0.0])
        work.append(
            JudgeWork(bench, e["judge"], len(models), int(e["calls"]), int(e["input"]), int(e["output"]), *price)
        )
    return work


def plan_alternatives():
    """Each large model's training under ZeRO-3 with and without offload: memory and time (Table 6 uses offload)."""
    out = []
    for large, spec in config["large"].items():
        run = next((r for r, v in RUNS.items() if v["large"] == large and "subset" not in v), None)
        if run is None or spec["preset"] not in PRESETS:
            continue
        cells = []
        for zero in ("zero3_offload", "zero3"):
            try:
                res = train_resources(
                    size_of(spec["model"]),
                    gpus=int(config["presets"][spec["preset"]]["gpus"]),
                    tokens=run_schedule(run)["samples"] * SFT_TOKENS,
                    cluster=CLUSTER,
                    zero=zero,
                    micro_batch_tokens=PRESETS[spec["preset"]]["per_device_batch_size"]
                    * int(TRAINING.get("max_length", 2048)),
                    micro_steps=run_schedule(run)["micro_steps"],
                )
                cells.append(
                    f"{zero} {res.hours:,.0f} h, {res.gpu_gb:,.0f} GB per GPU, {res.mem_mb / 1024:,.0f} GB RAM per node"
                )
            except ResourceError as err:
                cells.append(f"{zero} does not fit ({err})")
        size = size_of(spec["model"])
        out.append((f"{large} ({size.params / 1e9:.2f}B)", "; ".join(cells)))
    return out


# ------------------------------------------------------------------------------------ the tiny world's map

MAP_CONFIG = "config/map.yaml"


def map_settings():
    """config/map.yaml, from the working directory, else beside the Snakefile (a run from another folder)."""
    path = MAP_CONFIG if os.path.exists(MAP_CONFIG) else os.path.join(workflow.basedir, MAP_CONFIG)
    with open(path) as fh:
        return yaml.safe_load(fh)


def map_metrics():
    """The p*-metrics the map reports (config/map.yaml): one heatmap each."""
    return map_settings()["metrics"]


def map_families():
    """The map's families (config/map.yaml): one job each."""
    return map_settings()["families"]
