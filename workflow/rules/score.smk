# One job per (model, kind of pass) over the SFT set; every weight file and selection reads these.

SCORE_PASS = {
    "weights": "",  # the model's own chat template (base: `plain`), y given x
    "cond": "render.template=alpaca",  # IFD / Superfiltering: s(y|x) with the Alpaca prompt
    "direct": "render.template=alpaca render.context=response_only",  # s(y)
}


rule score:
    output:
        f"{RESULTS}/scores/{{scorer}}/{{kind}}.parquet",
    log:
        f"{RESULTS}/logs/score/{{scorer}}.{{kind}}.log",
    wildcard_constraints:
        kind="|".join(SCORE_PASS),
    conda:
        "../envs/atlantis.yaml"
    threads: 2
    resources:
        gpu=config["scoring"]["gpus"],
        runtime=config["scoring"]["hours"] * 60,
    params:
        model=lambda w: model_of(w.scorer),
        role=lambda w: w.scorer.rsplit(".", 1)[1] if w.kind == "weights" else w.kind,
        extra=lambda w: " ".join(config.get("score_extra", []) + [SCORE_PASS[w.kind]]),
        data=config["sft"],
    shell:
        "atlantis score model={params.model} role={params.role} data={params.data} out={output} {params.extra}"
        " > {log} 2>&1"


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
        cond=lambda w: f"{RESULTS}/scores/{selection_scorer(w.large, w.selector)}/cond.parquet",
        direct=lambda w: f"{RESULTS}/scores/{selection_scorer(w.large, w.selector)}/direct.parquet",
    output:
        f"{RESULTS}/selection/{{large}}/{{selector}}-{{rate}}.parquet",
    log:
        f"{RESULTS}/logs/select/{{large}}.{{selector}}-{{rate}}.log",
    conda:
        "../envs/atlantis.yaml"
    shell:
        "atlantis select method={wildcards.selector} rate={wildcards.rate} scores={input.cond},{input.direct}"
        " out={output} > {log} 2>&1"
