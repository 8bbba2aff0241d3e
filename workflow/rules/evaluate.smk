# Answers and the tiny world's own grading. The tiny profile grades every model with the world's ground truth
# (p*-metrics, `atlantis world evaluate`), which also writes the greedy answers the benchmarks judge; the paper
# profile generates them with `atlantis generate` (FastChat's answer format; rule `answers`).

if WORLD:

    rule world_evaluate:
        input:
            unpack(model_input),
            world=world_inputs(),
        output:
            metrics=f"{RESULTS}/metrics/{{model}}.json",
            answers=[f"{RESULTS}/answers/{{model}}/{name}.jsonl" for name in ("eval_open", "eval_mtbench")],
        log:
            f"{RESULTS}/logs/evaluate/{{model}}.log",
        wildcard_constraints:
            model="|".join(re.escape(m) for m in list(RUNS) + list(FIXED)),
        conda:
            "../envs/atlantis.yaml"
        threads: THREADS
        params:
            world=lambda w, input: os.path.dirname(os.path.dirname(input.world[0])),  # {world}/data/<file>
            model=lambda w: model_path(w.model),
            answers=lambda w, output: os.path.dirname(output.answers[0]),
        shell:
            "atlantis world evaluate model={params.model} model_id={wildcards.model} world={params.world}"
            " answers={params.answers} out={output.metrics} > {log} 2>&1"

    rule world_evaluate_proxy:
        input:
            models=lambda w: local_inputs(*proxy_triple(f"{w.large}.proxy")),
            world=world_inputs(),
        output:
            metrics=f"{RESULTS}/metrics/{{large}}.proxy.json",
            answers=[f"{RESULTS}/answers/{{large}}.proxy/{name}.jsonl" for name in ("eval_open", "eval_mtbench")],
        log:
            f"{RESULTS}/logs/evaluate/{{large}}.proxy.log",
        wildcard_constraints:
            large="|".join(re.escape(large) for large in PROXIES) or "$^",
        conda:
            "../envs/atlantis.yaml"
        threads: THREADS
        params:
            world=lambda w, input: os.path.dirname(os.path.dirname(input.world[0])),  # {world}/data/<file>
            triple=lambda w: proxy_triple(f"{w.large}.proxy"),
            answers=lambda w, output: os.path.dirname(output.answers[0]),
        shell:
            "atlantis world evaluate model={params.triple[0]} proxy_small={params.triple[1]}"
            " proxy_ref={params.triple[2]} model_id={wildcards.large}.proxy world={params.world}"
            " answers={params.answers} out={output.metrics} > {log} 2>&1"

else:

    # every judge endpoint and key, checked once before any GPU hour goes into answers that no judge could grade
    rule judge_check:
        output:
            touch(f"{RESULTS}/logs/judges.checked"),
        log:
            f"{RESULTS}/logs/judge_check.log",
        localrule: True
        params:
            checks=[judge_settings(b, lv).replace("judge.", "") for b, lv in JUDGED],
        run:
            run_judged(" && ".join(f"atlantis judge-check {check}" for check in params.checks) + f" > {log} 2>&1")

    rule answers:
        input:
            unpack(model_input),
            questions=lambda w: QUESTION_SETS[w.qset],
            judges=f"{RESULTS}/logs/judges.checked",
        output:
            f"{RESULTS}/answers/{{model}}/{{qset}}.jsonl",
        log:
            f"{RESULTS}/logs/answers/{{model}}.{{qset}}.log",
        wildcard_constraints:
            model=MODEL_PATTERN,
            qset="|".join(QUESTION_SETS),
        conda:
            "../envs/atlantis.yaml"
        threads: THREADS
        resources:
            **slurm_resources(lambda w: answers_res(w.model, w.qset)),
        params:
            source=lambda w: generate_source(w.model),
            extra=lambda w: " ".join(BENCH["generate"].get(w.qset, [])),
        shell:
            "atlantis generate {params.source} model_id={wildcards.model} questions={input.questions} out={output}"
            " {params.extra} > {log} 2>&1"
