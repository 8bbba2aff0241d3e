"""The tiny world's judge: grades judge prompts from p*, served by `atlantis.evals.local_judge`.

The HTTP server and the reading of every protocol's prompt (MT-Bench single and pairwise, Arena-Hard-Auto,
AlpacaEval 1.0 and 2.0, the judge check) are `atlantis.evals.local_judge`'s, shared with the smoke judge; this
module only decides: it looks the question up in the world's ground truth and rates the answer with
`atlantis.world.metrics.judge_rating` (10 / 7 / 2 / 1). Arena-Hard's "much better" needs a gap of 5 or more
(a true answer, well formed or sloppy, against a wrong one). A question that is not in the world is an HTTP 400
with the reason, never a made-up verdict.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from atlantis.evals.local_judge import (
    LOCAL_KEY_ENV,
    JudgeInputError,
    arena_label,
    judge_endpoint,
    respond,
    serve_grader,
)
from atlantis.log import get_logger
from atlantis.world.metrics import judge_rating

log = get_logger(__name__)

WORLD_KEY_ENV = LOCAL_KEY_ENV  # the served judge's own key variable (kept for callers of the old name)

__all__ = [
    "WORLD_KEY_ENV",
    "JudgeInputError",
    "Truth",
    "WorldJudge",
    "arena_label",
    "judge_endpoint",
    "load_truths",
    "serve",
]


@dataclass(frozen=True)
class Truth:
    answer: str
    misconception: str | None


def load_truths(world: str | Path) -> dict[str, Truth]:
    """Question text -> its true answer and popular misconception, from every held-out set of the world."""
    data = Path(world) / "data"
    truths: dict[str, Truth] = {}

    def add(question: str, answer: str, wrong: str | None) -> None:
        prev = truths.get(question.strip())
        if prev is not None and prev.answer != str(answer):
            raise JudgeInputError(f"question {question!r} has two answers in {data}")
        # AlpacaEval's records carry no misconception: never let them erase one another set gives
        truths[question.strip()] = Truth(str(answer), wrong if wrong is not None else prev and prev.misconception)

    for name in ("eval_open", "eval_mtbench", "dev_open", "dev_mtbench"):
        path = data / f"{name}.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            q = json.loads(line)
            for turn, ref, wrong in zip(q["turns"], q["reference"], q["misconception"]):
                add(turn, ref, wrong)
    alpaca = data / "eval_alpaca.jsonl"
    if alpaca.is_file():
        for line in alpaca.read_text().splitlines():
            r = json.loads(line)
            add(r["instruction"], r["reference"], None)
    if not truths:
        raise JudgeInputError(f"{data}: no held-out questions (is this a world built by `atlantis world build`?)")
    return truths


class WorldJudge:
    """Grades judge prompts of the supported protocols from the world's ground truth (a `local_judge.Grader`)."""

    basis = "Checked against the world's facts."
    strong_gap = 5  # 10/7 (true) against 2/1 (wrong) is "much better"; 10 vs 7 or 2 vs 1 only "better"

    def __init__(self, world: str | Path):
        self.truths = load_truths(world)

    def _truth(self, question: str) -> Truth:
        t = self.truths.get(question.strip())
        if t is None:
            raise JudgeInputError(f"question not in the world: {question.strip()[:80]!r}")
        return t

    def rate(self, question: str, answer: str) -> int:
        t = self._truth(question)
        return judge_rating(answer, t.answer, t.misconception)

    def grade(self, question: str, answer: str, reference: str | None) -> int:
        return self.rate(question, answer)  # the world's truth is the reference: MT-Bench's is not needed

    def respond(self, messages: list[dict]) -> str:
        """The reply text to one judge request (the chat messages a benchmark client sends)."""
        return respond(self, messages).content


@contextmanager
def serve(world: str | Path, api_key: str | None = None) -> Iterator[str]:
    """Run the world judge on 127.0.0.1 (a free port) for the duration of the block; yields its base URL
    (`http://127.0.0.1:PORT/v1`, what OPENAI_API_BASE / base_url expect)."""
    judge = WorldJudge(world)
    log.info("world judge: %d questions", len(judge.truths))
    with serve_grader(judge, api_key=api_key, name="world-judge") as url:
        yield url
