"""The model's FLOP count against torch's own counter on a forward and backward pass."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from biglearn.flops import attended_length, training_flops
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


@pytest.mark.parametrize("absent_share", [0.0, 0.6], ids=["full roles", "marginal roles (absent dropped)"])
@pytest.mark.parametrize("name", list(SPECS))
def test_the_flop_count_matches_torchs_counter(name, absent_share):
    spec = SPECS[name]
    g = torch.Generator().manual_seed(0)
    model = UniversalTransformer(spec)
    for block in model.blocks:
        # torch's counter does not see CPU's fused attention kernel; the written-out one is the
        # same two batched products.
        block.explicit_attention = True
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
