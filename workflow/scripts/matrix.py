"""Script of the `matrix` rule: the profile's runs and report settings as JSON, for `atlantis report/figures`."""

import json
from pathlib import Path

snakemake = globals()["snakemake"]  # injected by Snakemake's script directive
matrix = {"config": snakemake.config, "runs": snakemake.params.runs, "report": snakemake.config.get("report", {})}
Path(snakemake.output[0]).write_text(json.dumps(matrix, indent=1, sort_keys=True) + "\n")
Path(snakemake.log[0]).write_text(f"{len(matrix['runs'])} runs\n")
