"""The fixed evaluation panel: named (S, T) tasks, each scored by NLL per target token.

The panel is the same for every run on the same data shape (random tasks come from a fixed
seed per example index), so scores are comparable across runs and schedules.

Legend: B = batch, L = positions.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from biglearn.gan import generate
from biglearn.generation import decoding_nll
from biglearn.roles import ABSENT, SOURCE, TARGET

PANEL_SEED = 20240731
RolesFn = Callable[[int, torch.Generator], torch.Tensor]


def panel_tasks(length: int, grid: tuple[int, int] | None) -> dict[str, RolesFn]:
    """{task name: fn(batch, generator) -> roles_BL} for this data shape."""
    L = length
    pos_L = torch.arange(L)

    def fixed(target_L: torch.Tensor, source_L: torch.Tensor) -> RolesFn:
        roles_L = torch.where(target_L, TARGET, torch.where(source_L, SOURCE, ABSENT)).to(torch.int8)
        return lambda batch, generator: roles_L.expand(batch, L).clone()

    def random(target_frac: float, source_rest: bool) -> RolesFn:
        def make(batch: int, generator: torch.Generator) -> torch.Tensor:
            rank_BL = torch.rand(batch, L, generator=generator).argsort(1).argsort(1)
            target_BL = rank_BL < max(1, round(target_frac * L))
            other = SOURCE if source_rest else ABSENT
            return torch.where(target_BL, TARGET, other).to(torch.int8)

        return make

    everything = torch.ones(L, dtype=torch.bool)
    tasks: dict[str, RolesFn] = {"joint": fixed(everything, ~everything)}
    if grid is not None:
        rows, cols = grid
        top_L = pos_L // cols < rows // 2
        left_L = pos_L % cols < cols // 2
        tasks["bottom_half"] = fixed(~top_L, top_L)
        tasks["top_half"] = fixed(top_L, ~top_L)
        tasks["right_half"] = fixed(~left_L, left_L)
    else:
        first_L = pos_L < L // 2
        tasks["second_half"] = fixed(~first_L, first_L)
        tasks["first_half"] = fixed(first_L, ~first_L)
    tasks["random_50"] = random(0.5, source_rest=True)
    tasks["random_90"] = random(0.9, source_rest=True)
    tasks["marginal_25"] = random(0.25, source_rest=False)
    return tasks


@torch.no_grad()
def evaluate_panel(
    model: torch.nn.Module,
    values_BL: torch.Tensor,
    grid: tuple[int, int] | None,
    steps: int = 8,
    batch_size: int = 256,
) -> dict[str, float]:
    """{task: NLL per target token (nats)} on `values_BL`, under `steps`-step decoding."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    N, L = values_BL.shape
    scores = {}
    for name, make_roles in panel_tasks(L, grid).items():
        roles_generator = torch.Generator().manual_seed(PANEL_SEED)
        order_generator = torch.Generator(device=device).manual_seed(PANEL_SEED + 1)
        # A table's missing cells (negative values) are in no task.
        roles_NL = torch.where(values_BL >= 0, make_roles(N, roles_generator), ABSENT).to(torch.int8)
        total_nll, total_targets = 0.0, 0
        for start in range(0, N, batch_size):
            values = values_BL[start : start + batch_size].to(device)
            roles = roles_NL[start : start + batch_size].to(device)
            total_nll += float(decoding_nll(model, values, roles, order_generator, steps).sum())
            total_targets += int((roles == TARGET).sum())
        scores[name] = total_nll / max(total_targets, 1)
    model.train(was_training)
    return scores


@torch.no_grad()
def generator_panel(
    model: torch.nn.Module, values_BLP: torch.Tensor, grid: tuple[int, int] | None, batch_size: int = 256
) -> dict[str, dict[str, float]]:
    """The same named tasks for a continuous generator (no likelihood to score): per task,
    `error`, the RMS distance of a sample's targets from the real ones, and `spread`, the RMS
    distance between two samples of the same input (0 for a deterministic model)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    N, L, _ = values_BLP.shape
    scores = {}
    for name, make_roles in panel_tasks(L, grid).items():
        roles_NL = make_roles(N, torch.Generator().manual_seed(PANEL_SEED))
        noise = torch.Generator(device=device).manual_seed(PANEL_SEED + 1)
        error = spread = count = 0.0
        for start in range(0, N, batch_size):
            values = values_BLP[start : start + batch_size].to(device).float()
            roles = roles_NL[start : start + batch_size].to(device)
            first, second = generate(model, values, roles, noise), generate(model, values, roles, noise)
            is_target = (roles == TARGET)[..., None]
            error += float(((first - values).square() * is_target).sum())
            spread += float(((first - second).square() * is_target).sum())
            count += float(is_target.sum()) * values.shape[-1]
        scores[name] = {"error": (error / count) ** 0.5, "spread": (spread / count) ** 0.5}
    model.train(was_training)
    return scores
