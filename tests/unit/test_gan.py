"""BigLearn-GAN core: G keeps the sources, D is told the roles, R1 looks at real data only,
transformed views are orthogonal and seeded, losses are finite at initialisation."""

from __future__ import annotations

import pytest
import torch

from biglearn.export import load_export, write_export
from biglearn.gan import (
    CHANCE_LOSS,
    critic_at_chance,
    critic_loss,
    draw_noise,
    fill_targets,
    flattens,
    generate,
    generator_loss,
    pose_tasks,
    view,
)
from biglearn.model import ModelConfig, ModelSpec, UniversalTransformer
from biglearn.roles import ABSENT, SOURCE, TARGET, Schedule, sample_roles

GRID = (3, 4)
L, P, Z = 12, 5, 3


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(
    critic: bool = False,
    patch_dim: int = P,
    grid=GRID,
    length: int = L,
    std: float | None = 0.3,
    summary_width: int = 0,
    retrieval: int = 0,
) -> UniversalTransformer:
    """With `retrieval`, a memory of 20 random examples."""
    cfg = ModelConfig(
        d_model=32, num_layers=2, num_heads=4, summary_width=summary_width, retrieval_neighbours=retrieval
    )
    spec = ModelSpec(
        model=cfg,
        length=length,
        patch_dim=patch_dim,
        grid=grid,
        noise_dim=0 if critic else Z,
        critic=critic,
        memory_rows=20 if retrieval else 0,
    )
    model = UniversalTransformer(spec)
    if std is not None:  # spread weights out, so that every input visibly matters
        g = gen(99)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    if retrieval:
        model.memory.remember(torch.rand(20, length, patch_dim, generator=gen(98)))
    return model


def batch(b: int = 6, seed: int = 0, length: int = L, patch_dim: int = P):
    g = gen(seed)
    values = torch.rand(b, length, patch_dim, generator=g)
    roles = torch.randint(0, 3, (b, length), generator=g).to(torch.int8)
    roles[:, 0], roles[:, 1] = TARGET, SOURCE
    return values, roles


def test_generator_keeps_sources_and_absent_positions_exactly_and_samples_vary():
    model = make()
    values, roles = batch()
    first = generate(model, values, roles, gen(1))
    kept = roles != TARGET
    assert torch.equal(first[kept], values[kept])  # bit for bit, not approximately
    again = generate(model, values, roles, gen(1))
    other = generate(model, values, roles, gen(2))
    assert torch.equal(first, again)
    assert (first - other)[roles == TARGET].abs().min() > 0  # every target moves with the noise
    with pytest.raises(ValueError, match="noise_BLZ"):
        model(values, roles)


def test_retrieving_generator_sees_sources_only_and_never_finds_a_training_example_itself():
    model = make(retrieval=3).eval()
    values, roles = batch()
    values[:3] = model.memory.examples[:3]  # three training examples
    noise = draw_noise(values, Z, gen(1))
    hidden = (roles != SOURCE)[..., None]
    other = torch.where(hidden, torch.rand(values.shape, generator=gen(5)) * 9, values)
    with torch.no_grad():
        out = fill_targets(model, values, roles, noise)
        target = (roles == TARGET)[..., None]
        assert torch.allclose(fill_targets(model, other, roles, noise), torch.where(target, out, other), atol=1e-6)
        assert model.memory.nearest(values, roles)[:3, 0].tolist() == [0, 1, 2]
        model.train()
        found = model.memory.nearest(values, roles)
        assert all(b not in found[b].tolist() for b in range(3))
        model.eval()
        model.memory.examples.mul_(-1)  # what the memory holds reaches the targets
        assert (fill_targets(model, values, roles, noise) - out)[roles == TARGET].abs().min() > 0
    with pytest.raises(ValueError, match="a critic retrieves nothing"):
        make(critic=True, retrieval=3)


@pytest.mark.parametrize("summary_width", [0, 8])
def test_critic_is_told_the_roles_and_ignores_absent_positions(summary_width):
    critic = make(critic=True, summary_width=summary_width).eval()
    values, roles = batch()
    with torch.no_grad():
        score = critic(values, roles)
        assert score.shape == (6,)
        swapped = torch.where(roles == SOURCE, TARGET, torch.where(roles == TARGET, SOURCE, ABSENT)).to(torch.int8)
        assert (critic(values, swapped) - score).abs().min() > 1e-3  # same values, other roles
        other = torch.where((roles == ABSENT)[..., None], torch.randn_like(values) * 100, values)
        assert torch.allclose(critic(other, roles), score, atol=1e-5)
        target_changed = torch.where((roles == TARGET)[..., None], values + 0.5, values)
        assert (critic(target_changed, roles) - score).abs().min() > 1e-3  # targets are seen too
        transformed = torch.ones(6, dtype=torch.bool)
        assert (critic(values, roles, transformed_B=transformed) - score).abs().min() > 1e-4


def test_r1_is_the_squared_input_gradient_on_real_data_only():
    critic = make(critic=True)
    real, roles = batch()
    fake_a, fake_b = torch.rand_like(real), torch.rand_like(real)
    fake_a.requires_grad_(True)
    first = critic_loss(critic, real, fake_a, roles, None, r1_weight=10.0)
    second = critic_loss(critic, real, fake_b, roles, None, r1_weight=10.0)
    assert torch.allclose(first.r1_B, second.r1_B)  # the fake examples play no part in R1
    x = real.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x, roles).sum(), x)
    assert torch.allclose(first.r1_B, grad.square().flatten(1).sum(1), rtol=1e-4)
    assert (first.r1_B > 0).all()
    assert torch.allclose(first.loss, first.adversarial_B.mean() + 5.0 * first.r1_B.mean(), rtol=1e-5)
    first.loss.backward()
    assert fake_a.grad is None  # D's loss does not reach back into the generated examples
    assert all(p.grad is not None for p in critic.parameters() if p is not critic.view_embed)
    changed_real = critic_loss(critic, real + 0.3, fake_b, roles, None, r1_weight=10.0)
    assert not torch.allclose(changed_real.r1_B, first.r1_B)
    assert torch.equal(critic_loss(critic, real, fake_b, roles, None, r1_weight=0.0).r1_B, torch.zeros(6))


def test_a_critic_that_scores_everything_alike_is_flagged_at_chance():
    real, roles = batch()
    fake = torch.rand_like(real)
    stalled = make(critic=True)
    with torch.no_grad():
        stalled.head.weight.zero_()
        stalled.head.bias.zero_()
    for critic, at_chance in ((stalled, True), (make(critic=True), False)):
        loss = critic_loss(critic, real, fake, roles, None, r1_weight=1.0)
        assert critic_at_chance(loss.adversarial_B.mean().item()) is at_chance
    assert critic_at_chance(CHANCE_LOSS + 1e-3) and not critic_at_chance(CHANCE_LOSS - 0.01)


@pytest.mark.parametrize("length, patch_dim, grid", [(2, 1, None), (L, P, GRID), (4, 80, (2, 2))])
def test_losses_finite_at_initialisation(length, patch_dim, grid):
    g_model = make(patch_dim=patch_dim, grid=grid, length=length, std=None)
    d_model = make(critic=True, patch_dim=patch_dim, grid=grid, length=length, std=None)
    schedule = Schedule(families={"joint": {"weight": 1}, "conditional": {"weight": 1}, "marginal": {"weight": 1}})
    values = torch.rand(16, length, patch_dim, generator=gen(0)) * 2 - 1
    roles, _ = sample_roles(schedule, 16, length, gen(1))
    task = pose_tasks(roles, patch_dim, 0.5, gen(2))
    fake = fill_targets(g_model, values, task.generator_roles_BL, draw_noise(values, Z, gen(3)))
    d = critic_loss(d_model, view(values, task), view(fake, task), task.critic_roles_BL, task.transformed_B, 10.0)
    g_loss = generator_loss(d_model, view(fake, task), task.critic_roles_BL, task.transformed_B)
    assert torch.isfinite(d.loss) and torch.isfinite(g_loss).all()
    # near log 4 and log 2: a critic at initialisation cannot tell real from fake
    assert abs(d.adversarial_B.mean() - CHANCE_LOSS) < 0.3
    assert abs(g_loss.mean() - CHANCE_LOSS / 2) < 0.3
    g_loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in g_model.parameters() if p.grad is not None)


def test_transformed_views_are_orthogonal_and_seeded():
    values, roles = batch(b=64)
    per_patch = pose_tasks(roles, P, 0.5, gen(5))  # L * P = 60 <= 256: flattened
    assert flattens(L, P) and per_patch.a.shape == (64, L * P, L * P)
    y = view(values, per_patch)
    assert torch.allclose(y.flatten(1).norm(dim=1), values.flatten(1).norm(dim=1), atol=1e-5)
    moved = (y - values).flatten(1).abs().amax(1) > 1e-4
    assert torch.equal(moved, per_patch.transformed_B) and 10 < int(moved.sum()) < 54
    again = pose_tasks(roles, P, 0.5, gen(5))
    assert torch.equal(again.a, per_patch.a) and torch.equal(view(values, again), y)
    assert not torch.allclose(pose_tasks(roles, P, 0.5, gen(6)).a, per_patch.a)

    big = torch.rand(8, 4, 80, generator=gen(0))  # L * P = 320 > 256: one A for every patch
    big_roles = torch.full((8, 4), TARGET, dtype=torch.int8)
    task = pose_tasks(big_roles, 80, 1.0, gen(7))
    assert not flattens(4, 80) and task.a.shape == (8, 80, 80)
    assert torch.allclose(view(big, task).norm(dim=2), big.norm(dim=2), atol=1e-5)  # per patch
    shared = pose_tasks(big_roles, 80, 1.0, gen(7), per_batch=True)
    assert torch.equal(shared.a[0], shared.a[7])


def test_flattened_transformed_task_is_a_marginal_over_the_tasks_positions():
    roles = torch.tensor([[SOURCE, TARGET, ABSENT, TARGET]] * 40, dtype=torch.int8)
    task = pose_tasks(roles, 1, 0.5, gen(3))
    t = task.transformed_B
    assert 0 < int(t.sum()) < 40
    assert (task.generator_roles_BL[t] == TARGET).all()  # G draws the whole example jointly
    assert torch.equal(
        task.critic_roles_BL[t], torch.tensor([[TARGET, TARGET, ABSENT, TARGET]] * int(t.sum()), dtype=torch.int8)
    )
    assert torch.equal(task.generator_roles_BL[~t], roles[~t]) and torch.equal(task.critic_roles_BL[~t], roles[~t])
    plain_generator = gen(11)
    plain = pose_tasks(roles, 1, 0.0, plain_generator)
    assert plain.a is None and not plain.transformed_B.any()
    assert torch.equal(plain_generator.get_state(), gen(11).get_state())  # nothing drawn


def test_image_models_use_two_dimensional_positions_and_export_round_trips(tmp_path):
    model = make()
    assert not hasattr(model, "pos_embed")
    pos = model.positions()
    assert torch.allclose(pos[1 * 4 + 2], model.row_embed[1] + model.col_embed[2])
    values, roles = batch()
    write_export(tmp_path / "export", model.state_dict(), model.spec, {"name": "x"}, {})
    loaded, spec = load_export(tmp_path / "export")
    assert spec == model.spec
    noise = draw_noise(values, Z, gen(0))
    with torch.no_grad():
        assert torch.allclose(loaded(values, roles, noise), model(values, roles, noise))


def test_model_spec_needs_one_kind_of_value():
    cfg = ModelConfig(d_model=32, num_layers=1, num_heads=2)
    with pytest.raises(ValueError, match="exactly one"):
        ModelSpec(model=cfg, length=4, vocab_size=5, patch_dim=3)
    with pytest.raises(ValueError, match="continuous"):
        ModelSpec(model=cfg, length=4, vocab_size=5, noise_dim=2)


def test_continuous_digits_are_patches_of_the_pixels_scaled_to_unit_range():
    import numpy as np

    from biglearn.data.digits import judge_pixels
    from biglearn.data.manifest import Manifest
    from biglearn.data.sources import digits_source

    tokens, patches = digits_source(), digits_source("patches", 2)
    assert patches.kind == "continuous" and patches.length == 16 and patches.patch_dim == 4
    values = patches.rows(np.arange(5))["values"]
    assert values.shape == (5, 16, 4) and values.min() >= 0 and values.max() <= 1
    manifest = Manifest(
        name="digits",
        kind="continuous",
        length=16,
        patch_dim=4,
        geometry=patches.geometry,
        columns=["values"],
        splits={},
    )
    assert np.allclose(judge_pixels(values, manifest), tokens.rows(np.arange(5))["values"])


def test_sample_coverage_counts_modes_with_enough_close_samples():
    import numpy as np

    from biglearn.simulate.modes import paper_modes, sample_coverage

    means, variance = paper_modes("gmm25")
    rng = np.random.default_rng(0)
    data = means[rng.integers(0, 25, 2500)] + np.sqrt(variance) * rng.standard_normal((2500, 2))
    assert sample_coverage(data, "gmm25")["modes_covered"] == 25
    collapsed = means[[0]] + np.sqrt(variance) * rng.standard_normal((2500, 2))
    collapsed[:10] = means[5]  # a few stray samples elsewhere do not cover a mode
    assert sample_coverage(collapsed, "gmm25")["modes_covered"] == 1
    assert sample_coverage(data + 10, "gmm25")["high_quality"] == 0
