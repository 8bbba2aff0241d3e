# The paper's benchmarks through their packages, for every evaluated model: lm-eval (TruthfulQA, Open LLM
# Leaderboard v2; the tiny world's own tasks), MT-Bench via FastChat's judge (all models in one pass, as its
# --model-list does), AlpacaEval easy/hard and Arena-Hard-Auto (Table 2's runs). Judges: any OpenAI-compatible
# endpoint (config `benchmarks.judge`), or the tiny world's judge, served by the rule that needs it.
# Results: metrics/<model>/<benchmark>.json, merged per model by `atlantis report`.


if WORLD:

    # the tiny world's 40 models in one process: lm-eval's imports and task index are paid once
    rule lmeval:
        input:
            models=[f"{RESULTS}/runs/{run}/final" for run in RUNS],
            data=lm_eval_inputs(),
        output:
            [f"{RESULTS}/metrics/{run}/lmeval.json" for run in RUNS],
        log:
            f"{RESULTS}/logs/lmeval/runs.log",
        conda:
            "../envs/atlantis.yaml"
        threads: THREADS
        resources:
            gpu=config["benchmarks"]["gpus"],
            runtime=config["benchmarks"]["hours"] * 60 * len(RUNS),
        params:
            models=lambda w, input: ",".join(input.models),
            out=lambda w, output: ",".join(output),
            extra=" ".join(config["benchmarks"]["lm_eval"]),
        shell:
            "atlantis lmeval model={params.models} out={params.out} {params.extra} > {log} 2>&1"

else:

    # the paper's models: one GPU job each (the leaderboard takes hours per model)
    rule lmeval:
        input:
            unpack(lmeval_input),
        output:
            f"{RESULTS}/metrics/{{model}}/lmeval.json",
        log:
            f"{RESULTS}/logs/lmeval/{{model}}.log",
        wildcard_constraints:
            model="|".join(re.escape(run) for run in RUNS),
        conda:
            "../envs/atlantis.yaml"
        threads: THREADS
        resources:
            **slurm_resources(lambda w: lmeval_res(w.model)),
        params:
            source=lambda w: lmeval_source(w.model),
            extra=" ".join(config["benchmarks"]["lm_eval"]),
        shell:
            "atlantis lmeval {params.source} out={output} {params.extra} > {log} 2>&1"


rule lmeval_proxy:
    input:
        lambda w: local_inputs(*proxy_triple(f"{w.large}.proxy")) + lm_eval_inputs(),
    output:
        f"{RESULTS}/metrics/{{large}}.proxy/lmeval.json",
    log:
        f"{RESULTS}/logs/lmeval/{{large}}.proxy.log",
    wildcard_constraints:
        large="|".join(re.escape(large) for large in PROXIES) or "$^",
    conda:
        "../envs/atlantis.yaml"
    threads: THREADS
    resources:
        **slurm_resources(lambda w: lmeval_res(f"{w.large}.proxy")),
    params:
        source=lambda w: lmeval_source(f"{w.large}.proxy"),
        extra=" ".join(config["benchmarks"]["lm_eval"]),
    shell:
        "atlantis lmeval {params.source} out={output} {params.extra} > {log} 2>&1"


if WORLD:

    # the tiny world: every model in one FastChat pass (its local judge cannot fail on one model alone)
    rule mtbench:
        input:
            answers=[answers_file(m, "mtbench") for m in MTBENCH_MODELS],
            baseline=baseline_answers("mtbench", BENCH["mtbench"]["baseline"]),
            env=env_input("fschat"),
            questions=QUESTION_SETS[BENCH["answer_files"]["mtbench"]],
            world=world_inputs(),
        output:
            metrics=[f"{RESULTS}/metrics/{m}/mtbench.json" for m in MTBENCH_MODELS],
            # per-example judgments, kept beside the metrics (FastChat's working tree is scratch, not in git)
            judgments=[f"{RESULTS}/metrics/{m}/mtbench.judgments.jsonl" for m in MTBENCH_MODELS],
        log:
            f"{RESULTS}/logs/mtbench.log",
        localrule: True
        params:
            ids=",".join(MTBENCH_MODELS),
            answers=lambda w, input: ",".join(input.answers),
            out=lambda w, output: ",".join(output.metrics),
            baseline=BENCH["mtbench"]["baseline"],
            judge=judge_settings("mtbench"),
            python=env_python("fschat"),
        run:
            run_judged(
                f"atlantis mtbench questions={input.questions} answers={params.answers} model_ids={params.ids}"
                f" out={params.out} baseline_answers={input.baseline} baseline_id={params.baseline}"
                f" fschat_python={params.python} {params.judge} > {log} 2>&1"
            )

else:

    # one judging job per model: a failed or unanswered model blanks its own cells, not every table's MT-Bench
    rule mtbench:
        input:
            answers=lambda w: answers_file(w.model, "mtbench"),
            baseline=baseline_answers("mtbench", BENCH["mtbench"]["baseline"]),
            env=env_input("fschat"),
            questions=QUESTION_SETS[BENCH["answer_files"]["mtbench"]],
        output:
            metrics=f"{RESULTS}/metrics/{{model}}/mtbench.json",
            judgments=f"{RESULTS}/metrics/{{model}}/mtbench.judgments.jsonl",
        log:
            f"{RESULTS}/logs/mtbench/{{model}}.log",
        wildcard_constraints:
            model=MODEL_PATTERN,
        # judge calls need the API, not a GPU: on the submit host (compute nodes may have no internet)
        localrule: True
        params:
            baseline=BENCH["mtbench"]["baseline"],
            judge=judge_settings("mtbench"),
            python=env_python("fschat"),
        run:
            run_judged(
                f"atlantis mtbench questions={input.questions} answers={input.answers} model_ids={wildcards.model}"
                f" out={output.metrics} baseline_answers={input.baseline} baseline_id={params.baseline}"
                f" fschat_python={params.python} {params.judge} > {log} 2>&1"
            )


rule alpacaeval:
    input:
        answers=lambda w: answers_file(w.model, "alpacaeval"),
        reference=lambda w: baseline_answers("alpacaeval", BENCH["alpacaeval"][w.level]["reference"]),
        env=env_input("alpaca-eval"),
        questions=QUESTION_SETS["alpaca"],
        world=world_inputs(),
    output:
        metrics=f"{RESULTS}/metrics/{{model}}/alpacaeval_{{level}}.json",
        judgments=f"{RESULTS}/metrics/{{model}}/alpacaeval_{{level}}.annotations.json",
    log:
        f"{RESULTS}/logs/alpacaeval/{{model}}.{{level}}.log",
    wildcard_constraints:
        model=MODEL_PATTERN,
        level="easy|hard",
    # judge calls need the API, not a GPU: on the submit host (compute nodes may have no internet)
    localrule: True
    params:
        annotator=lambda w: BENCH["alpacaeval"][w.level]["annotator"],
        reference=lambda w: BENCH["alpacaeval"][w.level]["reference"],
        judge=lambda w: judge_settings("alpacaeval", w.level),
        python=env_python("alpaca-eval"),
    run:
        run_judged(
            f"atlantis alpacaeval answers={input.answers} questions={input.questions} model_id={wildcards.model}"
            f" reference={input.reference} reference_id={params.reference} annotator={params.annotator}"
            f" metric=alpacaeval_{wildcards.level} alpaca_python={params.python} {params.judge} out={output.metrics}"
            f" > {log} 2>&1"
        )


rule arena_hard:
    input:
        answers=lambda w: answers_file(w.model, "arena"),
        baseline=baseline_answers("arena", BENCH["arena"]["baseline"]),
        questions=QUESTION_SETS["arena"],
        world=world_inputs(),
    output:
        metrics=f"{RESULTS}/metrics/{{model}}/arena_hard.json",
        # declared, so a rerun (new answers) starts a fresh cache instead of refusing the stale one
        judgments=f"{RESULTS}/metrics/{{model}}/arena_hard.judgments.jsonl",
    log:
        f"{RESULTS}/logs/arena_hard/{{model}}.log",
    wildcard_constraints:
        model=MODEL_PATTERN,
    # judge calls need the API, not a GPU: on the submit host (compute nodes may have no internet)
    localrule: True
    params:
        judge=judge_settings("arena"),
    run:
        run_judged(
            f"atlantis arena-hard questions={input.questions} answers={input.answers} baseline={input.baseline}"
            f" {params.judge} judgments={output.judgments} out={output.metrics} > {log} 2>&1"
        )


rule fetch:
    output:
        "{path}",
    log:
        "results/logs/fetch/{path}.log",
    wildcard_constraints:
        path="|".join(re.escape(p) for p in DOWNLOADS) or "$^",
    localrule: True
    conda:
        "../envs/atlantis.yaml"
    params:
        url=lambda w: DOWNLOADS[w.path],
    shell:
        "curl -fsSL --retry 3 -o {output} {params.url} > {log} 2>&1"
