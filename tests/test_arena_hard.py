"""Arena-Hard-Auto: verdict parsing, position swap, BT score and CI, the judge client against a fake server."""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from atlantis.evals import arena_hard as ah
from atlantis.evals.judge import JudgeConfig, JudgeError, chat, check, redact

KEY = "sk-test-Secret1234567890abcdef"
KEY_ENV = "ATLANTIS_TEST_JUDGE_KEY"

# --------------------------------------------------------------------------------------- fake judge


class FakeJudge:
    """An OpenAI-compatible chat-completions server on 127.0.0.1 returning scripted replies.

    `script(messages) -> str | int`: a reply text, or an HTTP status to fail with. Records every request's
    body and Authorization header; a wrong key is a 401 whose body echoes the key sent (as some servers do).
    """

    def __init__(self, script, key: str | None = KEY, models: bool = True):
        self.script, self.key, self.requests, self.gets = script, key, [], 0
        judge = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                judge.gets += 1
                auth = self.headers.get("Authorization", "")
                if judge.key is not None and auth != f"Bearer {judge.key}":
                    return self._send(401, {"error": {"message": f"Incorrect API key provided: {auth[7:]}"}})
                if not models or self.path != "/v1/models":
                    return self._send(404, {"error": {"message": "no route"}})
                return self._send(200, {"object": "list", "data": [{"id": "judge-x", "object": "model"}]})

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                auth = self.headers.get("Authorization", "")
                judge.requests.append({"body": body, "auth": auth})
                if judge.key is not None and auth != f"Bearer {judge.key}":
                    return self._send(401, {"error": {"message": f"Incorrect API key provided: {auth[7:]}"}})
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "no route"}})
                if body.get("max_tokens") == 1:  # check()'s ping
                    return self._send(200, _completion("OK"))
                reply = judge.script(body["messages"])
                if isinstance(reply, int):
                    return self._send(reply, {"error": {"message": "scripted failure"}})
                return self._send(200, _completion(reply))

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def judged(self) -> list[dict]:
        return [r for r in self.requests if r["body"].get("max_tokens") != 1]


def _completion(text: str) -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}}],
    }


@contextmanager
def fake_judge(script, key: str | None = KEY, models: bool = True):
    judge = FakeJudge(script, key, models)
    thread = threading.Thread(target=judge.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield judge
    finally:
        judge.server.shutdown()
        judge.server.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def answers_in(messages) -> tuple[str, str]:
    """(assistant A's answer, assistant B's answer) from the judge's user prompt."""
    user = messages[1]["content"]
    a = re.search(r"<\|The Start of Assistant A's Answer\|>\n(.*)\n<\|The End of Assistant A's Answer\|>", user, re.S)
    b = re.search(r"<\|The Start of Assistant B's Answer\|>\n(.*)\n<\|The End of Assistant B's Answer\|>", user, re.S)
    return a.group(1), b.group(1)


# Per question, the (hidden) truth the scripted judge reports consistently in both positions:
# q1 the model is much better, q2 tie, q3 the baseline is slightly better, q4 the judge never gives a verdict.
TRUTH = {"q1": "model>>", "q2": "tie", "q3": "base>", "q4": None}


def consistent_judge(messages) -> str:
    if messages[-1]["content"] == ah.CONTINUE_PROMPT:
        return "Still thinking, no label."
    a, _ = answers_in(messages)
    qid, who = a.split(":")[0], a.split(":")[1]  # answers are "<qid>:model" or "<qid>:base"
    truth = TRUTH[qid]
    if truth is None:
        return "I cannot decide."
    if truth == "tie":
        return "My final verdict is tie: [[A=B]]"
    model_first = who == "model"
    if truth == "model>>":
        return "My final verdict: [[A>>B]]" if model_first else "My final verdict: [[B>>A]]"
    return "My final verdict: [[B>A]]" if model_first else "My final verdict: [[A>B]]"  # base slightly better


def write_inputs(tmp_path: Path, qids=("q1", "q2", "q3", "q4")) -> dict[str, str]:
    def jsonl(name, recs):
        p = tmp_path / name
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        return str(p)

    questions = [
        {"question_id": q, "category": "arena-hard-v0.1", "turns": [{"content": f"Prompt {q}?"}]} for q in qids
    ]
    model = [
        {"question_id": q, "model_id": "proxy-7b", "choices": [{"index": 0, "turns": [f"{q}:model"]}]} for q in qids
    ]
    base = [
        {"question_id": q, "model_id": "gpt-4-0314", "choices": [{"index": 0, "turns": [{"content": f"{q}:base"}]}]}
        for q in qids
    ]
    return {
        "questions": jsonl("q.jsonl", questions),
        "answers": jsonl("m.jsonl", model),
        "baseline": jsonl("b.jsonl", base),
    }


def make_cfg(tmp_path: Path, url: str | None, **kw) -> ah.ArenaHardConfig:
    judge = JudgeConfig(base_url=url, model="judge-x", api_key_env=KEY_ENV, retries=2, backoff=0.0, timeout=10)
    return ah.ArenaHardConfig(
        **write_inputs(tmp_path), out=str(tmp_path / "out" / "arena.json"), judge=judge, bootstrap_rounds=20, **kw
    )


# ----------------------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize(
    "text, label",
    [
        ("Long reasoning...\n\nMy final verdict is: [[A>>B]]", "A>>B"),
        ("My final verdict is tie: [[A=B]]", "A=B"),
        ("[[B>A]] and, to repeat, [[B>A]]", "B>A"),  # the same label twice: fine
        ("Assistant B is significantly better: [[B>>A]].", "B>>A"),
        ("first [[A>B]] then [[B>A]]", None),  # conflicting labels: no verdict (get_score)
        ("My verdict: A>B", None),  # no [[...]]
        ("[[a>b]]", None),  # v0.1 does not upper-case the judgment
        ("[[A<B]]", "A<B"),  # matched by the regex, but not a protocol label: weight 0 downstream
        ("", None),
    ],
)
def test_parse_verdict(text, label):
    assert ah.parse_verdict(text) == label


def test_score_judgment_retry_semantics():
    assert ah.score_judgment("no label here") == (None, True)  # ask once more
    assert ah.score_judgment("[[A>B]] [[B>A]]") == (None, False)  # conflicting: recorded, no retry
    assert ah.score_judgment("[[A=B]]") == ("A=B", False)


def test_prompts_have_the_verdict_labels_and_markers():
    # equality with the upstream files (transcribed and checked by git blob id): test_arena_hard_upstream.py
    for marker in (
        "<|User Prompt|>",
        "<|The Start of Assistant A's Answer|>",
        "<|The End of Assistant A's Answer|>",
        "<|The Start of Assistant B's Answer|>",
        "<|The End of Assistant B's Answer|>",
    ):
        assert marker in ah.USER_TEMPLATE
    for label in ah.LABELS:
        assert f"[[{label}]]" in ah.SYSTEM_PROMPT
    msgs = ah.game_messages("Q {braces}?", "ans {x}", "other")  # braces in answers survive str.format
    assert msgs[0] == {"role": "system", "content": ah.SYSTEM_PROMPT}
    assert "Q {braces}?" in msgs[1]["content"] and "ans {x}" in msgs[1]["content"]


def test_position_swap_maps_verdicts_back():
    # game 1: baseline is A; game 2: model is A. "A>B" in game 1 is a baseline win, in game 2 a model win.
    assert ah.game_winner("A>B", 1) == ("model_a", 1)
    assert ah.game_winner("A>B", 2) == ("model_b", 1)
    assert ah.game_winner("B>>A", 1) == ("model_b", 3)
    assert ah.game_winner("B>>A", 2) == ("model_a", 3)
    assert ah.game_winner("A=B", 2) == ("tie", 1)
    assert ah.game_winner(None, 1) == (None, 0)
    assert ah.game_winner("A<B", 1) == (None, 0)
    # a judge that always prefers position A: one win each way per question
    assert sorted(ah.battles_from_games([("A>B", "A>B")])) == ["model_a", "model_b"]
    assert ah.battles_from_games([("B>>A", "A>>B")]) == ["model_b"] * 6  # strong verdicts repeated 3 times
    assert ah.battles_from_games([("B>>A", None)], weight=5) == ["model_b"] * 5


# ------------------------------------------------------------------------------------- Bradley–Terry


def test_bt_two_models_matches_hand_computation():
    # 6 model wins, 3 baseline wins, 2 ties: the BT MLE's win rate is (wins + ties/2) / battles = 7/11
    winners = ["model_b"] * 6 + ["model_a"] * 3 + ["tie"] * 2
    elo = ah.fit_bradley_terry(["base"] * 11, ["m"] * 11, winners, "base")
    assert elo["base"] == 1000.0
    p = 7 / 11
    assert elo["m"] == pytest.approx(1000 + 400 * math.log10(p / (1 - p)), abs=1e-6)
    assert ah.win_rate(elo["m"]) == pytest.approx(p, abs=1e-9)
    res = ah.score(winners, "m", "base", rounds=0)
    assert res["score"] == round(100 * 7 / 11, 2) == 63.64


def test_bt_symmetric_gives_50_and_sweep_gives_100():
    assert ah.score(["model_a", "model_b"] * 5 + ["tie"] * 3, "m", "b", rounds=10)["score"] == 50.0
    res = ah.score(["model_b"] * 12, "m", "b", rounds=10)  # wins every game: separable, win rate 1
    assert res["score"] == 100.0 and res["ci"] == [100.0, 100.0]
    assert ah.score(["model_a"] * 4, "m", "b", rounds=0)["score"] == 0.0


def test_bt_several_models_is_the_mle():
    rng = np.random.default_rng(0)
    names, true = ["base", "x", "y"], {"base": 0.0, "x": 0.3, "y": -0.2}
    a, b, w = [], [], []
    for _ in range(300):
        i, j = rng.choice(3, size=2, replace=False)
        pa = 1 / (1 + 10 ** (true[names[j]] - true[names[i]]))
        u = rng.random()
        a.append(names[i])
        b.append(names[j])
        w.append("tie" if abs(u - pa) < 0.05 else "model_a" if u < pa else "model_b")
    elo = ah.fit_bradley_terry(a, b, w, "base")
    beta = {k: (v - 1000) / 400 for k, v in elo.items()}
    grad = dict.fromkeys(names, 0.0)  # score equations of the duplicated-battles likelihood vanish at the MLE
    for ma, mb, win in zip(a, b, w):
        s = 1 / (1 + 10 ** (beta[mb] - beta[ma]))
        g = {"model_a": 2.0, "tie": 1.0, "model_b": 0.0}[win] - 2 * s
        grad[ma] += g
        grad[mb] -= g
    assert max(abs(grad["x"]), abs(grad["y"])) < 1e-6
    assert elo["x"] > elo["base"] > elo["y"]


def test_bootstrap_ci_is_seeded_and_brackets_the_score():
    winners = ["model_b"] * 30 + ["model_a"] * 20 + ["tie"] * 10
    r1 = ah.score(winners, "m", "b", rounds=100, seed=42)
    r2 = ah.score(winners, "m", "b", rounds=100, seed=42)
    assert r1 == r2
    lo, hi = r1["ci"]
    assert lo < r1["score"] < hi and r1["score"] == round(100 * 35 / 60, 2)
    assert ah.score(winners, "m", "b", rounds=100, seed=1)["ci"] != r1["ci"]


# ------------------------------------------------------------------------------------- judge client


def test_chat_and_check(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with fake_judge(lambda m: "hello " + m[-1]["content"]) as srv:
        cfg = JudgeConfig(base_url=srv.url, model="judge-x", api_key_env=KEY_ENV, temperature=0.0, max_tokens=77)
        check(cfg)
        assert srv.gets == 1 and srv.requests == []  # GET /models proves the server and the key
        assert chat(cfg, [{"role": "user", "content": "hi"}]) == "hello hi"
        body = srv.requests[-1]["body"]
        assert body["model"] == "judge-x" and body["temperature"] == 0.0 and body["max_tokens"] == 77
        assert srv.requests[-1]["auth"] == f"Bearer {KEY}"
    with fake_judge(lambda m: "x", models=False) as srv:  # no /models: a 1-token chat request instead
        check(JudgeConfig(base_url=srv.url + "/chat/completions", api_key_env=KEY_ENV))
        assert srv.gets == 1 and [r["body"]["max_tokens"] for r in srv.requests] == [1]
    with fake_judge(lambda m: "x", models=False) as srv, pytest.raises(JudgeError, match="HTTP 404"):
        check(JudgeConfig(base_url=srv.url + "/wrong", api_key_env=KEY_ENV))


def test_chat_retries_server_errors(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    replies = iter([503, 429, "fine"])
    with fake_judge(lambda m: next(replies)) as srv:
        cfg = JudgeConfig(base_url=srv.url, api_key_env=KEY_ENV, retries=2, backoff=0.0)
        assert chat(cfg, [{"role": "user", "content": "x"}]) == "fine"
        assert len(srv.requests) == 3
    replies = iter([500, 500, 500])
    with fake_judge(lambda m: next(replies)) as srv:
        cfg = JudgeConfig(base_url=srv.url, api_key_env=KEY_ENV, retries=1, backoff=0.0)
        with pytest.raises(JudgeError, match="after 2 attempt"):
            chat(cfg, [{"role": "user", "content": "x"}])


def test_check_fails_fast_with_clear_errors(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="atlantis")
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(JudgeError, match="no judge endpoint"):
        check(JudgeConfig(base_url=None, api_key_env=KEY_ENV))
    with pytest.raises(JudgeError, match="connection refused"):
        check(JudgeConfig(base_url=f"http://127.0.0.1:{closed_port()}/v1", api_key_env=KEY_ENV))
    monkeypatch.delenv(KEY_ENV)
    with fake_judge(lambda m: "x") as srv:
        with pytest.raises(JudgeError, match=f"{KEY_ENV} is not set"):
            check(JudgeConfig(base_url=srv.url, api_key_env=KEY_ENV))
        assert srv.requests == [] and srv.gets == 0  # a missing key never reaches the network
        monkeypatch.setenv(KEY_ENV, KEY + "-wrong")
        with pytest.raises(JudgeError, match="HTTP 401") as err:
            check(JudgeConfig(base_url=srv.url, api_key_env=KEY_ENV))
    assert KEY not in str(err.value) and "***" in str(err.value)  # the server echoed the key; redacted
    assert KEY not in caplog.text
    with pytest.raises(ValueError, match="NAME of an environment variable"):
        JudgeConfig(api_key_env=KEY)  # a key pasted in place of the variable name is refused, not echoed


def test_redact_masks_keys_and_tokens(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "plain-looking-key-xyz")
    with fake_judge(lambda m: "ok", key="plain-looking-key-xyz") as srv:
        check(JudgeConfig(base_url=srv.url, api_key_env=KEY_ENV))  # reading the key registers it
    assert redact("key=plain-looking-key-xyz!") == "key=***!"
    assert redact("Authorization: Bearer abc.def") == "Authorization: Bearer ***"
    assert redact("token sk-abcdefghijklmnop end") == "token *** end"
    # fragments a server echoes: the key's head or tail (8+ characters), or the key half-masked with asterisks
    assert redact("Incorrect API key provided: plain-looking-key***") == "Incorrect API key provided: ***"
    assert redact("key ends in ...ng-key-xyz.") == "key ends in ...***."
    assert redact("Incorrect API key provided: sk-proj-********abcd.") == "Incorrect API key provided: ***."
    assert redact("the key looks fine") == "the key looks fine"  # short runs are words, not fragments


# -------------------------------------------------------------------------------------------- run


def test_run_end_to_end_resumes_and_never_leaks_the_key(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG, logger="atlantis")
    monkeypatch.setenv(KEY_ENV, KEY)
    with fake_judge(consistent_judge) as srv:
        cfg = make_cfg(tmp_path, srv.url)
        out = ah.run(cfg)
        first = len(srv.judged())
    rec = json.loads(Path(out).read_text())
    # q1: model >> in both games (3+3 model wins); q2: 2 ties; q3: 2 baseline wins; q4: dropped.
    # win rate = (6 + 2/2) / 10 = 0.7
    assert rec["metrics"]["arena_hard_auto"] == 70.0
    lo, hi = rec["metrics"]["arena_hard_auto_ci"]
    assert lo <= 70.0 <= hi
    assert rec["model"] == "proxy-7b" and rec["baseline"] == "gpt-4-0314"
    assert rec["judge"]["base_url"] == srv.url and rec["judge"]["model"] == "judge-x"
    assert rec["counts"]["games_without_verdict"] == 2 and rec["counts"]["battles"] == 10
    assert (rec["counts"]["model_wins"], rec["counts"]["baseline_wins"], rec["counts"]["ties"]) == (6, 2, 2)
    # 8 games; q4's two games each got the follow-up turn: 10 judge calls
    assert first == 10
    lines = [json.loads(x) for x in Path(rec["judgments"]).read_text().splitlines()]
    assert sorted((x["question_id"], x["game"]) for x in lines) == [(q, g) for q in TRUTH for g in (1, 2)]
    swapped = {(x["question_id"], x["game"]): x for x in lines}
    assert swapped[("q1", 1)]["score"] == "B>>A" and swapped[("q1", 2)]["score"] == "A>>B"
    assert swapped[("q1", 1)]["model_a"] == "gpt-4-0314" and swapped[("q1", 2)]["model_a"] == "proxy-7b"
    assert swapped[("q4", 1)]["score"] is None and swapped[("q4", 1)]["replies"] == 2
    followup = [r for r in srv.requests if r["body"]["messages"][-1]["content"] == ah.CONTINUE_PROMPT]
    assert len(followup) == 2 and followup[0]["body"]["messages"][0]["content"] == ah.SYSTEM_PROMPT

    # a rerun with everything cached does not call the judge at all (not even check), same result
    cfg.judge.base_url = f"http://127.0.0.1:{closed_port()}/v1"
    again = json.loads(Path(ah.run(cfg)).read_text())
    assert again["metrics"] == rec["metrics"]

    # an interrupted run: drop one judgment and cut the last line short; the rerun judges only what is missing
    path = Path(rec["judgments"])
    kept = path.read_text().splitlines()[:-2]
    path.write_text("\n".join(kept) + "\n" + '{"question_id": "q')
    with fake_judge(consistent_judge) as srv2:
        cfg.judge.base_url = srv2.url
        third = json.loads(Path(ah.run(cfg)).read_text())
        assert 1 <= len(srv2.judged()) <= 4
    assert third["metrics"] == rec["metrics"]

    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert KEY not in f.read_text(errors="replace"), f
    assert KEY not in caplog.text
    for r in caplog.records:
        assert KEY not in r.getMessage()


def test_run_checks_the_judge_before_judging(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with fake_judge(consistent_judge) as srv:
        with pytest.raises(JudgeError, match="not set"):
            ah.run(make_cfg(tmp_path, srv.url))
        assert srv.requests == [] and srv.gets == 0
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(JudgeError, match="no judge endpoint"):
        ah.run(make_cfg(tmp_path, None))
    with pytest.raises(JudgeError, match="connection refused"):
        ah.run(make_cfg(tmp_path, f"http://127.0.0.1:{closed_port()}/v1"))
    assert (
        not (tmp_path / "out" / "arena.judgments.jsonl").exists()
        or not (tmp_path / "out" / "arena.judgments.jsonl").read_text()
    )


def test_position_biased_judge_scores_50(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with fake_judge(lambda m: "Assistant A, clearly: [[A>B]]") as srv:
        rec = json.loads(Path(ah.run(make_cfg(tmp_path, srv.url))).read_text())
    assert rec["metrics"]["arena_hard_auto"] == 50.0  # each question: one win each way after the swap


def test_inputs_are_validated(tmp_path):
    paths = write_inputs(tmp_path)
    qs = ah.load_questions(paths["questions"])
    assert qs[0] == ("q1", "Prompt q1?", 1)
    mt = tmp_path / "mt.jsonl"
    mt.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": ["one", "two"]}) + "\n")
    assert ah.load_questions(mt) == [("81", "one", 2)]
    assert ah.load_answers(paths["baseline"]) == ("gpt-4-0314", {q: f"{q}:base" for q in TRUTH})
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        "".join(
            json.dumps({"question_id": i, "model_id": m, "choices": [{"turns": ["x"]}]}) + "\n"
            for i, m in enumerate(["a", "b"])
        )
    )
    with pytest.raises(ah.ArenaHardError, match="one model"):
        ah.load_answers(mixed)


def test_a_hung_judge_fails_after_the_timeout_with_a_message(monkeypatch):
    """A server that accepts and never answers: each attempt waits `judge.timeout` (a setting; default 120 s, not
    300 s), then the error says it timed out and after how many attempts."""
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    monkeypatch.setenv(KEY_ENV, KEY)
    try:
        cfg = JudgeConfig(base_url=f"http://127.0.0.1:{listener.getsockname()[1]}/v1", api_key_env=KEY_ENV,
                          timeout=0.5, retries=1, backoff=0.01)  # fmt: skip
        start = time.monotonic()
        with pytest.raises(
            JudgeError, match=r"failed after 2 attempt\(s\): no reply within judge.timeout=0.5 s \(timed out\)"
        ):
            chat(cfg, [{"role": "user", "content": "hi"}])
        assert 1.0 <= time.monotonic() - start < 5
    finally:
        listener.close()
    assert JudgeConfig.__dataclass_fields__["timeout"].default == 120.0
