"""The tiny world's models, metrics and experiment: grading by hand, a reduced end-to-end run, rebuilds."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from atlantis.stats import paired_ci
from atlantis.world import metrics
from atlantis.world.build import BuildConfig, build, checksums, compare
from atlantis.world.data import WorldConfig
from atlantis.world.experiment import ExperimentConfig, run
from atlantis.world.models import QA_TEMPLATE, TEMPLATE_PATH, PretrainConfig

TINY = WorldConfig(n_entities=16, sft_sums=30, eval_sums=10, sum_max=9, sft_per_fact=4)


def _build(root, families=("lumi",)):
    return build(
        BuildConfig(
            out=str(root),
            world=TINY,
            pretrain=PretrainConfig(epochs=2, batch_size=32, warmup_steps=2),
            families=list(families),
            sizes=["small", "large"],
        )
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    _build(root, families=("lumi", "quen"))
    return root


@pytest.mark.parametrize(
    ("answer", "truth", "wrong", "rating"),
    [
        (" blue.", "blue", "navy", 10),
        ("blue", "blue", "navy", 7),
        (" it is blue.", "blue", None, 7),
        (" navy.", "blue", "navy", 2),
        (" red.", "blue", "navy", 1),
        ("", "blue", None, 1),
        (" 42.", "42", None, 10),
    ],
)
def test_judge_rating(answer, truth, wrong, rating):
    assert metrics.judge_rating(answer, truth, wrong) == rating


def test_judge_pair():
    assert metrics.judge_pair(" blue.", " navy.", "blue", "navy") == "A"
    assert metrics.judge_pair(" red.", " navy.", "blue", "navy") == "B"  # a misconception beats nonsense
    assert metrics.judge_pair(" red.", " green.", "blue", "navy") == "tie"


def test_mc_scores_match_hand_computation():
    # MC1: true choice first; MC2: mass of the true choices over all choices
    mc1, mc2 = metrics.mc_scores([-1.0, -2.0, -0.5], [np.log(0.2), np.log(0.1), np.log(0.3)], [1, 1, 0])
    assert mc1 == 0.0 and mc2 == pytest.approx(0.3 / 0.6)
    mc1, _ = metrics.mc_scores([-0.1, -2.0], [0.0, 0.0], [1, 0])
    assert mc1 == 1.0
    # far-below-zero log-likelihoods (long answers) must not underflow
    assert metrics.mc_scores([-900.0, -901.0], [-900.0, -901.0], [1, 0])[1] == pytest.approx(1 / (1 + np.exp(-1)))


def test_paired_ci():
    mean, lo, hi = paired_ci(np.array([0.1, 0.2, 0.3]))
    half = 4.303 * 0.1 / math.sqrt(3)
    assert mean == pytest.approx(0.2) and lo == pytest.approx(0.2 - half) and hi == pytest.approx(0.2 + half)
    assert math.isnan(paired_ci(np.array([0.1]))[1])


def test_template_file_is_the_template():
    assert TEMPLATE_PATH.read_text() == QA_TEMPLATE


def test_built_models_are_hub_checkpoints(world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = json.loads((world / "manifest.json").read_text())
    for name in ("lumi-small", "lumi-large", "lumi-small-ref", "quen-small", "quen-large", "quen-small-ref"):
        folder = world / "models" / name
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
        tok = AutoTokenizer.from_pretrained(folder)
        AutoModelForCausalLM.from_pretrained(folder)
        assert (tok.chat_template is not None) == name.endswith("-ref")
        assert manifest["sha256"][f"models/{name}/model.safetensors"]
    lumi = json.loads((world / "models" / "lumi-small" / "config.json").read_text())
    quen = json.loads((world / "models" / "quen-small" / "config.json").read_text())
    assert lumi["model_type"] == "llama" and quen["model_type"] == "qwen2"
    assert lumi["vocab_size"] != quen["vocab_size"]
    assert manifest["models"]["lumi-large"]["params"] > 3 * manifest["models"]["lumi-small"]["params"]


def test_rebuild_is_bit_identical(world, tmp_path):
    manifest = _build(tmp_path)
    want = {k: v for k, v in json.loads((world / "manifest.json").read_text())["sha256"].items() if "quen" not in k}
    compare(manifest["sha256"], want)
    with pytest.raises(RuntimeError, match="differs"):
        compare(checksums(tmp_path), {**want, "models/lumi-small/model.safetensors": "0" * 64})


def test_reduced_experiment_produces_every_metric(world, tmp_path):
    cfg = ExperimentConfig(
        world=str(world),
        out=str(tmp_path),
        seeds=[0],
        arms=["sft", "atlantis", "control_ref_d", "control_permuted", "algorithm1_mean", "eq7_sum", "oracle"],
    )
    cfg.finetune.max_steps = 3
    runs = run(cfg)
    assert set(runs["arm"]) == set(cfg.arms) | {"p_S", "p_r", "p_r(D)", "p_L"}
    for metric in metrics.METRICS:
        assert np.isfinite(runs[metric].to_numpy(dtype=float)).all(), metric
    assert (runs["mc2"].between(0, 1)).all() and (runs["judge"].between(1, 10)).all()
    table = (tmp_path / "experiment-lumi-large.md").read_text()
    assert "| atlantis |" in table and "ESS/N" in table and "proportional-change" in table
    summary = pd.read_csv(tmp_path / "experiment-lumi-large-summary.csv")
    assert set(summary["metric"]) == set(metrics.METRICS)
    # the same ids got the same weights, permuted: same distribution, other assignment
    work = tmp_path / "work" / "lumi-large" / "weights"
    a = pd.read_parquet(work / "atlantis.parquet")
    p = pd.read_parquet(work / "control_permuted-seed0.parquet")
    assert sorted(a["weight"]) == pytest.approx(sorted(p["weight"])) and list(a["id"]) == list(p["id"])
    assert not np.allclose(a["weight"], p["weight"])
    # resuming does no work twice; other fine-tuning settings are refused, not mixed in
    again = run(cfg)
    assert len(again) == len(runs)
    cfg.finetune.learning_rate = 1e-3
    with pytest.raises(ValueError, match="other fine-tuning settings"):
        run(cfg)


def test_oracle_weights_are_p_star_over_p_d(world):
    from atlantis.world.experiment import oracle_weights, sample_categories

    df = oracle_weights(world).set_index("id").join(sample_categories(world))
    assert df["weight"].mean() == pytest.approx(1.0)
    by = df.groupby("category")["weight"]
    assert by.max()["misconception"] == 0 and by.max()["random wrong value"] == 0 and by.max()["sum wrong"] == 0
    # p*/p_d: 1/0.3 for the truth on a misconception fact, 1/0.8 for the truth on a normal fact or a sum
    assert by.min()["true (misconception fact)"] / by.min()["true (normal fact)"] == pytest.approx(0.8 / 0.3)
    assert by.min()["sum correct"] == pytest.approx(by.max()["true (normal fact)"])


def test_auc():
    from atlantis.world.experiment import auc

    assert auc(np.array([2.0, 3.0]), np.array([1.0])) == 1.0
    assert auc(np.array([1.0]), np.array([1.0])) == 0.5
    assert auc(np.array([0.0, 2.0]), np.array([1.0])) == 0.5
    with pytest.raises(ValueError):
        auc(np.array([1.0]), np.array([]))


SHIPPED = __import__("pathlib").Path(__file__).parents[1] / "results" / "tiny" / "world"


@pytest.mark.skipif(not (SHIPPED / "manifest.json").is_file(), reason="no shipped world")
def test_shipped_world_matches_its_manifest():
    """Every shipped file (data and weights) is the one `atlantis world build` recorded."""
    from atlantis.world.data import build_sets

    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    compare(checksums(SHIPPED), manifest["sha256"])
    assert set(checksums(SHIPPED)) == set(manifest["sha256"])
    # the shipped data is what the generator makes from the recorded config
    sets = build_sets(WorldConfig(**manifest["config"]["world"]))
    assert (SHIPPED / "data" / "sft.jsonl").read_text().splitlines() == [json.dumps(r) for r in sets["sft"]]


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "manifest.json").is_file(), reason="no shipped world")
def test_reduced_experiment_on_the_shipped_world(tmp_path):
    """CI's reduced run of the default experiment: one seed, a few steps, every output present and finite."""
    cfg = ExperimentConfig(world=str(SHIPPED), out=str(tmp_path), seeds=[0], arms=["sft", "atlantis", "oracle"])
    cfg.finetune.max_steps = 20
    runs = run(cfg)
    assert len(runs) == 3 + 4
    assert np.isfinite(runs[list(metrics.METRICS)].to_numpy(dtype=float)).all()
    # the fixed models: the large base knows more than the small ones
    fixed = runs.set_index("arm")
    assert fixed.loc["p_L", "truth_em_unseen"] > fixed.loc["p_S", "truth_em_unseen"]
    # real generations reach the judge whole (an answer, its full stop, EOS), so a 10 is possible
    answers = tmp_path / "work" / "lumi-large" / "answers" / "p_L" / "eval_open.jsonl"
    texts = [t for line in answers.read_text().splitlines() for t in json.loads(line)["choices"][0]["turns"]]
    assert sum(metrics.well_formed(t) for t in texts) > len(texts) / 2


def test_experiment_config_is_checked():
    with pytest.raises(ValueError, match="include atlantis"):
        ExperimentConfig(arms=["sft", "control_permuted"])
    with pytest.raises(ValueError, match="unknown arms"):
        ExperimentConfig(arms=["sft", "nope"])
    with pytest.raises(ValueError, match="include sft"):
        ExperimentConfig(arms=["atlantis"])


@pytest.mark.skipif(not (SHIPPED / "manifest.json").is_file(), reason="no shipped world")
def test_proxy_logliks_are_comparable_with_a_models():
    """The decoder path (proxy-tuning, Table 7) scores exactly what the one-model path scores: with p_r = p_S the
    proxy s_L + (s_r − s_S) is p_L itself, and a single model's decoder equals `continuation_logliks`."""
    import torch

    from atlantis.models import load_model, load_tokenizer
    from atlantis.proxy import ProxyModel, SingleModel

    tqa = [json.loads(x) for x in (SHIPPED / "data" / "eval_truthfulqa.jsonl").read_text().splitlines()[:3]]
    pairs = [(r["question"], c) for r in tqa for c in r["mc1_targets"]["choices"]]
    large, small = (SHIPPED / "models" / n for n in ("lumi-large", "lumi-small"))
    tok = load_tokenizer(str(large))
    lm = load_model(str(large), torch.float32, torch.device("cpu")).eval()
    sm = load_model(str(small), torch.float32, torch.device("cpu")).eval()
    template = str(TEMPLATE_PATH)
    reference = metrics.continuation_logliks(lm, tok, template, pairs)
    single = metrics.decoder_logliks(SingleModel(lm, tok, template=template), pairs)
    proxy = metrics.decoder_logliks(ProxyModel(lm, sm, sm, tok, template=template), pairs)
    assert single == pytest.approx(reference, abs=1e-4)
    assert proxy == pytest.approx(reference, abs=1e-4)
    # and a real proxy (p_r = the tuned reference) moves them
    ref = load_model(str(SHIPPED / "models" / "lumi-small-ref"), torch.float32, torch.device("cpu")).eval()
    moved = metrics.decoder_logliks(ProxyModel(lm, sm, ref, tok, template=template), pairs)
    assert np.abs(np.asarray(moved) - np.asarray(reference)).max() > 0.1


def test_evaluate_config_needs_both_proxy_models():
    with pytest.raises(ValueError, match="both proxy_small and proxy_ref"):
        metrics.EvaluateConfig(model="m", out="o", proxy_small="s")
