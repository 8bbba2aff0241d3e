"""Arena-Hard-Auto v0.1, compactly: pairwise judging against a baseline, Bradley–Terry score, bootstrap CI.

No package of Arena-Hard-Auto is published; this follows the original repository, lmarena/arena-hard-auto
(formerly lm-sys/arena-hard-auto), file by file:

- judge prompts, regex and sampling: `config/judge_config.yaml` @ 7f1b7f5dd6ce53e1f8530220ceb452b7019a8056
  (judge gpt-4-1106-preview, baseline gpt-4-0314, temperature 0, max_tokens 4096, `\\[\\[([AB<>=]+)\\]\\]`);
  the same template is in `config/arena-hard-v0.1.yaml` @ 9a1d3864b1a4388635b856fdd7eefb2cc8142525;
- games and verdict parsing: `gen_judgment.py` @ 7f1b7f5d: two games per question, game 1 with the baseline
  as assistant A, game 2 with the positions swapped; `get_score` takes the regex's matches and returns the one
  label when all matches agree, nothing when they disagree, and when there is no match at all asks once more
  ("continue your judgment and finish by outputting a final verdict label"), parsing the two replies together;
- battles, weights and score: `show_result.py` @ 0489bf384abd010906014dec7b903f7c438eabba
  (`get_battles_from_row`): a verdict becomes a battle baseline-vs-model; strong verdicts (`A>>B`, `B>>A`) are
  repeated `--weight 3` times; ties are ties; any other label or none gets weight 0 (dropped);
- fit and CI: `utils_math.py` @ 561534a6a768e825a92af7e08384d0fe2111cb79: `compute_mle_elo` is a logistic
  regression without intercept or penalty on duplicated battles (a win counts twice, a tie once each way),
  Elo = 400·coef + 1000 with the baseline anchored at 1000; `get_bootstrap_result` refits on 100 resamples of
  the battle rows (`battles.sample(frac=1.0, replace=True)` under `np.random.seed(42)`); the score is
  `predict_win_rate` against the baseline ×100 (`get_win_rate_column`, rounded to 2 decimals) and the 95% CI
  the win rates at the 2.5th and 97.5th percentiles of the bootstrap Elos.

Here the logistic regression is solved by Newton's method in numpy (the baseline's coefficient fixed at 0,
which is the repo's anchoring; the MLE is unique up to that shift, so the scores are the same), and the
bootstrap draws its row indices with `numpy.random.RandomState(seed).choice` as pandas' `sample` does.
Departures: judgments go to one cache JSONL keyed by (question_id, game) so that a rerun resumes; a judge
request that fails after its retries stops the run (the repo records the text "$ERROR$" as a judgment).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from atlantis import provenance
from atlantis.config import field
from atlantis.data import decode_line, read_jsonl
from atlantis.evals.judge import JudgeConfig, JudgeError, chat, check, public, redact
from atlantis.log import get_logger

log = get_logger(__name__)

# ------------------------------------------------------------------------------- protocol constants

SOURCE = {
    "repository": "https://github.com/lmarena/arena-hard-auto",
    "judge_config": "config/judge_config.yaml@7f1b7f5dd6ce53e1f8530220ceb452b7019a8056",
    "gen_judgment": "gen_judgment.py@7f1b7f5dd6ce53e1f8530220ceb452b7019a8056",
    "show_result": "show_result.py@0489bf384abd010906014dec7b903f7c438eabba",
    "utils_math": "utils_math.py@561534a6a768e825a92af7e08384d0fe2111cb79",
}

# `system_prompt` of config/judge_config.yaml @ 7f1b7f5d, verbatim.
SYSTEM_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants "
    "to the user prompt displayed below. You will be given assistant A's answer and assistant B's answer. Your "
    "job is to evaluate which assistant's answer is better.\n\n"
    "Begin your evaluation by generating your own answer to the prompt. You must provide your answers before "
    "judging any answers.\n\n"
    "When evaluating the assistants' answers, compare both assistants' answers with your answer. You must "
    "identify and correct any mistakes or inaccurate information.\n\n"
    "Then consider if the assistant's answers are helpful, relevant, and concise. Helpful means the answer "
    "correctly responds to the prompt or follows the instructions. Note when user prompt has any ambiguity or "
    "more than one interpretation, it is more helpful and appropriate to ask for clarifications or more "
    "information from the user than providing an answer based on assumptions. Relevant means all parts of the "
    "response closely connect or are appropriate to what is being asked. Concise means the response is clear "
    "and not verbose or excessive.\n\n"
    "Then consider the creativity and novelty of the assistant's answers when needed. Finally, identify any "
    "missing important information in the assistants' answers that would be beneficial to include when "
    "responding to the user prompt.\n\n"
    "After providing your explanation, you must output only one of the following choices as your final verdict "
    "with a label:\n\n"
    "1. Assistant A is significantly better: [[A>>B]]\n"
    "2. Assistant A is slightly better: [[A>B]]\n"
    "3. Tie, relatively the same: [[A=B]]\n"
    "4. Assistant B is slightly better: [[B>A]]\n"
    "5. Assistant B is significantly better: [[B>>A]]\n\n"
    'Example output: "My final verdict is tie: [[A=B]]".'
)

# `prompt_template[0]` of config/judge_config.yaml @ 7f1b7f5d (filled with str.format, as gen_judgment does).
USER_TEMPLATE = (
    "<|User Prompt|>\n{question_1}\n\n"
    "<|The Start of Assistant A's Answer|>\n{answer_1}\n<|The End of Assistant A's Answer|>\n\n"
    "<|The Start of Assistant B's Answer|>\n{answer_2}\n<|The End of Assistant B's Answer|>"
)

# `regex_pattern` of config/judge_config.yaml; applied to the judgment as written (v0.1 does not upper-case).
VERDICT_RE = re.compile(r"\[\[([AB<>=]+)\]\]")
LABELS = ("A>>B", "A>B", "A=B", "B>A", "B>>A")
# gen_judgment.py @ 7f1b7f5d: the follow-up turn when a reply has no verdict (at most one follow-up).
CONTINUE_PROMPT = "continue your judgment and finish by outputting a final verdict label"
JUDGE_ROUNDS = 2
STRONG_WEIGHT = 3  # show_result.py --weight (default 3)
SCALE, BASE, INIT_RATING = 400.0, 10.0, 1000.0  # utils_math.compute_mle_elo

# Winner of a game, by the verdict label, with the baseline as "model_a" (show_result.get_battles_from_row):
# game 1 has the baseline as assistant A, game 2 has it as assistant B.
_GAME_WINNER = {
    1: {"A=B": "tie", "A>B": "model_a", "A>>B": "model_a", "B>A": "model_b", "B>>A": "model_b"},
    2: {"A=B": "tie", "A>B": "model_b", "A>>B": "model_b", "B>A": "model_a", "B>>A": "model_a"},
}


class ArenaHardError(RuntimeError):
    """Inputs or cached judgments that cannot be used as asked."""


# ------------------------------------------------------------------------------------------ verdicts


def score_judgment(text: str) -> tuple[str | None, bool]:
    """gen_judgment.get_score: (label, try_again). One distinct match: that label; none: (None, True), ask once
    more; several different ones: (None, False), recorded without a verdict."""
    matches = [m for m in VERDICT_RE.findall(text or "") if m != ""]
    if len(set(matches)) == 0:
        return None, True
    if len(set(matches)) == 1:
        return matches[0].strip("\n"), False
    return None, False


def parse_verdict(text: str) -> str | None:
    """The verdict label of a judge reply (e.g. "A>>B"), or None: no `[[...]]` label, or conflicting ones.

    A label the regex accepts but the protocol does not use (e.g. "A<B") is returned as written; it gets
    weight 0 in the battles, as in show_result.py.
    """
    return score_judgment(text)[0]


def game_winner(label: str | None, game: int, weight: int = STRONG_WEIGHT) -> tuple[str | None, int]:
    """(winner, weight) of one game's verdict: winner "model_a" (the baseline), "model_b" (the model) or
    "tie"; `weight` for a strong verdict, 1 otherwise, 0 (dropped) for no label or one outside LABELS."""
    winner = _GAME_WINNER[game].get(label or "")
    if winner is None:
        return None, 0
    return winner, weight if label in ("A>>B", "B>>A") else 1


def battles_from_games(games: Sequence[tuple[str | None, str | None]], weight: int = STRONG_WEIGHT) -> list[str]:
    """show_result.get_battles_from_row over questions: each (game-1 label, game-2 label) pair becomes its
    battles' winners ("model_a" = baseline, "model_b" = model, "tie"), strong verdicts repeated `weight` times."""
    out: list[str] = []
    for labels in games:
        for game, label in zip((1, 2), labels):
            winner, w = game_winner(label, game, weight)
            out.extend([winner] * w)
    return out


# ------------------------------------------------------------------------------------ Bradley–Terry


def fit_bradley_terry(
    model_a: Sequence[str], model_b: Sequence[str], winner: Sequence[str], baseline: str, max_iter: int = 100
) -> dict[str, float]:
    """utils_math.compute_mle_elo: Elo ratings (baseline = 1000) by the unpenalised logistic-regression MLE.

    The repo duplicates the battles: a win for A is two A wins, a tie one A win and one B win; with
    X = ±ln(BASE) the model is P(A wins) = σ(ln10·(β_a − β_b)) and Elo = 400·β + 1000. Newton's method with
    step halving; for separable data (a model that wins or loses everything) the MLE is infinite and the
    coefficients are capped at ±50 (odds 10^50: win rates of exactly 1 or 0 in float64).
    """
    names = sorted(set(model_a) | set(model_b))
    if baseline not in names:
        raise ArenaHardError(f"baseline {baseline!r} is in no battle")
    free = [n for n in names if n != baseline]
    col = {n: i for i, n in enumerate(free)}
    n, p = len(winner), len(free)
    x = np.zeros((n, p))
    for r, (a, b) in enumerate(zip(model_a, model_b)):
        if a != baseline:
            x[r, col[a]] += 1.0
        if b != baseline:
            x[r, col[b]] -= 1.0
    w = np.array([{"model_a": 2.0, "tie": 1.0, "model_b": 0.0}[v] for v in winner])  # A wins among 2 copies
    ln = math.log(BASE)
    beta = np.zeros(p)

    def loglik(b: np.ndarray) -> float:
        z = ln * (x @ b)
        return float(np.sum(w * -np.logaddexp(0, -z) + (2 - w) * -np.logaddexp(0, z)))

    cap = 50.0
    cur = loglik(beta)
    for _ in range(max_iter):
        z = ln * (x @ beta)
        s = 1 / (1 + np.exp(-z))
        grad = ln * x.T @ (w - 2 * s)
        hess = ln**2 * (x.T * (2 * s * (1 - s))) @ x
        if np.max(np.abs(grad), initial=0.0) < 1e-10:
            break
        step = np.linalg.lstsq(hess + 1e-12 * np.eye(p), grad, rcond=None)[0]
        t, accepted = 1.0, False
        while t > 1e-8 and not accepted:
            cand = np.clip(beta + t * step, -cap, cap)
            new = loglik(cand)
            accepted = new >= cur - 1e-12
            t /= 2
        if not accepted or np.max(np.abs(cand - beta), initial=0.0) < 1e-12:
            break
        beta, cur = cand, new
    ratings = {baseline: INIT_RATING}
    ratings.update({name: SCALE * float(beta[col[name]]) + INIT_RATING for name in free})
    return ratings


def win_rate(rating: float, baseline_rating: float = INIT_RATING) -> float:
    """utils_math.predict_win_rate: P(model beats baseline) = 1 / (1 + 10^((R_base − R_model)/400))."""
    return 1.0 / (1.0 + BASE ** ((baseline_rating - rating) / SCALE))


def score(winner: Sequence[str], model: str, baseline: str, rounds: int = 100, seed: int = 42) -> dict[str, Any]:
    """Arena-Hard-Auto score of `model` from its battles with `baseline` (winner per row, "model_a" = baseline):
    the win rate ×100 from the BT fit, and the 95% CI from `rounds` bootstrap refits (show_result.py)."""
    if not winner:
        raise ArenaHardError("no battles: every judgment lacks a usable verdict")
    winner = list(winner)
    a, b = [baseline] * len(winner), [model] * len(winner)
    elo = fit_bradley_terry(a, b, winner, baseline)[model]
    rng = np.random.RandomState(seed)  # show_result: np.random.seed(42); pandas .sample draws rng.choice(n, n)
    arr = np.array(winner)
    boot = []
    for _ in range(rounds):
        idx = rng.choice(len(arr), size=len(arr), replace=True)
        boot.append(fit_bradley_terry(a, b, arr[idx].tolist(), baseline)[model])
    out: dict[str, Any] = {"elo": elo, "score": round(win_rate(elo) * 100, 2)}
    if rounds:
        lo, hi = float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))
        out.update(elo_ci=[lo, hi], ci=[round(win_rate(lo) * 100, 2), round(win_rate(hi) * 100, 2)])
    else:
        out.update(elo_ci=None, ci=None)
    return out


# ------------------------------------------------------------------------------------------- inputs


def _read_jsonl(path: Path) -> list[dict]:
    rows = read_jsonl(path)  # the data layer's reader: file:line on malformed JSON
    for i, rec in enumerate(rows, start=1):
        if not isinstance(rec, dict):
            raise ArenaHardError(f"{path}: record {i} is not a JSON object")
    return rows


def _text(turn: Any, where: str) -> str:
    """A turn as FastChat writes it (a string) or as Arena-Hard v0.1 does ({"content": ...})."""
    if isinstance(turn, dict):
        turn = turn.get("content")
    if not isinstance(turn, str):
        raise ArenaHardError(f"{where}: a turn must be a string or an object with 'content'")
    return turn


def _qid(rec: dict, where: str) -> str:
    qid = rec.get("question_id", rec.get("uid"))
    if isinstance(qid, bool) or not isinstance(qid, (str, int)) or qid == "":
        raise ArenaHardError(f"{where}: needs a question_id (string or integer)")
    return str(qid)


def load_questions(path: str | Path) -> list[tuple[str, str, int]]:
    """(question_id, first-turn prompt, number of turns) in file order. Accepts MT-Bench/FastChat questions
    (`turns`: strings), Arena-Hard v0.1 (`turns`: [{"content"}]) and single-prompt records (`prompt`/`instruction`)."""
    path = Path(path)
    out, seen = [], set()
    for i, rec in enumerate(_read_jsonl(path), start=1):
        where = f"{path}:{i}"
        qid = _qid(rec, where)
        if qid in seen:
            raise ArenaHardError(f"{where}: duplicate question_id {qid!r}")
        seen.add(qid)
        if isinstance(rec.get("turns"), list) and rec["turns"]:
            turns = [_text(t, where) for t in rec["turns"]]
        elif isinstance(rec.get("prompt", rec.get("instruction")), str):
            turns = [rec.get("prompt", rec.get("instruction"))]
        else:
            raise ArenaHardError(f"{where}: a question needs 'turns' (a non-empty list) or 'prompt'/'instruction'")
        out.append((qid, turns[0], len(turns)))
    if not out:
        raise ArenaHardError(f"{path}: no questions")
    return out


def load_answers(path: str | Path) -> tuple[str, dict[str, str]]:
    """(model_id, {question_id: first-turn answer}) of a FastChat answer file (`model_id`, `choices[0].turns`)."""
    path = Path(path)
    names, answers = set(), {}
    for i, rec in enumerate(_read_jsonl(path), start=1):
        where = f"{path}:{i}"
        qid = _qid(rec, where)
        names.add(str(rec.get("model_id", rec.get("model", path.stem))))
        try:
            turns = rec["choices"][0]["turns"]
        except (KeyError, IndexError, TypeError):
            raise ArenaHardError(f"{where}: an answer needs choices[0].turns (FastChat's format)") from None
        if not isinstance(turns, list) or not turns:
            raise ArenaHardError(f"{where}: choices[0].turns must be a non-empty list")
        answers[qid] = _text(turns[0], where)
    if len(names) != 1:
        raise ArenaHardError(f"{path}: expected the answers of one model, found model_id(s) {sorted(names)}")
    return names.pop(), answers


# --------------------------------------------------------------------------------------------- runs


@dataclass
class ArenaHardConfig:
    questions: str = field(help="Questions JSONL (Arena-Hard v0.1 question.jsonl, or MT-Bench/FastChat style).")
    answers: str = field(help="The model's answers: FastChat answer JSONL as written by `atlantis generate`.")
    baseline: str = field(help="The baseline's answers, same format (Arena-Hard v0.1: gpt-4-0314.jsonl).")
    out: str = field(help="Output JSON: model, metrics {arena_hard_auto, arena_hard_auto_ci}, judge, counts.")
    judge: JudgeConfig = field(
        default_factory=JudgeConfig,
        help="Judge endpoint (Arena-Hard-Auto v0.1: gpt-4-1106-preview, temperature 0, max_tokens 4096).",
    )
    judgments: str | None = field(
        None,
        help="Judgment cache JSONL, keyed by (question_id, game); a rerun resumes. Default: <out>.judgments.jsonl.",
    )
    bootstrap_rounds: int = field(100, help="Bootstrap rounds for the 95% CI (show_result.py --num-rounds 100).")
    seed: int = field(42, help="Bootstrap seed (show_result.py seeds numpy with 42).")
    weight: int = field(STRONG_WEIGHT, help="Repetitions of a strong verdict [[A>>B]]/[[B>>A]] (show_result --weight).")
    parallel: int = field(4, help="Concurrent judge requests.")
    world: str | None = field(None, help="Judge with the tiny world's judge server (ignores judge.base_url).")

    def __post_init__(self) -> None:
        if self.bootstrap_rounds < 0:
            raise ValueError(f"bootstrap_rounds must be >= 0, got {self.bootstrap_rounds}")
        if self.weight < 1:
            raise ValueError(f"weight must be >= 1, got {self.weight}")
        if self.parallel < 1:
            raise ValueError(f"parallel must be >= 1, got {self.parallel}")
        if not self.out.endswith(".json"):
            raise ValueError(f"out must be a .json file, got {self.out!r}")

    @property
    def judgments_path(self) -> Path:
        if self.judgments:
            return Path(self.judgments)
        out = Path(self.out)
        return out.with_name(out.name.removesuffix(".json") + ".judgments.jsonl")


def game_messages(question: str, answer_a: str, answer_b: str) -> list[dict[str, str]]:
    """The judge conversation of one game: the system prompt and the filled user template."""
    user = USER_TEMPLATE.format(question_1=question, answer_1=answer_a, answer_2=answer_b)
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def judge_game(cfg: JudgeConfig, messages: list[dict[str, str]]) -> tuple[str, str | None, int]:
    """gen_judgment.judgment's loop for one game: (judgment text, label, replies). Asks once more when the first
    reply has no verdict; the label is parsed from both replies together, as the repo does."""
    conv = list(messages)
    judgment, label = "", None
    for rnd in range(JUDGE_ROUNDS):
        reply = chat(cfg, conv)
        judgment += "\n" + reply
        label, try_again = score_judgment(judgment)
        conv.append({"role": "assistant", "content": reply})
        if not try_again:
            return judgment, label, rnd + 1
        conv.append({"role": "user", "content": CONTINUE_PROMPT})
    return judgment, label, JUDGE_ROUNDS


def _digest(messages: list[dict[str, str]]) -> str:
    return hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()


def _load_cache(path: Path, judge_model: str) -> dict[tuple[str, int], dict]:
    """Cached judgments by (question_id, game); a line cut short by a killed run is dropped with a warning."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    cache: dict[tuple[str, int], dict] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            if lineno == len(lines):  # no newline after it: the write was interrupted
                log.warning("%s:%d: dropping an incomplete last line (an interrupted run)", path, lineno)
                with path.open("r+b") as fh:
                    fh.truncate(len(raw) - len(line))
                break
            if isinstance(err, UnicodeDecodeError):
                decode_line(line, path, lineno)  # raises, naming the line and the byte
            raise ArenaHardError(f"{path}:{lineno}: malformed JSON ({err.msg}); fix or remove the line") from None
        if rec.get("judge_model") != judge_model:
            raise ArenaHardError(
                f"{path}:{lineno}: judged by {rec.get('judge_model')!r}, this run's judge is {judge_model!r}; "
                "use another judgments file"
            )
        cache[(str(rec["question_id"]), int(rec["game"]))] = rec
    if raw and not raw.endswith(b"\n") and path.read_bytes() == raw:
        with path.open("ab") as fh:
            fh.write(b"\n")
    return cache


def run(cfg: ArenaHardConfig) -> Path:
    """`atlantis arena-hard`; a local judge (the world's with `world`, or `judge.local`) is served for the run."""
    import dataclasses

    from atlantis.evals.local_judge import judge_endpoint, judge_record

    if not (cfg.world or cfg.judge.local):
        return _run(cfg)
    with judge_endpoint(cfg.judge, cfg.world) as judge:
        out = _run(dataclasses.replace(cfg, judge=judge))
        record = json.loads(out.read_text())
        record["judge"] = judge_record(cfg.judge, judge, cfg.world)  # its port changes from run to run
    out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return out


def _run(cfg: ArenaHardConfig) -> Path:
    """`atlantis arena-hard`: judge the model against the baseline on every question (both orders), fit the score,
    write `cfg.out`. Inputs are read and the judge endpoint checked before any judging; judgments are appended
    to the cache as they come, so an interrupted run loses nothing and a rerun only judges what is missing."""
    questions = load_questions(cfg.questions)
    model, answers = load_answers(cfg.answers)
    baseline, base_answers = load_answers(cfg.baseline)
    if model == baseline:
        raise ArenaHardError(f"the model and the baseline have the same model_id {model!r}")
    missing_base = [q for q, _, _ in questions if q not in base_answers]
    if missing_base:
        raise ArenaHardError(
            f"{cfg.baseline}: no baseline answer for {len(missing_base)} question(s): {missing_base[:5]}"
        )
    todo_q = [q for q in questions if q[0] in answers]
    missing = [q for q, _, _ in questions if q not in answers]
    if missing:  # gen_judgment.py skips these with a warning
        log.warning("%s: no answer to %d question(s), skipped: %s", cfg.answers, len(missing), missing[:5])
    multi = sum(1 for q in todo_q if q[2] > 1)
    if multi:
        log.warning("%d question(s) have several turns; Arena-Hard-Auto judges the first turn only", multi)

    path = cfg.judgments_path
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = _load_cache(path, cfg.judge.model)
    jobs = []
    for qid, prompt, _ in todo_q:
        for game in (1, 2):  # game 1: baseline is A; game 2: positions swapped (gen_judgment.py)
            a, b = (base_answers[qid], answers[qid]) if game == 1 else (answers[qid], base_answers[qid])
            messages = game_messages(prompt, a, b)
            digest = _digest(messages)
            rec = cache.get((qid, game))
            if rec is not None:
                if rec.get("prompt_sha256") != digest or rec.get("model") != model or rec.get("baseline") != baseline:
                    raise ArenaHardError(
                        f"{path}: the cached judgment of question {qid!r} game {game} was made for other answers "
                        f"or models; use another judgments file or delete it"
                    )
                continue
            jobs.append((qid, game, messages, digest))

    judge_info = public(cfg.judge)
    if jobs:
        check(cfg.judge)  # no endpoint, no key, refused or rejected: fail here, before any judging
        log.info("Arena-Hard: %d game(s) to judge (%d cached) with %s", len(jobs), len(cache), cfg.judge.model)
        lock = threading.Lock()
        done = [0]

        def work(job: tuple[str, int, list[dict[str, str]], str]) -> None:
            qid, game, messages, digest = job
            judgment, label, replies = judge_game(cfg.judge, messages)
            rec = {
                "question_id": qid,
                "game": game,
                "model": model,
                "baseline": baseline,
                "model_a": baseline if game == 1 else model,
                "model_b": model if game == 1 else baseline,
                "judge_model": cfg.judge.model,
                "score": label,
                "judgment": redact(judgment),
                "replies": replies,
                "prompt_sha256": digest,
            }
            with lock:
                with path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
                cache[(qid, game)] = rec
                done[0] += 1
                if done[0] % 50 == 0 or done[0] == len(jobs):
                    log.info("judged %d/%d games", done[0], len(jobs))

        with ThreadPoolExecutor(max_workers=cfg.parallel) as pool:
            futures = [pool.submit(work, job) for job in jobs]
            try:
                for fut in futures:
                    fut.result()  # a judge error (after its retries) stops the run; finished games stay cached
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)  # no further (paid) calls once one has failed
                raise
    else:
        log.info("Arena-Hard: all %d game(s) cached in %s; not calling the judge", 2 * len(todo_q), path)

    games = [(cache[(q, 1)]["score"], cache[(q, 2)]["score"]) for q, _, _ in todo_q]
    winners = battles_from_games(games, cfg.weight)
    usable = sum(1 for pair in games for g, label in zip((1, 2), pair) if game_winner(label, g)[0] is not None)
    result = score(winners, model, baseline, cfg.bootstrap_rounds, cfg.seed)
    counts = {
        "questions": len(questions),
        "judged_questions": len(todo_q),
        "missing_answers": len(missing),
        "games": 2 * len(todo_q),
        "games_with_verdict": usable,
        "games_without_verdict": 2 * len(todo_q) - usable,  # dropped (weight 0), as show_result.py does
        "battles": len(winners),
        "model_wins": winners.count("model_b"),
        "baseline_wins": winners.count("model_a"),
        "ties": winners.count("tie"),
    }
    if counts["games_without_verdict"]:
        log.warning("%d game(s) without a usable verdict were dropped", counts["games_without_verdict"])
    record = {
        "model": model,
        "baseline": baseline,
        "metrics": {"arena_hard_auto": result["score"], "arena_hard_auto_ci": result["ci"]},
        "elo": {"model": result["elo"], "baseline": INIT_RATING, "ci": result["elo_ci"]},
        "counts": counts,
        "judgments": str(path),
        "judge": judge_info,
        "protocol": {
            "benchmark": "arena-hard-auto-v0.1",
            "source": SOURCE,
            "strong_weight": cfg.weight,
            "bootstrap_rounds": cfg.bootstrap_rounds,
            "seed": cfg.seed,
            "ci": "2.5th/97.5th percentiles of bootstrap Elo, as win rates vs the baseline",
        },
        "inputs": {
            name: {"path": str(p), "sha256": provenance.file_sha256(p)}
            for name, p in (("questions", cfg.questions), ("answers", cfg.answers), ("baseline", cfg.baseline))
        },
        "provenance": provenance.environment(),
    }
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(redact(json.dumps(record, indent=1, ensure_ascii=False)) + "\n", encoding="utf-8")
    log.info("Arena-Hard-Auto %s vs %s: %.2f (95%% CI %s) -> %s", model, baseline, result["score"], result["ci"], out)
    return out


__all__ = [
    "ArenaHardConfig",
    "ArenaHardError",
    "CONTINUE_PROMPT",
    "JudgeError",
    "LABELS",
    "SYSTEM_PROMPT",
    "USER_TEMPLATE",
    "VERDICT_RE",
    "battles_from_games",
    "fit_bradley_terry",
    "game_messages",
    "parse_verdict",
    "run",
    "score",
    "win_rate",
]
