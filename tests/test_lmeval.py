"""lm-evaluation-harness path: the world's TruthfulQA/sums through lm-eval, the proxy model, leaderboard numbers.

Runs offline on the shipped tiny world (results/tiny/world); every lm-eval run is limited to a few documents.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

from atlantis.data import read_jsonl  # noqa: E402
from atlantis.evals.lmeval import (  # noqa: E402
    BBH_CHOICES,
    LEADERBOARD,
    MUSR_CHOICES,
    LmEvalConfig,
    ProxyLM,
    leaderboard_scores,
    metrics_from_results,
    normalize_within_range,
    resolve_tasks,
    run,
    world_task_configs,
)
from atlantis.world.data import grade  # noqa: E402
from atlantis.world.metrics import continuation_logliks, mc_scores  # noqa: E402
from atlantis.world.models import TEMPLATE_PATH  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORLD = ROOT / "results" / "tiny" / "world"
MODELS = WORLD / "models"
LARGE, SMALL, REF = (str(MODELS / m) for m in ("lumi-large", "lumi-small", "lumi-small-ref"))
N_DOCS = 4

pytestmark = pytest.mark.skipif(not (MODELS / "lumi-small-ref").is_dir(), reason="the tiny world is not built")


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager()


@pytest.fixture(scope="module")
def large():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(LARGE, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(LARGE)


@torch.no_grad()
def _hand_loglik(model, tok, context: str, continuation: str) -> float:
    """Σ log p(continuation | context), tokenised and left-truncated to the context window as lm-eval's hf model
    does (trailing context spaces join the continuation; the window keeps the last max_length + 1 tokens)."""
    window = model.config.max_position_embeddings
    ctx = tok(context)["input_ids"]
    cont = tok(context + continuation)["input_ids"][len(ctx) :]
    whole = (ctx + cont)[-(window + 1) :]
    logits = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
    positions = range(len(whole) - 1 - len(cont), len(whole) - 1)
    return float(sum(logits[p, t] for p, t in zip(positions, cont)))


def test_world_truthfulqa_is_lm_evals_task_on_world_data(task_manager, large, tmp_path):
    """MC1/MC2 from lm-eval's own truthfulqa tasks equal a hand computation from the model's log-likelihoods."""
    model, tok = large
    out = tmp_path / "tqa.json"
    tasks = ["world_truthfulqa_mc1", "world_truthfulqa_mc2"]
    cfg = LmEvalConfig(out=str(out), model=LARGE, world=str(WORLD), tasks=tasks, limit=N_DOCS, log_samples=True)
    record = run(cfg, task_manager=task_manager)

    # the installed definition, reused (not copied): its prompt and its MC2 scorer
    installed = load_yaml(task_manager.task_index["truthfulqa_mc2"].yaml_path, resolve_func=True)
    tasks = task_manager.load(world_task_configs(WORLD, task_manager))["tasks"]
    mc1_task, mc2_task = tasks["world_truthfulqa_mc1"], tasks["world_truthfulqa_mc2"]
    assert mc2_task.config.doc_to_text == installed["doc_to_text"]
    assert mc2_task.config.process_results is installed["process_results"]

    samples = {(r["task"], r["doc_id"]): r for r in map(json.loads, out.with_name("tqa.samples.jsonl").open())}
    mc = []
    for i, raw in enumerate(read_jsonl(WORLD / "data" / "eval_truthfulqa.jsonl")[:N_DOCS]):
        doc = mc1_task.test_docs()[i]
        question = raw["question"].removeprefix("Q: ")
        context = mc1_task.doc_to_text(doc)
        assert context.startswith("Q: What is human life expectancy in the United States?")
        assert context.endswith(f"\n\nQ: {question}\nA:")
        ll = {}
        for key, task in (("mc1_targets", "world_truthfulqa_mc1"), ("mc2_targets", "world_truthfulqa_mc2")):
            ll[key] = [_hand_loglik(model, tok, context, " " + c.strip()) for c in raw[key]["choices"]]
            harness = [resp[0][0] for resp in samples[(task, i)]["resps"]]
            assert harness == pytest.approx(ll[key], abs=1e-4)
        mc.append(mc_scores(ll["mc1_targets"], ll["mc2_targets"], raw["mc2_targets"]["labels"]))

    metrics = record["metrics"]
    assert set(metrics) == {"truthfulqa_mc1_lm_eval_prompt", "truthfulqa_mc2_lm_eval_prompt"}
    assert metrics["truthfulqa_mc1_lm_eval_prompt"] == pytest.approx(100 * sum(m[0] for m in mc) / N_DOCS)
    assert metrics["truthfulqa_mc2_lm_eval_prompt"] == pytest.approx(100 * sum(m[1] for m in mc) / N_DOCS, abs=1e-6)
    saved = json.loads(out.read_text())
    assert saved["metrics"] == metrics and saved["model"] == LARGE
    assert saved["lm_eval"]["configs"]["world_truthfulqa_mc1"]["metadata"]["reuses"].endswith("truthfulqa_mc1.yaml")
    assert "samples" not in saved["lm_eval"]


def test_world_truthfulqa_qa_reproduces_the_worlds_own_mc_scores(task_manager, large, tmp_path):
    """The _qa tasks (lm-eval's TruthfulQA metrics, the world's prompt) give the world evaluator's MC1/MC2:
    `mc_scores` on `continuation_logliks` under qa.jinja, same model, same documents."""
    model, tok = large
    out = tmp_path / "qa.json"
    tasks = ["world_truthfulqa_mc1_qa", "world_truthfulqa_mc2_qa"]
    cfg = LmEvalConfig(out=str(out), model=LARGE, world=str(WORLD), tasks=tasks, limit=N_DOCS, log_samples=True)
    record = run(cfg, task_manager=task_manager)

    # lm-eval's installed metric code, reused: the gold index, `acc` and MC2's process_results; only the prompt differs
    installed = {n: load_yaml(task_manager.task_index[n].yaml_path, resolve_func=True) for n in tasks_of(tasks)}
    loaded = task_manager.load(world_task_configs(WORLD, task_manager))["tasks"]
    for name, base in zip(tasks, installed.values()):
        task = loaded[name]
        assert task.config.doc_to_target == base["doc_to_target"] == 0
        assert task.config.doc_to_choice == base["doc_to_choice"] and task.config.metric_list == base["metric_list"]
        assert task.config.num_fewshot == 0 and task.config.target_delimiter == ""
    assert loaded["world_truthfulqa_mc2_qa"].config.process_results is installed["truthfulqa_mc2"]["process_results"]
    assert loaded["world_truthfulqa_mc1_qa"].config.process_results is None  # lm-eval's own `acc` for MC1

    raw = read_jsonl(WORLD / "data" / "eval_truthfulqa.jsonl")[:N_DOCS]
    samples = {(r["task"], r["doc_id"]): r for r in map(json.loads, out.with_name("qa.samples.jsonl").open())}
    template = str(TEMPLATE_PATH)  # atlantis/world/qa.jinja, as `atlantis world evaluate` passes it
    mc = []
    for i, r in enumerate(raw):
        ll = {}
        for key, name in (("mc1_targets", tasks[0]), ("mc2_targets", tasks[1])):
            ll[key] = continuation_logliks(model, tok, template, [(r["question"], c) for c in r[key]["choices"]])
            sample = samples[(name, i)]
            assert [a[0] for a in sample["arguments"]] == [r["question"]] * len(r[key]["choices"])  # no primer
            assert [a[1] for a in sample["arguments"]] == r[key]["choices"]  # " blue.", as stored
            assert [resp[0][0] for resp in sample["resps"]] == pytest.approx(ll[key], abs=1e-4)
        mc.append(mc_scores(ll["mc1_targets"], ll["mc2_targets"], r["mc2_targets"]["labels"]))

    metrics = record["metrics"]
    assert set(metrics) == {"truthfulqa_mc1", "truthfulqa_mc2"}  # the table's columns
    assert metrics["truthfulqa_mc1"] == pytest.approx(100 * sum(m[0] for m in mc) / N_DOCS, abs=1e-4)
    assert metrics["truthfulqa_mc2"] == pytest.approx(100 * sum(m[1] for m in mc) / N_DOCS, abs=1e-4)
    assert resolve_tasks(["world"], WORLD, task_manager)[2]["task"] == "world_truthfulqa_mc1_qa"


def tasks_of(names: list[str]) -> list[str]:
    """lm-eval's task each world _qa task reuses."""
    return [n.removeprefix("world_").removesuffix("_qa") for n in names]


def test_world_sums_exact_match(task_manager, large, tmp_path):
    """The sums task asks the world's question text and grades with the world's policy; EM matches greedy HF."""
    model, tok = large
    cfg = LmEvalConfig(out=str(tmp_path / "sums.json"), model=LARGE, world=str(WORLD), tasks=["world_sums"], limit=6)
    em = run(cfg, task_manager=task_manager)["metrics"]["world_sums"]
    assert math.isfinite(em) and 0 <= em <= 100

    hits = []
    for row in read_jsonl(WORLD / "data" / "eval_skill.jsonl")[:6]:
        ids = tok(row["question"], return_tensors="pt")["input_ids"]
        gen = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
        text = tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).split("\n")[0]
        hits.append(grade(text, row["answer"]))
    assert em == pytest.approx(100 * sum(hits) / len(hits))


def _requests(task_manager) -> list[Instance]:
    tasks = task_manager.load(world_task_configs(WORLD, task_manager))["tasks"]
    task = tasks["world_truthfulqa_mc2"]
    doc = task.test_docs()[0]
    long_context = task.doc_to_text(doc)  # ~500 tokens: exercises the left truncation to the 128-token window
    pairs = [(long_context, " " + c) for c in doc["mc2_targets"]["choices"]]
    pairs += [("Q: 30 + 45?", " 75."), ("Q: 30 + 45?", " 74."), ("", "W: 4 + 6? 10.")]
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


def test_proxy_model_equals_large_model_when_it_shifts_nothing(task_manager):
    """small == ref (or alpha = 0): Eq. 9 reduces to the large model; lm-eval's hf model is the reference."""
    assert get_model("atlantis-proxy") is ProxyLM and get_model("hf").__name__ == "HFLM"
    hf = get_model("hf")(pretrained=LARGE, dtype="float32", device="cpu", batch_size=4)
    requests = _requests(task_manager)
    expected = hf.loglikelihood(requests)
    gen_requests = [
        Instance("generate_until", {}, (q, {"until": ["\n"], "do_sample": False, "max_gen_toks": 8}), i)
        for i, q in enumerate(["Q: 30 + 45?", "Q: 12 + 9?", "Q: fendra home?"])
    ]
    rolling = [Instance("loglikelihood_rolling", {}, ("W: 4 + 6? 10.\nW: 41 + 37? 78.",), 0)]
    for small, ref, alpha in ((SMALL, SMALL, 1.0), (SMALL, REF, 0.0)):
        proxy = get_model("atlantis-proxy")(large=LARGE, small=small, ref=ref, alpha=alpha, batch_size=4)
        got = proxy.loglikelihood(requests)
        assert [g for _, g in got] == [g for _, g in expected]
        assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in expected], abs=1e-4)
        assert proxy.generate_until(gen_requests) == hf.generate_until(gen_requests)
        assert proxy.loglikelihood_rolling(rolling) == pytest.approx(hf.loglikelihood_rolling(rolling), abs=1e-4)
    # a real shift changes the scores
    shifted = get_model("atlantis-proxy")(large=LARGE, small=SMALL, ref=REF, alpha=1.0).loglikelihood(requests)
    assert max(abs(a[0] - b[0]) for a, b in zip(shifted, expected)) > 1e-3


def test_leaderboard_normalisation_on_hand_numbers():
    # the HF doc's examples: GPQA 0.6 -> 46.67; MuSR (0.7, 0.4, 0.6) -> (40 + 25 + 40) / 3 = 35
    assert normalize_within_range(0.6, 0.25) == pytest.approx(46.6667, abs=1e-4)
    assert normalize_within_range(0.2, 0.25) == 0.0  # below the random baseline: 0, not negative
    results = {t: {} for t in LEADERBOARD}
    results["leaderboard_bbh"] = {"acc_norm,none": 0.9}
    for i, sub in enumerate(BBH_CHOICES):  # half the subtasks perfect (100), half at chance (0)
        results[f"leaderboard_bbh_{sub}"] = {"acc_norm,none": 1.0 if i % 2 else 1 / BBH_CHOICES[sub]}
    results["leaderboard_gpqa"] = {"acc_norm,none": 0.6}
    results["leaderboard_ifeval"] = {"prompt_level_strict_acc,none": 0.4, "inst_level_strict_acc,none": 0.6}
    results["leaderboard_math_hard"] = {"exact_match,none": 0.1}
    results["leaderboard_mmlu_pro"] = {"acc,none": 0.55}
    results["leaderboard_musr"] = {"acc_norm,none": 0.5}
    for sub, v in zip(MUSR_CHOICES, (0.7, 0.4, 0.6)):
        results[f"leaderboard_musr_{sub}"] = {"acc_norm,none": v}
    scores = leaderboard_scores(results)
    expected = {
        "leaderboard_bbh": 50.0,
        "leaderboard_gpqa": 46.6667,
        "leaderboard_ifeval": 50.0,
        "leaderboard_math_hard": 10.0,
        "leaderboard_mmlu_pro": 50.0,
        "leaderboard_musr": 35.0,
    }
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-3), name
    assert scores["open_llm_leaderboard_2"] == pytest.approx(sum(expected.values()) / 6, abs=1e-3)
    assert scores["open_llm_leaderboard_2_raw"] == pytest.approx((90 + 60 + 50 + 10 + 55 + 50) / 6)
    tqa = {"truthfulqa_mc1": {"acc,none": 0.25}, "world_truthfulqa_mc2_qa": {"acc,none": 0.5}}
    assert metrics_from_results({**results, **tqa})["truthfulqa_mc1"] == 25.0
    assert metrics_from_results(tqa) == {"truthfulqa_mc1": 25.0, "truthfulqa_mc2": 50.0}
    world = {f"world_truthfulqa_mc{k}{s}": {"acc,none": v} for k in (1, 2) for s, v in (("", 0.2), ("_qa", 0.8))}
    assert metrics_from_results(world) == pytest.approx(
        {"truthfulqa_mc1": 80.0, "truthfulqa_mc2": 80.0}
        | {"truthfulqa_mc1_lm_eval_prompt": 20.0, "truthfulqa_mc2_lm_eval_prompt": 20.0}
    )
    # the Hub task keeps the column; the world's _qa result then keeps its own name
    both = metrics_from_results({**tqa, "world_truthfulqa_mc1_qa": {"acc,none": 0.75}})
    assert both["truthfulqa_mc1"] == 25.0 and both["world_truthfulqa_mc1_qa"] == 75.0


def test_paper_tasks_resolve_offline(task_manager):
    """The paper profile names lm-eval's tasks; only names are checked (their data is on the Hub)."""
    assert resolve_tasks(["paper"], WORLD, task_manager) == ["truthfulqa_mc1", "truthfulqa_mc2", "leaderboard"]
    index = task_manager.task_index
    assert load_yaml(index["leaderboard"].yaml_path, resolve_func=False)["task"] == [
        "leaderboard_mmlu_pro",
        "leaderboard_bbh",
        "leaderboard_gpqa",
        "leaderboard_math_hard",
        "leaderboard_ifeval",
        "leaderboard_musr",
    ]
    for sub in MUSR_CHOICES:
        assert f"leaderboard_musr_{sub}" in index

    def leaves(name: str) -> list[str]:
        cfg = load_yaml(index[name].yaml_path, resolve_func=False)
        return [leaf for child in cfg["task"] for leaf in leaves(child)] if "group" in cfg else [name]

    paper = [leaf for name in ("truthfulqa_mc1", "truthfulqa_mc2", "leaderboard") for leaf in leaves(name)]
    assert len(paper) == 2 + 1 + 24 + 3 + 1 + 7 + 3  # TruthfulQA, MMLU-Pro, BBH, GPQA, IFEval, MATH, MuSR
    for name in paper:
        # every task's functions import (the `ifeval`/`math` extras are installed); IFEval's utils are left out:
        # importing them downloads NLTK's punkt_tab (network)
        if name != "leaderboard_ifeval":
            load_yaml(index[name].yaml_path, resolve_func=True)
    # the normalisation's BBH choice counts are those of the installed task definitions
    for sub, n in BBH_CHOICES.items():
        cfg = load_yaml(index[f"leaderboard_bbh_{sub}"].yaml_path, resolve_func=False)
        assert len(cfg["doc_to_choice"]) == n, sub
    with pytest.raises(ValueError, match="unknown lm-eval task"):
        resolve_tasks(["no_such_task"], WORLD, task_manager)


def test_config_checks(tmp_path):
    out = str(tmp_path / "x.json")
    with pytest.raises(ValueError, match="all three"):
        LmEvalConfig(out=out, proxy_large=LARGE, proxy_small=SMALL)
    with pytest.raises(ValueError, match="either model or"):
        LmEvalConfig(out=out, model=LARGE, proxy_large=LARGE, proxy_small=SMALL, proxy_ref=REF)
    with pytest.raises(ValueError, match="apply_chat_template"):
        LmEvalConfig(out=out, model=LARGE, fewshot_as_multiturn=True)
