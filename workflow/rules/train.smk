# Weighted SFT of p_L (Table 6 presets); ATLANTIS runs read their family's weights, Table 3 runs a selection.
# A multi-GPU preset asks SLURM for its nodes and one task per GPU (`mpi` keeps the executor from wrapping the
# shell in a one-task srun) and starts the tasks with srun; each maps SLURM's ids to torch's (atlantis.launch).


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
        tasks=processes,
        cpus_per_task=lambda w: preset(w, "cpus_per_task") if "cpus_per_task" in preset_keys(w) else 2,
        tasks_per_gpu=lambda w: 1 if preset(w, "gpus") else 0,
        mpi=lambda w: "srun" if processes(w) > 1 else "",
        runtime=lambda w: preset(w, "hours") * 60,
    params:
        settings=train_settings,
        data=config["sft"],
        out=lambda w: f"{RESULTS}/runs/{w.run}",
        launch=lambda w: srun_prefix(processes(w), preset(w, "nodes"), preset(w, "gpus")),
    shell:
        "{params.launch}atlantis train data={params.data} out={params.out} {params.settings} > {log} 2>&1"
