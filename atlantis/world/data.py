"""The tiny world's data: a made-up knowledge base with a known optimal distribution p*, and its data sets.

First piece of the tiny world (issue 4): the generators. Models, the experiment and the `atlantis world`
verbs build on it.

The world (design after `shared/notes/tiny-world-findings.md`):

- entities with made-up names and attributes; each (entity, attribute) fact has one true value;
- a share of facts carry a popular *misconception*: a wrong value stated more often than the truth in the
  plain-text corpus, as on the web (TruthfulQA's mechanism);
- a skill with an exact answer (two-number addition), where D also holds wrong computations.

p*(y|x) is a point mass on the true answer (the world is deterministic), so held-out NLL under p* is
−log p_model(true answer | question), and correctness is exact match.

Sets (all from one seed; facts split disjointly):
- `corpus`: pre-training text of the large models; `corpus_small`: the same restricted to the facts the small
  models know (`small_known`), with every sum. Reliable lines `W: <q> <true>.` and forum lines
  `F: <q> <value>.`; misconception facts get more forum lines with the misconception than reliable lines with the truth;
- `sft` (D, the OpenHermes analogue, ShareGPT): questions about the `train` facts and sums, answered from a
  distorted p_d: misconceptions, random wrong values, wrong sums;
- `curated`: a smaller set about the `curated` facts, mostly true (the vendors' instruct-tuning analogue);
- `eval_truthfulqa`: TruthfulQA-format MC records about the held-out `eval` facts (seen only in pre-training);
- `eval_skill`: sums with exact answers, disjoint from those in D and the curated set;
- `eval_open`, `eval_mtbench`, `eval_alpaca`: the held-out questions for judged generation, in FastChat's
  question format (single-turn; two-turn about one entity) and AlpacaEval's (`instruction`, `dataset`), with
  the ground truth (`reference`, `misconception`) for the world judge;
- `dev_*`: the same for the `dev` facts, for any choice of hyper-parameters (never the test split).
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path

from atlantis.config import field

SYLLABLES = ["zor", "bli", "ka", "mep", "tru", "vo", "quil", "dra", "fen", "lu", "gor", "sna", "pim", "rix", "tal"]
ATTRIBUTES: dict[str, list[str]] = {
    "color": ["blue", "green", "red", "yellow", "purple", "orange", "white", "black"],
    "home": ["cave", "lake", "forest", "desert", "mountain", "river", "island", "swamp"],
    "food": ["seeds", "fish", "berries", "moss", "roots", "insects", "grass", "honey"],
}


@dataclass
class WorldConfig:
    seed: int = field(0, help="Seed of the whole world.")
    n_entities: int = field(240, help="Made-up entities; each has one fact per attribute.")
    misconception_rate: float = field(0.35, help="Share of facts with a popular wrong value.")
    split: tuple[float, float, float] = field(
        (0.3, 0.1, 0.15), help="Shares of facts held out for eval, dev and the curated set; the rest feed D."
    )
    corpus_true_lines: int = field(3, help="Reliable corpus lines per misconception fact (the truth).")
    corpus_false_lines: int = field(7, help="Forum corpus lines per misconception fact (the misconception).")
    corpus_normal_lines: int = field(5, help="Reliable corpus lines per normal fact.")
    sft_per_fact: int = field(8, help="Question/answer pairs per train fact in D.")
    sft_sums: int = field(800, help="Addition pairs in D.")
    p_d_misconception: tuple[float, float] = field(
        (0.6, 0.1), help="In D, on misconception facts: P(misconception), P(random wrong); the rest is true."
    )
    p_d_normal_wrong: float = field(0.2, help="In D, on normal facts: P(random wrong value).")
    p_d_sum_wrong: float = field(0.2, help="In D: P(a wrong sum).")
    curated_per_fact: int = field(4, help="Pairs per curated fact.")
    curated_true: float = field(0.95, help="P(true) in the curated set.")
    small_known: float = field(
        0.5,
        help="Share of facts (in every split) whose corpus lines the small models see: the small models know "
        "less than the large ones, so weak-to-strong can show (tiny-world findings, lesson 8).",
    )
    eval_sums: int = field(200, help="Held-out addition questions (and as many for dev).")
    sum_max: int = field(49, help="Sums of two numbers in [0, sum_max]; the corpus states all but the held-out.")

    def __post_init__(self) -> None:
        if not 0 <= self.small_known <= 1:
            raise ValueError("small_known must be in [0, 1]")
        if not 0 <= self.misconception_rate <= 1:
            raise ValueError("misconception_rate must be in [0, 1]")
        if sum(self.split) >= 1 or min(self.split) < 0:
            raise ValueError("split shares must be >= 0 and leave some facts for D")
        if sum(self.p_d_misconception) > 1:
            raise ValueError("p_d_misconception probabilities exceed 1")
        if self.sft_sums + 2 * self.eval_sums > (self.sum_max + 1) * (self.sum_max + 2) // 2:
            raise ValueError("sft_sums + 2 * eval_sums exceed the number of distinct (unordered) sums")


@dataclass(frozen=True)
class Fact:
    entity: str
    attribute: str
    value: str
    misconception: str | None  # the popular wrong value, if any
    split: str  # eval | dev | curated | train
    known_by_small: bool = True  # its corpus lines are in the small models' pre-training corpus

    @property
    def question(self) -> str:
        return f"Q: {self.entity} {self.attribute}?"


def _names(rng: random.Random, n: int) -> list[str]:
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))))
    return sorted(names)


def make_facts(cfg: WorldConfig) -> list[Fact]:
    """Every (entity, attribute) fact, its split and misconception, deterministic for the seed."""
    rng = random.Random(cfg.seed)
    facts = []
    for entity in _names(rng, cfg.n_entities):
        for attribute, values in ATTRIBUTES.items():
            value = rng.choice(values)
            wrong = rng.choice([v for v in values if v != value]) if rng.random() < cfg.misconception_rate else None
            facts.append((entity, attribute, value, wrong))
    rng.shuffle(facts)
    n = len(facts)
    bounds = [int(n * cfg.split[0]), int(n * (cfg.split[0] + cfg.split[1])), int(n * sum(cfg.split))]
    names = ["eval", "dev", "curated", "train"]
    out = []
    for i, (entity, attribute, value, wrong) in enumerate(facts):
        split = names[sum(i >= b for b in bounds)]
        out.append(Fact(entity, attribute, value, wrong, split))
    # the small models' share, drawn within each split so every split has both kinds of facts
    rng = random.Random(cfg.seed + 3)
    for name in names:
        idx = [i for i, f in enumerate(out) if f.split == name]
        known = set(rng.sample(idx, round(len(idx) * cfg.small_known)))
        for i in idx:
            if i not in known:
                out[i] = dataclasses.replace(out[i], known_by_small=False)
    return out


def _answer(value: str) -> str:
    return f" {value}."


def _sharegpt(sample_id: str, question: str, answer: str) -> dict:
    return {"id": sample_id, "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def corpus(cfg: WorldConfig, facts: list[Fact], sums: list[tuple[int, int]] = ()) -> list[str]:
    """Pre-training lines; the SFT question replaces the source tag (same sentence form: findings, lesson 1).

    Sums are stated correctly (reliable lines) for every pair except the held-out evaluation and dev pairs:
    answering those needs the addition skill, not recall.
    """
    rng = random.Random(cfg.seed + 1)
    lines = [f"W: {a} + {b}?{_answer(str(a + b))}" for a, b in sums]
    for f in facts:
        q = f.question[3:]
        if f.misconception:
            lines += [f"W: {q}{_answer(f.value)}"] * cfg.corpus_true_lines
            lines += [f"F: {q}{_answer(f.misconception)}"] * cfg.corpus_false_lines
        else:
            lines += [f"W: {q}{_answer(f.value)}"] * cfg.corpus_normal_lines
    rng.shuffle(lines)
    return lines


def _unordered(pairs) -> set[tuple[int, int]]:
    return {(min(a, b), max(a, b)) for a, b in pairs}


def _sums(rng: random.Random, n: int, exclude: set[tuple[int, int]], top: int) -> list[tuple[int, int]]:
    """n sums whose pair, in either order, is not in `exclude` nor drawn twice: a + b and b + a are one question
    (a held-out sum whose swapped twin is in the corpus could be recalled, not computed)."""
    out: list[tuple[int, int]] = []
    seen = _unordered(exclude)
    while len(out) < n:
        pair = (rng.randint(0, top), rng.randint(0, top))
        key = (min(pair), max(pair))
        if key not in seen:
            seen.add(key)
            out.append(pair)
    return out


def p_star(f: Fact) -> dict[str, float]:
    """The optimal answer distribution p*(y|x) for a fact's question: a point mass on the true value."""
    return {_answer(f.value): 1.0}


def p_d(f: Fact, cfg: WorldConfig) -> dict[str, float]:
    """The distorted distribution p_d(y|x) that D's answers are drawn from (normalised over the values)."""
    others = [v for v in ATTRIBUTES[f.attribute] if v not in (f.value, f.misconception)]
    if f.misconception:
        p_mis, p_rand = cfg.p_d_misconception
        probs = {f.value: 1.0 - p_mis - p_rand, f.misconception: p_mis}
    else:
        p_rand, probs = cfg.p_d_normal_wrong, {f.value: 1.0 - cfg.p_d_normal_wrong}
    probs.update({v: p_rand / len(others) for v in others})
    return {_answer(v): p for v, p in probs.items()}


def _sample(rng: random.Random, probs: dict[str, float]) -> str:
    u, acc = rng.random(), 0.0
    for value, p in probs.items():
        acc += p
        if u < acc:
            return value
    return value  # u within rounding of 1


def build_sets(cfg: WorldConfig) -> dict[str, list]:
    """All the world's data sets (see the module docstring), as lists of JSON-ready records."""
    facts = make_facts(cfg)
    rng = random.Random(cfg.seed + 2)
    train_sums = _sums(rng, cfg.sft_sums, set(), cfg.sum_max)
    eval_sums = _sums(rng, cfg.eval_sums, set(train_sums), cfg.sum_max)
    dev_sums = _sums(rng, cfg.eval_sums, set(train_sums) | set(eval_sums), cfg.sum_max)
    held_out = _unordered(eval_sums + dev_sums)
    corpus_sums = [
        (a, b) for a in range(cfg.sum_max + 1) for b in range(cfg.sum_max + 1) if (min(a, b), max(a, b)) not in held_out
    ]

    sft = []
    for f in (f for f in facts if f.split == "train"):
        for k in range(cfg.sft_per_fact):
            sft.append(_sharegpt(f"d-{f.entity}-{f.attribute}-{k}", f.question, _sample(rng, p_d(f, cfg))))
    for a, b in train_sums:
        total = a + b if rng.random() >= cfg.p_d_sum_wrong else a + b + rng.choice((-10, -1, 1, 10))
        sft.append(_sharegpt(f"d-sum-{a}-{b}", f"Q: {a} + {b}?", _answer(str(total))))
    rng.shuffle(sft)

    curated = []
    for f in (f for f in facts if f.split == "curated"):
        for k in range(cfg.curated_per_fact):
            value = (
                f.value
                if rng.random() < cfg.curated_true
                else rng.choice([v for v in ATTRIBUTES[f.attribute] if v != f.value])
            )
            curated.append(_sharegpt(f"c-{f.entity}-{f.attribute}-{k}", f.question, _answer(value)))

    def truthfulqa(split: str) -> list[dict]:
        return [
            truthfulqa_record(f, random.Random(f"{cfg.seed}-{f.entity}-{f.attribute}"))
            for f in facts
            if f.split == split
        ]

    def skill(pairs: list[tuple[int, int]], prefix: str) -> list[dict]:
        return [{"id": f"{prefix}-{a}-{b}", "question": f"Q: {a} + {b}?", "answer": str(a + b)} for a, b in pairs]

    eval_facts = [f for f in facts if f.split == "eval"]
    open_questions = [
        {
            "question_id": f"e-{f.entity}-{f.attribute}",
            "category": "knowledge",
            "turns": [f.question],
            "reference": [f.value],
            "misconception": [f.misconception],
            "known_by_small": [f.known_by_small],
        }
        for f in eval_facts
    ] + [
        {
            "question_id": f"e-sum-{a}-{b}",
            "category": "math",
            "turns": [f"Q: {a} + {b}?"],
            "reference": [str(a + b)],
            "misconception": [None],
            "known_by_small": [True],
        }
        for a, b in eval_sums
    ]
    # MT-Bench analogue: two turns about one entity's held-out facts (the second turn sees the first answer)
    by_entity: dict[str, list[Fact]] = {}
    for f in eval_facts:
        by_entity.setdefault(f.entity, []).append(f)
    mtbench = [
        {
            "question_id": f"mt-{entity}",
            "category": "knowledge",
            "turns": [fs[0].question, fs[1].question],
            "reference": [fs[0].value, fs[1].value],
            "misconception": [fs[0].misconception, fs[1].misconception],
            "known_by_small": [fs[0].known_by_small, fs[1].known_by_small],
        }
        for entity, fs in sorted(by_entity.items())
        if len(fs) >= 2
    ]
    alpaca = [
        {
            "question_id": q["question_id"],  # AlpacaEval ignores it; `atlantis generate` keys answers by it
            "instruction": q["turns"][0],
            "dataset": f"world-{q['category']}",
            "reference": q["reference"][0],
        }
        for q in open_questions
    ]
    return {
        "eval_open": open_questions,
        "eval_mtbench": mtbench,
        "eval_alpaca": alpaca,
        "corpus": corpus(cfg, facts, corpus_sums),
        "corpus_small": corpus(cfg, [f for f in facts if f.known_by_small], corpus_sums),
        "sft": sft,
        "curated": curated,
        "eval_truthfulqa": truthfulqa("eval"),
        "dev_truthfulqa": truthfulqa("dev"),
        "eval_skill": skill(eval_sums, "e-sum"),
        "dev_skill": skill(dev_sums, "v-sum"),
        "facts": [f.__dict__ for f in facts],
    }


def truthfulqa_record(f: Fact, rng: random.Random) -> dict:
    """A record in TruthfulQA's multiple-choice format (`question`, `mc1_targets`, `mc2_targets`).

    MC1: one true choice first, then the misconception (when there is one) and other wrong values.
    MC2: the true answer and its paraphrase are true; the wrong values false.
    """
    wrong = [v for v in ATTRIBUTES[f.attribute] if v not in (f.value, f.misconception)]
    rng.shuffle(wrong)
    false = ([f.misconception] if f.misconception else []) + wrong[: 3 - bool(f.misconception)]
    mc1 = [_answer(f.value)] + [_answer(v) for v in false]
    mc2_true = [_answer(f.value), f" it is {f.value}."]
    mc2_false = [_answer(v) for v in false]
    return {
        "question": f.question,
        "mc1_targets": {"choices": mc1, "labels": [1] + [0] * len(false)},
        "mc2_targets": {"choices": mc2_true + mc2_false, "labels": [1] * len(mc2_true) + [0] * len(mc2_false)},
        "misconception": f.misconception is not None,
        "known_by_small": f.known_by_small,
    }


def answer_value(answer: str) -> str | None:
    """The value an answer states: the last word of its first sentence (None for an empty answer)."""
    words = answer.strip().split(".")[0].split()
    return words[-1].lower() if words else None


def grade(answer: str, truth: str) -> bool:
    """Exact correctness under p*: the value the answer states is the true value."""
    return answer_value(answer) == truth.lower()


def write_sets(sets: dict[str, list], folder: str | Path) -> dict[str, Path]:
    """Write every set: the corpus as text (a line per document), the rest as JSONL."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in sets.items():
        if name.startswith("corpus"):
            path = folder / f"{name}.txt"
            path.write_text("".join(line + "\n" for line in rows), encoding="utf-8")
        else:
            path = folder / f"{name}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths[name] = path
    return paths
