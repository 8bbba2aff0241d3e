# Weighted SFT of p_L (Table 6 presets); ATLANTIS runs read their family's weights, Table 3 runs a selection.


rule train:
    input:
        unpack(train_inputs),
    output:
        directory(f"{RESULTS}/runs/{{run}}/final"),
    log:
        f"{RESULTS}/logs/train/{{run}}.log",
    conda:
        "../envs/atlantis.yaml"
    threads: 2
    resources:
        gpu=lambda w: preset(w, "gpus"),
        nodes=lambda w: preset(w, "nodes"),
        runtime=lambda w: preset(w, "hours") * 60,
    params:
        settings=train_settings,
        data=config["sft"],
        out=lambda w: f"{RESULTS}/runs/{w.run}",
    shell:
        "atlantis train data={params.data} out={params.out} {params.settings} > {log} 2>&1"
