# `snakemake -c2 world_map`: where weak-to-strong importance sampling works in the tiny world (`atlantis world
# map`, config/map.yaml). Its own target, not part of `all`: the default run stays as fast as before. It reads
# the shipped world and writes the map's tables, provenance and figures; its work (extra worlds, cell models,
# fine-tuned runs) is cached under results/tiny/map/work, so a rerun resumes.

if WORLD:

    rule world_map:
        input:
            config=MAP_CONFIG,
            manifest=f"{config['world']}/manifest.json",
            world=world_inputs(),
        output:
            tables=[f"{RESULTS}/map/{name}" for name in ("runs.csv", "cells.csv", "worlds.csv", "map.md")],
            provenance=f"{RESULTS}/map/provenance.json",
            heatmaps=expand(f"{FIGURES}/map-{{metric}}.{{ext}}", metric=map_metrics(), ext=["png", "pdf"]),
            scatter=expand(f"{FIGURES}/map-scatter.{{ext}}", ext=["png", "pdf"]),
        log:
            f"{RESULTS}/logs/world_map.log",
        conda:
            "../envs/atlantis.yaml"
        threads: THREADS
        params:
            world=lambda w, input: os.path.dirname(input.manifest),
            out=lambda w, output: os.path.dirname(output.provenance),
            figures=lambda w, output: os.path.dirname(output.scatter[0]),
        shell:
            "atlantis world map --config {input.config} world={params.world} out={params.out}"
            " figures={params.figures} threads={threads} > {log} 2>&1"
