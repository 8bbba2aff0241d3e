"""AlpacaEval through its package (`alpaca_eval evaluate`, alpaca-eval 0.6.6), in its own environment.

Table 2's "AlpacaEval Easy" and "Hard" columns. The paper names only "AlpacaEval (Li et al., 2023b)" and
"the winning rate of the model's responses to a fixed baseline model's responses"; its numbers settle the
reading: Easy (72–80%) is AlpacaEval 1.0 — annotator `alpaca_eval_gpt4` (GPT-4), reference outputs
text-davinci-003 — where 7–13B SFT models score in that range, and Hard (6–8%) is AlpacaEval 2.0 — annotator
`weighted_alpaca_eval_gpt4_turbo`, reference GPT-4 Turbo — where such models score single digits. Both use the
805 AlpacaEval instructions.

Two metrics, both the package's own computation on the same annotations:

- `win_rate` (`--fn_metric get_winrate`) and its standard error: the metric the paper's columns are compared
  with (`metrics[<metric>]`), since the paper reports "the winning rate" and does not say length-controlled;
- for AlpacaEval 2.0, its headline `length_controlled_winrate` and `lc_standard_error`
  (`alpaca_eval.metrics.get_length_controlled_winrate`, the package's default `fn_metric` for 2.0), recorded
  beside it (`metrics[<metric>_lc]`). AlpacaEval 1.0 has none. In 0.6.6 this is no fitted GLM fetched from the
  Hub: the package fits a logistic regression (`length_controlled_v1`: tanh of the standardised length
  difference + instruction difficulty + a baseline term; L1, 5-fold `LogisticRegressionCV`) on this model's own
  annotations, regularised towards two length-gamed versions of the baseline, and predicts the preference at
  zero length difference. What it does download is `df_gamed.csv` from the Hub dataset tatsu-lab/alpaca_eval
  (the 805 instructions' difficulties, looked up by the annotation's row position, and the gamed baselines'
  annotations), for every GLM variant (`_get_featurized_data` always reads it); offline and not in the Hugging
  Face cache it fails (after huggingface_hub's retries, about 25 s, unless HF_HUB_OFFLINE=1). With one
  annotation, or no length difference at all, the standardised length difference is undefined and the package
  raises; with a few annotations it still fits (`length_controlled_v1` also trains on the gamed baselines'
  annotations, at weight 0.1 each), and the value leans on them. `lc_standard_error` is the package's: the
  standard error of the mean of the GLM's predicted preferences, not a sampling error of the fit. Any failure
  is recorded as `length_controlled_winrate: null` with the package's error in `length_controlled.reason`,
  never as a number; the raw win rate stands. The record keeps the fitted weights (`glm_weights/`), the
  `df_gamed.csv` revision and checksum, the package's warnings and the versions of alpaca-eval, scikit-learn,
  pandas and patsy.

In the tiny world the two columns keep that meaning with the world's own models and data: the same annotator
prompt (`alpaca_eval_gpt4`: the package's prompt and `ranking_parser`, judged by the world judge over HTTP),
the world's instructions, and two fixed reference models, a weak one (easy) and a strong one (hard). Its
annotator is 1.0's at both levels, so it has no length-controlled rate (the GLM's instruction difficulties and
gamed baselines are AlpacaEval 2.0's 805 instructions, not the world's).
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
from atlantis.data import read_jsonl, read_text
from atlantis.evals.judge import JudgeConfig, check, redact
from atlantis.log import get_logger

log = get_logger(__name__)

# AlpacaEval 2.0's annotator (the package's constants.ANNOTATOR_CONFIG_AE2): the one whose annotations the
# length-controlled GLM's gamed baselines and instruction difficulties come from
AE2_ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
LC_SCRIPT = Path(__file__).with_name("alpaca_lc.py")


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
    length_controlled: bool | None = field(
        None,
        help="Also record the package's length-controlled win rate (AlpacaEval 2.0's headline metric) beside the "
        f"raw one; default: when the annotator is 2.0's ({AE2_ANNOTATOR}).",
    )


def read_instructions(path: str | Path) -> dict[str, dict]:
    """Instructions by question id: JSONL with question_id, or AlpacaEval's JSON (ids = content hashes, as
    `atlantis generate` gives them)."""
    from atlantis.generate import instruction_id

    path = Path(path)
    rows = json.loads(read_text(path)) if path.suffix == ".json" else read_jsonl(path)
    return {str(r.get("question_id") or instruction_id(r["instruction"])): r for r in rows}


def outputs(answers: str | Path, questions: dict, generator: str) -> list[dict]:
    """AlpacaEval's outputs format (instruction, output, generator) from FastChat answers keyed by question id;
    an AlpacaEval JSON file is read as is."""
    path = Path(answers)
    if path.suffix == ".json":
        return json.loads(read_text(path))
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


def length_controlled(cfg: AlpacaEvalConfig, python: str, leaderboard: Path, board: dict) -> dict:
    """The package's `get_length_controlled_winrate` on the annotations `evaluate` saved beside its leaderboard
    (in the alpaca-eval environment): `length_controlled_winrate`, `lc_standard_error` and a `length_controlled`
    record; the two numbers are null, with the reason in the record, when they are not computed or the package
    cannot compute them."""
    wanted = cfg.length_controlled if cfg.length_controlled is not None else cfg.annotator == AE2_ANNOTATOR
    if not wanted:
        reason = (
            f"not computed: annotator {cfg.annotator!r} is not AlpacaEval 2.0's ({AE2_ANNOTATOR}); the "
            "length-controlled win rate is 2.0's metric (its GLM regularises towards 2.0's gamed baselines), "
            "AlpacaEval 1.0 reports the raw win rate only (set length_controlled=true to compute it anyway)"
        )
        return {"length_controlled_winrate": None, "lc_standard_error": None, "length_controlled": {"reason": reason}}
    work = leaderboard.parent
    annotations = work / "annotations.json"
    if not annotations.is_file():
        raise AlpacaEvalError(f"alpaca_eval wrote no annotations.json beside {leaderboard}")
    out = work / "length_controlled.json"
    cmd = [python, str(LC_SCRIPT), str(annotations), str(work / "glm_weights"), str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)  # no judge calls
    (work / "length_controlled.log").write_text(redact(proc.stdout + proc.stderr))
    if proc.returncode != 0 or not out.is_file():
        raise AlpacaEvalError(f"{LC_SCRIPT.name} failed ({proc.returncode}): {redact(proc.stderr[-2000:])}")
    got = json.loads(out.read_text())
    record = {
        "function": "alpaca_eval.metrics.get_length_controlled_winrate",
        "glm": "length_controlled_v1",
        "annotations": str(annotations),
        "warnings": got.get("warnings", []),
        "versions": got.get("versions", {}),
    }
    lc = got.get("metrics", {})
    value = lc.get("length_controlled_winrate")
    if "error" in got or value is None:
        reason = got.get("error") or f"the package returned no number ({lc})"
        if "huggingface_hub" in reason or "df_gamed" in reason:
            reason += (
                " (the GLM needs df_gamed.csv from the Hub dataset tatsu-lab/alpaca_eval: not reachable and "
                "not in the Hugging Face cache)"
            )
        log.warning("AlpacaEval %s: no length-controlled win rate: %s", cfg.model_id, reason)
        record["reason"] = reason
        return {"length_controlled_winrate": None, "lc_standard_error": None, "length_controlled": record}
    # the same package, the same annotations: its raw win rate must be the leaderboard's
    if abs(float(lc["win_rate"]) - board["win_rate"]) > 1e-6:
        raise AlpacaEvalError(
            f"{annotations}: get_length_controlled_winrate's win_rate {lc['win_rate']} is not the leaderboard's "
            f"{board['win_rate']}"
        )
    record["df_gamed"] = got.get("df_gamed")
    record["n_annotations"] = lc.get("n_total")
    if board.get("n_total") != 805:
        record["note"] = (
            "the GLM reads AlpacaEval 2.0's instruction difficulty by row position (805 instructions); "
            f"{board.get('n_total', 0):.0f} annotations are not that set, so this is the package's number, "
            "not AlpacaEval 2.0's length-controlled win rate"
        )
    return {
        "length_controlled_winrate": float(value),
        "lc_standard_error": lc.get("lc_standard_error"),
        "length_controlled": record,
    }


def keep_annotations(leaderboard: Path, out: Path) -> Path:
    """The per-example judgments, beside the metrics: `<out>.annotations.json`. The package's working folder
    (`<out>.work`: its caches, inputs and log) is scratch, kept out of git; these are what a reader checks."""
    dest = out.with_name(out.stem + ".annotations.json")
    shutil.copyfile(leaderboard.parent / "annotations.json", dest)
    return dest


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
            "--fn_metric", "get_winrate",  # the raw rate; the length-controlled one below, from these annotations
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
    lc = length_controlled(cfg, python, boards[0], board)
    metrics = {cfg.metric: board["win_rate"]}  # the paper's column: the raw win rate
    if lc["length_controlled_winrate"] is not None:
        metrics[f"{cfg.metric}_lc"] = lc["length_controlled_winrate"]
    result = {
        "model": cfg.model_id,
        "metrics": metrics,
        "alpaca_eval": {
            **board,
            **lc,
            "compared_with_paper": "win_rate",
            "reference": cfg.reference_id,
            "annotator": cfg.annotator,
        },
        "judge": judge_record(cfg.judge, judge, cfg.world),
        "leaderboard": str(boards[0]),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    result["judgments"] = str(keep_annotations(boards[0], out))
    out.write_text(json.dumps(result, indent=1) + "\n")
    log.info(
        "AlpacaEval %s: %s = %.2f (length-controlled: %s)",
        cfg.model_id,
        cfg.metric,
        board["win_rate"],
        "–" if lc["length_controlled_winrate"] is None else f"{lc['length_controlled_winrate']:.2f}",
    )
    return out
