"""Maximum-likelihood big learning: cross-entropy of p(x_T | x_S) over target positions.

Legend: B = batch, L = positions, V = vocabulary, F = task families.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from biglearn.roles import FAMILIES, TARGET

Weighting = Literal["inverse_ratio", "uniform"]


def big_learning_loss(
    logits_BLV: torch.Tensor,
    values_BL: torch.Tensor,
    roles_BL: torch.Tensor,
    family_B: torch.Tensor,
    weighting: Weighting = "inverse_ratio",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihood of the targets given the sources.

    weighting='inverse_ratio' averages each example's NLL over its own targets, i.e. the sum
    weighted by 1/ratio with ratio = |T| / (|S| + |T|), divided by |S| + |T|: with |T| drawn
    uniformly this is the masked-diffusion bound on the joint NLL per position. 'uniform' is the
    plain mean over all target tokens of the batch (examples with many targets weigh more).

    Returns:
        loss: scalar to minimise.
        family_stats_F2: per family, [sum of per-example mean NLL, number of examples]
            (detached; summed across ranks and steps for reporting).
    """
    is_target_BL = roles_BL == TARGET
    # Clamped: non-target positions may hold placeholders outside the vocabulary (a table's MISSING).
    safe_BL = values_BL.long().clamp(0, logits_BLV.shape[-1] - 1)
    nll_BL = F.cross_entropy(logits_BLV.float().transpose(1, 2), safe_BL, reduction="none")
    nll_BL = nll_BL * is_target_BL
    n_target_B = is_target_BL.sum(1)
    example_nll_B = nll_BL.sum(1) / n_target_B
    if weighting == "inverse_ratio":
        loss = example_nll_B.mean()
    else:
        loss = nll_BL.sum() / n_target_B.sum()
    return loss, family_stats(example_nll_B, family_B)


def family_stats(per_example_B: torch.Tensor, family_B: torch.Tensor) -> torch.Tensor:
    """stats_F2: per family, [sum of `per_example_B`, number of examples] (detached)."""
    stats_F2 = torch.zeros(len(FAMILIES), 2, device=per_example_B.device)
    stats_F2[:, 0].index_add_(0, family_B, per_example_B.detach().float())
    stats_F2[:, 1].index_add_(0, family_B, torch.ones_like(per_example_B, dtype=torch.float32))
    return stats_F2


def family_means(stats_F2: torch.Tensor) -> dict[str, float]:
    """{family: mean per-example NLL} for the families that occurred."""
    out = {}
    for family, (total, count) in zip(FAMILIES, stats_F2.tolist()):
        if count > 0:
            out[family.value] = total / count
    return out
