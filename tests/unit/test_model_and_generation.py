"""The universal model hides what it must not see; decoding fills targets and nothing else."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from biglearn.generation import complete, decoding_nll
from biglearn.model import ModelConfig, ModelSpec, UniversalTransformer
from biglearn.roles import ABSENT, SOURCE, TARGET

V, LEN = 7, 12


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_model(
    drop_absent: bool = True, std: float = 0.3, length: int = LEN, summary_width: int = 0, retrieval: int = 0
) -> UniversalTransformer:
    """A tiny model whose weights are redrawn with a larger spread, so that context matters; with
    `retrieval`, a memory of 30 random rows."""
    cfg = ModelConfig(
        d_model=32,
        num_layers=2,
        num_heads=4,
        drop_absent=drop_absent,
        summary_width=summary_width,
        retrieval_neighbours=retrieval,
    )
    rows = 30 if retrieval else 0
    model = UniversalTransformer(ModelSpec(model=cfg, length=length, vocab_size=V, memory_rows=rows)).eval()
    g = gen(1234)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    if retrieval:
        model.memory.remember(torch.randint(0, V, (rows, length), generator=g))
    return model


def random_task(batch: int = 6, seed: int = 0):
    g = gen(seed)
    values = torch.randint(0, V, (batch, LEN), generator=g)
    roles = torch.randint(0, 3, (batch, LEN), generator=g).to(torch.int8)
    roles[:, 0], roles[:, 1] = TARGET, SOURCE
    roles[0] = torch.where(torch.arange(LEN) < 4, SOURCE, TARGET)  # a row with no absent position
    return values, roles


@pytest.mark.parametrize(
    "drop_absent, summary_width, retrieval", [(True, 0, 0), (False, 0, 0), (True, 16, 0), (True, 0, 3)]
)
def test_model_never_sees_values_at_targets_or_absent_positions(drop_absent, summary_width, retrieval):
    model = make_model(drop_absent, summary_width=summary_width, retrieval=retrieval)
    values, roles = random_task()
    hidden = roles != SOURCE
    # anything at all, even out of the vocabulary, may sit at hidden positions
    other = torch.where(hidden, torch.randint(-3, V + 3, values.shape, generator=gen(9)), values)
    assert (other != values)[hidden].sum() > 10
    with torch.no_grad():
        base = model(values, roles)
        assert base.shape == (*values.shape, V)
        assert torch.allclose(base, model(other, roles), atol=1e-6)  # at every position
        # control: a source value does matter
        changed = values.clone()
        changed[:, 1] = (changed[:, 1] + 1) % V
        moved = (model(changed, roles) - base).abs()[roles == TARGET]
    assert moved.max() > 1e-3


def test_retrieval_finds_the_nearest_rows_on_sources_and_never_a_training_example_itself():
    model = make_model(retrieval=4)
    memory = model.memory.examples
    values = memory[:5].clone()  # training examples, as the loss sees them
    roles = torch.full_like(values, TARGET, dtype=torch.int8)
    roles[:, : LEN // 2] = SOURCE
    roles[:, -2:] = ABSENT
    roles[4] = TARGET  # no source: nothing to retrieve by
    source = roles == SOURCE
    with torch.no_grad():
        found = model.memory.nearest(values, roles)  # eval mode: as for a held-out example
        distance = ((values[:, None, :] - memory[None]).square() * source[:, None, :]).sum(-1)
        assert torch.equal(distance.gather(1, found), distance.sort(1).values[:, :4])
        assert found[:4, 0].tolist() == [0, 1, 2, 3]  # in the memory, an example is its own nearest
        served = model(values, roles)
        model.train()
        found_in_training = model.memory.nearest(values, roles)
        trained = model(values, roles)
    assert all(b not in found_in_training[b].tolist() for b in range(5))
    assert not torch.allclose(served[:4], trained[:4])
    # an example with no source gets no retrieval at all, whatever the memory holds
    model.eval()
    with torch.no_grad():
        before = model(values[4:], roles[4:])
        model.memory.examples.random_(0, V, generator=gen(7))
        assert torch.equal(model(values[4:], roles[4:]), before)


def _short_model(model: UniversalTransformer, kept: torch.Tensor) -> UniversalTransformer:
    """The same weights on a sequence of only the `kept` positions (their position embeddings)."""
    K = int(kept.sum())
    short = UniversalTransformer(ModelSpec(model=model.spec.model, length=K, vocab_size=V)).eval()
    state = dict(model.state_dict())
    state["pos_embed"] = state["pos_embed"][kept]
    short.load_state_dict(state)
    return short


def test_dropping_absent_positions_equals_running_on_the_kept_positions_only():
    model = make_model(drop_absent=True)
    values, roles = random_task(batch=6, seed=1)
    roles[1, 5:9] = ABSENT
    roles[2, 2:] = TARGET  # no absent position
    counts = (roles != ABSENT).sum(1)
    assert len(set(counts.tolist())) > 2  # rows of different kept lengths: padding and key mask in use
    with torch.no_grad():
        out = model(values, roles)
        for b in range(len(values)):
            kept = roles[b] != ABSENT
            alone = model(values[b : b + 1], roles[b : b + 1])[0]
            assert torch.allclose(out[b, kept], alone[kept], atol=1e-5), b
            short = _short_model(model, kept)(values[b : b + 1, kept], roles[b : b + 1, kept])[0]
            assert torch.allclose(out[b, kept], short, atol=1e-5), b
            # the absent positions' contents (values, and whether the row holds them) change nothing
            other = values[b : b + 1].clone()
            other[0, ~kept] = (other[0, ~kept] + 3) % V
            assert torch.allclose(model(other, roles[b : b + 1])[0, kept], short, atol=1e-5), b

        # with nothing absent, drop_absent makes no difference (same weights)
        full = roles[2:3]
        dense = make_model(drop_absent=False)
        assert torch.allclose(model(values[2:3], full), dense(values[2:3], full), atol=1e-6)


def decoding_task(batch: int = 8):
    g = gen(4)
    values = torch.randint(0, V, (batch, LEN), generator=g)
    roles = torch.randint(0, 3, (batch, LEN), generator=g).to(torch.int8)
    roles[:, :2] = torch.tensor([SOURCE, TARGET], dtype=torch.int8)
    values = torch.where(roles == TARGET, -1, values)  # placeholders to be filled
    values = torch.where(roles == ABSENT, 99, values)  # sentinel that must survive untouched
    return values, roles


@pytest.mark.parametrize("guidance", [0.0, 2.0])
@pytest.mark.parametrize("order", ["confidence", "random"])
@pytest.mark.parametrize("steps", [1, 3, LEN])
def test_complete_fills_targets_only_and_is_seeded(order, steps, guidance):
    model = make_model(std=0.05)  # a broad predictive distribution: sampling is visibly random
    values, roles = decoding_task()
    values_in, roles_in = values.clone(), roles.clone()
    target = roles == TARGET
    kw = dict(steps=steps, order=order, guidance=guidance)
    out = complete(model, values, roles, gen(0), temperature=1.0, **kw)
    assert out.dtype == torch.int64 and out.shape == values.shape
    assert torch.equal(out[~target], values[~target])  # sources and absent positions untouched
    assert ((out[target] >= 0) & (out[target] < V)).all()  # every target filled with a valid token
    assert torch.equal(complete(model, values, roles, gen(0), temperature=1.0, **kw), out)
    assert not torch.equal(complete(model, values, roles, gen(1), temperature=1.0, **kw), out)
    greedy = complete(model, values, roles, gen(0), temperature=0.0, **dict(kw, order="confidence"))
    assert torch.equal(complete(model, values, roles, gen(5), temperature=0.0, **dict(kw, order="confidence")), greedy)
    assert torch.equal(greedy[~target], values[~target])
    assert torch.equal(values, values_in) and torch.equal(roles, roles_in)  # inputs not modified in place


class ChainModel(nn.Module):
    """A context-dependent stand-in: at position i it prefers (sum of shown values + i) mod V,
    more confidently at later positions, so the commit order changes the result."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(1.0 + 0.25 * torch.arange(LEN, dtype=torch.float32))

    def forward(self, values, roles):
        shown = torch.where(roles.long() == SOURCE, values, 0).sum(1, keepdim=True)
        best = (shown + torch.arange(LEN)) % V
        return nn.functional.one_hot(best, V).float() * self.scale[:, None]


@pytest.mark.parametrize("steps", [1, 4, LEN])
def test_top_k_1_equals_greedy(steps):
    values, roles = decoding_task()
    for model in (make_model(), ChainModel()):
        greedy = complete(model, values, roles, gen(0), steps=steps, order="confidence", temperature=0.0)
        top1 = complete(model, values, roles, gen(0), steps=steps, order="confidence", temperature=1.0, top_k=1)
        assert torch.equal(top1, greedy), (type(model).__name__, steps)
    # with one step the order is irrelevant
    model = make_model()
    greedy = complete(model, values, roles, gen(0), steps=1, order="random", temperature=0.0)
    assert torch.equal(complete(model, values, roles, gen(3), steps=1, order="random", top_k=1), greedy)


class CueModel(nn.Module):
    """Every position is 1 with probability 0.6 (else 0) when position 0 is a source holding 1,
    and 1 or 0 evenly when it is not shown."""

    def forward(self, values, roles):
        cued_B = (roles[:, 0].long() == SOURCE) & (values[:, 0] == 1)
        probs_BV = torch.zeros(values.shape[0], V)
        probs_BV[:, 1] = torch.where(cued_B, 0.6, 0.5)
        probs_BV[:, 0] = 1 - probs_BV[:, 1]
        return probs_BV.log()[:, None, :].expand(-1, values.shape[1], -1)


def test_guidance_samples_the_sharpened_conditional():
    rows = 4000
    roles = torch.full((rows, LEN), TARGET, dtype=torch.int8)
    roles[:, 0] = SOURCE
    values = torch.ones(rows, LEN, dtype=torch.long)
    model = CueModel()
    share_of_ones = {
        w: complete(model, values, roles, gen(0), steps=1, guidance=w)[:, 1:].float().mean().item() for w in (0.0, 3.0)
    }
    # p(1) under guidance 3: 0.6 * 1.2^3 / (0.6 * 1.2^3 + 0.4 * 0.8^3) = 0.835
    assert share_of_ones[0.0] == pytest.approx(0.6, abs=0.01)
    assert share_of_ones[3.0] == pytest.approx(0.835, abs=0.01)
    # with no sources there is nothing to guide toward: the very same draws
    joint = torch.full((rows, LEN), TARGET, dtype=torch.int8)
    assert torch.equal(complete(model, values, joint, gen(0), guidance=3.0), complete(model, values, joint, gen(0)))


def test_guidance_calls_the_model_again_only_for_rows_with_sources():
    rows = 4000
    roles = torch.full((rows, LEN), TARGET, dtype=torch.int8)
    roles[: rows // 2, 0] = SOURCE
    values = torch.ones(rows, LEN, dtype=torch.long)
    model = CueModel()
    seen_rows = []
    model.register_forward_hook(lambda module, args, out: seen_rows.append(args[0].shape[0]))
    guided = complete(model, values, roles, [gen(i) for i in range(rows)], steps=1, guidance=3.0)
    assert seen_rows == [rows, rows // 2]
    # per-row generators: each row draws as it would alone, so the unsourced half matches plain sampling
    plain = complete(model, values, roles, [gen(i) for i in range(rows)], steps=1)
    assert torch.equal(guided[rows // 2 :], plain[rows // 2 :])
    assert guided[: rows // 2, 1:].float().mean().item() == pytest.approx(0.835, abs=0.015)


def test_complete_rejects_zero_steps_and_negative_guidance():
    values, roles = decoding_task()
    with pytest.raises(ValueError, match="steps"):
        complete(make_model(), values, roles, gen(0), steps=0)
    with pytest.raises(ValueError, match="guidance"):
        complete(make_model(), values, roles, gen(0), guidance=-1.0)


def test_decoding_nll_single_step_equals_the_target_nll():
    model = make_model()
    values, roles = random_task(batch=6, seed=2)
    nll = decoding_nll(model, values, roles, gen(0), steps=1)
    with torch.no_grad():
        logp = model(values, roles).log_softmax(-1).gather(2, values[..., None])[..., 0]
    by_hand = -(logp * (roles == TARGET)).sum(1)
    assert nll.shape == (6,)
    assert torch.allclose(nll, by_hand, atol=1e-5)
    for steps in (2, 4, LEN):
        multi = decoding_nll(model, values, roles, gen(0), steps=steps)
        assert torch.isfinite(multi).all() and (multi > 0).all()
        assert torch.equal(multi, decoding_nll(model, values, roles, gen(0), steps=steps))
    # the values at absent positions do not matter
    other = torch.where(roles == ABSENT, (values + 2) % V, values)
    assert torch.allclose(
        decoding_nll(model, other, roles, gen(0), steps=3), decoding_nll(model, values, roles, gen(0), steps=3)
    )


def test_decoding_nll_two_steps_is_the_chain_rule_along_a_random_order():
    model = make_model()
    values = torch.randint(0, V, (1, LEN), generator=gen(6))
    roles = torch.full((1, LEN), SOURCE, dtype=torch.int8)
    roles[0, 3], roles[0, 7], roles[0, 9:] = TARGET, TARGET, ABSENT

    def logp(position, roles_now):
        with torch.no_grad():
            return model(values, roles_now).log_softmax(-1)[0, position, values[0, position]].item()

    def reveal(position):
        r = roles.clone()
        r[0, position] = SOURCE
        return r

    first_3 = -(logp(3, roles) + logp(7, reveal(3)))
    first_7 = -(logp(7, roles) + logp(3, reveal(7)))
    assert abs(first_3 - first_7) > 1e-4  # the order matters for this model
    seen = set()
    for seed in range(12):
        nll = decoding_nll(model, values, roles, gen(seed), steps=2).item()
        match = [name for name, ref in (("3 first", first_3), ("7 first", first_7)) if abs(nll - ref) < 1e-4]
        assert match, (nll, first_3, first_7)
        seen.update(match)
    assert seen == {"3 first", "7 first"}


def test_bf16_cpu_attention_agrees_with_fp32_and_checkpointing_keeps_gradients():
    """The bf16 CPU path (explicit attention) stays close to fp32 SDPA, masks included; and
    recomputing blocks in backward (activation checkpointing) gives the same gradients."""
    values, roles = random_task(batch=8, seed=5)
    model = make_model(std=0.1)
    target = roles == TARGET
    with torch.no_grad():
        reference = model(values, roles)[target]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(values, roles)[target].float()
    assert (low - reference).abs().max() < 0.1 * reference.abs().max()

    def gradients(checkpointed: bool) -> list[torch.Tensor]:
        model.zero_grad()
        model.train()
        model.checkpoint_activations = checkpointed
        model(values, roles)[target].logsumexp(-1).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for plain, recomputed in zip(gradients(False), gradients(True)):
        torch.testing.assert_close(plain, recomputed)
