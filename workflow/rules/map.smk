# `snakemake -c2 world_map`: where weak-to-strong importance sampling works in the tiny world (`atlantis world
# map`, config/map.yaml). Its own target, not part of `all`: the default run stays as fast as before. One job
# per family runs its cells (1 thread each, side by side) and caches every run under results/tiny/map/work; the
# report job then reads them back (nothing is retrained) and writes the tables, provenance and figures.

if WORLD:

    rule world_map_family:
        input:
            config=MAP_CONFIG,
            manifest=f"{config['world']}/manifest.json",
            world=world_inputs(),
        output:
            done=f"{RESULTS}/map/work/done-{{family}}.json",
        log:
            f"{RESULTS}/logs/world_map/{{family}}.log",
        wildcard_constraints:
            family="|".join(map_families()),
        conda:
            "../envs/atlantis.yaml"
        threads: 1
        params:
            world=lambda w, input: os.path.dirname(input.manifest),
            out=lambda w, output: os.path.dirname(os.path.dirname(output.done)),
        shell:
            "atlantis world map --config {input.config} world={params.world} out={params.out}"
            " families={wildcards.family} report=false threads={threads} > {log} 2>&1"

    rule world_map:
        input:
            config=MAP_CONFIG,
            manifest=f"{config['world']}/manifest.json",
            done=expand(f"{RESULTS}/map/work/done-{{family}}.json", family=map_families()),
        output:
            tables=[f"{RESULTS}/map/{name}" for name in ("runs.csv", "cells.csv", "worlds.csv", "map.md")],
            provenance=f"{RESULTS}/map/provenance.json",
            heatmaps=expand(f"{FIGURES}/map-{{metric}}.{{ext}}", metric=map_metrics(), ext=["png", "pdf"]),
            scatter=expand(f"{FIGURES}/map-scatter.{{ext}}", ext=["png", "pdf"]),
        log:
            f"{RESULTS}/logs/world_map/report.log",
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
