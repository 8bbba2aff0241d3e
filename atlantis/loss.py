"""The ATLANTIS training loss: per-sample weighted negative log-likelihood of the response tokens.

Algorithm 1 (lines 5-6) trains with L = −Σ_{i∈B} (W_i/|B|) log p(y_i|x_i). Two normalisations:

- ``token`` (default): Σ_i w_i Σ_t ℓ_it / N, with N the number of response tokens in the *global* batch
  (all gradient-accumulation micro-batches and all data-parallel ranks: HF's `num_items_in_batch` with
  `average_tokens_across_devices`). With all weights 1 this is exactly plain SFT's token-mean loss, so the
  paper's SFT hyper-parameters (Table 6) carry over unchanged.
- ``sequence``: Algorithm 1 literally, Σ_i w_i Σ_t ℓ_it / |B|, with |B| the number of sequences in the
  global batch (log p(y|x) is the sum over the response tokens).

Both give every response token of sample i the same coefficient ∂L/∂ℓ_it = w_i/N (N: tokens or sequences),
so in both a sample's pull on the step grows with its length (w_i·n_i); they differ only in N, a scalar of
the step: token = sequence · |B|/N_tokens. What a weight of 2 is worth: under ``sequence`` a sample adds
w_i·Σ_t ℓ_it/|B| to its step whatever its companions, so at a fixed batch size weight 2 is exactly two
copies; under ``token`` N counts tokens, not weighted tokens, so weight 2 on a sample with n_a of the
step's N tokens is (N + n_a)/N times the step with the copy added as an extra row (same direction; the
sequence analogue is (|B| + 1)/|B|). Derivations and the long-vs-short consequences: docs/normalisation.md.

Never divide by Σw of a micro-batch: at the paper's micro-batch sizes of 1-2 that cancels the weights
(a one-sample micro-batch would always get weight 1).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
Normalization = Literal["token", "sequence"]


def token_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX):
    """Per-token NLL [B, T-1] in float32 and its mask, for next-token prediction (labels not yet shifted)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    mask = shift_labels != ignore_index
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1).clamp_min(0),
        reduction="none",
    ).view_as(shift_labels)
    return nll * mask, mask


def weighted_loss(
    nll: torch.Tensor,
    mask: torch.Tensor,
    weights: torch.Tensor,
    num_items: torch.Tensor | int | float,
    normalization: Normalization = "token",
) -> torch.Tensor:
    """Σ_i w_i Σ_t nll_it / num_items.

    `nll`, `mask`: [B, T] per-token losses (already zero where masked) and the response mask.
    `weights`: [B] per-sample weights. `num_items`: response tokens (``token``) or sequences (``sequence``)
    in the global batch; the caller counts them over accumulation steps and ranks.
    """
    if weights.shape != nll.shape[:1]:
        raise ValueError(f"weights must have shape [{nll.shape[0]}], got {list(weights.shape)}")
    if normalization not in ("token", "sequence"):
        raise ValueError(f"unknown normalization {normalization!r}")
    per_sample = (nll * mask).sum(dim=1)
    total = (weights.to(per_sample.dtype) * per_sample).sum()
    if isinstance(num_items, torch.Tensor):
        num_items = num_items.to(total.device)
    return total / num_items


def weighted_nll_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weights: torch.Tensor,
    num_items: torch.Tensor | int | float | None = None,
    normalization: Normalization = "token",
) -> torch.Tensor:
    """`(logits, labels, weights, num_items) -> loss`; num_items defaults to this batch's own count."""
    nll, mask = token_nll(logits, labels)
    if num_items is None:
        num_items = mask.sum() if normalization == "token" else labels.shape[0]
    return weighted_loss(nll, mask, weights, num_items, normalization)
