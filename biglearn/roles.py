"""Roles and schedules: how a task (S, T) is represented and sampled.

`roles_BL` (int8) gives each position its part in the task: ABSENT (in neither S nor T, i.e.
marginalised out), SOURCE (in S: its value is shown) or TARGET (in T: to be predicted). Every
example has at least one target. A `Schedule` is a weighted mixture of task families; the
sampler is a pure function of an explicit `torch.Generator`.

Legend: B = batch, L = positions, F = task families.
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from biglearn.config import Config

ABSENT, SOURCE, TARGET = 0, 1, 2


class Family(str, Enum):
    """Task families. Fractions below are of the L positions unless said otherwise.

    joint:       S = {}, T = all.
    marginal:    S = {}, T = a random subset (|T|/L ~ target), the rest absent.
    conditional: T = a random subset (|T|/L ~ target); S = a random share (~ source) of the
                 other positions, the rest absent. source concentrated at 1 gives S = rest.
    prefix:      S = the first floor(s * L) positions (s ~ source), T = all after them.
    span:        T = one contiguous run (|T|/L ~ target), S = the rest.
    half:        images only: S = the top, bottom, left or right half of the patch grid,
                 T = the other half.
    box:         images only: T = a rectangle of the patch grid whose side fractions are
                 sqrt(t) (t ~ target), S = the rest.
    """

    joint = "joint"
    marginal = "marginal"
    conditional = "conditional"
    prefix = "prefix"
    span = "span"
    half = "half"
    box = "box"


FAMILIES: tuple[Family, ...] = tuple(Family)
IMAGE_FAMILIES = frozenset({Family.half, Family.box})


class Beta(Config):
    a: PositiveFloat = 1.0
    b: PositiveFloat = 1.0


class FamilySpec(Config):
    weight: float = Field(ge=0)
    target: Beta = Beta()
    source: Beta = Beta()


class Schedule(Config):
    """Which tasks training poses, how often, and how large S and T are.

    granularity='example' draws a task per example (one batch mixes tasks); 'batch' draws one
    (S, T) for the whole batch and keeps it for `inner_steps` consecutive optimizer steps (global
    batches of `grad_accum` micro-batches each), the authors' outer/inner-step habit.
    """

    families: dict[Family, FamilySpec] = {
        Family.conditional: FamilySpec(weight=0.6, source=Beta(a=4.0, b=1.0)),
        Family.marginal: FamilySpec(weight=0.1),
        Family.joint: FamilySpec(weight=0.05),
        Family.prefix: FamilySpec(weight=0.05),
        Family.span: FamilySpec(weight=0.05),
        Family.half: FamilySpec(weight=0.1),
        Family.box: FamilySpec(weight=0.05),
    }
    """Task families drawn and their relative weights; a family left out is never drawn. Each also
    has Beta laws of its target and source fractions (see `Family`)."""
    granularity: Literal["example", "batch"] = "example"
    """example: a task drawn for each example; batch: one task for the whole global batch."""
    inner_steps: PositiveInt = 1
    """Consecutive optimizer steps that share one task (granularity batch only)."""

    @model_validator(mode="after")
    def _check(self) -> Schedule:
        if not any(spec.weight > 0 for spec in self.families.values()):
            raise ValueError("schedule.families needs at least one family with weight > 0")
        if self.inner_steps > 1 and self.granularity != "batch":
            raise ValueError("inner_steps > 1 holds one task over several steps: set granularity: batch")
        return self

    def weights(self) -> torch.Tensor:
        """Family weights as a float tensor [F], in FAMILIES order."""
        return torch.tensor([self.families[f].weight if f in self.families else 0.0 for f in FAMILIES])

    def require_grid(self, grid: tuple[int, int] | None) -> None:
        used = {f for f, spec in self.families.items() if spec.weight > 0}
        if grid is None and used & IMAGE_FAMILIES:
            names = ", ".join(sorted(f.value for f in used & IMAGE_FAMILIES))
            raise ValueError(
                f"schedule families {names} need an image grid, and this dataset has no geometry; set their weight to 0"
            )


def sample_roles(
    schedule: Schedule,
    batch: int,
    length: int,
    generator: torch.Generator,
    grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws one task per example (or one per batch) from `schedule`.

    Args:
        grid: (rows, cols) of the patch grid, rows * cols == length; needed by half/box.
    Returns:
        roles_BL: int8 on the generator's device; ABSENT / SOURCE / TARGET, >= 1 target a row.
        family_B: int64 index into FAMILIES of each example's family.
    """
    schedule.require_grid(grid)
    device = generator.device
    draws = 1 if schedule.granularity == "batch" else batch
    family_B = torch.multinomial(schedule.weights().to(device), draws, replacement=True, generator=generator)
    target_frac_B, source_frac_B = _beta_fractions(schedule, family_B, generator)
    noise_BL = torch.rand(draws, length, generator=generator, device=device)
    start_u_B = torch.rand(draws, 3, generator=generator, device=device)
    roles_BL = _roles_for(family_B, target_frac_B, source_frac_B, noise_BL, start_u_B, length, grid)
    if draws == 1:
        roles_BL, family_B = roles_BL.expand(batch, length).contiguous(), family_B.expand(batch).contiguous()
    return roles_BL, family_B


def without_missing(roles_BL: torch.Tensor, observed_BL: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`roles_BL` with every unobserved position (a table's missing cell) ABSENT: never a source,
    never a target. A row left without a target gets one at an observed position drawn
    uniformly (rows with nothing observed keep none)."""
    roles_BL = torch.where(observed_BL, roles_BL, torch.full_like(roles_BL, ABSENT))
    orphan_B = ~(roles_BL == TARGET).any(1) & observed_BL.any(1)
    pick_B = torch.where(
        observed_BL, torch.rand(roles_BL.shape, generator=generator, device=roles_BL.device), -1.0
    ).argmax(1)
    chosen_BL = F.one_hot(pick_B, roles_BL.shape[1]).bool() & orphan_B[:, None]
    return torch.where(chosen_BL, torch.full_like(roles_BL, TARGET), roles_BL)


def _beta_fractions(schedule: Schedule, family_B: torch.Tensor, generator: torch.Generator):
    # torch's Beta sampler takes no generator; numpy's does, seeded from ours (so still pure).
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    rng = np.random.default_rng(seed)
    fams = family_B.cpu().numpy()
    target = np.empty(len(fams), dtype=np.float32)
    source = np.empty(len(fams), dtype=np.float32)
    for index, family in enumerate(FAMILIES):
        rows = fams == index
        if rows.any():
            spec = schedule.families[family]
            target[rows] = rng.beta(spec.target.a, spec.target.b, rows.sum())
            source[rows] = rng.beta(spec.source.a, spec.source.b, rows.sum())
    device = family_B.device
    return torch.from_numpy(target).to(device), torch.from_numpy(source).to(device)


def _roles_for(family_B, target_frac_B, source_frac_B, noise_BL, start_u_B, length, grid):
    """Builds every family's roles for every row, then keeps each row's own family."""
    B, L = noise_BL.shape
    device = noise_BL.device
    pos_L = torch.arange(L, device=device)
    rank_BL = noise_BL.argsort(1).argsort(1)  # a random permutation rank of each position
    n_target_B1 = (target_frac_B * L).ceil().clamp(1, L).long()[:, None]
    rest_B1 = L - n_target_B1
    n_source_B1 = (source_frac_B[:, None] * rest_B1).round().long()
    is_target_BL = rank_BL < n_target_B1
    as_roles = lambda target, source: torch.where(  # noqa: E731
        target, TARGET, torch.where(source, SOURCE, ABSENT)
    ).to(torch.int8)

    joint = torch.full((B, L), TARGET, dtype=torch.int8, device=device)
    marginal = as_roles(is_target_BL, torch.zeros_like(is_target_BL))
    conditional = as_roles(is_target_BL, rank_BL < n_target_B1 + n_source_B1)
    n_prefix_B1 = (source_frac_B * L).floor().clamp(0, L - 1).long()[:, None]
    prefix = as_roles(pos_L >= n_prefix_B1, pos_L < n_prefix_B1)
    span_start_B1 = (start_u_B[:, :1] * (L - n_target_B1 + 1)).floor().long()
    in_span = (pos_L >= span_start_B1) & (pos_L < span_start_B1 + n_target_B1)
    span = as_roles(in_span, ~in_span)
    candidates = [joint, marginal, conditional, prefix, span]
    if grid is None:
        candidates += [joint, joint]  # placeholders keep FAMILIES indexing; require_grid refuses them
    else:
        candidates += _image_roles(target_frac_B, start_u_B, grid, device)
    stacked_FBL = torch.stack(candidates)
    return stacked_FBL[family_B, torch.arange(B, device=device)]


def _image_roles(target_frac_B, start_u_B, grid, device):
    rows, cols = grid
    B = target_frac_B.shape[0]
    r_L = torch.arange(rows, device=device).repeat_interleave(cols)
    c_L = torch.arange(cols, device=device).repeat(rows)
    side_B1 = (start_u_B[:, :1] * 4).floor().long().clamp(max=3)
    given = torch.stack([r_L < rows // 2, r_L >= rows - rows // 2, c_L < cols // 2, c_L >= cols - cols // 2])
    source_BL = given[side_B1[:, 0]]
    half = torch.where(source_BL, SOURCE, TARGET).to(torch.int8)
    side = target_frac_B.sqrt()
    box_h_B1 = (side * rows).ceil().clamp(1, rows).long()[:, None]
    box_w_B1 = (side * cols).ceil().clamp(1, cols).long()[:, None]
    top_B1 = (start_u_B[:, 1:2] * (rows - box_h_B1 + 1)).floor().long()
    left_B1 = (start_u_B[:, 2:3] * (cols - box_w_B1 + 1)).floor().long()
    in_box = (r_L >= top_B1) & (r_L < top_B1 + box_h_B1) & (c_L >= left_B1) & (c_L < left_B1 + box_w_B1)
    box = torch.where(in_box, TARGET, SOURCE).to(torch.int8)
    assert half.shape == (B, rows * cols)
    return [half, box]


def task_seed(seed: int, step: int, rank: int, schedule: Schedule, micro: int = 0, accum: int = 1) -> int:
    """Seed of the generator that draws the roles of optimizer step `step` (counted from 1)'s
    micro-step `micro` (of `accum`) on `rank`.

    Deriving it from (seed, step, micro-step, rank) makes the sampler's state trivially
    resumable. With granularity='batch' every rank and every micro-step of a step shares the task
    (one global batch, one task), and it changes every `inner_steps` optimizer steps.
    """
    if schedule.granularity == "batch":
        return _mix(seed, (step - 1) // schedule.inner_steps, 0)
    return _mix(seed, step * accum + micro, rank + 1)


def _mix(*parts: int) -> int:
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (part + 0x632BE59BD9B4E019 + (value << 6) + (value >> 2))) % (2**61 - 1)
    return value
