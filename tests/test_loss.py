import pytest
import torch
import torch.nn.functional as F

from atlantis.loss import IGNORE_INDEX, token_nll, weighted_loss, weighted_nll_from_logits


def batch(seed=0, b=4, t=7, v=11):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, t, v, generator=g, dtype=torch.float64)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, 5:] = IGNORE_INDEX  # padding
    return logits, labels


def test_all_ones_equals_plain_cross_entropy():
    logits, labels = batch()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    got = weighted_nll_from_logits(logits, labels, torch.ones(4))
    assert torch.allclose(got, ref.float(), atol=1e-6)


def test_weight_two_equals_duplicate_and_zero_equals_removal():
    logits, labels = batch()
    n = 17  # the global count is a constant of the step, shared by both forms
    w = torch.tensor([2.0, 1.0, 1.0, 1.0])
    dup_logits = torch.cat([logits, logits[:1]])
    dup_labels = torch.cat([labels, labels[:1]])
    assert torch.allclose(
        weighted_nll_from_logits(logits, labels, w, n),
        weighted_nll_from_logits(dup_logits, dup_labels, torch.ones(5), n),
        atol=1e-6,
    )
    w0 = torch.tensor([0.0, 1.0, 1.0, 1.0])
    assert torch.allclose(
        weighted_nll_from_logits(logits, labels, w0, n),
        weighted_nll_from_logits(logits[1:], labels[1:], torch.ones(3), n),
        atol=1e-6,
    )


def test_micro_batches_sum_to_the_full_batch():
    """Batch 4 x accumulation 1 equals batch 1 x accumulation 4 when N is the global count (never Σw per batch)."""
    logits, labels = batch()
    w = torch.tensor([0.3, 2.5, 1.0, 0.2])
    n_global = (labels[:, 1:] != IGNORE_INDEX).sum()
    full = weighted_nll_from_logits(logits, labels, w, n_global)
    parts = sum(
        weighted_nll_from_logits(logits[i : i + 1], labels[i : i + 1], w[i : i + 1], n_global) for i in range(4)
    )
    assert torch.allclose(full, parts, atol=1e-6)
    # the popular per-micro-batch Σw normalisation cancels the weights at micro-batch size 1:
    cancelled = sum(
        weighted_nll_from_logits(
            logits[i : i + 1], labels[i : i + 1], w[i : i + 1], (labels[i, 1:] != IGNORE_INDEX).sum() * w[i]
        )
        for i in range(4)
    )
    unweighted = sum(weighted_nll_from_logits(logits[i : i + 1], labels[i : i + 1], torch.ones(1)) for i in range(4))
    assert torch.allclose(cancelled, unweighted)


def test_sequence_normalisation_is_algorithm_1():
    logits, labels = batch()
    w = torch.tensor([0.5, 1.5, 1.0, 2.0])
    logp = torch.log_softmax(logits[:, :-1], -1).gather(2, labels[:, 1:].clamp_min(0)[..., None])[..., 0]
    logp_seq = (logp * (labels[:, 1:] != IGNORE_INDEX)).sum(1)
    expected = -(w.double() / 4 * logp_seq).sum()
    got = weighted_nll_from_logits(logits, labels, w, normalization="sequence")
    assert torch.allclose(got.double(), expected, atol=1e-5)


def test_gradients_scale_with_weights():
    logits, labels = batch()
    x = logits.clone().float().requires_grad_()
    weighted_nll_from_logits(x, labels, torch.tensor([3.0, 0.0, 0.0, 0.0]), 10).backward()
    g3 = x.grad.clone()
    x.grad = None
    weighted_nll_from_logits(x, labels, torch.tensor([1.0, 0.0, 0.0, 0.0]), 10).backward()
    assert torch.allclose(g3, 3 * x.grad, atol=1e-6) and g3[1:].abs().sum() == 0


def test_bad_shapes():
    nll, mask = token_nll(*batch())
    with pytest.raises(ValueError, match="weights must have shape"):
        weighted_loss(nll, mask, torch.ones(3), 5)
