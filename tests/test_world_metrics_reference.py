"""Every p*-metric of `atlantis.world.metrics.evaluate`, against values computed by hand.

The model is a lookup table: p(answer | question) is written below, greedy decoding takes the table's argmax.
`evaluate` runs unchanged on a hand-made world of five held-out facts and three sums (its loaders, the
log-likelihood scorer and the decoder are replaced by the table; the answers go through the real
`atlantis generate`). Every expected value is computed here from the table with the textbook formula, not with
the module's helpers, so a flipped sign, a swapped KL direction or a wrong subset fails a test.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from atlantis.proxy import Generation
from atlantis.world import metrics

# p(answer | question) of the table model. Facts: (question, truth, misconception, seen by the small models).
TABLE: dict[str, dict[str, float]] = {
    # F1: misconception fact, greedy answer is the misconception
    "Q: zorb color?": {" blue.": 0.2, " navy.": 0.5, " red.": 0.15, " green.": 0.1, " it is blue.": 0.05},
    # F2: normal fact, unseen by the small models, greedy answer right
    "Q: zorb home?": {" cave.": 0.7, " lake.": 0.2, " forest.": 0.05, " desert.": 0.03, " it is cave.": 0.02},
    # F3: misconception fact, greedy answer right
    "Q: blik food?": {" fish.": 0.6, " moss.": 0.3, " seeds.": 0.05, " roots.": 0.04, " it is fish.": 0.01},
    # F4: normal fact, unseen, greedy answer wrong
    "Q: blik color?": {" red.": 0.1, " white.": 0.8, " blue.": 0.05, " black.": 0.03, " it is red.": 0.02},
    # F5: normal fact, unseen, greedy answer right but sloppily formatted (judge: 7)
    "Q: fen food?": {" grass.": 0.3, " it is grass.": 0.4, " honey.": 0.2, " moss.": 0.06, " fish.": 0.04},
    # sums
    "Q: 2 + 3?": {" 5.": 0.9, " 6.": 0.1},
    "Q: 4 + 4?": {" 8.": 0.25, " 7.": 0.5, " 9.": 0.25},
    "Q: 1 + 1?": {" 2.": 0.5, " 3.": 0.3, " 11.": 0.2},
}
FACTS = [  # question, truth, misconception, known_by_small, MC1 choices (true first)
    ("Q: zorb color?", "blue", "navy", True, ["blue", "navy", "red", "green"]),
    ("Q: zorb home?", "cave", None, False, ["cave", "lake", "forest", "desert"]),
    ("Q: blik food?", "fish", "moss", True, ["fish", "moss", "seeds", "roots"]),
    ("Q: blik color?", "red", None, False, ["red", "white", "blue", "black"]),
    ("Q: fen food?", "grass", None, False, ["grass", "honey", "moss", "fish"]),
]
SUMS = [("Q: 2 + 3?", "5"), ("Q: 4 + 4?", "8"), ("Q: 1 + 1?", "2")]
MTBENCH = [(0, 1), (2, 3), (4, 1)]  # two-turn questions: pairs of facts


def kl(p: dict[str, float], q: dict[str, float]) -> float:
    """KL(p‖q) = Σ_y p(y) log(p(y)/q(y)) over p's support (+inf where q(y) = 0 < p(y))."""
    total = 0.0
    for y, py in p.items():
        if py > 0:
            qy = q.get(y, 0.0)
            total += math.inf if qy == 0 else py * math.log(py / qy)
    return total


def p_star(truth: str) -> dict[str, float]:
    return {f" {truth}.": 1.0}  # the world is deterministic: a point mass on the true answer


class TableDecoder:
    """Greedy decoding from the table: the most probable answer to the last user message."""

    def __init__(self):
        self.temperatures: list[float] = []

    def generate(self, prompts, *, max_new_tokens, temperature, top_p, seed, stop):
        self.temperatures += list(temperature)
        out = []
        for messages in prompts:
            row = TABLE[messages[-1]["content"]]
            out.append(Generation(text=max(row, key=row.get), token_ids=[], finish_reason="eos"))
        return out


class _Model:
    def eval(self):
        return self


def _table_logliks(model, tokenizer, template, pairs, batch=64):
    return [math.log(TABLE[q][a]) for q, a in pairs]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture()
def evaluated(tmp_path, monkeypatch):
    return _evaluate(tmp_path, monkeypatch, FACTS)


def _evaluate(tmp_path, monkeypatch, facts):
    world = tmp_path / "world" / "data"
    world.mkdir(parents=True)
    tqa = []
    for q, truth, wrong, known, mc1 in facts:
        false = [f" {v}." for v in mc1[1:]]
        tqa.append(
            {
                "question": q,
                "mc1_targets": {"choices": [f" {truth}."] + false, "labels": [1, 0, 0, 0]},
                "mc2_targets": {
                    "choices": [f" {truth}.", f" it is {truth}."] + false,
                    "labels": [1, 1, 0, 0, 0],
                },
                "misconception": wrong is not None,
                "known_by_small": known,
            }
        )
    _write(world / "eval_truthfulqa.jsonl", tqa)
    _write(world / "eval_skill.jsonl", [{"id": f"s{i}", "question": q, "answer": a} for i, (q, a) in enumerate(SUMS)])
    opens = [
        {
            "question_id": f"e-{i}",
            "category": "knowledge",
            "turns": [q],
            "reference": [truth],
            "misconception": [wrong],
            "known_by_small": [known],
        }
        for i, (q, truth, wrong, known, _) in enumerate(facts)
    ] + [
        {
            "question_id": f"e-sum-{i}",
            "category": "math",
            "turns": [q],
            "reference": [a],
            "misconception": [None],
            "known_by_small": [True],
        }
        for i, (q, a) in enumerate(SUMS)
    ]
    _write(world / "eval_open.jsonl", opens)
    _write(
        world / "eval_mtbench.jsonl",
        [
            {
                "question_id": f"mt-{i}",
                "category": "knowledge",
                "turns": [facts[a][0], facts[b][0]],
                "reference": [facts[a][1], facts[b][1]],
                "misconception": [facts[a][2], facts[b][2]],
                "known_by_small": [facts[a][3], facts[b][3]],
            }
            for i, (a, b) in enumerate(MTBENCH)
        ],
    )
    model_dir = tmp_path / "table-model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")  # what `generate`'s source check reads; the model is the table
    (model_dir / "tokenizer.json").write_text("{}")

    decoder = TableDecoder()
    monkeypatch.setattr("atlantis.models.load_model", lambda *a, **k: _Model())
    monkeypatch.setattr("atlantis.models.load_tokenizer", lambda *a, **k: object())
    monkeypatch.setattr("atlantis.proxy.SingleModel", lambda *a, **k: decoder)
    monkeypatch.setattr(metrics, "continuation_logliks", _table_logliks)
    result = metrics.evaluate(model_dir, tmp_path / "world", "unused.jinja", tmp_path / "answers")
    return result, decoder, tmp_path / "answers"


def test_reports_every_metric(evaluated):
    result, _, _ = evaluated
    assert set(result) == set(metrics.METRICS)


def test_kl_is_kl_of_p_star_from_the_model(evaluated):
    result, _, _ = evaluated
    kls = {q: kl(p_star(truth), TABLE[q]) for q, truth, *_ in FACTS}
    # by hand: a point mass p* gives KL(p*‖p) = −log p(y*|x)
    assert kls["Q: zorb color?"] == pytest.approx(-math.log(0.2), abs=1e-12)
    mis = [kls[q] for q, _, wrong, *_ in FACTS if wrong is not None]
    normal = [kls[q] for q, _, wrong, *_ in FACTS if wrong is None]
    assert result["kl_mis"] == pytest.approx((-math.log(0.2) - math.log(0.6)) / 2, abs=1e-9)
    assert result["kl_mis"] == pytest.approx(np.mean(mis), abs=1e-9)
    assert result["kl_normal"] == pytest.approx((-math.log(0.7) - math.log(0.1) - math.log(0.3)) / 3, abs=1e-9)
    assert result["kl_normal"] == pytest.approx(np.mean(normal), abs=1e-9)
    skill = [kl(p_star(a), TABLE[q]) for q, a in SUMS]
    assert result["kl_skill"] == pytest.approx((-math.log(0.9) - math.log(0.25) - math.log(0.5)) / 3, abs=1e-9)
    assert result["kl_skill"] == pytest.approx(np.mean(skill), abs=1e-9)


def test_kl_direction_and_sign(evaluated):
    """KL(p*‖p) ≥ 0 and finite; the other direction KL(p‖p*) is infinite (p puts mass where p* has none)."""
    result, _, _ = evaluated
    for key in ("kl_mis", "kl_normal", "kl_skill"):
        assert result[key] > 0 and math.isfinite(result[key])
    forward = kl(p_star("blue"), TABLE["Q: zorb color?"])
    reverse = kl(TABLE["Q: zorb color?"], p_star("blue"))
    assert forward == pytest.approx(1.6094379124341003) and reverse == math.inf
    # an asymmetric pair with common support: the two directions differ, and the metric is the forward one
    p, q = {"a": 0.9, "b": 0.1}, {"a": 0.5, "b": 0.5}
    assert kl(p, q) == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2))
    assert abs(kl(p, q) - kl(q, p)) > 0.1


def test_mc1_mc2(evaluated):
    result, _, _ = evaluated
    mc1, mc2 = [], []
    for q, truth, _, _, choices in FACTS:
        ll1 = [math.log(TABLE[q][f" {c}."]) for c in choices]
        mc1.append(float(max(range(len(ll1)), key=ll1.__getitem__) == 0))  # the true choice is the most likely
        true = [f" {truth}.", f" it is {truth}."]
        mass = sum(TABLE[q][c] for c in true)
        mc2.append(mass / (mass + sum(TABLE[q][f" {c}."] for c in choices[1:])))
    assert mc1 == [0.0, 1.0, 1.0, 0.0, 1.0]
    assert mc2 == pytest.approx([0.25, 0.72, 0.61, 0.12, 0.70])
    assert result["mc1"] == pytest.approx(3 / 5, abs=1e-9)
    assert result["mc2"] == pytest.approx((0.25 + 0.72 + 0.61 + 0.12 + 0.70) / 5, abs=1e-9)


def test_exact_answers_skill_and_judge(evaluated):
    result, decoder, answers = evaluated
    # greedy answers: navy (F1, wrong), cave (F2), fish (F3), white (F4, wrong), "it is grass." (F5, right)
    assert result["truth_em"] == pytest.approx(3 / 5, abs=1e-9)
    assert result["truth_em_mis"] == pytest.approx(1 / 2, abs=1e-9)  # F1 wrong, F3 right
    assert result["truth_em_unseen"] == pytest.approx(2 / 3, abs=1e-9)  # F2, F5 right; F4 wrong
    assert result["skill_acc"] == pytest.approx(2 / 3, abs=1e-9)  # 5 right, 7 for 8 wrong, 2 right
    # ratings: navy 2 (the misconception), cave 10 | fish 10, white 1 | "it is grass." 7 (sloppy), cave 10
    assert result["judge"] == pytest.approx((2 + 10 + 10 + 1 + 7 + 10) / 6, abs=1e-9)
    assert decoder.temperatures and set(decoder.temperatures) == {0.0}  # greedy everywhere
    mt = [json.loads(line) for line in (answers / "eval_mtbench.jsonl").read_text().splitlines()]
    turns = [r["choices"][0]["turns"] for r in mt]
    assert turns == [["navy.", "cave."], ["fish.", "white."], ["it is grass.", "cave."]]


def test_no_unseen_fact_gives_nan_and_nothing_else_changes(tmp_path, monkeypatch):
    """A world whose small models see every fact (`small_known=1`, the map's no-gap cell) has no "facts p_S never
    saw": that metric is undefined (NaN, not 0 and not an error), and every other metric is what it was."""
    seen = [(q, truth, wrong, True, mc1) for q, truth, wrong, _, mc1 in FACTS]
    result, _, _ = _evaluate(tmp_path / "seen", monkeypatch, seen)
    reference, _, _ = _evaluate(tmp_path / "gap", monkeypatch, FACTS)
    assert math.isnan(result["truth_em_unseen"])
    assert {k: v for k, v in result.items() if k != "truth_em_unseen"} == pytest.approx(
        {k: v for k, v in reference.items() if k != "truth_em_unseen"}, abs=1e-12
    )


def test_a_non_finite_metric_otherwise_stops(tmp_path, monkeypatch):
    """The NaN above is the only one allowed: a model that puts no mass on a true answer stops with its folder."""
    monkeypatch.setitem(TABLE, "Q: zorb home?", {**TABLE["Q: zorb home?"], " cave.": 0.0})
    monkeypatch.setattr(math, "log", lambda x: -math.inf if x == 0 else np.log(x))
    with pytest.raises(ValueError, match="non-finite metrics"):
        _evaluate(tmp_path, monkeypatch, FACTS)
