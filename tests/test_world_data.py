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
    assert counts["eval"] == int(len(facts) * SMALL.split[0]) and counts["dev"] > 0 and counts["curated"] > 0
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


def test_p_star_and_p_d_normalise():
    from atlantis.world.data import p_d, p_star

    cfg = WorldConfig()
    for f in make_facts(SMALL)[:30]:
        assert p_star(f) == {f" {f.value}.": 1.0}
        probs = p_d(f, cfg)
        assert sum(probs.values()) == pytest.approx(1.0)
        assert set(probs) == {f" {v}." for v in ATTRIBUTES[f.attribute]}
        if f.misconception:
            assert probs[f" {f.misconception}."] == pytest.approx(0.6) and probs[f" {f.value}."] == pytest.approx(0.3)
        else:
            assert probs[f" {f.value}."] == pytest.approx(0.8)


def test_d_follows_p_d():
    """D's empirical answer frequencies match p_d, pooled over facts by kind of answer."""
    cfg = WorldConfig(n_entities=200, sft_sums=10)
    sets = build_sets(cfg)
    facts = {f.question: f for f in make_facts(cfg)}
    kinds = Counter()
    for r in sets["sft"]:
        f = facts.get(r["conversations"][0]["value"])
        if f is None:
            continue
        a = r["conversations"][1]["value"]
        kinds[("mis" if f.misconception else "normal", "true" if a == f" {f.value}." else "other")] += 1
    mis_true = kinds[("mis", "true")] / (kinds[("mis", "true")] + kinds[("mis", "other")])
    normal_true = kinds[("normal", "true")] / (kinds[("normal", "true")] + kinds[("normal", "other")])
    assert mis_true == pytest.approx(0.3, abs=0.03) and normal_true == pytest.approx(0.8, abs=0.03)


def test_held_out_sums_are_nowhere_in_training_text():
    sets = build_sets(SMALL)

    def pair(text: str) -> tuple[int, int]:  # "12 + 30?" -> (12, 30), order-free
        a, b = text.split("?")[0].split(" + ")
        return min(int(a), int(b)), max(int(a), int(b))

    sums = [line[3:] for line in sets["corpus"] if "+" in line]
    sums += [
        r["conversations"][0]["value"][3:] for r in sets["sft"] + sets["curated"] if "+" in r["id"] or "sum" in r["id"]
    ]
    seen = {pair(t) for t in sums}
    held = [pair(rec["question"][3:]) for rec in sets["eval_skill"] + sets["dev_skill"]]
    assert not seen & set(held) and len(set(held)) == len(held)  # in neither order, and no twin within them
    # every other pair is stated, correctly, in the corpus
    ordered = sum(2 if a != b else 1 for a, b in held)
    assert len([line for line in sets["corpus"] if "+" in line]) == (SMALL.sum_max + 1) ** 2 - ordered


def test_judged_sets_ask_only_held_out_facts(tmp_path):
    from atlantis.world.data import write_sets

    sets = build_sets(SMALL)
    split = {f"Q: {f['entity']} {f['attribute']}?": f for f in sets["facts"]}
    for q in sets["eval_open"] + sets["eval_mtbench"]:
        assert len(q["turns"]) == len(q["reference"]) == len(q["misconception"])
        for turn, ref in zip(q["turns"], q["reference"]):
            if q["category"] == "knowledge":
                assert split[turn]["split"] == "eval" and split[turn]["value"] == ref
            else:
                a, b = turn[3:-1].split(" + ")
                assert int(a) + int(b) == int(ref)
    assert {len(q["turns"]) for q in sets["eval_mtbench"]} == {2}
    assert len(sets["eval_alpaca"]) == len(sets["eval_open"])
    paths = write_sets(sets, tmp_path)
    assert paths["corpus"].read_text().splitlines() == sets["corpus"]
    from atlantis.generate import load_questions

    assert len(load_questions(paths["eval_mtbench"])) == len(sets["eval_mtbench"])
