# The smoke profile (config/smoke.yaml): the paper profile's own rules on real small checkpoints that install
# offline. Two rules stand in for the paper profile's `fetch`: `asset` converts a GGUF package into a Hub-format
# checkpoint (`atlantis assets convert`) and `smoke_data` lays out real benchmark data from installed packages and
# the excerpts shipped in atlantis/smoke_data (`atlantis smoke-data`).

SMOKE_DATA = config["smoke"]["data"]
# every file `atlantis smoke-data` writes that a rule reads: the SFT set, the question sets, the fixed baselines'
# answers (AlpacaEval's example outputs, Arena-Hard's gpt-4-0314), the TruthfulQA records
SMOKE_FILES = list(
    dict.fromkeys(
        [config["sft"], *QUESTION_SETS.values()]
        + [p for b in ("mtbench", "alpacaeval", "arena") for p in BENCH[b].get("answers_of", {}).values()]
        + config["smoke"].get("files", [])
    )
)


rule asset:
    output:
        directory(f"{RESULTS}/models/{{name}}"),
    log:
        f"{RESULTS}/logs/assets/{{name}}.log",
    wildcard_constraints:
        name="|".join(re.escape(n) for n in config["smoke"]["assets"]),
    conda:
        "../envs/atlantis.yaml"
    threads: 2
    resources:
        mem_mb=8000,
    shell:
        "atlantis assets convert name={wildcards.name} out={output} > {log} 2>&1"


rule smoke_data:
    output:
        SMOKE_FILES,
    log:
        f"{RESULTS}/logs/smoke_data.log",
    conda:
        "../envs/atlantis.yaml"
    params:
        out=SMOKE_DATA,
        n=config["smoke"].get("n_sft", 300),
        mtbench="[" + ",".join(map(str, config["smoke"].get("mtbench", [81, 104, 120, 144]))) + "]",
    shell:
        "atlantis smoke-data out={params.out} n_sft={params.n} mtbench={params.mtbench} force=true > {log} 2>&1"
