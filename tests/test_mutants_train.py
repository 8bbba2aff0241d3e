"""The training data path's baseline weights and its loss against the model's own forward (from the mutation
survivors of bench/mutation.py): SFT weights are all 1, Gemma-2's soft-cap is applied, chunking changes nothing."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from atlantis.data import DataConfig
from atlantis.loss import IGNORE_INDEX
from atlantis.models import load_tokenizer
from atlantis.testing import build_tiny_model
from atlantis.train import TrainConfig, build_dataset, response_token_nll


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    return str(build_tiny_model(tmp_path_factory.mktemp("g") / "gemma2", "gemma2", seed=3))


def batch(vocab: int):
    """Two right-padded rows of 10 tokens: 3 prompt tokens, then 7 and 4 response tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 10), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 7:] = 0
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX
    labels[1, 7:] = IGNORE_INDEX
    return ids, attn, labels


def own_nll(model, ids, attn, labels):
    """Per-token NLL from the model's own full logits (its forward applies any soft-cap), zero off the response."""
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
    target = labels[:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), target.clamp_min(0), reduction="none")
    return nll * (target != IGNORE_INDEX), target != IGNORE_INDEX


def test_sft_baseline_weights_are_all_one(models, data_file, tmp_path):
    cfg = TrainConfig(model=models["llama"], data=DataConfig(path=str(data_file)), out=str(tmp_path), method="sft")
    ds = build_dataset(cfg, load_tokenizer(models["llama"]))
    assert len(ds) > 0 and ds.weights == [1.0] * len(ds)
    assert [ds[i]["weights"] for i in range(len(ds))] == [1.0] * len(ds)


def test_training_loss_applies_gemma_softcapping(gemma):
    model = AutoModelForCausalLM.from_pretrained(gemma, torch_dtype=torch.float32).eval()
    model.config.final_logit_softcapping = 0.5  # tight, so that the cap changes random logits a lot
    ids, attn, labels = batch(model.config.vocab_size)
    ref, ref_mask = own_nll(model, ids, attn, labels)
    with torch.no_grad():
        nll, mask = response_token_nll(model, ids, attn, labels, chunk=4)
    assert torch.equal(mask, ref_mask) and int(mask.sum()) == 11
    torch.testing.assert_close(nll, ref, atol=1e-5, rtol=1e-5)
    model.config.final_logit_softcapping = None
    with torch.no_grad():
        uncapped, _ = response_token_nll(model, ids, attn, labels, chunk=4)
    assert float((uncapped - nll).abs().max()) > 1e-2  # the cap shows


def test_chunked_response_nll_equals_unchunked(models):
    model = AutoModelForCausalLM.from_pretrained(models["llama"], torch_dtype=torch.float32).eval()
    ids, attn, labels = batch(model.config.vocab_size)
    ref, _ = own_nll(model, ids, attn, labels)
    with torch.no_grad():
        whole, mask = response_token_nll(model, ids, attn, labels)
        by_two, _ = response_token_nll(model, ids, attn, labels, chunk=2)  # 11 response tokens: 6 chunks
    torch.testing.assert_close(whole, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(by_two, ref, atol=1e-5, rtol=1e-5)
