# One job per (model, kind of pass) over the SFT set; every weight file and selection reads these.

SCORE_PASS = {
    "weights": "",  # y given x, each role through its template (common.smk: ROLE_TEMPLATES)
    # IFD as Cherry_LLM: s(y|x) under the Alpaca prompt, s(y) as "### Response:" then y, max length 512 (its scripts)
    "ifd_cond": "render.template=alpaca render.max_length=512",
    "ifd_direct": "render.template=alpaca render.context=response_only render.direct_prefix=alpaca"
    " render.max_length=512",
    # Superfiltering's code_ifd/: "{instruction}\n" then y, and y alone, max length 1024
    "superfiltering_cond": "render.template=superfiltering render.max_length=1024",
    "superfiltering_direct": "render.template=superfiltering render.context=response_only render.max_length=1024",
}


rule score:
    input:
        lambda w: local_inputs(model_of(w.scorer), config["sft"]) + setting_inputs(score_settings(w)),
    output:
        f"{RESULTS}/scores/{{scorer}}/{{kind}}.parquet",
    log:
        f"{RESULTS}/logs/score/{{scorer}}.{{kind}}.log",
    wildcard_constraints:
        kind="|".join(SCORE_PASS),
    conda:
        "../envs/atlantis.yaml"
    threads: THREADS
    resources:
        gpu=lambda w: score_res(w.scorer).gpus,
        nodes=1,
        tasks=lambda w: score_tasks(w.scorer),
        tasks_per_gpu=lambda w: 1 if score_tasks(w.scorer) > 1 else 0,
        mpi=lambda w: "srun" if score_tasks(w.scorer) > 1 else "",
        cpus_per_task=lambda w: score_res(w.scorer).cpus_per_task // score_tasks(w.scorer),
        mem_mb=lambda w: score_res(w.scorer).mem_mb * score_tasks(w.scorer),
        runtime=lambda w, attempt: score_res(w.scorer).runtime_minutes(CLUSTER, attempt),
    params:
        model=lambda w: model_of(w.scorer),
        role=lambda w: w.scorer.rsplit(".", 1)[1] if w.kind == "weights" else w.kind.rsplit("_", 1)[1],
        extra=lambda w: " ".join(score_settings(w)),
        data=config["sft"],
        # data-parallel over the job's GPUs (rank r scores shards i % world == r; the last one merges)
        launch=lambda w: srun_prefix(
            score_tasks(w.scorer), 1, score_tasks(w.scorer), score_res(w.scorer).cpus_per_task // score_tasks(w.scorer)
        ),
    shell:
        "{params.launch}atlantis score model={params.model} role={params.role} data={params.data} out={output}"
        " {params.extra} > {log} 2>&1"


rule weights:
    input:
        small=f"{RESULTS}/scores/{{family}}.small/weights.parquet",
        ref=f"{RESULTS}/scores/{{family}}.ref/weights.parquet",
    output:
        f"{RESULTS}/weights/{{family}}.parquet",
    log:
        f"{RESULTS}/logs/weights/{{family}}.log",
    conda:
        "../envs/atlantis.yaml"
    shell:
        "atlantis weights scores={input.small},{input.ref} out={output} > {log} 2>&1"


rule select:
    input:
        cond=lambda w: f"{RESULTS}/scores/{selection_scorer(w.large, w.selector)}/{w.selector}_cond.parquet",
        direct=lambda w: f"{RESULTS}/scores/{selection_scorer(w.large, w.selector)}/{w.selector}_direct.parquet",
    output:
        f"{RESULTS}/selection/{{large}}/{{selector}}-{{rate}}.parquet",
    log:
        f"{RESULTS}/logs/select/{{large}}.{{selector}}-{{rate}}.log",
    conda:
        "../envs/atlantis.yaml"
    shell:
        "atlantis select method={wildcards.selector} rate={wildcards.rate} scores={input.cond},{input.direct}"
        " out={output} > {log} 2>&1"
