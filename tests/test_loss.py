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


# ---------------------------------------------------------- the two normalisations by hand (docs/normalisation.md)

# Three samples with explicit per-token losses: lengths 3, 1 and 4 response tokens, sums 3.0, 2.0 and 1.0.
NLL = torch.tensor([[0.5, 1.0, 1.5, 0.0], [2.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
W = torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)


def test_token_normalisation_by_hand():
    # Σ_i w_i Σ_t ℓ_it = 2·3.0 + 1·2.0 + 0.5·1.0 = 8.5, over the 3 + 1 + 4 = 8 response tokens
    assert weighted_loss(NLL, MASK, W, 8, "token").item() == pytest.approx(8.5 / 8, abs=1e-15)


def test_sequence_normalisation_by_hand():
    # Algorithm 1: −Σ_i (W_i/|B|) log p(y_i|x_i), log p(y_i|x_i) = −Σ_t ℓ_it: the same 8.5, over |B| = 3 sequences
    assert weighted_loss(NLL, MASK, W, 3, "sequence").item() == pytest.approx(8.5 / 3, abs=1e-15)


def test_both_give_every_response_token_the_coefficient_w_i_over_n():
    """∂L/∂ℓ_it = w_i / num_items in both: a sample's share of the step grows with its length (w_i·n_i) in both;
    they differ only in num_items (the step's tokens vs its sequences), the same for all samples of the step."""
    for norm, n in (("token", 8), ("sequence", 3)):
        nll = NLL.clone().requires_grad_()
        weighted_loss(nll, MASK, W, n, norm).backward()
        expected = (W[:, None] / n).expand(3, 4) * MASK
        assert torch.equal(nll.grad, expected), norm
    # hence token = sequence · |B| / N for any step, here 3/8
    tok, seq = weighted_loss(NLL, MASK, W, 8, "token"), weighted_loss(NLL, MASK, W, 3, "sequence")
    assert tok.item() == pytest.approx(seq.item() * 3 / 8, abs=1e-15)
    # a sample's coefficient depends on its companions under token only: sample 0 (3 tokens) in a step with
    # sample 1 (1 token) gets 2/4 per token; with sample 2 (4 tokens) 2/7. Under sequence 2/2 in both.
    for rows, n_tok in (([0, 1], 4), ([0, 2], 7)):
        for norm, n in (("token", n_tok), ("sequence", 2)):
            nll = NLL[rows].clone().requires_grad_()
            weighted_loss(nll, MASK[rows], W[rows], n, norm).backward()
            assert nll.grad[0, 0].item() == pytest.approx(2.0 / n, abs=1e-15), (rows, norm)


def test_weight_two_versus_a_duplicate_in_the_same_step():
    """Weighted step [a (w=2), b, c] vs duplicated step [a, a, b, c]: the same numerator 2·S_a + S_b + S_c, so the
    same gradient direction; the denominators differ. token: N_w = n_a + n_R, N_dup = 2·n_a + n_R, so weight 2 is
    (2·n_a + n_R)/(n_a + n_R) times the duplicate; sequence: (|B| + 1)/|B|, whatever the lengths."""
    logits, labels = batch(b=3)
    labels[2, 4:] = IGNORE_INDEX  # response lengths 4, 2 (row 1 is padded from 5) and 1 tokens
    w = torch.tensor([2.0, 1.0, 1.0])
    dup_labels = torch.cat([labels, labels[:1]])
    n_tok = (labels[:, 1:] != IGNORE_INDEX).sum(1)
    n_a, n_rest = int(n_tok[0]), int(n_tok[1:].sum())
    assert (n_a, n_rest) == (4, 3)

    def loss_and_grad(duplicate, norm):
        x = logits.clone().requires_grad_()  # the copy of a is the same tensor: its gradient adds into x[0]
        if duplicate:
            loss = weighted_nll_from_logits(torch.cat([x, x[:1]]), dup_labels, torch.ones(4), normalization=norm)
        else:
            loss = weighted_nll_from_logits(x, labels, w, normalization=norm)  # each step's own num_items
        loss.backward()
        return loss.detach(), x.grad

    for norm, factor in (("token", (2 * n_a + n_rest) / (n_a + n_rest)), ("sequence", (3 + 1) / 3)):
        lw, gw = loss_and_grad(False, norm)
        ld, gd = loss_and_grad(True, norm)
        assert (lw / ld).item() == pytest.approx(factor, rel=1e-6), norm  # token_nll computes in float32
        assert torch.allclose(gw, factor * gd, rtol=1e-5, atol=1e-9), norm  # same direction, norm × factor
    assert (2 * n_a + n_rest) / (n_a + n_rest) == 11 / 7  # a takes 4 of the step's 7 tokens


def test_sequence_weight_two_is_exactly_a_duplicate_at_a_fixed_batch_size():
    """Batched at a fixed |B| (the Trainer's per-device batch × accumulation × ranks), a sample contributes
    w_i·S_i/|B| to its step whatever its companions: over an epoch (at the same parameters), [a (w=2), b, c (w=2), d]
    in steps {a,b}, {c,d} sums to exactly what [a, b, a, c, c, d] in steps {a,b}, {a,c}, {c,d} does. Under token the
    denominators are the steps' token counts, so the two differ (by a hand-computable amount)."""
    nll = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 0.0], [0.5, 0.5, 0.5], [3.0, 0.0, 0.0]], dtype=torch.float64)
    mask = nll > 0  # a: 2 tokens, S=3; b: 1, S=4; c: 3, S=1.5; d: 1, S=3
    s, n = (nll * mask).sum(1).tolist(), mask.sum(1).tolist()
    a, b, c, d = 0, 1, 2, 3

    def epoch(steps, norm):
        total = 0.0
        for rows, weights in steps:
            count = len(rows) if norm == "sequence" else int(mask[rows].sum())
            total += weighted_loss(nll[rows], mask[rows], torch.tensor(weights, dtype=torch.float64), count, norm)
        return float(total)

    weighted = [([a, b], [2.0, 1.0]), ([c, d], [2.0, 1.0])]
    duplicated = [([a, b], [1.0, 1.0]), ([a, c], [1.0, 1.0]), ([c, d], [1.0, 1.0])]
    assert epoch(weighted, "sequence") == epoch(duplicated, "sequence") == (2 * s[a] + s[b] + 2 * s[c] + s[d]) / 2
    by_hand = (2 * s[a] + s[b]) / (n[a] + n[b]) + (2 * s[c] + s[d]) / (n[c] + n[d])  # 10/3 + 6/4
    assert epoch(weighted, "token") == pytest.approx(by_hand, abs=1e-12)
    dup_by_hand = (s[a] + s[b]) / (n[a] + n[b]) + (s[a] + s[c]) / (n[a] + n[c]) + (s[c] + s[d]) / (n[c] + n[d])
    assert epoch(duplicated, "token") == pytest.approx(dup_by_hand, abs=1e-12)
    assert abs(by_hand - dup_by_hand) > 0.1  # 29/6 vs 7/3 + 4.5/5 + 4.5/4
