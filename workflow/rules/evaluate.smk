# Evaluation of every trained run. The tiny profile grades with the world's ground truth (p*-metrics); the
# benchmark packages (lm-eval, fschat, alpaca-eval, Arena-Hard-Auto) come with issue 6.


rule world_evaluate:
    input:
        f"{RESULTS}/runs/{{run}}/final",
    output:
        f"{RESULTS}/metrics/{{run}}.json",
    log:
        f"{RESULTS}/logs/evaluate/{{run}}.log",
    wildcard_constraints:
        run="|".join(re.escape(run) for run in RUNS),
    conda:
        "../envs/atlantis.yaml"
    threads: 2
    params:
        world=config.get("world", ""),
    shell:
        "atlantis world evaluate model={input} world={params.world} out={output} > {log} 2>&1"


rule world_evaluate_proxy:
    input:
        lambda w: config["large"][w.large]["model"],
    output:
        f"{RESULTS}/metrics/{{large}}.proxy.json",
    log:
        f"{RESULTS}/logs/evaluate/{{large}}.proxy.log",
    wildcard_constraints:
        large="|".join(re.escape(large) for large in PROXIES) or "$^",
    conda:
        "../envs/atlantis.yaml"
    threads: 2
    params:
        world=config.get("world", ""),
        small=lambda w: config["families"][config["large"][w.large]["family"]]["small"],
        ref=lambda w: config["families"][config["large"][w.large]["family"]]["ref"],
    shell:
        "atlantis world evaluate model={input} proxy_small={params.small} proxy_ref={params.ref}"
        " world={params.world} out={output} > {log} 2>&1"
