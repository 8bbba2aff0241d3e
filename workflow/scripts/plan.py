"""Script of the `plan` rule: write the plan table (job counts, GPU-hours) for this profile."""

from pathlib import Path

from atlantis.plan import plan_table

snakemake = globals()["snakemake"]  # injected by Snakemake's script directive
Path(snakemake.output[0]).write_text(plan_table(snakemake.params.jobs, snakemake.params.profile))
Path(snakemake.log[0]).write_text(f"{len(snakemake.params.jobs)} jobs planned\n")
