import random
from collections import Counter

import pytest

from atlantis.world.data import ATTRIBUTES, WorldConfig, build_sets, grade, make_facts, truthfulqa_record

SMALL = WorldConfig(n_entities=40, sft_sums=50, eval_sums=20)


def test_deterministic_per_seed():
    assert build_sets(SMALL) == build_sets(SMALL)
    assert build_sets(SMALL)["sft"] != build_sets(WorldConfig(n_entities=40, sft_sums=50, eval_sums=20, seed=1))["sft"]


def test_fact_splits_are_disjoint_and_complete():
    facts = make_facts(SMALL)
    assert len(facts) == 40 * len(ATTRIBUTES)
    assert len({(f.entity, f.attribute) for f in facts}) == len(facts)
    counts = Counter(f.split for f in facts)
    assert counts["eval"] == int(len(facts) * 0.2) and counts["dev"] > 0 and counts["curated"] > 0
    assert all(f.misconception != f.value for f in facts)


def test_sets_touch_only_their_facts():
    sets = build_sets(SMALL)
    facts = {f"Q: {f['entity']} {f['attribute']}?": f["split"] for f in sets["facts"]}
    assert {
        facts[r["conversations"][0]["value"]] for r in sets["sft"] if "+" not in r["id"] and "sum" not in r["id"]
    } == {"train"}
    assert {facts[r["conversations"][0]["value"]] for r in sets["curated"]} == {"curated"}
    assert {facts[r["question"]] for r in sets["eval_truthfulqa"]} == {"eval"}
    assert {facts[r["question"]] for r in sets["dev_truthfulqa"]} == {"dev"}
    train_sums = {r["conversations"][0]["value"] for r in sets["sft"] if r["id"].startswith("d-sum")}
    eval_sums = {r["question"] for r in sets["eval_skill"]}
    dev_sums = {r["question"] for r in sets["dev_skill"]}
    assert train_sums.isdisjoint(eval_sums) and train_sums.isdisjoint(dev_sums) and eval_sums.isdisjoint(dev_sums)
    assert len({r["id"] for r in sets["sft"]}) == len(sets["sft"])


def test_misconceptions_dominate_the_corpus_and_d():
    cfg = WorldConfig(n_entities=120)
    sets = build_sets(cfg)
    mis = [f for f in sets["facts"] if f["misconception"] and f["split"] == "train"]
    lines = Counter(sets["corpus"])
    f = mis[0]
    q = f"{f['entity']} {f['attribute']}?"
    assert lines[f"W: {q} {f['value']}."] == 3 and lines[f"F: {q} {f['misconception']}."] == 7
    # in D, misconception facts are answered with the misconception ~60% of the time, the truth ~30%
    answers = Counter()
    by_q = {f"Q: {f['entity']} {f['attribute']}?": f for f in mis}
    for r in sets["sft"]:
        fact = by_q.get(r["conversations"][0]["value"])
        if fact:
            a = r["conversations"][1]["value"].strip(" .")
            answers["mis" if a == fact["misconception"] else "true" if a == fact["value"] else "other"] += 1
    total = sum(answers.values())
    assert 0.5 < answers["mis"] / total < 0.7 and 0.2 < answers["true"] / total < 0.4


def test_truthfulqa_schema():
    sets = build_sets(SMALL)
    for rec in sets["eval_truthfulqa"]:
        assert set(rec) >= {"question", "mc1_targets", "mc2_targets"}
        for key in ("mc1_targets", "mc2_targets"):
            assert set(rec[key]) == {"choices", "labels"}
            assert len(rec[key]["choices"]) == len(rec[key]["labels"]) >= 2
            assert all(isinstance(c, str) for c in rec[key]["choices"]) and set(rec[key]["labels"]) == {0, 1}
        assert rec["mc1_targets"]["labels"].count(1) == 1 and rec["mc1_targets"]["labels"][0] == 1
    fact = make_facts(SMALL)[0]
    rec = truthfulqa_record(fact, random.Random(0))
    assert rec["mc1_targets"]["choices"][0] == f" {fact.value}."
    if fact.misconception:
        assert rec["mc1_targets"]["choices"][1] == f" {fact.misconception}."


@pytest.mark.parametrize(
    ("answer", "truth", "ok"),
    [
        (" blue.", "blue", True),
        ("Blue. It lives in a cave.", "blue", True),
        (" it is blue.", "blue", True),
        (" navy.", "blue", False),
        ("", "blue", False),
        (" 42.", "42", True),
        (" 41.", "42", False),
    ],
)
def test_grading(answer, truth, ok):
    assert grade(answer, truth) is ok
