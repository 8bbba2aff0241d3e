"""Script of the `plan` rule: write the plan (GPU-hours, node-hours, wall-clock, judge cost) for this profile."""

from pathlib import Path

from atlantis.plan import plan_report

snakemake = globals()["snakemake"]  # injected by Snakemake's script directive
p = snakemake.params
text = plan_report(p.jobs, p.judge, p.cluster, p.profile, p.assumptions, p.alternatives)
Path(snakemake.output[0]).write_text(text)
Path(snakemake.log[0]).write_text(text)
