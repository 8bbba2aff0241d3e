"""The tiny world's judge: an OpenAI-compatible chat-completions server on 127.0.0.1 that grades from p*.

The benchmark clients (FastChat's `gen_judgment`, `alpaca_eval evaluate`, our Arena-Hard runner) talk to it
over HTTP exactly as they would to a hosted judge; it reads the judge prompt each of them sends, finds the
question(s) and answer(s) by the prompt's own markers, looks the question up in the world's ground truth and
replies in the format the prompt asks for:

- MT-Bench single (`single-v1`, `single-math-v1`, and their `-multi-turn` forms: the second turn is graded):
  "Rating: [[r]]" with the world rating r (`atlantis.world.metrics.judge_rating`: 10 / 7 / 2 / 1);
- MT-Bench pairwise (`pair-v2`, `pair-math-v1`, and `-multi-turn`): "[[A]]", "[[B]]" or "[[C]]" (tie);
- Arena-Hard-Auto: "[[A>>B]]", "[[A>B]]", "[[A=B]]", "[[B>A]]" or "[[B>>A]]" (a gap of 5+ rating points is
  "much better");
- AlpacaEval 1.0's annotator (`alpaca_eval_gpt4`, the package's own prompt and `ranking_parser`): the
  ranking list `[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]` it asks for.

A prompt it cannot read, or a question that is not in the world, is an HTTP 400 with the reason, never a
made-up verdict. The server checks the bearer key when started with one, so clients' key handling is
exercised; the key is never logged.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from atlantis.log import get_logger
from atlantis.world.metrics import judge_rating

log = get_logger(__name__)


WORLD_KEY_ENV = "ATLANTIS_WORLD_JUDGE_KEY"


class JudgeInputError(ValueError):
    """The judge prompt cannot be graded (unknown format or a question the world does not have)."""


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


def _between(text: str, start: str, end: str) -> str:
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        raise JudgeInputError(f"judge prompt lacks {start!r} ... {end!r}")
    return text[i + len(start) : j].strip("\n")


def _turns(conversation: str, who: str) -> list[tuple[str, str]]:
    """(question, answer) pairs of a FastChat multi-turn conversation block ('### User:' / '### Assistant X:')."""
    parts = re.split(r"\n*### (User|Assistant(?: [AB])?):\n", "\n" + conversation)
    pairs, question = [], None
    for role, body in zip(parts[1::2], parts[2::2]):
        body = body.strip("\n")
        if role == "User":
            question = body
        elif question is not None:
            pairs.append((question, body))
            question = None
    if not pairs:
        raise JudgeInputError(f"no turns found in assistant {who}'s conversation")
    return pairs


def arena_label(ra: int, rb: int) -> str:
    """Arena-Hard's verdict from two world ratings (10 / 7 / 2 / 1): a gap of 5 or more (a true answer, well formed
    or sloppy, against a wrong one) is "significantly better"; a smaller one (well formed against sloppy, or the
    misconception against another wrong value) "slightly better"."""
    if ra == rb:
        return "A=B"
    better, gap = ("A", "B") if ra > rb else ("B", "A"), abs(ra - rb)
    return f"{better[0]}>>{better[1]}" if gap >= 5 else f"{better[0]}>{better[1]}"


class WorldJudge:
    """Grades judge prompts of the supported protocols from the world's ground truth."""

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

    def respond(self, messages: list[dict]) -> str:
        text = "\n".join(str(m.get("content", "")) for m in messages)
        if text.strip() == "Reply with OK.":  # the clients' connectivity probe (atlantis.evals.judge.check)
            return "OK"
        if "<|User Prompt|>" in text:  # Arena-Hard-Auto
            q = _between(text, "<|User Prompt|>\n", "\n\n<|The Start of Assistant A's Answer|>")
            a = _between(text, "<|The Start of Assistant A's Answer|>\n", "\n<|The End of Assistant A's Answer|>")
            b = _between(text, "<|The Start of Assistant B's Answer|>\n", "\n<|The End of Assistant B's Answer|>")
            label = arena_label(self.rate(q, a), self.rate(q, b))
            return f"Both answers were checked against the world's facts.\n\nMy final verdict is: [[{label}]]"
        if "<|The Start of Assistant B's Conversation with User|>" in text:  # MT-Bench pairwise, multi-turn
            ca = _between(text, "<|The Start of Assistant A's Conversation with User|>", "<|The End of Assistant A's")
            cb = _between(text, "<|The Start of Assistant B's Conversation with User|>", "<|The End of Assistant B's")
            (qa, a), (_, b) = _turns(ca, "A")[-1], _turns(cb, "B")[-1]
            return self._pair(qa, a, b)
        if "<|The Start of Assistant A's Conversation with User|>" in text:  # MT-Bench single, multi-turn
            ca = _between(text, "<|The Start of Assistant A's Conversation with User|>", "<|The End of Assistant A's")
            q, a = _turns(ca, "A")[-1]  # the second turn is the one graded
            return f"Checked against the world's facts.\n\nRating: [[{self.rate(q, a)}]]"
        if "[The Start of Assistant A's Answer]" in text:  # MT-Bench pairwise, one turn
            q = _between(text, "[User Question]\n", "\n\n[The Start of")
            a = _between(text, "[The Start of Assistant A's Answer]\n", "\n[The End of Assistant A's Answer]")
            b = _between(text, "[The Start of Assistant B's Answer]\n", "\n[The End of Assistant B's Answer]")
            return self._pair(q, a, b)
        if "[The Start of Assistant's Answer]" in text:  # MT-Bench single, one turn
            q = _between(text, "[Question]\n", "\n\n[The Start of")
            a = _between(text, "[The Start of Assistant's Answer]\n", "\n[The End of Assistant's Answer]")
            return f"Checked against the world's facts.\n\nRating: [[{self.rate(q, a)}]]"
        if "Here are the outputs of the models:" in text:  # AlpacaEval 1.0's annotator (alpaca_eval_gpt4)
            q = _between(text, '"instruction": """', '""",')
            outputs = re.findall(r'"answer": """(.*?)"""\n', text, re.S)
            if len(outputs) != 2:
                raise JudgeInputError(f"expected two model outputs in the AlpacaEval prompt, found {len(outputs)}")
            r1, r2 = self.rate(q, outputs[0]), self.rate(q, outputs[1])
            # ranking_parser needs a strict order: a tie goes to model_1 (AlpacaEval randomises the order)
            first, second = ("model_2", "model_1") if r2 > r1 else ("model_1", "model_2")
            return f"[{{'model': '{first}', 'rank': 1}}, {{'model': '{second}', 'rank': 2}}]"
        raise JudgeInputError("unknown judge prompt format (not MT-Bench, Arena-Hard-Auto or the world AlpacaEval)")

    def _pair(self, question: str, a: str, b: str) -> str:
        ra, rb = self.rate(question, a), self.rate(question, b)
        return f"Checked against the world's facts.\n\n[[{'A' if ra > rb else 'B' if rb > ra else 'C'}]]"


def _handler(judge: WorldJudge, api_key: str | None):
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
                self._send(200, {"object": "list", "data": [{"id": "world-judge", "object": "model"}]})
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
                content = judge.respond(req["messages"])
            except (JudgeInputError, KeyError, json.JSONDecodeError) as err:
                self._send(400, {"error": {"message": str(err), "type": "invalid_request_error"}})
                return
            n = max(1, int(req.get("n", 1)))
            self._send(
                200,
                {
                    "id": f"world-{time.monotonic_ns()}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": req.get("model", "world-judge"),
                    "choices": [
                        {"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                        for i in range(n)
                    ],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
                },
            )

        def log_message(self, fmt, *args):  # requests go to the package logger at DEBUG, never with headers
            log.debug("world judge: " + fmt, *args)

    return Handler


@contextmanager
def serve(world: str | Path, api_key: str | None = None) -> Iterator[str]:
    """Run the world judge on 127.0.0.1 (a free port) for the duration of the block; yields its base URL
    (`http://127.0.0.1:PORT/v1`, what OPENAI_API_BASE / base_url expect)."""
    judge = WorldJudge(world)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(judge, api_key))
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="world-judge")
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    log.info("world judge serving %d questions at %s", len(judge.truths), url)
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextmanager
def judge_endpoint(judge, world: str | Path | None):
    """The judge to use: `judge` itself, or, with a world, a copy pointing at a world judge served for the
    duration of the block (with a local key in the judge's key variable, so the clients' key path is the real one).
    """
    if not world:
        yield judge
        return
    # its own key in its own variable: a real OPENAI_API_KEY in the environment is never sent to it
    var = WORLD_KEY_ENV
    os.environ[var] = "world-judge-local"
    with serve(world, api_key=os.environ[var]) as url:
        yield dataclasses.replace(judge, base_url=url, api_key_env=var)
