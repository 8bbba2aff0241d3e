# Tables and figures for review: the paper's tables beside this profile's runs, Fig. 2/3/4 analogues, and the
# items of `snakemake --report`.


rule matrix:
    output:
        f"{RESULTS}/matrix.json",
    log:
        f"{RESULTS}/logs/matrix.log",
    localrule: True
    conda:
        "../envs/atlantis.yaml"
    params:
        runs=RUNS,
        # the whole config as a parameter: any change of it (the report mapping, the matrix) rewrites the matrix
        config=config,
    script:
        "../scripts/matrix.py"


rule tables:
    input:
        matrix=f"{RESULTS}/matrix.json",
        metrics=METRICS_FILES,
        # the paper's tables as transcribed in this repository (wherever the workflow runs from)
        paper=expand(os.path.join(workflow.basedir, "results", "paper", "{table}.csv"), table=TABLES),
    output:
        csv=report(
            expand(f"{RESULTS}/tables/{{table}}.csv", table=TABLES),
            category="Tables",
            caption="../report/tables.rst",
        ),
        md=expand(f"{RESULTS}/tables/{{table}}.{{ext}}", table=TABLES, ext=["md", "tex"]),
        delta=report(
            expand(f"{RESULTS}/tables/{{table}}-delta.csv", table=TABLES),
            category="Tables",
            subcategory="Δ vs baseline",
            caption="../report/deltas.rst",
        ),
        provenance=f"{RESULTS}/tables/provenance.json",
    log:
        f"{RESULTS}/logs/tables.log",
    conda:
        "../envs/atlantis.yaml"
    params:
        metrics=lambda w, input: os.path.commonpath(input.metrics),
        paper=lambda w, input: os.path.dirname(input.paper[0]),
        out=lambda w, output: os.path.dirname(output.provenance),
    shell:
        "atlantis report matrix={input.matrix} metrics={params.metrics} paper={params.paper} out={params.out}"
        " > {log} 2>&1"


rule figures:
    input:
        matrix=f"{RESULTS}/matrix.json",
        weights=[f"{RESULTS}/weights/{family}.parquet" for family in WEIGHT_FAMILIES],
        metrics=METRICS_FILES,
    output:
        png=report(
            expand(f"{FIGURES}/{{stem}}.png", stem=["fig2", "fig3", "fig3-radar", "fig4"]),
            category="Figures",
            caption="../report/figures.rst",
        ),
        pdf=expand(f"{FIGURES}/{{stem}}.pdf", stem=["fig2", "fig3", "fig3-radar", "fig4"]),
        stats=f"{FIGURES}/fig4.json",
    log:
        f"{RESULTS}/logs/figures.log",
    conda:
        "../envs/atlantis.yaml"
    params:
        weights=lambda w, input: os.path.dirname(input.weights[0]),
        metrics=lambda w, input: os.path.commonpath(input.metrics),
        out=lambda w, output: os.path.dirname(output.stats),
    shell:
        "atlantis figures matrix={input.matrix} weights={params.weights} metrics={params.metrics} out={params.out}"
        " > {log} 2>&1"
