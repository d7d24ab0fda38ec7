"""The task sampler: roles are well formed, follow each family's definition and the schedule."""

from __future__ import annotations

import math

import pydantic
import pytest
import torch

from biglearn.config import ConfigError, validate_config
from biglearn.roles import (
    ABSENT,
    FAMILIES,
    IMAGE_FAMILIES,
    SOURCE,
    TARGET,
    Beta,
    Family,
    FamilySpec,
    Schedule,
    sample_roles,
    task_seed,
)

GRID = (8, 8)
L = 64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def only(family: Family, target: Beta = Beta(), source: Beta = Beta(), **kw) -> Schedule:
    return Schedule(families={family: FamilySpec(weight=1.0, target=target, source=source)}, **kw)


# Uniform, U-shaped (mass at 0 and 1), concentrated at 1, concentrated at 0.
EXTREME_BETAS = [Beta(), Beta(a=1e-3, b=1e-3), Beta(a=1e4, b=1e-3), Beta(a=1e-3, b=1e4)]
# (length, grid) including tiny sequences and degenerate one-row / one-column grids.
SHAPES = [(1, (1, 1)), (2, (1, 2)), (2, (2, 1)), (3, (3, 1)), (3, (1, 3)), (6, (2, 3)), (64, (8, 8))]


@pytest.mark.parametrize("family", FAMILIES, ids=[f.value for f in FAMILIES])
def test_roles_are_well_formed_with_a_target_in_every_row(family):
    for length, grid in SHAPES:
        for target in EXTREME_BETAS:
            for source in EXTREME_BETAS:
                roles, fams = sample_roles(only(family, target, source), 64, length, gen(3), grid)
                where = f"{family.value} L={length} grid={grid} target={target} source={source}"
                assert roles.dtype == torch.int8, where
                assert roles.shape == (64, length), where
                assert set(roles.unique().tolist()) <= {ABSENT, SOURCE, TARGET}, where
                assert ((roles == TARGET).sum(1) >= 1).all(), where
                assert fams.dtype == torch.int64 and fams.shape == (64,), where
                assert (fams == FAMILIES.index(family)).all(), where


def test_fractions_follow_the_beta_draws():
    # target concentrated at 1: marginal is (nearly) all targets; concentrated at 0: exactly one.
    high, low = Beta(a=1e4, b=1e-3), Beta(a=1e-3, b=1e4)
    roles, _ = sample_roles(only(Family.marginal, target=high), 256, L, gen(0))
    assert ((roles == TARGET).sum(1) >= L - 1).all()
    roles, _ = sample_roles(only(Family.marginal, target=low), 256, L, gen(0))
    assert ((roles == TARGET).sum(1) == 1).all()
    assert not (roles == SOURCE).any()
    # conditional with source ~ 1: S is (nearly) the rest; with source ~ 0: no (or ~no) sources.
    roles, _ = sample_roles(only(Family.conditional, target=low, source=high), 256, L, gen(0))
    assert ((roles == TARGET).sum(1) == 1).all()
    assert ((roles == ABSENT).sum(1) <= 1).all()
    roles, _ = sample_roles(only(Family.conditional, target=low, source=low), 256, L, gen(0))
    assert ((roles == SOURCE).sum(1) <= 1).all()
    # uniform target fraction: mean |T|/L about 1/2 (ceil adds about 1/(2L)).
    roles, _ = sample_roles(only(Family.marginal), 4000, L, gen(0))
    assert abs((roles == TARGET).float().mean().item() - 0.5) < 0.03


def test_family_frequencies_match_the_schedule_weights():
    schedule = Schedule()  # the default mixture, every family present
    n = 40_000
    _, fams = sample_roles(schedule, n, L, gen(7), GRID)
    counts = torch.bincount(fams, minlength=len(FAMILIES))
    p = schedule.weights() / schedule.weights().sum()
    for index, family in enumerate(FAMILIES):
        expected = n * p[index].item()
        sigma = math.sqrt(n * p[index].item() * (1 - p[index].item()))
        assert abs(counts[index].item() - expected) <= 5 * sigma + 1, (family, counts.tolist(), p.tolist())

    zero = Schedule(
        families={
            Family.prefix: FamilySpec(weight=3.0),
            Family.span: FamilySpec(weight=1.0),
            Family.joint: FamilySpec(weight=0.0),
        }
    )
    _, fams = sample_roles(zero, n, L, gen(8))
    counts = torch.bincount(fams, minlength=len(FAMILIES))
    assert counts[FAMILIES.index(Family.joint)] == 0
    assert counts.sum() == n
    share = counts[FAMILIES.index(Family.prefix)].item() / n
    assert abs(share - 0.75) <= 5 * math.sqrt(0.75 * 0.25 / n)


def test_sampling_is_a_pure_function_of_the_generator():
    schedule = Schedule()
    a = sample_roles(schedule, 128, L, gen(11), GRID)
    b = sample_roles(schedule, 128, L, gen(11), GRID)
    c = sample_roles(schedule, 128, L, gen(12), GRID)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[1], c[1])


def test_batch_granularity_gives_one_task_for_the_whole_batch():
    schedule = Schedule(granularity="batch", inner_steps=3)
    seen = set()
    for seed in range(20):
        roles, fams = sample_roles(schedule, 16, L, gen(seed), GRID)
        assert roles.shape == (16, L) and fams.shape == (16,)
        assert (roles == roles[:1]).all()
        assert (fams == fams[0]).all()
        assert roles.is_contiguous()
        seen.add(roles[0].numpy().tobytes())
    assert len(seen) > 1  # still random across draws


def _sample(family: Family, batch: int = 512, grid=GRID):
    roles, _ = sample_roles(only(family), batch, grid[0] * grid[1], gen(5), grid)
    return roles


def test_joint_and_marginal_structure():
    assert (_sample(Family.joint) == TARGET).all()
    marginal = _sample(Family.marginal)
    assert not (marginal == SOURCE).any()
    assert (marginal == ABSENT).any()  # some targets are marginalised out, not all positions targets


def test_prefix_structure():
    roles = _sample(Family.prefix)
    pos = torch.arange(L)
    n_source = (roles == SOURCE).sum(1, keepdim=True)
    expected = torch.where(pos < n_source, SOURCE, TARGET).to(torch.int8)
    assert torch.equal(roles, expected)
    assert n_source.min() == 0 and n_source.max() > L // 2  # the prefix length varies


def test_span_structure():
    roles = _sample(Family.span)
    assert not (roles == ABSENT).any()
    starts = set()
    for row in roles:
        where = (row == TARGET).nonzero()[:, 0]
        assert where.max() - where.min() + 1 == len(where), row
        starts.add(int(where.min()))
    assert len(starts) > 5  # the span moves


@pytest.mark.parametrize("grid", [(8, 8), (4, 6)])
def test_half_structure(grid):
    rows, cols = grid
    roles = _sample(Family.half, grid=grid)
    r = torch.arange(rows).repeat_interleave(cols)
    c = torch.arange(cols).repeat(rows)
    halves = {
        "top": r < rows // 2,
        "bottom": r >= rows - rows // 2,
        "left": c < cols // 2,
        "right": c >= cols - cols // 2,
    }
    seen = set()
    for row in roles:
        given = row == SOURCE
        assert not (row == ABSENT).any()
        assert given.sum() * 2 == rows * cols  # exactly half the grid is given
        matches = [name for name, mask in halves.items() if torch.equal(given, mask)]
        assert matches, row.view(rows, cols)
        seen.update(matches)
    assert seen == set(halves)


@pytest.mark.parametrize("grid", [(8, 8), (3, 5)])
def test_box_structure(grid):
    rows, cols = grid
    roles = _sample(Family.box, grid=grid)
    assert not (roles == ABSENT).any()
    sizes = set()
    for row in roles:
        target = (row == TARGET).view(rows, cols)
        in_rows, in_cols = target.any(1), target.any(0)
        assert torch.equal(target, in_rows[:, None] & in_cols[None, :]), target  # a full rectangle
        r_idx, c_idx = in_rows.nonzero()[:, 0], in_cols.nonzero()[:, 0]
        assert r_idx.max() - r_idx.min() + 1 == len(r_idx)  # contiguous rows
        assert c_idx.max() - c_idx.min() + 1 == len(c_idx)  # contiguous columns
        sizes.add(int(target.sum()))
    assert len(sizes) > 3


@pytest.mark.parametrize("family", sorted(IMAGE_FAMILIES), ids=lambda f: f.value)
def test_image_families_without_a_grid_are_refused(family):
    schedule = Schedule(families={Family.joint: FamilySpec(weight=1.0), family: FamilySpec(weight=0.5)})
    with pytest.raises(ValueError, match=rf"{family.value}.*grid"):
        sample_roles(schedule, 4, L, gen(0), grid=None)
    # with weight 0 the same schedule is fine without a grid
    fine = Schedule(families={Family.joint: FamilySpec(weight=1.0), family: FamilySpec(weight=0.0)})
    roles, _ = sample_roles(fine, 4, L, gen(0), grid=None)
    assert (roles == TARGET).all()


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"families": {"joint": {"weight": 0.0}, "span": {"weight": 0.0}}}, "weight > 0"),
        ({"families": {}}, "weight > 0"),
        ({"granularity": "example", "inner_steps": 4}, "granularity"),
        ({"families": {"bogus": {"weight": 1.0}}}, "bogus"),
        ({"families": {"joint": {"weight": -1.0}}}, "families.joint.weight"),
        ({"families": {"joint": {"weight": 1.0, "target": {"a": 0}}}}, "families.joint.target.a"),
    ],
)
def test_schedule_validation(data, fragment):
    with pytest.raises(pydantic.ValidationError):
        Schedule.model_validate(data)
    with pytest.raises(ConfigError, match=fragment):
        validate_config(Schedule, data)


def test_task_seed_per_example_differs_across_steps_and_ranks():
    schedule = Schedule()
    seeds = {task_seed(1, step, rank, schedule) for step in range(200) for rank in range(8)}
    assert len(seeds) == 200 * 8
    assert task_seed(1, 5, 0, schedule) != task_seed(2, 5, 0, schedule)
    assert task_seed(1, 5, 3, schedule) == task_seed(1, 5, 3, schedule)


def test_task_seed_per_batch_is_shared_across_ranks_and_held_for_inner_steps():
    schedule = Schedule(granularity="batch", inner_steps=4)
    for step in range(1, 13):
        seeds = {task_seed(1, step, rank, schedule) for rank in range(8)}
        assert len(seeds) == 1, step
    held = [task_seed(1, step, 0, schedule) for step in range(1, 13)]
    assert held[0:4] == [held[0]] * 4 and held[4:8] == [held[4]] * 4 and held[8:12] == [held[8]] * 4
    assert len({held[0], held[4], held[8]}) == 3
    # the shared seed really gives every rank the same task
    a = sample_roles(schedule, 8, L, gen(task_seed(1, 5, 0, schedule)), GRID)[0]
    b = sample_roles(schedule, 8, L, gen(task_seed(1, 6, 7, schedule)), GRID)[0]
    assert torch.equal(a, b)


@pytest.mark.parametrize("accum", [1, 2, 3])
def test_gradient_accumulation_keeps_one_task_per_global_batch(accum):
    """inner_steps counts optimizer steps: every micro-step of a step (and of the steps the task is
    held for) gets the same task; per example, every micro-step gets its own."""
    batch = Schedule(granularity="batch", inner_steps=4)
    seeds = [[task_seed(1, step, 0, batch, micro, accum) for micro in range(accum)] for step in range(1, 9)]
    assert seeds[:4] == [[seeds[0][0]] * accum] * 4 and seeds[4:] == [[seeds[4][0]] * accum] * 4
    assert seeds[0][0] != seeds[4][0]
    per_example = Schedule()
    micro_seeds = [task_seed(1, step, 0, per_example, micro, accum) for step in range(1, 9) for micro in range(accum)]
    assert len(set(micro_seeds)) == 8 * accum
