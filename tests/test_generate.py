"""`atlantis generate`: MT-Bench / AlpacaEval questions in, FastChat answers out; batching, resume, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_jsonl

from atlantis.config import build
from atlantis.data import DataError
from atlantis.generate import GenerateConfig, GenerateError, generate, load_questions
from atlantis.models import load_model, load_tokenizer
from atlantis.proxy import SingleModel
from atlantis.testing import build_tiny_model

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about the sea.", "Now one about a fox."]},
    {"question_id": 82, "category": "math", "turns": ["What is two plus two?", "And 12 + 30?"]},
    {"question_id": 83, "category": "stem", "turns": ["Translate 'bonjour' to English.", "And 'merci'?"]},
    {"question_id": "alpaca-1", "instruction": "Add two numbers in Python."},
    {"question_id": 85, "category": "reasoning", "turns": ["Zorbs are blue; florps are green. What is blue?"]},
]
ANSWER_KEYS = ["question_id", "answer_id", "model_id", "choices", "tstamp"]


@pytest.fixture()
def questions(tmp_path) -> Path:
    return write_jsonl(tmp_path / "question.jsonl", QUESTIONS)


@pytest.fixture(scope="module")
def instruct(models) -> SingleModel:
    """llama-it loaded once; `generate(cfg, decoder)` reuses it."""
    path = models["llama-it"]
    return SingleModel(load_model(path, torch.float32, torch.device("cpu")), load_tokenizer(path))


def config(models, questions, out, **kw) -> GenerateConfig:
    kw.setdefault("model", models["llama-it"])
    kw.setdefault("max_new_tokens", 8)
    return GenerateConfig(questions=str(questions), out=str(out), device="cpu", **kw)


def read(out) -> list[dict]:
    return [json.loads(line) for line in Path(out).read_text().splitlines()]


def by_id(records) -> dict:
    return {r["question_id"]: r["choices"][0]["turns"] for r in records}


class Spy:
    """Wraps a decoder's `generate` to record the conversations it is asked to continue."""

    def __init__(self, decoder):
        self.decoder, self.calls = decoder, []

    def __getattr__(self, name):
        return getattr(self.decoder, name)

    def generate(self, prompts, **kw):
        self.calls.append([list(p) for p in prompts])
        return self.decoder.generate(prompts, **kw)


def test_answers_in_fastchat_format_one_per_turn(models, questions, tmp_path, instruct):
    out = generate(config(models, questions, tmp_path / "llama-it.jsonl", batch_size=2), decoder=instruct)
    records = read(out)
    assert [r["question_id"] for r in records] == [q["question_id"] for q in QUESTIONS]
    for rec, q in zip(records, QUESTIONS):
        assert list(rec) == ANSWER_KEYS
        assert rec["model_id"] == "llama-it"
        assert isinstance(rec["answer_id"], str) and len(rec["answer_id"]) == 22
        assert isinstance(rec["tstamp"], float)
        (choice,) = rec["choices"]
        assert choice["index"] == 0
        assert len(choice["turns"]) == len(q.get("turns", [None]))
        assert all(isinstance(a, str) and a == a.strip() for a in choice["turns"])
    # FastChat's MT-Bench temperatures: math/reasoning greedy, writing sampled, AlpacaEval default 0.7
    settings = json.loads((tmp_path / "llama-it.jsonl.settings.json").read_text())
    assert settings["temperature"] is None and settings["model"] == models["llama-it"]


def test_second_turn_sees_the_first_answer(models, questions, tmp_path, instruct):
    spy = Spy(instruct)
    out = generate(config(models, questions, tmp_path / "a.jsonl", batch_size=8), decoder=spy)
    answers = by_id(read(out))
    assert len(spy.calls) == 2  # turn 1 of five questions, then turn 2 of the three that have one
    assert len(spy.calls[0]) == 5 and len(spy.calls[1]) == 3
    for conv in spy.calls[1]:
        qid = next(q["question_id"] for q in QUESTIONS if q.get("turns", [""])[0] == conv[0]["content"])
        first, _ = answers[qid]
        q = next(q for q in QUESTIONS if q["question_id"] == qid)
        assert first  # a non-empty answer, so that the check below means something
        assert conv == [
            {"role": "user", "content": q["turns"][0]},
            {"role": "assistant", "content": first},
            {"role": "user", "content": q["turns"][1]},
        ]
        prompt = instruct.render(conv)["model"]
        assert prompt == f"<s>[INST] {q['turns'][0]} [/INST] {first} </s>[INST] {q['turns'][1]} [/INST]"


@pytest.mark.parametrize("temperature", [0.0, None])  # greedy; FastChat's per-category (some sampled)
def test_batched_equals_batch_size_one(models, questions, tmp_path, instruct, temperature):
    one = generate(config(models, questions, tmp_path / "1.jsonl", batch_size=1, temperature=temperature), instruct)
    many = generate(config(models, questions, tmp_path / "4.jsonl", batch_size=4, temperature=temperature), instruct)
    assert by_id(read(one)) == by_id(read(many))


def test_resume_skips_answered_questions(models, questions, tmp_path, instruct):
    out = tmp_path / "r.jsonl"
    generate(config(models, questions, out, limit=2), decoder=instruct)
    first = read(out)
    assert [r["question_id"] for r in first] == [81, 82]
    with out.open("a") as fh:
        fh.write('{"question_id": 83, "answer_id": "cut sh')  # a run killed mid-write
    spy = Spy(instruct)
    generate(config(models, questions, out), decoder=spy)
    records = read(out)
    assert records[:2] == first  # untouched
    assert [r["question_id"] for r in records] == [q["question_id"] for q in QUESTIONS]
    asked = {m[0]["content"] for call in spy.calls for m in call}
    assert QUESTIONS[0]["turns"][0] not in asked and QUESTIONS[2]["turns"][0] in asked
    spy.calls.clear()
    generate(config(models, questions, out), decoder=spy)  # everything done: nothing generated
    assert spy.calls == [] and len(read(out)) == len(QUESTIONS)
    # Same answers as an uninterrupted run (seeds are per question and turn).
    full = generate(config(models, questions, tmp_path / "full.jsonl"), decoder=instruct)
    assert by_id(read(full)) == by_id(records)


def test_resume_refuses_other_settings_or_model(models, questions, tmp_path, instruct):
    out = tmp_path / "s.jsonl"
    generate(config(models, questions, out, limit=1), decoder=instruct)
    with pytest.raises(GenerateError, match="max_new_tokens: 8 -> 9"):
        generate(GenerateConfig(questions=str(questions), out=str(out), model=models["llama-it"], max_new_tokens=9))
    with pytest.raises(GenerateError, match="model_id 'llama-it'"):
        generate(config(models, questions, out, model_id="other"), decoder=instruct)
    generate(config(models, questions, out, max_new_tokens=4, overwrite=True), decoder=instruct)
    assert len(read(out)) == len(QUESTIONS)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question_id": 3, "turns": []}', "field 'turns' must be a non-empty list"),
        ('{"question_id": 3, "turns": ["ok", 5]}', r"field 'turns\[1\]' must be a non-empty string"),
        ('{"turns": ["no id"]}', "field 'question_id'"),
        ('{"question_id": 3, "output": "x"}', "needs 'turns'"),
        ('{"question_id": 1, "instruction": "dup"}', "duplicate question_id 1 \\(first at .*:1\\)"),
        ('{"question_id": 3, "turns": ["x"}', "malformed JSON"),
    ],
)
def test_bad_question_line_names_file_and_line(models, tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question_id": 1, "turns": ["fine"]}\n\n' + line + "\n")
    with pytest.raises(DataError, match=f"{path}:3: .*{message}"):
        load_questions(path)
    with pytest.raises(DataError, match=f"{path}:3"):
        generate(GenerateConfig(questions=str(path), out=str(tmp_path / "o.jsonl"), model=models["llama-it"]))


def test_proxy_with_alpha_zero_answers_like_the_large_model(models, questions, tmp_path):
    large = str(build_tiny_model(tmp_path / "large", "llama", seed=5, hidden_size=96, num_layers=3))
    proxy = dict(large=large, small=models["llama"], ref=models["llama-it"], model=None, temperature=0.0)
    out = generate(config(models, questions, tmp_path / "p.jsonl", alpha=0.0, batch_size=3, **proxy))
    records = read(out)
    assert {r["model_id"] for r in records} == {"proxy-large-a0"}
    # p_b^L alone, reading the reference model's chat template (the proxy renders every prompt with it).
    alone = SingleModel(load_model(large, torch.float32, torch.device("cpu")), load_tokenizer(models["llama-it"]))
    single = generate(config(models, questions, tmp_path / "l.jsonl", temperature=0.0, model=large), decoder=alone)
    assert by_id(records) == by_id(read(single))
    # With alpha = 1 the answers move away from the large model's.
    moved = generate(config(models, questions, tmp_path / "p1.jsonl", alpha=1.0, **proxy))
    assert by_id(read(moved)) != by_id(records)


def test_config_validation():
    base = {"questions": "q.jsonl", "out": "a.jsonl"}
    with pytest.raises(ValueError, match="not both"):
        build(GenerateConfig, {**base, "model": "m", "large": "l"})
    with pytest.raises(ValueError, match="all three"):
        build(GenerateConfig, {**base, "large": "l", "small": "s"})
    with pytest.raises(ValueError, match="top_p"):
        build(GenerateConfig, {**base, "model": "m", "top_p": 0})
    with pytest.raises(ValueError, match=".jsonl"):
        build(GenerateConfig, {**base, "model": "m", "out": "a.json"})
    cfg = build(GenerateConfig, {**base, "large": "x/L", "small": "s", "ref": "r", "alpha": 0.5, "stop": "</s>,###"})
    assert cfg.model_id == "proxy-L-a0.5" and cfg.stop == ["</s>", "###"] and cfg.is_proxy


def test_arena_hard_v01_turns_are_read():
    """Arena-Hard-Auto v0.1's question.jsonl writes each turn as {"content": ...} (the shipped smoke excerpt)."""
    from atlantis.generate import load_questions

    path = Path(__file__).parents[1] / "atlantis" / "smoke_data" / "arena-hard-v0.1_question.jsonl"
    questions = load_questions(path)
    assert len(questions) == 4
    first = json.loads(path.read_text().splitlines()[0])
    assert questions[0].turns == (first["turns"][0]["content"],)
