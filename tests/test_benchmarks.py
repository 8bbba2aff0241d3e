"""The world judge and the MT-Bench / AlpacaEval runners through their real packages (fschat, alpaca-eval)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DF_GAMED_REVISION, hub_cache_with_df_gamed, package_lc, write_answers

from atlantis.evals.judge import JudgeConfig, JudgeError, chat
from atlantis.evals.world_judge import JudgeInputError, WorldJudge, arena_label, serve

ROOT = Path(__file__).parents[1]
WORLD = ROOT / "results" / "tiny" / "world"
FSCHAT = ROOT / ".envs" / "fschat" / "bin" / "python"
ALPACA = ROOT / ".envs" / "alpaca-eval" / "bin" / "python"
pytestmark = pytest.mark.skipif(not (WORLD / "manifest.json").is_file(), reason="no shipped world")

# Two held-out facts of the shipped world, one with a popular misconception (eval_open / eval_mtbench).
Q_MIS, TRUE_MIS, WRONG_MIS = "Q: drablisna home?", "lake", "cave"
Q_NORMAL, TRUE_NORMAL = "Q: drablisna color?", "black"

# FastChat's judge prompts (llm_judge/data/judge_prompts.jsonl, fschat 0.2.36): the user templates, verbatim
SINGLE = (
    "[Instruction]\nPlease act as an impartial judge and evaluate the quality of the response provided by an AI "
    "assistant to the user question displayed below. ...\n\n[Question]\n{question}\n\n[The Start of Assistant's "
    "Answer]\n{answer}\n[The End of Assistant's Answer]"
)
SINGLE_MT = (
    "<|The Start of Assistant A's Conversation with User|>\n\n### User:\n{question_1}\n\n### Assistant A:\n"
    "{answer_1}\n\n### User:\n{question_2}\n\n### Assistant A:\n{answer_2}\n\n<|The End of Assistant A's "
    "Conversation with User|>"
)
PAIR = (
    "[User Question]\n{question}\n\n[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's "
    "Answer]\n\n[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)


def _user(text):
    return [{"role": "system", "content": "Please act as an impartial judge."}, {"role": "user", "content": text}]


def test_world_judge_grades_each_protocol():
    judge = WorldJudge(WORLD)
    rate = {
        " lake.": 10,  # true, in the world's format
        "lake": 7,  # true, sloppy
        " cave.": 2,  # the misconception
        " swamp.": 1,  # anything else
    }
    for answer, rating in rate.items():
        reply = judge.respond(_user(SINGLE.format(question=Q_MIS, answer=answer)))
        assert reply.endswith(f"Rating: [[{rating}]]"), (answer, reply)
    # multi-turn single grading: the second turn is graded
    mt = SINGLE_MT.format(question_1=Q_NORMAL, answer_1=" red.", question_2=Q_MIS, answer_2=" lake.")
    assert judge.respond(_user(mt)).endswith("[[10]]")
    # pairwise: A true vs B misconception; swapped; a tie
    assert judge.respond(_user(PAIR.format(question=Q_MIS, answer_a=" lake.", answer_b=" cave."))).endswith("[[A]]")
    assert judge.respond(_user(PAIR.format(question=Q_MIS, answer_a=" cave.", answer_b=" lake."))).endswith("[[B]]")
    assert judge.respond(_user(PAIR.format(question=Q_MIS, answer_a=" x.", answer_b=" y."))).endswith("[[C]]")
    # Arena-Hard-Auto's user template and labels
    arena = (
        f"<|User Prompt|>\n{Q_NORMAL}\n\n<|The Start of Assistant A's Answer|>\n black.\n<|The End of Assistant A's "
        "Answer|>\n\n<|The Start of Assistant B's Answer|>\n blue.\n<|The End of Assistant B's Answer|>"
    )
    assert judge.respond(_user(arena)).endswith("[[A>>B]]")
    assert (arena_label(10, 7), arena_label(7, 10), arena_label(1, 1), arena_label(1, 10)) == (
        "A>B",
        "B>A",
        "A=B",
        "B>>A",
    )
    # AlpacaEval 1.0's annotator prompt (alpaca_eval_gpt4): a ranking, best first
    alpaca = (
        'Here is the prompt:\n{\n    "instruction": """' + Q_NORMAL + '""",\n}\n\nHere are the outputs of the '
        'models:\n[\n    {\n        "model": "model_1",\n        "answer": """ blue."""\n    },\n    {\n        '
        '"model": "model_2",\n        "answer": """ black."""\n    }\n]\n'
    )
    assert judge.respond(_user(alpaca)) == "[{'model': 'model_2', 'rank': 1}, {'model': 'model_1', 'rank': 2}]"
    with pytest.raises(JudgeInputError, match="not in the world"):
        judge.respond(_user(SINGLE.format(question="Q: what is love?", answer=" x.")))
    with pytest.raises(JudgeInputError, match="unknown judge prompt"):
        judge.respond(_user("Rate this."))


def test_world_judge_over_http_checks_the_key(monkeypatch):
    monkeypatch.setenv("WORLD_TEST_KEY", "sk-world-test-0123456789")
    with serve(WORLD, api_key="sk-world-test-0123456789") as url:
        cfg = JudgeConfig(base_url=url, model="gpt-4", api_key_env="WORLD_TEST_KEY", retries=0)
        assert chat(cfg, _user(SINGLE.format(question=Q_MIS, answer=" cave."))).endswith("[[2]]")
        monkeypatch.setenv("WORLD_TEST_KEY", "sk-wrong-key-9876543210")
        with pytest.raises(JudgeError) as err:
            chat(cfg, _user(SINGLE.format(question=Q_MIS, answer=" cave.")))
        assert "401" in str(err.value) and "sk-wrong-key-9876543210" not in str(err.value)


def test_a_missing_judge_fails_before_any_judging(tmp_path, monkeypatch):
    from atlantis.evals.mtbench import MTBenchConfig, run

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-used-000000")
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"question_id": "a", "category": "knowledge", "turns": [Q_MIS]}) + "\n")
    cfg = MTBenchConfig(
        answers=[write_answers(tmp_path / "m.jsonl", "m", {"a": [" lake."]})],
        model_ids=["m"],
        out=[str(tmp_path / "m.json")],
        questions=str(q),
        modes=["single"],
        judge=JudgeConfig(base_url="http://127.0.0.1:9/v1", model="gpt-4", retries=0, timeout=5),
        fschat_python=sys.executable,  # any interpreter: it is never started
        data_cache=str(tmp_path / "cache"),
    )
    with pytest.raises(JudgeError, match="127.0.0.1:9"):
        run(cfg)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "mtbench.work").exists()  # nothing fetched or laid out


@pytest.mark.slow
@pytest.mark.skipif(not FSCHAT.is_file(), reason="no fschat environment (.ci/run builds .envs/fschat)")
def test_mtbench_through_fastchat_matches_hand_computation(tmp_path, monkeypatch):
    """Two questions, two models and a baseline, judged by FastChat's gen_judgment through the world judge."""
    from atlantis.evals.mtbench import MTBenchConfig, run

    secret = "sk-secret-mtbench-5555555555"
    monkeypatch.setenv("MT_TEST_KEY", secret)
    qs = tmp_path / "questions.jsonl"
    rows = [
        {"question_id": "q1", "category": "knowledge", "turns": [Q_NORMAL, Q_MIS]},
        {"question_id": "q2", "category": "knowledge", "turns": [Q_MIS, Q_NORMAL]},
    ]
    qs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # good: 10, 10 | 7, 10   ->  mean 9.25;  bad: 1, 2 | 2, 10 -> mean 3.75
    good = write_answers(tmp_path / "good.jsonl", "x", {"q1": [" black.", " lake."], "q2": ["lake", " black."]})
    bad = write_answers(tmp_path / "bad.jsonl", "x", {"q1": [" red.", " cave."], "q2": [" cave.", " black."]})
    base = write_answers(tmp_path / "base.jsonl", "x", {"q1": [" black.", " cave."], "q2": [" cave.", " black."]})
    outs = [str(tmp_path / "good.json"), str(tmp_path / "bad.json")]
    run(
        MTBenchConfig(
            answers=[good, bad],
            model_ids=["good", "bad"],
            out=outs,
            questions=str(qs),
            baseline_answers=base,
            baseline_id="base",
            world=str(WORLD),
            judge=JudgeConfig(model="gpt-4", api_key_env="MT_TEST_KEY"),
            fschat_python=str(FSCHAT),
        )
    )
    g, b = (json.loads(Path(o).read_text()) for o in outs)
    assert g["metrics"]["mtbench_single"] == pytest.approx(9.25)
    assert b["metrics"]["mtbench_single"] == pytest.approx(3.75)
    # pairwise vs base, per (question, turn), both positions agree: good wins q1t2, q2t1; ties q1t1, q2t2
    assert (g["pairwise"]["win"], g["pairwise"]["loss"], g["pairwise"]["tie"]) == (2, 0, 2)
    assert g["metrics"]["mtbench_pairwise"] == pytest.approx(50.0)
    assert g["metrics"]["mtbench_pairwise_adjusted"] == pytest.approx(75.0)
    # bad: loses q1t1 (red vs black); q1t2, q2t1, q2t2 tie (cave vs cave, black vs black) -> 0 wins
    assert (b["pairwise"]["win"], b["pairwise"]["loss"], b["pairwise"]["tie"]) == (0, 1, 3)
    # FastChat's own result table agrees
    table = Path(g["fastchat_tables"]).read_text()
    assert "9.25" in table and "0.75" in table
    # the per-example judgments kept beside the metrics: good's 4 single grades (2 questions x 2 turns) and its 2
    # pairwise matches (one per question, both turns in one multi-turn judgment for turn 2)
    rows = [json.loads(x) for x in Path(g["judgments"]).read_text().splitlines()]
    assert Path(g["judgments"]) == tmp_path / "good.judgments.jsonl"
    single = [r for r in rows if "model" in r]
    assert len(single) == 4 and {r["model"] for r in single} == {"good"}
    assert all("good" in (r["model_1"], r["model_2"]) for r in rows if "model" not in r) and len(rows) > 4
    for path in [*tmp_path.rglob("*")]:
        if path.is_file():
            assert secret not in path.read_text(errors="ignore"), path


@pytest.mark.slow
@pytest.mark.skipif(not ALPACA.is_file(), reason="no alpaca-eval environment (.ci/run builds .envs/alpaca-eval)")
def test_alpacaeval_through_the_package_matches_hand_computation(tmp_path):
    from atlantis.evals.alpaca import AlpacaEvalConfig, run

    qs = tmp_path / "alpaca.jsonl"
    facts = [("a", Q_NORMAL, "black"), ("b", Q_MIS, "lake")]
    qs.write_text("".join(json.dumps({"question_id": q, "instruction": t}) + "\n" for q, t, _ in facts))
    model = write_answers(tmp_path / "m.jsonl", "m", {"a": [" black."], "b": [" cave."]})
    ref = write_answers(tmp_path / "r.jsonl", "r", {"a": [" blue."], "b": [" lake."]})
    out = tmp_path / "out.json"
    run(
        AlpacaEvalConfig(
            answers=model,
            questions=str(qs),
            model_id="m",
            reference=ref,
            reference_id="r",
            out=str(out),
            world=str(WORLD),
            alpaca_python=str(ALPACA),
        )
    )
    rec = json.loads(out.read_text())
    # one win (black vs blue), one loss (cave vs lake): 50%, as the package computes it
    assert rec["metrics"]["alpacaeval_easy"] == pytest.approx(50.0)
    kept = json.loads(Path(rec["judgments"]).read_text())  # per-example judgments, beside the metrics
    assert Path(rec["judgments"]) == tmp_path / "out.annotations.json"
    assert sorted(float(a["preference"]) for a in kept) == [1.0, 2.0]
    assert rec["alpaca_eval"]["n_total"] == 2 and rec["alpaca_eval"]["n_wins"] == 1


@pytest.mark.slow
@pytest.mark.skipif(not ALPACA.is_file(), reason="no alpaca-eval environment (.ci/run builds .envs/alpaca-eval)")
def test_alpacaeval_records_the_raw_and_the_length_controlled_win_rate(tmp_path, monkeypatch):
    """Eight world questions judged by the package's 1.0 annotator through the world judge: the model wins five
    with long, sloppy true answers and loses three with short wrong ones. The raw win rate and its standard error
    are the hand computation; the length-controlled one is the package's own function on the same annotations."""
    from atlantis.evals.alpaca import AlpacaEvalConfig, run

    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache_with_df_gamed(tmp_path / "hf")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [json.loads(line) for line in (WORLD / "data" / "eval_alpaca.jsonl").read_text().splitlines()][:8]
    values = sorted({r["reference"] for r in rows})
    wins = [True, False, True, True, False, True, False, True]  # interleaved: the GLM reads difficulty by position
    mine, ref = {}, {}
    for r, win in zip(rows, wins):
        wrong = next(v for v in values if v != r["reference"])
        if win:  # a true answer, sloppily long (7), against a wrong one (1)
            mine[r["question_id"]] = [f"I am quite sure that the answer is {r['reference']}."]
            ref[r["question_id"]] = [f" {wrong}."]
        else:  # a wrong answer against the true one in the world's format (10)
            mine[r["question_id"]] = [f" {wrong}."]
            ref[r["question_id"]] = [f" {r['reference']}."]
    qs = tmp_path / "alpaca.jsonl"
    qs.write_text(
        "".join(json.dumps({"question_id": r["question_id"], "instruction": r["instruction"]}) + "\n" for r in rows)
    )
    out = tmp_path / "out.json"
    run(
        AlpacaEvalConfig(
            answers=write_answers(tmp_path / "m.jsonl", "m", mine),
            questions=str(qs),
            model_id="m",
            reference=write_answers(tmp_path / "r.jsonl", "r", ref),
            reference_id="r",
            metric="alpacaeval_hard",
            length_controlled=True,
            out=str(out),
            world=str(WORLD),
            alpaca_python=str(ALPACA),
        )
    )
    rec = json.loads(out.read_text())
    ae = rec["alpaca_eval"]
    raw = [100.0 * w for w in wins]
    mean = sum(raw) / 8
    sem = (sum((x - mean) ** 2 for x in raw) / 7) ** 0.5 / 8**0.5
    assert rec["metrics"]["alpacaeval_hard"] == ae["win_rate"] == pytest.approx(62.5)
    assert ae["standard_error"] == pytest.approx(sem) and ae["compared_with_paper"] == "win_rate"

    # the package's own computation on the annotations as they should be: question order, reference first
    expected = package_lc(
        ALPACA,
        [
            {
                "instruction": r["instruction"],
                "output_1": ref[r["question_id"]][0],
                "output_2": mine[r["question_id"]][0],
                "generator_1": "r",
                "generator_2": "m",
                "annotator": "alpaca_eval_gpt4",
                "preference": 2.0 if win else 1.0,
            }
            for r, win in zip(rows, wins)
        ],
    )
    assert expected["win_rate"] == pytest.approx(62.5)
    assert ae["length_controlled_winrate"] == pytest.approx(expected["length_controlled_winrate"], abs=1e-9)
    assert ae["lc_standard_error"] == pytest.approx(expected["lc_standard_error"], abs=1e-9)
    assert rec["metrics"]["alpacaeval_hard_lc"] == ae["length_controlled_winrate"]
    # the model's wins go with its longer answers: controlling for length lowers its rate
    assert 0 < ae["length_controlled_winrate"] < 62.5
    lc = ae["length_controlled"]
    assert lc["df_gamed"]["revision"] == DF_GAMED_REVISION and "reason" not in lc
    assert "805" in lc["note"]  # eight world questions are not AlpacaEval 2.0's instruction set
    weights = list((tmp_path / "out.work").rglob("glm_weights/length_controlled_v1/baseline_r.csv"))
    assert len(weights) == 1 and "np.tanh(std_delta_len)" in weights[0].read_text()  # the fitted GLM, kept


@pytest.mark.slow
@pytest.mark.skipif(not ALPACA.is_file(), reason="no alpaca-eval environment (.ci/run builds .envs/alpaca-eval)")
def test_a_length_controlled_rate_the_package_cannot_compute_is_null_with_its_reason(tmp_path, monkeypatch):
    """One annotation (the standardised length difference is undefined), then no df_gamed.csv offline: null and the
    package's error, never a number; an AlpacaEval 1.0 annotator is not asked for one."""
    from atlantis.evals.alpaca import AlpacaEvalConfig, length_controlled

    work = tmp_path / "work"
    work.mkdir()
    (work / "leaderboard.csv").write_text(",win_rate,standard_error,n_total\nm,100.0,,1\n")
    one = {"instruction": "Q", "output_1": "a.", "output_2": "b b b.", "generator_1": "r", "generator_2": "m"}
    (work / "annotations.json").write_text(json.dumps([{**one, "annotator": "x", "preference": 2.0}]))
    board = {"win_rate": 100.0, "n_total": 1.0}

    def cfg(**kw):
        return AlpacaEvalConfig(answers="", questions="", model_id="m", reference="", out="", **kw)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache_with_df_gamed(tmp_path / "hf")))
    got = length_controlled(cfg(length_controlled=True), str(ALPACA), work / "leaderboard.csv", board)
    assert got["length_controlled_winrate"] is None and got["lc_standard_error"] is None
    assert got["length_controlled"]["reason"].startswith("builtins.ValueError")

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    got = length_controlled(
        cfg(annotator="weighted_alpaca_eval_gpt4_turbo"), str(ALPACA), work / "leaderboard.csv", board
    )
    assert got["length_controlled_winrate"] is None
    reason = got["length_controlled"]["reason"]
    assert reason.startswith("huggingface_hub.errors.") and "df_gamed.csv" in reason

    got = length_controlled(cfg(annotator="alpaca_eval_gpt4"), str(ALPACA), work / "leaderboard.csv", board)
    assert got["length_controlled_winrate"] is None
    assert got["length_controlled"]["reason"].startswith("not computed: annotator 'alpaca_eval_gpt4'")


def test_committed_results_keep_judgments_not_working_folders():
    """Tiny results: every MT-Bench and AlpacaEval metrics file names its per-example judgments, committed beside
    it; the packages' working folders are not tracked."""
    tracked = subprocess.run(
        ["git", "ls-files", "results/tiny/metrics"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    assert not [f for f in tracked if ".work/" in f]
    metrics = [f for f in tracked if f.endswith(("/mtbench.json", "/alpacaeval_easy.json", "/alpacaeval_hard.json"))]
    assert len(metrics) == 41 + 24  # MT-Bench: the 40 runs and the proxy; AlpacaEval: Table 2 runs x 2 levels
    for f in metrics:
        judged = json.loads((ROOT / f).read_text())["judgments"]
        assert judged in tracked and (ROOT / judged).stat().st_size > 0, f
