"""Loss settings the other tests pass explicitly: the default normalisation and `sequence` through the logits path."""

import math

import pytest
import torch

from atlantis.loss import IGNORE_INDEX, weighted_loss, weighted_nll_from_logits

LN2 = math.log(2)


def uniform_batch():
    """Two sequences over a 2-token vocabulary with all-zero logits: every response token costs ln 2.

    Labels are shifted by one inside: sequence 0 has 2 response tokens, sequence 1 has 1."""
    logits = torch.zeros(2, 3, 2)
    labels = torch.tensor([[IGNORE_INDEX, 1, 0], [IGNORE_INDEX, IGNORE_INDEX, 1]])
    return logits, labels, torch.tensor([2.0, 1.0])


def test_weighted_loss_defaults_to_token_normalisation():
    nll = torch.full((2, 2), LN2) * torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    # Σ_i w_i Σ_t ℓ_it = 2·2 ln2 + 1·ln2 = 5 ln2, over the 3 tokens given as num_items
    got = weighted_loss(nll, mask, torch.tensor([2.0, 1.0]), 3)
    assert got.item() == pytest.approx(5 * LN2 / 3, rel=1e-6)


def test_from_logits_sequence_normalisation_divides_by_the_sequences():
    logits, labels, w = uniform_batch()
    assert weighted_nll_from_logits(logits, labels, w, normalization="sequence").item() == pytest.approx(
        5 * LN2 / 2, rel=1e-6
    )
    assert weighted_nll_from_logits(logits, labels, w).item() == pytest.approx(5 * LN2 / 3, rel=1e-6)


def test_from_logits_passes_the_normalisation_on_for_checking():
    logits, labels, w = uniform_batch()
    with pytest.raises(ValueError, match="unknown normalization 'tokens'"):
        weighted_nll_from_logits(logits, labels, w, normalization="tokens")
