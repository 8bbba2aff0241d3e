"""p*-metrics of a model in the tiny world, and the world judge's grading policy.

p*(y|x) is a point mass on the true answer (the world is deterministic), so for a held-out question the
KL divergence KL(p* || p_θ) equals the NLL −log p_θ(y*|x): the paper's unmeasurable target, measured.

Every metric reads only held-out sets (`eval_*`): facts seen in pre-training text but never asked in any
fine-tuning set, and sums seen nowhere.

- ``kl_*``: mean −log p_θ(y*|x) (nats per answer) on misconception facts, normal facts and sums;
- ``mc1`` / ``mc2``: TruthfulQA's multiple-choice scores from summed continuation log-likelihoods, computed as
  lm-eval's ``truthfulqa_mc1``/``truthfulqa_mc2`` do (MC1: the true choice has the highest log-likelihood;
  MC2: normalised probability mass on the true choices);
- ``truth_em`` / ``truth_em_mis`` / ``truth_em_unseen``: greedy answers graded exactly, on all facts, on
  misconception facts, and on facts absent from the small models' corpus (weak-to-strong: p_r cannot know them);
- ``skill_acc``: greedy sums graded exactly;
- ``judge``: mean world-judge rating (1–10) over the MT-Bench-style two-turn questions.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from atlantis import provenance
from atlantis.config import field
from atlantis.data import Sample, Turn, read_jsonl
from atlantis.log import get_logger
from atlantis.world.data import answer_value, grade

log = get_logger(__name__)

METRICS = {
    "kl_mis": ("KL(p*‖p) misconception facts", "lower"),
    "kl_normal": ("KL(p*‖p) normal facts", "lower"),
    "kl_skill": ("KL(p*‖p) sums", "lower"),
    "mc1": ("TruthfulQA-format MC1", "higher"),
    "mc2": ("TruthfulQA-format MC2", "higher"),
    "truth_em": ("exact answers, all facts", "higher"),
    "truth_em_mis": ("exact answers, misconception facts", "higher"),
    "truth_em_unseen": ("exact answers, facts p_S never saw", "higher"),
    "skill_acc": ("sum accuracy", "higher"),
    "judge": ("judge rating (1-10), two-turn", "higher"),
}


# ------------------------------------------------------------------------------------ grading policy


def well_formed(answer: str) -> bool:
    """The world's answer format: one word or number, then a full stop, nothing else."""
    text = answer.strip()
    return text.endswith(".") and len(text[:-1].split()) == 1


def judge_rating(answer: str, truth: str, misconception: str | None = None) -> int:
    """The world judge's 1–10 rating of one answer (MT-Bench single-answer grading's scale).

    10: the true value in the world's format; 7: the true value, sloppily formatted; 2: the popular
    misconception (confidently wrong); 1: anything else.
    """
    value = answer_value(answer)
    if value == truth.lower():
        return 10 if well_formed(answer) else 7
    if misconception is not None and value == misconception.lower():
        return 2
    return 1


def judge_pair(answer_a: str, answer_b: str, truth: str, misconception: str | None = None) -> str:
    """Pairwise verdict from ratings: "A", "B" or "tie" (MT-Bench pairwise, AlpacaEval, Arena-Hard)."""
    ra, rb = judge_rating(answer_a, truth, misconception), judge_rating(answer_b, truth, misconception)
    return "A" if ra > rb else "B" if rb > ra else "tie"


def mc_scores(loglik_mc1: list[float], loglik_mc2: list[float], labels_mc2: list[int]) -> tuple[float, float]:
    """(MC1, MC2) of one TruthfulQA record from its choices' log-likelihoods (lm-eval's definitions).

    MC1: 1 when the first (true) choice has the highest log-likelihood. MC2: the probability mass of the true
    choices, normalised over all choices.
    """
    mc1 = float(int(np.argmax(loglik_mc1)) == 0)
    ll = np.asarray(loglik_mc2, dtype=np.float64)
    p = np.exp(ll - ll.max())  # shifted: very unlikely choices must not underflow to 0/0
    true = np.asarray(labels_mc2) == 1
    mc2 = float(p[true].sum() / p.sum())
    return mc1, mc2


# ------------------------------------------------------------------------------------------ scoring


@torch.no_grad()
def continuation_logliks(model, tokenizer, template: str, pairs: list[tuple[str, str]], batch: int = 64) -> list[float]:
    """Σ log p(answer tokens | question) under the world's chat format, for each (question, answer)."""
    from atlantis.render import RenderConfig, Renderer
    from atlantis.scoring import collate, response_logprobs

    samples = [
        Sample(f"p{i}", (Turn("user", q), Turn("assistant", a)), source=f"pair {i}") for i, (q, a) in enumerate(pairs)
    ]
    rendered, excluded = Renderer(tokenizer, RenderConfig(template=template)).render(samples)
    if excluded:
        raise ValueError(f"{len(excluded)} evaluation pair(s) could not be rendered: {excluded[:3]}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = np.zeros(len(rendered))
    device = next(model.parameters()).device
    for s in range(0, len(rendered), batch):
        chunk = rendered[s : s + batch]
        sums, _ = response_logprobs(model, *collate(chunk, pad, device))
        out[s : s + len(chunk)] = sums.cpu().numpy()
    return out.tolist()


def decoder_logliks(decoder, pairs: list[tuple[str, str]], batch: int = 64) -> list[float]:
    """Σ log p(answer | question) under any `LogitDecoder` (a proxy-tuned model, Eq. 9), lm-eval's tokenisation.

    For one model this equals `continuation_logliks` (tested), so a proxy's metrics compare with a model's.
    """
    by_question: dict[str, list[int]] = {}
    for i, (q, _) in enumerate(pairs):
        by_question.setdefault(q, []).append(i)
    out = np.zeros(len(pairs))
    for q, rows in by_question.items():
        conts = decoder.continuation_logprobs(
            [{"role": "user", "content": q}], [pairs[i][1] for i in rows], batch_size=batch
        )
        out[rows] = [c.total for c in conts]
    return out.tolist()


def evaluate(
    model_dir: str | Path,
    world_dir: str | Path,
    template: str,
    answers_dir: str | Path,
    proxy: tuple[str, str] | None = None,
    model_id: str | None = None,
) -> dict:
    """Every p*-metric of one model; greedy answers are written with `atlantis generate` to `answers_dir`.

    proxy=(small, ref): evaluate the proxy-tuned `model_dir` instead, s_L + (s_r − s_S) (paper Eq. 9, Table 7).
    """
    from atlantis.generate import GenerateConfig, generate
    from atlantis.models import load_model, load_tokenizer
    from atlantis.proxy import ProxyModel, SingleModel

    world = Path(world_dir) / "data"
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), torch.float32, torch.device("cpu"))
    model.eval()
    if proxy is None:
        decoder = SingleModel(model, tokenizer, template=template)

        def logliks(pairs):
            return continuation_logliks(model, tokenizer, template, pairs)

    else:
        small, ref = (load_model(p, torch.float32, torch.device("cpu")).eval() for p in proxy)
        toks = {"large": tokenizer, "small": load_tokenizer(proxy[0]), "ref": load_tokenizer(proxy[1])}
        decoder = ProxyModel(model, small, ref, toks, template=template)

        def logliks(pairs):
            return decoder_logliks(decoder, pairs)

    tqa = read_jsonl(world / "eval_truthfulqa.jsonl")
    skill = read_jsonl(world / "eval_skill.jsonl")

    # KL(p*‖p) = −log p(y*|x): the true answer of each held-out question
    truths = [(r["question"], r["mc1_targets"]["choices"][0]) for r in tqa]
    kl_facts = -np.asarray(logliks(truths))
    mis = np.asarray([r["misconception"] for r in tqa])
    kl_skill = -np.asarray(logliks([(r["question"], f" {r['answer']}.") for r in skill]))

    # MC1/MC2: every choice of every record in one pass
    pairs, spans = [], []
    for r in tqa:
        for key in ("mc1_targets", "mc2_targets"):
            start = len(pairs)
            pairs += [(r["question"], c) for c in r[key]["choices"]]
            spans.append((start, len(pairs)))
    ll = logliks(pairs)
    mc = [
        mc_scores(ll[slice(*spans[2 * i])], ll[slice(*spans[2 * i + 1])], r["mc2_targets"]["labels"])
        for i, r in enumerate(tqa)
    ]

    # Greedy answers through the real generation path (FastChat answer files), graded by the world judge
    answers_dir = Path(answers_dir)
    results: dict[str, list] = {}
    for name in ("eval_open", "eval_mtbench"):
        out = answers_dir / f"{name}.jsonl"
        cfg = GenerateConfig(
            model=str(model_dir),
            questions=str(world / f"{name}.jsonl"),
            out=str(out),
            template=template,
            temperature=0.0,
            max_new_tokens=8,  # an answer is a word or a number, a full stop and EOS
            batch_size=64,
            overwrite=True,
            model_id=model_id,
        )
        generate(cfg, decoder=decoder)
        by_id = {str(a["question_id"]): a for a in read_jsonl(out)}
        results[name] = [(q, by_id[str(q["question_id"])]) for q in read_jsonl(world / f"{name}.jsonl")]

    def turns(answer: dict) -> list[str]:
        return answer["choices"][0]["turns"]

    open_facts = [(q, a) for q, a in results["eval_open"] if q["category"] == "knowledge"]
    open_sums = [(q, a) for q, a in results["eval_open"] if q["category"] == "math"]
    em = np.asarray([grade(turns(a)[0], q["reference"][0]) for q, a in open_facts], dtype=float)
    em_mis = np.asarray([q["misconception"][0] is not None for q, _ in open_facts])
    em_unseen = np.asarray([not q["known_by_small"][0] for q, _ in open_facts])
    ratings = [
        judge_rating(answer, truth, wrong)
        for q, a in results["eval_mtbench"]
        for answer, truth, wrong in zip(turns(a), q["reference"], q["misconception"])
    ]
    metrics = {
        "kl_mis": float(kl_facts[mis].mean()),
        "kl_normal": float(kl_facts[~mis].mean()),
        "kl_skill": float(kl_skill.mean()),
        "mc1": float(np.mean([m[0] for m in mc])),
        "mc2": float(np.mean([m[1] for m in mc])),
        "truth_em": float(em.mean()),
        "truth_em_mis": float(em[em_mis].mean()),
        # undefined (NaN) in a world whose small models see every fact (`small_known=1`, the map's no-gap cell)
        "truth_em_unseen": float(em[em_unseen].mean()) if em_unseen.any() else math.nan,
        "skill_acc": float(np.mean([grade(turns(a)[0], q["reference"][0]) for q, a in open_sums])),
        "judge": float(np.mean(ratings)),
    }
    bad = [k for k, v in metrics.items() if not math.isfinite(v) and (k != "truth_em_unseen" or em_unseen.any())]
    if bad:
        raise ValueError(f"{model_dir}: non-finite metrics {bad}")
    return metrics


@dataclass
class EvaluateConfig:
    model: str = field(help="Model folder to evaluate (a fine-tuned run's `final`, or any world model).")
    out: str = field(help="Output JSON: the model and its p*-metrics.")
    world: str = field("results/tiny/world", help="World folder from `atlantis world build`.")
    template: str | None = field(None, help="Chat template (.jinja); None: the world's question/answer format.")
    proxy_small: str | None = field(None, help="Proxy-tuning (Eq. 9, Table 7): the small base model p_S.")
    proxy_ref: str | None = field(None, help="Proxy-tuning: the reference model p_r (p_S fine-tuned).")
    answers: str | None = field(
        None, help="Folder for the greedy answers (eval_open.jsonl, eval_mtbench.jsonl); default <out>.answers."
    )
    model_id: str | None = field(None, help="model_id written in the answers (FastChat's name); default: the folder's.")

    def __post_init__(self):
        if (self.proxy_small is None) != (self.proxy_ref is None):
            raise ValueError("proxy-tuning needs both proxy_small and proxy_ref (or neither)")


def evaluate_to_file(cfg: EvaluateConfig) -> Path:
    """`atlantis world evaluate`: every p*-metric of one model, as JSON (answers beside it)."""
    from atlantis.world.models import TEMPLATE_PATH

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    answers = Path(cfg.answers) if cfg.answers else out.with_name(out.name.removesuffix(".json") + ".answers")
    proxy = (cfg.proxy_small, cfg.proxy_ref) if cfg.proxy_small else None
    result = evaluate(
        cfg.model, cfg.world, cfg.template or str(TEMPLATE_PATH), answers, proxy=proxy, model_id=cfg.model_id
    )
    record = {"model": cfg.model, "metrics": result}
    if proxy:
        record["proxy"] = {"small": proxy[0], "ref": proxy[1], "alpha": 1.0}
    record["provenance"] = provenance.of_model(cfg.model)
    out.write_text(json.dumps(record, indent=1) + "\n")
    log.info("wrote %s", out)
    return out
