# `snakemake plan`: GPU-hours, node-hours, wall-clock and the judge's calls and cost for this profile, from the
# same estimates the rules give SLURM (atlantis.resources), without touching models or data.


rule plan:
    output:
        f"{RESULTS}/plan.md",
    log:
        f"{RESULTS}/logs/plan.log",
    localrule: True
    conda:
        "../envs/atlantis.yaml"
    params:
        # callables: evaluated only when the plan is made, not at every parse of the workflow
        jobs=lambda w: plan_jobs(),
        judge=lambda w: plan_judge(),
        cluster=CLUSTER,
        alternatives=lambda w: plan_alternatives(),
        assumptions=lambda w: {
            **{f"estimates.{k}": v for k, v in ESTIMATES.items() if k != "judge"},
            "training": TRAINING,
        },
        profile=config["profile"],
    script:
        "../scripts/plan.py"
