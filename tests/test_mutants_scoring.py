"""Batching bounds, the first-batch verification and the written columns of atlantis/scoring.py (from the mutation
survivors of bench/mutation.py), against values worked out here: partitions by hand, hashes of decoded tokens."""

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_jsonl
from tqdm import tqdm

import atlantis.scoring as scoring
from atlantis.data import DataConfig, load_samples
from atlantis.models import load_model, load_tokenizer
from atlantis.render import RenderConfig, Rendered, Renderer
from atlantis.scoring import ScoreConfig, ScoringError, make_batches, response_logprobs, score

LONG = [
    {
        "id": f"long-{i}",
        "conversations": [
            {"from": "human", "value": f"List {i}."},
            {"from": "gpt", "value": " ".join(["fox", "dog", "sea"][j % 3] for j in range(4 + 6 * i))},
        ],
    }
    for i in range(4)
]


def sample(sid: str, n: int) -> Rendered:
    return Rendered(sid, list(range(n)), [False] + [True] * (n - 1), n - 1, False)


def test_make_batches_respects_both_bounds_and_fills_greedily():
    lengths = {"a": 2, "b": 3, "c": 3, "d": 4, "e": 5, "f": 5, "g": 6, "h": 10, "i": 21}
    batches = make_batches([sample(k, n) for k, n in reversed(lengths.items())], max_tokens=20, max_batch=3)
    # sorted by length: a b c fill 3 rows; d e f (3 x 5 = 15); g h (2 x 10 = 20, exactly the budget); i alone
    # (21 > 20, but one sample always gets a batch)
    assert [[s.id for s in b] for b in batches] == [["a", "b", "c"], ["d", "e", "f"], ["g", "h"], ["i"]]
    for b in batches[:-1]:
        assert len(b) <= 3 and len(b) * max(len(s) for s in b) <= 20


def test_a_model_whose_fast_path_differs_is_caught_on_the_first_batch(models, data_file, tmp_path, monkeypatch):
    calls = []
    real = scoring.response_logprobs

    def off_by_one(*args, **kwargs):
        sums, counts = real(*args, **kwargs)
        calls.append(1)
        return sums + 1.0, counts

    monkeypatch.setattr(scoring, "response_logprobs", off_by_one)
    cfg = ScoreConfig(
        model=models["llama"], role="small", out=str(tmp_path / "s.parquet"), data=DataConfig(path=str(data_file))
    )
    cfg.max_batch_size = 1
    tok = load_tokenizer(models["llama"])
    rendered, _ = Renderer(tok, cfg.render).render(load_samples(cfg.data))
    assert len(rendered) > 1
    scorer = scoring._Scorer(cfg, tok.pad_token_id or 0)
    with tqdm(disable=True) as bar, pytest.raises(ScoringError, match="the chunked LM-head path gives"):
        scorer.score_shard(rendered, bar)
    assert len(calls) == 1


def test_written_columns_against_the_rendering(models, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", LONG)
    out = tmp_path / "s.parquet"
    render = RenderConfig(max_length=44)
    score(
        ScoreConfig(model=models["llama"], role="small", out=str(out), data=DataConfig(path=str(data)), render=render)
    )
    got = pq.read_table(out)
    assert got.schema.remove_metadata() == scoring._schema("small")
    rows = {r["id"]: r for r in got.to_pylist()}
    tok = load_tokenizer(models["llama"])
    full, _ = Renderer(tok, RenderConfig(max_length=4096)).render(load_samples(DataConfig(path=str(data))))
    cut, _ = Renderer(tok, render).render(load_samples(DataConfig(path=str(data))))
    truncated = 0
    for whole, kept in zip(full, cut, strict=True):
        row = rows[whole.id]
        # ntok_full: the response tokens of the untruncated rendering; ntok: those that fit max_length
        assert row["ntok_full_small"] == sum(whole.labels_mask)
        assert row["ntok_small"] == sum(kept.labels_mask)
        assert row["truncated_small"] == (sum(kept.labels_mask) < sum(whole.labels_mask))
        truncated += row["truncated_small"]
        scored = [t for t, m in zip(kept.input_ids, kept.labels_mask) if m]
        assert row["y_sha_small"] == hashlib.sha256(tok.decode(scored).encode()).hexdigest()[:16]
    assert truncated == 2  # rendered lengths 28, 40, 52, 64 under max_length 44


def test_a_shard_table_has_the_schema_of_its_role(models, data_file, tmp_path):
    cfg = ScoreConfig(
        model=models["llama"], role="ref", out=str(tmp_path / "s.parquet"), data=DataConfig(path=str(data_file))
    )
    tok = load_tokenizer(models["llama"])
    rendered, _ = Renderer(tok, cfg.render).render(load_samples(cfg.data))
    with tqdm(disable=True) as bar, torch.no_grad():
        table = scoring._Scorer(cfg, tok.pad_token_id or 0).score_shard(rendered, bar)
    assert table.schema == pa.schema(
        [
            ("id", pa.string()),
            ("logp_sum_ref", pa.float64()),
            ("ntok_ref", pa.int32()),
            ("logp_mean_ref", pa.float64()),
            ("ntok_full_ref", pa.int32()),
            ("truncated_ref", pa.bool_()),
            ("y_sha_ref", pa.string()),
        ]
    )


def test_make_batches_token_budget_binds_at_two_rows():
    # [x] then y: 2 rows x 11 = 22 > 20 padded tokens, so y starts a new batch
    batches = make_batches([sample("x", 8), sample("y", 11)], max_tokens=20, max_batch=3)
    assert [[s.id for s in b] for b in batches] == [["x"], ["y"]]


def naive_logprob(model, ids: list[int], mask: list[bool]) -> float:
    """Batch 1, full logits: Σ log p(token t | tokens < t) over the tokens t marked in `mask`."""
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
    picked = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(picked[torch.tensor(mask[1:])].sum())


def test_left_padded_batch_and_a_response_from_token_one_equal_batch_one(models):
    """A left-padded row needs the padding mask (its pads lie in the past of its tokens); a row whose response
    starts at token 1 (a direct score of y after BOS alone) counts and scores that token too."""
    model = load_model(models["llama"], torch.float32, torch.device("cpu"))
    a_ids, a_mask = [1, 40, 41, 42, 43, 44], [False, False, False, True, True, True]  # prompt 3, response 3
    b_ids, b_mask = [1, 50, 51, 52, 53, 54, 55, 56, 57], [False] + [True] * 8  # the response from token 1
    width, pad = len(b_ids), 0
    ids = torch.tensor([[pad] * (width - len(a_ids)) + a_ids, b_ids])
    attn = torch.tensor([[0] * (width - len(a_ids)) + [1] * len(a_ids), [1] * width])
    labels = torch.tensor([[False] * (width - len(a_mask)) + a_mask, b_mask])
    sums, counts = response_logprobs(model, ids, attn, labels)
    assert sums.shape == (2,) and counts.tolist() == [3, 8]
    expected = [naive_logprob(model, a_ids, a_mask), naive_logprob(model, b_ids, b_mask)]
    np.testing.assert_allclose(sums.numpy(), expected, atol=1e-4, rtol=0)
