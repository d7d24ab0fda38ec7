"""Conditional generation by iterative any-order decoding, and its exact likelihood.

Each step predicts every remaining target at once, samples a value for each, and commits some
of them (random order, or the most confident first); committed targets become sources for the
next step. Sources are never changed; absent positions stay absent. Joint generation is the
S = {} case. Everything random comes from an explicit generator.

Guidance: the universal model knows p(x_i | x_S, decoded) and, with the given sources made
absent, p(x_i | decoded) too, so it can sharpen every step toward what the condition explains,
sampling from p(x_i | x_S, decoded) * (p(x_i | x_S, decoded) / p(x_i | decoded))^w. This is
classifier-free guidance (Ho & Salimans, 2022) without the separately trained unconditional
model: big learning trains both. It costs a second model call per step.

Legend: B = batch, L = positions, V = vocabulary, N = remaining targets in the batch, G = guided rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from biglearn.model import OUTSIDE_LOGIT
from biglearn.roles import ABSENT, SOURCE, TARGET

Order = Literal["random", "confidence"]
LOG_FLOOR = -1e4
MAX_GUIDANCE = 1e6  # |weight * (log p_c - log p_u)| <= 1e6 * 2e4 stays far inside float64


def commit_counts(remaining_B: torch.Tensor, steps_left: int) -> torch.Tensor:
    """How many targets each row commits this step: an even split of what is left."""
    return torch.div(remaining_B + steps_left - 1, steps_left, rounding_mode="floor")


@torch.no_grad()
def complete(
    model: torch.nn.Module,
    values_BL: torch.Tensor,
    roles_BL: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator],
    steps: int = 16,
    order: Order = "random",
    temperature: float = 1.0,
    top_k: int | None = None,
    guidance: float = 0.0,
) -> torch.Tensor:
    """Fills every TARGET position of `values_BL`; returns the completed values (int64).

    `guidance` is the weight w above (0: plain sampling; rows without sources are unaffected).

    `generator` is one generator for the batch, or one per row: then each row draws its own
    noise (a fixed amount per step), so a row's sample does not depend on the other rows, which
    lets a server batch unrelated requests without changing their answers.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    per_row = not isinstance(generator, torch.Generator)
    if per_row and len(generator) != values_BL.shape[0]:
        raise ValueError(f"got {len(generator)} generators for {values_BL.shape[0]} rows")
    if not 0 <= guidance <= MAX_GUIDANCE:
        raise ValueError(f"guidance must be in [0, {MAX_GUIDANCE:g}]")
    values_BL = values_BL.long().clone()
    roles_BL = roles_BL.clone()
    remaining_BL = roles_BL == TARGET
    given_BL = roles_BL == SOURCE
    # Rows without sources have nothing to guide toward: only rows with some get the second call.
    guided_B = given_BL.any(1) if guidance > 0 else torch.zeros_like(given_BL[:, 0])
    guided = bool(guided_B.any())
    for step in range(steps):
        count_B = remaining_BL.sum(1)
        if not bool(count_B.any()):
            break
        logits_BLV = model(values_BL, roles_BL)
        # A table position's tokens of other columns: ruled out at every temperature and guidance.
        ruled_out_BLV = logits_BLV <= OUTSIDE_LOGIT
        if guided:
            unconditional_GLV = model(values_BL[guided_B], roles_BL[guided_B].masked_fill(given_BL[guided_B], ABSENT))
            logits_BLV = logits_BLV.float()
            logits_BLV[guided_B] = _guide(logits_BLV[guided_B], unconditional_GLV, guidance).float()
        logits_NV = logits_BLV[remaining_BL].float().masked_fill(ruled_out_BLV[remaining_BL], float("-inf"))
        if per_row:
            draw_N = _row_uniforms(generator, remaining_BL)[remaining_BL]
            order_N = _row_uniforms(generator, remaining_BL)[remaining_BL]
            sampled_N, prob_N = sample_values(logits_NV, None, temperature, top_k, draw_N)
        else:
            sampled_N, prob_N = sample_values(logits_NV, generator, temperature, top_k)
        if order == "confidence":
            score_N = prob_N
        elif per_row:
            score_N = order_N
        else:
            score_N = torch.rand(prob_N.shape, generator=generator, device=prob_N.device)
        score_BL = torch.full(remaining_BL.shape, -1.0, device=values_BL.device)
        score_BL[remaining_BL] = score_N
        rank_BL = score_BL.argsort(1, descending=True).argsort(1)
        commit_BL = remaining_BL & (rank_BL < commit_counts(count_B, steps - step)[:, None])
        proposal_BL = torch.zeros_like(values_BL)
        proposal_BL[remaining_BL] = sampled_N
        values_BL = torch.where(commit_BL, proposal_BL, values_BL)
        roles_BL = torch.where(commit_BL, torch.full_like(roles_BL, SOURCE), roles_BL)
        remaining_BL &= ~commit_BL
    return values_BL


def _guide(conditional_BLV: torch.Tensor, unconditional_BLV: torch.Tensor, weight: float) -> torch.Tensor:
    """Log-probabilities log p_c + w (log p_c - log p_u), up to a constant per position.

    Both are floored at LOG_FLOOR so that a value a model rules out (-inf) stays ruled out
    instead of turning the difference into NaN; in float64, so that every weight up to
    MAX_GUIDANCE stays finite."""
    log_conditional = conditional_BLV.double().log_softmax(-1).clamp(min=LOG_FLOOR)
    log_unconditional = unconditional_BLV.double().log_softmax(-1).clamp(min=LOG_FLOOR)
    return log_conditional + weight * (log_conditional - log_unconditional)


def _row_uniforms(generators: Sequence[torch.Generator], like_BL: torch.Tensor) -> torch.Tensor:
    """U(0, 1) noise_BL, row b from generators[b]; always L draws a row, whatever is left."""
    length = like_BL.shape[1]
    return torch.stack([torch.rand(length, generator=g, device=g.device) for g in generators]).to(like_BL.device)


def sample_values(logits_NV, generator, temperature, top_k, uniform_N=None):
    """Samples a value per row; also returns its probability under the untruncated, tempered
    distribution (the confidence: top-k truncation would flatten it, e.g. to 1.0 at top_k=1).

    With `uniform_N`, the sample is the inverse CDF at that noise instead of a draw from
    `generator`.

    Safe for every temperature > 0 and any logits with a finite largest one (-inf rules a value
    out): the logits are shifted so that their largest is 0 and divided in float64, so no
    temperature turns them into inf - inf."""
    shifted_NV = (logits_NV - logits_NV.amax(-1, keepdim=True)).double()
    scaled_NV = shifted_NV / temperature if temperature > 0 else shifted_NV
    probs_NV = scaled_NV.softmax(-1)
    if temperature <= 0:
        sampled_N = probs_NV.argmax(-1)
    else:
        if top_k is not None and top_k < logits_NV.shape[-1]:
            kth_N1 = scaled_NV.topk(top_k, dim=-1).values[:, -1:]
            scaled_NV = scaled_NV.masked_fill(scaled_NV < kth_N1, float("-inf"))
        truncated_NV = scaled_NV.softmax(-1)
        if uniform_N is None:
            sampled_N = torch.multinomial(truncated_NV, 1, generator=generator)[:, 0]
        else:
            below_N = (truncated_NV.cumsum(-1) < uniform_N[:, None]).sum(-1)
            # The cumsum may end just under 1: never step past the last value top-k allows.
            last_allowed_N = (truncated_NV > 0).long().cumsum(-1).argmax(-1)
            sampled_N = torch.minimum(below_N, last_allowed_N)
    return sampled_N, probs_NV.gather(1, sampled_N[:, None])[:, 0].to(logits_NV.dtype)


@torch.no_grad()
def decoding_nll(
    model: torch.nn.Module,
    values_BL: torch.Tensor,
    roles_BL: torch.Tensor,
    generator: torch.Generator,
    steps: int = 8,
) -> torch.Tensor:
    """-log p(x_T | x_S, order) per example for one random order of `steps`-step decoding.

    The targets are put in a random order and revealed in the same chunks `complete` commits
    at T = 1. The random-order sampler mixes over orders, so by Jensen's inequality this is, in
    expectation over the order, an upper bound on its NLL (exact for steps = 1).
    Returns nll_B (nats, summed over each example's targets).
    """
    values_BL = values_BL.long()
    roles_BL = roles_BL.clone()
    remaining_BL = roles_BL == TARGET
    nll_B = torch.zeros(values_BL.shape[0], device=values_BL.device)
    noise_BL = torch.rand(values_BL.shape, generator=generator, device=values_BL.device)
    for step in range(steps):
        count_B = remaining_BL.sum(1)
        if not bool(count_B.any()):
            break
        logp_BLV = model(values_BL, roles_BL).float().log_softmax(-1)
        # Clamped: absent positions may hold placeholders outside the vocabulary.
        logp_BL = logp_BLV.gather(2, values_BL.clamp(0, logp_BLV.shape[-1] - 1)[..., None])[..., 0]
        rank_BL = torch.where(remaining_BL, noise_BL, -1.0).argsort(1, descending=True).argsort(1)
        commit_BL = remaining_BL & (rank_BL < commit_counts(count_B, steps - step)[:, None])
        nll_B -= torch.where(commit_BL, logp_BL, 0.0).sum(1)  # a row with nothing to attend to gives NaN elsewhere
        roles_BL = torch.where(commit_BL, torch.full_like(roles_BL, SOURCE), roles_BL)
        remaining_BL &= ~commit_BL
    return nll_B
