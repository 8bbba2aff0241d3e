"""AlpacaEval through its package (`alpaca_eval evaluate`, alpaca-eval 0.6.6), in its own environment.

Table 2's "AlpacaEval Easy" and "Hard" columns. The paper names only "AlpacaEval (Li et al., 2023b)" and
"the winning rate of the model's responses to a fixed baseline model's responses"; its numbers settle the
reading: Easy (72–80%) is AlpacaEval 1.0 — annotator `alpaca_eval_gpt4` (GPT-4), reference outputs
text-davinci-003 — where 7–13B SFT models score in that range, and Hard (6–8%) is AlpacaEval 2.0 — annotator
`weighted_alpaca_eval_gpt4_turbo`, reference GPT-4 Turbo — where such models score single digits. Both use the
805 AlpacaEval instructions. We report the package's `win_rate` (`--fn_metric get_winrate`; 2.0's
length-controlled rate needs the package's fitted GLM from the Hub) and record its standard error.

In the tiny world the two columns keep that meaning with the world's own models and data: the same annotator
prompt (`alpaca_eval_gpt4`: the package's prompt and `ranking_parser`, judged by the world judge over HTTP),
the world's instructions, and two fixed reference models, a weak one (easy) and a strong one (hard).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from atlantis.config import field
from atlantis.data import read_jsonl
from atlantis.evals.judge import JudgeConfig, check, redact
from atlantis.log import get_logger

log = get_logger(__name__)


class AlpacaEvalError(RuntimeError):
    pass


@dataclass
class AlpacaEvalConfig:
    answers: str = field(help="The model's answers (FastChat answer JSONL from `atlantis generate`).")
    questions: str = field(
        help="Instructions: JSONL with question_id and instruction (the world's eval_alpaca), or AlpacaEval's JSON."
    )
    model_id: str = field(help="The model's name in AlpacaEval's leaderboard.")
    reference: str = field(help="Reference answers: FastChat answer JSONL, or AlpacaEval outputs JSON.")
    out: str = field(help="Output JSON with the metric.")
    metric: str = field("alpacaeval_easy", help="Metric name in the output (alpacaeval_easy / alpacaeval_hard).")
    reference_id: str = field("reference", help="The reference model's name.")
    annotator: str = field("alpaca_eval_gpt4", help="AlpacaEval annotator config (a package config name or folder).")
    judge: JudgeConfig = field(
        default_factory=lambda: JudgeConfig(base_url="https://api.openai.com/v1", model="gpt-4"),
        help="The judge endpoint (the annotator config names the model).",
    )
    world: str | None = field(None, help="Judge with the tiny world's judge server (ignores judge.base_url).")
    alpaca_python: str = field(".envs/alpaca-eval/bin/python", help="Python of the alpaca-eval environment.")
    work: str | None = field(None, help="AlpacaEval's output folder (default: <out>.work).")


def read_instructions(path: str | Path) -> dict[str, dict]:
    """Instructions by question id: JSONL with question_id, or AlpacaEval's JSON (ids = content hashes, as
    `atlantis generate` gives them)."""
    from atlantis.generate import instruction_id

    path = Path(path)
    rows = json.loads(path.read_text(encoding="utf-8")) if path.suffix == ".json" else read_jsonl(path)
    return {str(r.get("question_id") or instruction_id(r["instruction"])): r for r in rows}


def outputs(answers: str | Path, questions: dict, generator: str) -> list[dict]:
    """AlpacaEval's outputs format (instruction, output, generator) from FastChat answers keyed by question id;
    an AlpacaEval JSON file is read as is."""
    path = Path(answers)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    by_id = {str(a["question_id"]): a for a in read_jsonl(path)}
    missing = [qid for qid in questions if qid not in by_id]
    if missing:
        raise AlpacaEvalError(f"{path}: no answer to {len(missing)} instruction(s), e.g. {missing[:3]}")
    return [
        {"instruction": q["instruction"], "output": by_id[qid]["choices"][0]["turns"][0], "generator": generator}
        for qid, q in questions.items()
    ]


def read_leaderboard(path: Path, model_id: str) -> dict:
    with open(path, newline="") as f:
        rows = {r[""] if "" in r else r.get("name", ""): r for r in csv.DictReader(f)}
    if model_id not in rows:
        raise AlpacaEvalError(f"{path}: no row for {model_id} (rows: {sorted(rows)[:5]})")
    row = rows[model_id]
    return {k: float(row[k]) for k in ("win_rate", "standard_error", "n_wins", "n_draws", "n_total") if row.get(k)}


def run(cfg: AlpacaEvalConfig) -> Path:
    """`atlantis alpacaeval`: the package's evaluate on this model's outputs against the reference."""
    from atlantis.evals.local_judge import judge_endpoint, judge_record

    # absolute, not resolved (a venv's python is a symlink); or an interpreter on PATH
    found = cfg.alpaca_python if Path(cfg.alpaca_python).is_file() else shutil.which(cfg.alpaca_python)
    python = os.path.abspath(found) if found else ""
    if not found:
        raise AlpacaEvalError(
            f"{cfg.alpaca_python}: no alpaca-eval environment (atlantis env spec=workflow/envs/alpaca-eval.yaml "
            "out=.envs/alpaca-eval)"
        )
    out = Path(cfg.out)
    work = Path(cfg.work) if cfg.work else out.with_suffix(".work")
    questions = read_instructions(cfg.questions)
    model_out = outputs(cfg.answers, questions, cfg.model_id)
    ref_out = outputs(cfg.reference, questions, cfg.reference_id)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / "model_outputs.json").write_text(json.dumps(model_out, indent=1))
    (work / "reference_outputs.json").write_text(json.dumps(ref_out, indent=1))
    with judge_endpoint(cfg.judge, cfg.world) as judge:
        check(judge)  # before any annotation is paid for
        env = {
            **os.environ,
            "OPENAI_API_BASE": judge.base_url,
            "OPENAI_API_KEY": os.environ.get(judge.api_key_env, "") if judge.api_key_env else "none",
        }
        cmd = [
            python, "-m", "alpaca_eval.main", "evaluate",
            "--model_outputs", str(work / "model_outputs.json"),
            "--reference_outputs", str(work / "reference_outputs.json"),
            "--annotators_config", cfg.annotator,
            "--name", cfg.model_id,
            "--output_path", str(work),
            "--fn_metric", "get_winrate",  # the length-controlled GLM is fetched from the Hub
            "--sort_by", "win_rate",
            "--precomputed_leaderboard", "None",
            "--is_overwrite_leaderboard", "True",
            "--caching_path", str(work / "annotations_cache.json"),
        ]  # fmt: skip
        log.info(
            "AlpacaEval (%s): %d outputs of %s against %s", cfg.metric, len(model_out), cfg.model_id, cfg.reference_id
        )
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (work / "alpaca_eval.log").write_text(redact(proc.stdout + proc.stderr))
    if proc.returncode != 0:
        raise AlpacaEvalError(f"alpaca_eval evaluate failed ({proc.returncode}): {redact(proc.stderr[-2000:])}")
    boards = sorted(work.rglob("leaderboard.csv"))
    if not boards:
        raise AlpacaEvalError(f"alpaca_eval wrote no leaderboard.csv under {work}")
    board = read_leaderboard(boards[0], cfg.model_id)
    result = {
        "model": cfg.model_id,
        "metrics": {cfg.metric: board["win_rate"]},
        "alpaca_eval": {**board, "reference": cfg.reference_id, "annotator": cfg.annotator},
        "judge": judge_record(cfg.judge, judge, cfg.world),
        "leaderboard": str(boards[0]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    log.info("AlpacaEval %s: %s = %.2f", cfg.model_id, cfg.metric, board["win_rate"])
    return out
