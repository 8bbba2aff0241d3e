import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SAMPLES, torchrun, write_jsonl

import atlantis.scoring as scoring
from atlantis.data import DataConfig, load_samples
from atlantis.models import ModelError, load_model, load_tokenizer
from atlantis.render import RenderConfig, Renderer
from atlantis.scoring import ScoreConfig, ScoringError, response_logprobs, score
from atlantis.testing import build_tiny_model

# More samples of varied length so that batching, bucketing and sharding all happen.
MORE = [
    {
        "id": f"gen-{i}",
        "conversations": [
            {"from": "human", "value": "Count: " + " ".join(map(str, range(i)))},
            {"from": "gpt", "value": " ".join(["fox", "dog", "sea", "blue"][j % 4] for j in range(1 + 3 * i))},
        ],
    }
    for i in range(14)
]


@pytest.fixture()
def big_data(tmp_path):
    return write_jsonl(tmp_path / "big.jsonl", SAMPLES + MORE)


def naive_scores(model_dir, data, render=None):
    """Batch-1, full-vocabulary logits: the way Cherry_LLM/Superfiltering score (the reference)."""
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    rendered, _ = Renderer(tok, render or RenderConfig()).render(load_samples(DataConfig(path=str(data))))
    out = {}
    for r in rendered:
        ids = torch.tensor([r.input_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        tok_lp = logp.gather(1, ids[0, 1:, None])[:, 0]
        out[r.id] = float(tok_lp[torch.tensor(r.labels_mask[1:])].sum())
    return out


def run(model_dir, data, out, **kw):
    cfg = ScoreConfig(
        model=model_dir, role=kw.pop("role", "small"), out=str(out), data=DataConfig(path=str(data)), **kw
    )
    score(cfg)
    return pd.read_parquet(out)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("g") / "gemma2", "gemma2", seed=3))


@pytest.mark.parametrize("name", ["llama", "llama-it", "qwen2-it", "gemma2"])
def test_batched_chunked_scorer_equals_naive_batch1(models, gemma, big_data, tmp_path, name):
    model_dir = gemma if name == "gemma2" else models[name]
    got = run(
        model_dir,
        big_data,
        tmp_path / "s.parquet",
        head_chunk=5,
        max_tokens_per_batch=160,
        max_batch_size=4,
        shard_size=7,
    ).set_index("id")
    ref = naive_scores(model_dir, big_data)
    assert len(got) == len(ref) == len(SAMPLES) + len(MORE)
    for sid, value in ref.items():
        assert abs(got.loc[sid, "logp_sum_small"] - value) < 1e-5, (sid, got.loc[sid, "logp_sum_small"], value)
    np.testing.assert_allclose(got["logp_mean_small"], got["logp_sum_small"] / got["ntok_small"])
    assert (got["ntok_small"] > 0).all() and not got["truncated_small"].any()


def test_gemma_softcapping_is_applied(gemma, big_data):
    """The chunked path applies Gemma-2's final-logit soft-cap exactly as the model's own forward does."""
    tok = load_tokenizer(gemma)
    model = load_model(gemma, torch.float32, torch.device("cpu"))
    model.config.final_logit_softcapping = 0.5  # tight, so that the cap changes random logits a lot
    (r, *_), _ = Renderer(tok, RenderConfig()).render(load_samples(DataConfig(path=str(big_data))))
    ids = torch.tensor([r.input_ids])
    labels = torch.tensor([r.labels_mask])
    capped, _ = response_logprobs(model, ids, torch.ones_like(ids), labels, head_chunk=3)
    assert abs(float(capped[0]) - scoring.reference_logprob(model, r, torch.device("cpu"))) < 1e-5
    model.config.final_logit_softcapping = None
    uncapped, _ = response_logprobs(model, ids, torch.ones_like(ids), labels, head_chunk=3)
    assert abs(float(capped[0] - uncapped[0])) > 1e-2  # random logits are small: the cap still shows


def test_columns_keyed_by_id_and_report(models, big_data, tmp_path):
    df = run(models["qwen2"], big_data, tmp_path / "s.parquet", role="ref")
    assert list(df.columns) == [
        "id",
        "logp_sum_ref",
        "ntok_ref",
        "logp_mean_ref",
        "ntok_full_ref",
        "truncated_ref",
        "y_sha_ref",
    ]
    assert df["id"].is_monotonic_increasing and df["id"].is_unique
    report = json.loads((tmp_path / "s.report.json").read_text())
    assert report["n_scored"] == len(df) and report["template"] == "plain" and report["excluded"] == []
    assert not (tmp_path / "s.parquet.parts").exists()


def test_resume_after_interruption_gives_identical_output(models, big_data, tmp_path, monkeypatch):
    kw = dict(shard_size=3, max_tokens_per_batch=128)
    expected = run(models["llama-it"], big_data, tmp_path / "ref.parquet", **kw)

    real_write, calls = scoring._atomic_write_table, []

    def dying_write(table, path):
        calls.append(path)
        if len(calls) == 3:  # killed while writing the third shard: its temp file is left behind
            path.with_name(f".{path.name}.tmp-{os.getpid()}").write_bytes(b"partial")
            raise KeyboardInterrupt
        real_write(table, path)

    monkeypatch.setattr(scoring, "_atomic_write_table", dying_write)
    out = tmp_path / "s.parquet"
    with pytest.raises(KeyboardInterrupt):
        run(models["llama-it"], big_data, out, **kw)
    assert not out.exists()
    parts = sorted(p.name for p in (tmp_path / "s.parquet.parts").glob("shard-*.parquet"))
    assert parts == ["shard-000000.parquet", "shard-000001.parquet"]

    monkeypatch.setattr(scoring, "_atomic_write_table", real_write)
    written = []
    monkeypatch.setattr(
        scoring._Scorer,
        "score_shard",
        lambda self, shard, bar, f=scoring._Scorer.score_shard: written.append(1) or f(self, shard, bar),
    )
    resumed = run(models["llama-it"], big_data, out, **kw)
    assert len(written) == 7 - 2  # only the missing shards were scored again
    pd.testing.assert_frame_equal(resumed, expected, check_exact=True)


def test_changed_settings_over_existing_shards_is_an_error(models, big_data, tmp_path, monkeypatch):
    monkeypatch.setattr(scoring, "_take_merge_lock", lambda parts: False)  # leave the shards in place
    run_cfg = dict(shard_size=4)
    cfg = ScoreConfig(
        model=models["llama"],
        role="small",
        out=str(tmp_path / "s.parquet"),
        data=DataConfig(path=str(big_data)),
        **run_cfg,
    )
    assert score(cfg) is None
    shards = sorted((tmp_path / "s.parquet.parts").glob("shard-*"))
    cfg.render = RenderConfig(max_length=64)
    with pytest.raises(ScoringError, match="holds shards made from other data or settings; they are kept"):
        score(cfg)
    assert sorted((tmp_path / "s.parquet.parts").glob("shard-*")) == shards


def test_existing_output_is_never_overwritten_silently(models, data_file, tmp_path):
    out = tmp_path / "s.parquet"
    first = run(models["llama"], data_file, out)
    with pytest.raises(ScoringError, match="never overwritten silently"):
        run(models["llama"], data_file, out)
    pd.testing.assert_frame_equal(pd.read_parquet(out), first)
    run(models["llama"], data_file, out, overwrite=True)


def test_two_ranks_give_the_same_file_as_one(models, big_data, tmp_path, monkeypatch):
    kw = dict(shard_size=3)
    one = run(models["qwen2-it"], big_data, tmp_path / "one.parquet", **kw)
    out = tmp_path / "two.parquet"
    monkeypatch.setenv("WORLD_SIZE", "2")
    for r in (1, 0):  # the rank that writes the last shard merges
        monkeypatch.setenv("RANK", str(r))
        cfg = ScoreConfig(
            model=models["qwen2-it"], role="small", out=str(out), data=DataConfig(path=str(big_data)), **kw
        )
        result = score(cfg)
        assert (result is None) == (r == 1)
    pd.testing.assert_frame_equal(pd.read_parquet(out), one, check_exact=True)


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(models, big_data, tmp_path):
    one = run(models["llama"], big_data, tmp_path / "one.parquet", shard_size=3)
    out = tmp_path / "two.parquet"
    cmd = [
        *torchrun(),
        "score",
        f"model={models['llama']}",
        "role=small",
        f"data={big_data}",
        f"out={out}",
        "shard_size=3",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    pd.testing.assert_frame_equal(pd.read_parquet(out), one, check_exact=True)


def test_non_finite_logprobs_stop_and_keep_shards(models, big_data, tmp_path, monkeypatch):
    real, calls = scoring.response_logprobs, []

    def poisoned(*args, **kwargs):
        sums, counts = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 4:
            sums[0] = float("nan")
        return sums, counts

    monkeypatch.setattr(scoring, "response_logprobs", poisoned)
    with pytest.raises(ScoringError, match="non-finite log-probabilities for sample"):
        run(models["llama"], big_data, tmp_path / "s.parquet", shard_size=4, max_batch_size=2, verify=False)
    assert len(list((tmp_path / "s.parquet.parts").glob("shard-*.parquet"))) == 1


def test_fully_truncated_samples_are_excluded_and_reported(models, big_data, tmp_path):
    df = run(models["qwen2-it"], big_data, tmp_path / "s.parquet", render=RenderConfig(max_length=24))
    report = json.loads((tmp_path / "s.report.json").read_text())
    assert report["excluded"] and all("fully truncated" in e["reason"] for e in report["excluded"])
    assert {e["id"] for e in report["excluded"]}.isdisjoint(df["id"])
    assert len(df) + len(report["excluded"]) == len(SAMPLES) + len(MORE)
    assert df["truncated_small"].any() and (df["ntok_small"] > 0).all()


def test_model_errors(models, tmp_path, data_file):
    with pytest.raises(ModelError, match="no such folder"):
        run(str(tmp_path / "missing"), data_file, tmp_path / "s.parquet")
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((Path(models["llama"]) / "config.json").read_text())
    with pytest.raises(ModelError, match="no tokenizer files"):
        run(str(no_tok), data_file, tmp_path / "s.parquet")
    remote = tmp_path / "remote"
    build_tiny_model(remote, "llama")
    cfg = json.loads((remote / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (remote / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="refusing to run it. Pass trust_remote_code=true"):
        run(str(remote), data_file, tmp_path / "s.parquet")
    with pytest.raises(ModelError, match="Hub id"):
        run("not/a/hub/id", data_file, tmp_path / "s.parquet")
