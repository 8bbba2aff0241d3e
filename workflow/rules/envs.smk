# Benchmark environments on machines without conda: .envs/<name> built once from workflow/envs/<name>.yaml
# (with conda, `--software-deployment-method conda` builds the same YAML and the rules' `conda:` uses it).


rule pip_env:
    input:
        lambda w: os.path.join(workflow.basedir, "workflow", "envs", f"{w.env}.yaml"),
    output:
        ".envs/{env}/atlantis-env.json",
    log:
        "results/logs/envs/{env}.log",
    localrule: True
    conda:
        "../envs/atlantis.yaml"
    params:
        out=lambda w, output: os.path.dirname(output[0]),
    shell:
        "atlantis env spec={input} out={params.out} > {log} 2>&1"
