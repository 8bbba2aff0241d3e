# The experiment matrix: every training run of Tables 2-5 named once, and every scoring pass it needs.
# Runs shared between tables (Table 3's and Table 4's baselines are Table 2's runs) are the same job.

RESULTS = f"results/{config['profile']}"
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
                    }
    for large, family in exp["cross"].items():
        runs[f"{large}.atlantis.cross-{family}"] = {"large": large, "method": "atlantis", "family": family}
    return runs


RUNS = _large_runs()


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
    parts += [f"{k}={v}" for k, v in input.items()]
    return " ".join(parts + config.get("train_extra", []))


def preset_of(run, key):
    return config["presets"][config["large"][RUNS[run]["large"]]["preset"]][key]


def preset(w, key):
    return preset_of(w.run, key)


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
