"""The model's FLOP count against torch's own counter on a forward and backward pass."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from biglearn.flops import adversarial_step_flops, attended_length, peak_flops, training_flops
from biglearn.gan import critic_loss, draw_noise, fill_targets, frozen, generator_loss, pose_tasks, view
from biglearn.model import ModelConfig, ModelSpec, UniversalTransformer
from biglearn.roles import ABSENT

B, L, V, P = 8, 64, 17, 2


def token_spec(**model) -> ModelSpec:
    memory_rows = 50 if model.get("retrieval_neighbours") else 0
    return ModelSpec(
        model=ModelConfig(d_model=64, num_layers=2, num_heads=4, **model),
        length=L,
        vocab_size=V,
        grid=(8, 8),
        memory_rows=memory_rows,
    )


def patch_spec(**fields) -> ModelSpec:
    return ModelSpec(
        model=ModelConfig(d_model=32, num_layers=2, num_heads=2, summary_width=16), length=12, patch_dim=P, **fields
    )


SPECS = {
    "tokens": token_spec(),
    "tokens, all positions attended": token_spec(drop_absent=False),
    "tokens with retrieval": token_spec(retrieval_neighbours=3),
    "tokens with a summary path": token_spec(summary_width=32),
    "generator": patch_spec(noise_dim=4),
    "critic": patch_spec(critic=True),
}


def counted_model(spec: ModelSpec) -> UniversalTransformer:
    model = UniversalTransformer(spec)
    for block in model.blocks:
        # torch's counter does not see CPU's fused attention kernel; the written-out one is the
        # same two batched products.
        block.explicit_attention = True
    return model


@pytest.mark.parametrize("absent_share", [0.0, 0.6], ids=["full roles", "marginal roles (absent dropped)"])
@pytest.mark.parametrize("name", list(SPECS))
def test_the_flop_count_matches_torchs_counter(name, absent_share):
    spec = SPECS[name]
    g = torch.Generator().manual_seed(0)
    model = counted_model(spec)
    if model.memory is not None:
        model.memory.remember(torch.randint(0, V, (spec.memory_rows, L), generator=g))
    length = spec.length
    roles = torch.randint(1, 3, (B, length), generator=g)
    roles = torch.where(torch.rand(B, length, generator=g) < absent_share, ABSENT, roles).to(torch.int8)
    values = (
        torch.randint(0, V, (B, length), generator=g) if spec.vocab_size else torch.randn(B, length, P, generator=g)
    )
    noise = torch.randn(B, length, spec.noise_dim, generator=g) if spec.noise_dim else None
    with FlopCounterMode(display=False) as counter:
        out = model(values, roles, noise) if noise is not None else model(values, roles)
        out.float().square().mean().backward()
    assert training_flops(spec, roles) == pytest.approx(counter.get_total_flops(), rel=0.01)
    if absent_share and spec.model.drop_absent:
        assert attended_length(spec, roles) < length + spec.critic, "dropped positions are not attended"


class OnlyGlobal:
    """Stands in for FlopCounterMode's module tracker: every count goes to the total alone."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


@pytest.mark.parametrize("r1_weight", [0.0, 1.0], ids=["without R1", "with R1"])
def test_an_adversarial_step_counts_as_torchs_counter(r1_weight):
    """The passes of a BigLearn-GAN micro-step as AdversarialStep runs them, on plain modules."""
    generator_spec, critic_spec = patch_spec(noise_dim=4), patch_spec(critic=True)
    generator, critic = counted_model(generator_spec), counted_model(critic_spec)
    g = torch.Generator().manual_seed(0)
    roles = torch.randint(1, 3, (B, 12), generator=g)
    roles = torch.where(torch.rand(B, 12, generator=g) < 0.4, ABSENT, roles).to(torch.int8)
    real = torch.randn(B, 12, P, generator=g)
    task = pose_tasks(roles, P, 0.0, g, False)
    counter = FlopCounterMode(display=False)
    counter.mod_tracker = OnlyGlobal()  # its module tracker fails inside autograd.grad(create_graph=True)
    with counter:
        with torch.no_grad():
            fake = fill_targets(generator, real, task.generator_roles_BL, draw_noise(real, 4, g))
        loss = critic_loss(
            critic, view(real, task), view(fake, task), task.critic_roles_BL, task.transformed_B, r1_weight
        )
        loss.loss.backward()
        with frozen(critic):
            fake = fill_targets(generator, real, task.generator_roles_BL, draw_noise(real, 4, g))
            generator_loss(critic, view(fake, task), task.critic_roles_BL, task.transformed_B).mean().backward()
    counted = adversarial_step_flops(
        generator_spec, critic_spec, task.generator_roles_BL, task.critic_roles_BL, r1=r1_weight > 0
    )
    assert counted == pytest.approx(counter.get_total_flops(), rel=0.05)


def test_the_peak_of_a_cpu_is_its_measured_matmul_rate():
    flops, source = peak_flops(torch.device("cpu"), bf16=False)
    assert 1e8 < flops < 1e14 and source == f"float32 matmul measured on {torch.get_num_threads()} CPU threads"
