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
    threads: THREADS
    resources:
        gpu=lambda w: train_res(w.run).gpus,
        nodes=lambda w: train_res(w.run).nodes,
        tasks=lambda w: train_res(w.run).tasks,
        cpus_per_task=lambda w: train_res(w.run).cpus_per_task,
        mem_mb=lambda w: train_res(w.run).mem_mb,
        tasks_per_gpu=lambda w: 1 if train_res(w.run).gpus else 0,
        mpi=lambda w: "srun" if train_res(w.run).tasks > 1 else "",
        runtime=lambda w, attempt: train_res(w.run).runtime_minutes(CLUSTER, attempt),
    params:
        settings=train_settings,
        data=config["sft"],
        out=lambda w: f"{RESULTS}/runs/{w.run}",
        launch=lambda w: srun_prefix(
            train_res(w.run).tasks, train_res(w.run).nodes, train_res(w.run).gpus, train_res(w.run).cpus_per_task
        ),
        env=TORCH_ENV,
    shell:
        "{params.env}{params.launch}atlantis train data={params.data} out={params.out} {params.settings} > {log} 2>&1"
