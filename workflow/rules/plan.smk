# `snakemake plan`: job counts and GPU-hours per rule for this profile, without touching models or data.


rule plan:
    output:
        f"{RESULTS}/plan.md",
    log:
        f"{RESULTS}/logs/plan.log",
    localrule: True
    conda:
        "../envs/atlantis.yaml"
    params:
        jobs=[("train", preset_of(r, "gpus"), preset_of(r, "hours")) for r in RUNS]
        + [("score", config["scoring"]["gpus"], config["scoring"]["hours"]) for _ in SCORE_PASSES]
        + [("weights", 0, 0.0) for _ in WEIGHT_FAMILIES]
        + [("select", 0, 0.0) for _ in SELECTIONS],
        profile=config["profile"],
    script:
        "../scripts/plan.py"
