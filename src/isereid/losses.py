"""Label-preserving (LP) loss between samples and their supports (docs/method.md#lp-loss)."""
from __future__ import annotations

import torch

NEGATIVES = ("per_identity", "all")


def label_preserving_loss(features: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor,
                          temperature: float = 0.6, negatives: str = "per_identity") -> torch.Tensor:
    """Mean over anchors b of  −log(P_b / (P_b + N_b + 1e-6) + 1e-6).

    Args:
        features: anchors f (B, D), unit norm.
        supports: s (B·K, D), row b·K + k belongs to anchor b (see :func:`isereid.ise.support_samples`).
        labels: pseudo-labels (B,); the supports carry ``labels.repeat_interleave(K)``.
        temperature: similarities are ``exp(f·s / temperature)`` (plain exp, bounded for unit vectors).
        negatives: ``"per_identity"`` — N_b sums, over every other identity in the batch, its most
            similar support (the reference's result on its standard batch of contiguous identity
            blocks, and still correct when blocks are misaligned, docs/reference_quirks.md#q9); ``"all"`` — sums all
            negative supports (the reference's fallback).

    P_b is the *least* similar same-label support, the anchor's own support included.
    """
    if negatives not in NEGATIVES:
        raise ValueError(f"unknown negatives {negatives!r}; choose one of {', '.join(NEGATIVES)}")
    batch = features.shape[0]
    if supports.shape[0] % batch:
        raise ValueError(f"{supports.shape[0]} supports is not a multiple of the batch size {batch}")
    labels = labels.long()
    support_labels = labels.repeat_interleave(supports.shape[0] // batch)
    sims = torch.exp(features @ supports.t() / temperature)  # (B, B·K)
    same = labels.unsqueeze(1) == support_labels.unsqueeze(0)  # (B, B·K)
    hardest_positive = sims.masked_fill(~same, float("inf")).amin(dim=1)  # (B,)
    if negatives == "all":
        negative_sum = (sims * ~same).sum(dim=1)
    else:
        identities, column_identity = torch.unique(support_labels, return_inverse=True)  # (U,), (B·K,)
        member = column_identity.unsqueeze(0) == torch.arange(len(identities), device=labels.device).unsqueeze(1)
        # (B, U, B·K): similarities restricted to each identity's supports; sims > 0 so 0 is a safe fill.
        per_identity = (sims.unsqueeze(1) * member.unsqueeze(0)).amax(dim=2)  # (B, U)
        foreign = identities.unsqueeze(0) != labels.unsqueeze(1)  # (B, U)
        negative_sum = (per_identity * foreign).sum(dim=1)
    ratio = hardest_positive / (hardest_positive + negative_sum + 1e-6)
    return -torch.log(ratio + 1e-6).mean()
