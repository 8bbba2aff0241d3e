"""Local OpenAI-compatible judges: one HTTP server and one reader of every protocol's judge prompt; judges decide.

The benchmark clients (FastChat's `gen_judgment`, `alpaca_eval evaluate`, our Arena-Hard runner and judge check)
talk to a local judge over HTTP exactly as they would to a hosted one. `read_prompt` finds, by each protocol's own
markers, what a prompt asks: the question(s), the answer(s) and any reference answer. A `Grader` rates one answer
1–10; everything a protocol asks for is derived from those ratings by `reply`:

- MT-Bench single (`single-v1`, `single-math-v1` with its reference, and their `-multi-turn` forms, whose second
  turn is graded): "Rating: [[r]]";
- MT-Bench pairwise (`pair-v2`, `pair-math-v1`, `-multi-turn`): "[[A]]", "[[B]]" or "[[C]]" (equal ratings);
- Arena-Hard-Auto v0.1: "[[A>>B]]" ... "[[B>>A]]", "much better" when the ratings differ by the grader's
  `strong_gap` or more;
- AlpacaEval 1.0's annotator (`alpaca_eval_gpt4`, `ranking_parser`): the ranking list it asks for, ties to model_1;
- AlpacaEval 2.0's annotator (`weighted_alpaca_eval_gpt4_turbo`, `logprob_parser`): the one token "m" or "M"
  with `logprobs.content[0].top_logprobs` for both (the annotator requests `logprobs: true, top_logprobs: 5` and
  reads P(m) / (P(m) + P(M))); P(m) = r1 / (r1 + r2);
- the judge check's probe ("Reply with OK."): "OK".

Two graders: the tiny world's (`atlantis.evals.world_judge.WorldJudge`, ground truth) and `SmokeJudge`, a format
stand-in with no ground truth for the smoke profile (`judge.local=smoke`). A prompt that cannot be read is an
HTTP 400 with the reason, never a made-up verdict. The server checks the bearer key when started with one, so the
clients' key handling is exercised; the key is never logged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Literal, Protocol

from atlantis.evals.judge import LOCAL_JUDGES, JudgeConfig, public
from atlantis.log import get_logger

log = get_logger(__name__)

# The served judge's own key variable: a real OPENAI_API_KEY in the environment is never sent to a local server.
LOCAL_KEY_ENV = "ATLANTIS_LOCAL_JUDGE_KEY"
# Names /models lists: the judge models the paper profile's protocols call (check() warns about others).
SERVED_MODELS = ("gpt-4", "gpt-4-1106-preview", "gpt-4-turbo", "gpt-4-0613")
PROBE = "Reply with OK."  # atlantis.evals.judge.check's one-token request


class JudgeInputError(ValueError):
    """The judge prompt cannot be graded (an unknown format, or a question the grader cannot place)."""


Kind = Literal["probe", "single", "pair", "arena", "alpaca_ranking", "alpaca_logprob"]


@dataclass(frozen=True)
class Grading:
    """What one judge prompt asks: rate `answers[0]`, or compare `answers[0]` (A, model_1, m) with `answers[1]`."""

    kind: Kind
    question: str = ""
    answers: tuple[str, ...] = ()
    reference: str | None = None  # MT-Bench's reference answer for math/reasoning/coding (the graded turn's)


@dataclass(frozen=True)
class Reply:
    content: str
    top_logprobs: tuple[tuple[str, float], ...] | None = None  # (token, logprob), best first


class Grader(Protocol):
    """How a local judge decides: a 1–10 rating of one answer; `basis` opens every explanation."""

    basis: str
    strong_gap: int

    def grade(self, question: str, answer: str, reference: str | None) -> int: ...


# ------------------------------------------------------------------------------------------ prompt reading


def _between(text: str, start: str, end: str) -> str:
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        raise JudgeInputError(f"judge prompt lacks {start!r} ... {end!r}")
    return text[i + len(start) : j].strip("\n")


def _turns(conversation: str, who: str, answer_role: str = r"Assistant(?: [AB])?") -> list[tuple[str, str]]:
    """(question, answer) pairs of a FastChat multi-turn block ('### User:' / '### Assistant X:' or
    '### Reference answer:')."""
    parts = re.split(rf"\n*### (User|{answer_role}):\n", "\n" + conversation)
    pairs, question = [], None
    for role, body in zip(parts[1::2], parts[2::2]):
        body = body.strip("\n")
        if role == "User":
            question = body
        elif question is not None:
            pairs.append((question, body))
            question = None
    if not pairs:
        raise JudgeInputError(f"no turns found in {who}'s conversation")
    return pairs


def _multi_turn_reference(text: str) -> str | None:
    if "<|The Start of Reference Answer|>" not in text:
        return None
    block = _between(text, "<|The Start of Reference Answer|>", "<|The End of Reference Answer|>")
    return _turns(block, "the reference", answer_role="Reference answer")[-1][1]


def _single_reference(text: str) -> str | None:
    if "[The Start of Reference Answer]" not in text:
        return None
    return _between(text, "[The Start of Reference Answer]\n", "\n[The End of Reference Answer]")


def read_prompt(messages: list[dict]) -> Grading:
    """What a judge prompt of one of the supported protocols asks (see the module docstring)."""
    text = "\n".join(str(m.get("content", "")) for m in messages)
    if text.strip() == PROBE:
        return Grading("probe")
    if "<|User Prompt|>" in text:  # Arena-Hard-Auto
        q = _between(text, "<|User Prompt|>\n", "\n\n<|The Start of Assistant A's Answer|>")
        a = _between(text, "<|The Start of Assistant A's Answer|>\n", "\n<|The End of Assistant A's Answer|>")
        b = _between(text, "<|The Start of Assistant B's Answer|>\n", "\n<|The End of Assistant B's Answer|>")
        return Grading("arena", q, (a, b))
    if "<|The Start of Assistant B's Conversation with User|>" in text:  # MT-Bench pairwise, multi-turn
        ca = _between(text, "<|The Start of Assistant A's Conversation with User|>", "<|The End of Assistant A's")
        cb = _between(text, "<|The Start of Assistant B's Conversation with User|>", "<|The End of Assistant B's")
        (q, a), (_, b) = _turns(ca, "assistant A")[-1], _turns(cb, "assistant B")[-1]  # the second turn is judged
        return Grading("pair", q, (a, b), _multi_turn_reference(text))
    if "<|The Start of Assistant A's Conversation with User|>" in text:  # MT-Bench single, multi-turn
        ca = _between(text, "<|The Start of Assistant A's Conversation with User|>", "<|The End of Assistant A's")
        q, a = _turns(ca, "assistant A")[-1]
        return Grading("single", q, (a,), _multi_turn_reference(text))
    if "[The Start of Assistant A's Answer]" in text:  # MT-Bench pairwise, one turn
        q = _between(text, "[User Question]\n", "\n\n[The Start of")
        a = _between(text, "[The Start of Assistant A's Answer]\n", "\n[The End of Assistant A's Answer]")
        b = _between(text, "[The Start of Assistant B's Answer]\n", "\n[The End of Assistant B's Answer]")
        return Grading("pair", q, (a, b), _single_reference(text))
    if "[The Start of Assistant's Answer]" in text:  # MT-Bench single, one turn
        q = _between(text, "[Question]\n", "\n\n[The Start of")
        a = _between(text, "[The Start of Assistant's Answer]\n", "\n[The End of Assistant's Answer]")
        return Grading("single", q, (a,), _single_reference(text))
    if "Here are the outputs of the models:" in text:  # AlpacaEval 1.0 (alpaca_eval_gpt4)
        q = _between(text, '"instruction": """', '""",')
        outputs = re.findall(r'"answer": """(.*?)"""\n', text, re.S)
        if len(outputs) != 2:
            raise JudgeInputError(f"expected two model outputs in the AlpacaEval prompt, found {len(outputs)}")
        return Grading("alpaca_ranking", q, tuple(outputs))
    if '"model_identifier": "m"' in text:  # AlpacaEval 2.0 (weighted_alpaca_eval_gpt4_turbo)
        q = _between(text, '"instruction": """', '""",')
        outputs = re.findall(r'"model_identifier": "[mM]",\s*"output": """(.*?)"""\n', text, re.S)
        if len(outputs) != 2:
            raise JudgeInputError(f"expected outputs m and M in the AlpacaEval 2.0 prompt, found {len(outputs)}")
        return Grading("alpaca_logprob", q, tuple(outputs))
    raise JudgeInputError(
        "unknown judge prompt format (not MT-Bench, Arena-Hard-Auto, AlpacaEval 1.0/2.0 or the judge check)"
    )


# ---------------------------------------------------------------------------------------------- replies


def arena_label(ra: int, rb: int, strong_gap: int = 5) -> str:
    """Arena-Hard's verdict from two ratings: "much better" (>>) when they differ by `strong_gap` or more."""
    if ra == rb:
        return "A=B"
    better = ("A", "B") if ra > rb else ("B", "A")
    return f"{better[0]}>>{better[1]}" if abs(ra - rb) >= strong_gap else f"{better[0]}>{better[1]}"


def reply(grader: Grader, grading: Grading) -> Reply:
    """The reply `grading`'s protocol asks for, from `grader`'s ratings."""
    if grading.kind == "probe":
        return Reply("OK")
    rates = [grader.grade(grading.question, a, grading.reference) for a in grading.answers]
    if grading.kind == "single":
        return Reply(f"{grader.basis}\n\nRating: [[{rates[0]}]]")
    r1, r2 = rates
    if grading.kind == "pair":
        return Reply(f"{grader.basis}\n\n[[{'A' if r1 > r2 else 'B' if r2 > r1 else 'C'}]]")
    if grading.kind == "arena":
        return Reply(f"{grader.basis}\n\nMy final verdict is: [[{arena_label(r1, r2, grader.strong_gap)}]]")
    if grading.kind == "alpaca_ranking":
        # ranking_parser needs a strict order: a tie goes to model_1 (AlpacaEval randomises the order)
        first, second = ("model_2", "model_1") if r2 > r1 else ("model_1", "model_2")
        return Reply(f"[{{'model': '{first}', 'rank': 1}}, {{'model': '{second}', 'rank': 2}}]")
    # AlpacaEval 2.0: P(m) = r1 / (r1 + r2), kept off 0 and 1 so that both log-probs are finite
    p = min(max(r1 / (r1 + r2), 1e-4), 1 - 1e-4)
    tops = sorted((("m", math.log(p)), ("M", math.log(1 - p))), key=lambda t: -t[1])
    return Reply(tops[0][0], tuple(tops))


def respond(grader: Grader, messages: list[dict]) -> Reply:
    return reply(grader, read_prompt(messages))


# ------------------------------------------------------------------------------------------- smoke judge

_WORD = re.compile(r"[A-Za-z]{4,}")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _repeats(answer: str, span: int = 12) -> bool:
    """A line, or a `span`-word stretch, three or more times: the run-on text of an answer that never stops (a
    list whose items share a phrase, "Step 1: ... Step 2: ...", repeats shorter stretches and is not flagged)."""
    lines = Counter(line.strip() for line in answer.splitlines() if line.strip())
    words = answer.split()
    spans = Counter(tuple(words[i : i + span]) for i in range(len(words) - span + 1))
    return max(lines.values(), default=0) >= 3 or max(spans.values(), default=0) >= 3


class SmokeJudge:
    """The smoke profile's judge: a deterministic FORMAT STAND-IN with no ground truth and no model.

    It lets every judged benchmark run end to end on a machine without a judge; its numbers mean nothing about
    quality. The rating of an answer (1–10): 1 when empty; else 2, plus 1 per 25 words (at most 4), 1 when it ends
    a sentence or a code block, 1 when it shares a word of 4+ letters with the question, 1 when it has more than one
    line, 1 when a reference answer is given and the reference's last number appears in it; minus 3 when it repeats
    itself (`_repeats`); clipped to 1–10. Arena-Hard's "much better" needs a gap of 3.
    """

    basis = "Smoke judge (a format stand-in; no ground truth): rated by length, completeness, relevance, repetition."
    strong_gap = 3

    def grade(self, question: str, answer: str, reference: str | None) -> int:
        text = answer.strip()
        if not text:
            return 1
        score = 2 + min(4, len(text.split()) // 25)
        score += text.endswith((".", "!", "?", "```", ")", "]", "}", '"'))
        score += bool(set(w.lower() for w in _WORD.findall(question)) & set(w.lower() for w in _WORD.findall(text)))
        score += "\n" in text
        if reference:
            numbers = _NUMBER.findall(reference)
            score += bool(numbers) and numbers[-1] in _NUMBER.findall(text)
        score -= 3 * _repeats(text)
        return max(1, min(10, score))


def make_grader(name: str) -> Grader:
    """The local judge named by `judge.local`."""
    graders = {"smoke": SmokeJudge}
    if name not in graders or name not in LOCAL_JUDGES:
        raise ValueError(f"unknown local judge {name!r}; known: {sorted(graders)}")
    return graders[name]()


# ------------------------------------------------------------------------------------------------ server


def _token(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def _completion(req: dict, answer: Reply, model: str) -> dict:
    """A chat.completion object as the openai clients (0.28 and 1.x) parse it; logprobs when asked for (the reply is
    one token then, as AlpacaEval 2.0's annotator asks with max_tokens=1)."""
    logprobs = None
    if req.get("logprobs"):
        tops = answer.top_logprobs or ((answer.content, 0.0),)
        k = max(1, int(req.get("top_logprobs") or 1))
        first = {**_token(answer.content, tops[0][1]), "top_logprobs": [_token(t, lp) for t, lp in tops[:k]]}
        logprobs = {"content": [first]}
    n = max(1, int(req.get("n", 1)))
    return {
        "id": f"local-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": req.get("model", model),
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": answer.content},
                "logprobs": logprobs,
                "finish_reason": "stop",
            }
            for i in range(n)
        ],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
    }


def _handler(grader: Grader, api_key: str | None, name: str):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorised(self) -> bool:
            if api_key is None or self.headers.get("Authorization", "") == f"Bearer {api_key}":
                return True
            self._send(401, {"error": {"message": "invalid API key", "type": "invalid_request_error"}})
            return False

        def do_GET(self):  # noqa: N802 (http.server's naming)
            if not self._authorised():
                return
            if self.path.rstrip("/").endswith("/models"):
                ids = (name, *SERVED_MODELS)
                self._send(200, {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]})
            else:
                self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):  # noqa: N802
            if not self._authorised():
                return
            if not self.path.rstrip("/").endswith("/chat/completions"):
                self._send(404, {"error": {"message": f"no route {self.path}"}})
                return
            try:
                req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                answer = respond(grader, req["messages"])
            except (JudgeInputError, KeyError, TypeError, json.JSONDecodeError) as err:
                self._send(400, {"error": {"message": str(err), "type": "invalid_request_error"}})
                return
            self._send(200, _completion(req, answer, name))

        def log_message(self, fmt, *args):  # requests go to the package logger at DEBUG, never with headers
            log.debug(f"{name}: " + fmt, *args)

    return Handler


@contextmanager
def serve_grader(grader: Grader, api_key: str | None = None, name: str = "local-judge") -> Iterator[str]:
    """Serve `grader` on 127.0.0.1 (a free port) for the duration of the block; yields its base URL
    (`http://127.0.0.1:PORT/v1`, what OPENAI_API_BASE / base_url expect)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(grader, api_key, name))
    thread = threading.Thread(target=server.serve_forever, daemon=True, name=name)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    log.info("%s serving at %s", name, url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def judge_endpoint(judge: JudgeConfig, world: str | Path | None = None) -> Iterator[JudgeConfig]:
    """The judge to call: `judge` itself, or a copy pointing at a local judge served for the duration of the block
    (the tiny world's with `world`, else the one `judge.local` names), with its own local key in its own variable so
    that the clients' key path is the real one. The copy has `local` unset: checking it probes the served judge."""
    if world:
        from atlantis.evals.world_judge import WorldJudge

        grader: Grader | None = WorldJudge(world)
        name = "world-judge"
    elif judge.local:
        grader, name = make_grader(judge.local), f"{judge.local}-judge"
    else:
        grader = None
    if grader is None:
        yield judge
        return
    os.environ[LOCAL_KEY_ENV] = f"{name}-local"
    with serve_grader(grader, api_key=os.environ[LOCAL_KEY_ENV], name=name) as url:
        yield dataclasses.replace(judge, base_url=url, api_key_env=LOCAL_KEY_ENV, local=None)


def judge_record(judge: JudgeConfig, served: JudgeConfig, world: str | Path | None = None) -> dict:
    """What results record about the judge: `public(served)`, with a local judge named instead of its port."""
    record = public(served)
    if world:
        record["base_url"] = "world judge (127.0.0.1)"  # its port changes from run to run
    elif judge.local:
        record.update(base_url=f"{judge.local} judge (127.0.0.1)", local=judge.local)
    return record
