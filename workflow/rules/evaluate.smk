# Evaluation of every trained run. The tiny profile grades with the world's ground truth (p*-metrics); the
# benchmark packages (lm-eval, fschat, alpaca-eval, Arena-Hard-Auto) come with issue 6.


rule world_evaluate:
    input:
        f"{RESULTS}/runs/{{run}}/final",
    output:
        f"{RESULTS}/metrics/{{run}}.json",
    log:
        f"{RESULTS}/logs/evaluate/{{run}}.log",
    conda:
        "../envs/atlantis.yaml"
    threads: 2
    params:
        world=config.get("world", ""),
    shell:
        "atlantis world evaluate model={input} world={params.world} out={output} > {log} 2>&1"
