"""The big-learning loss: NLL of the targets only, with the documented weightings."""

from __future__ import annotations

import math

import pytest
import torch

from biglearn.objectives import big_learning_loss, family_means
from biglearn.roles import ABSENT, FAMILIES, SOURCE, TARGET, Family

B, L, V = 5, 7, 6


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, L, V, generator=g)
    values = torch.randint(0, V, (B, L), generator=g)
    roles = torch.randint(0, 3, (B, L), generator=g).to(torch.int8)
    roles[:, 0] = TARGET  # every row has a target
    roles[0] = TARGET  # a joint row
    roles[1, 1:] = SOURCE
    roles[2, 1:] = ABSENT
    family = torch.tensor([0, 2, 1, 2, 3])
    return logits, values, roles, family


@pytest.mark.parametrize("weighting", ["inverse_ratio", "uniform"])
def test_only_targets_contribute(weighting):
    logits, values, roles, family = _batch()
    loss, stats = big_learning_loss(logits, values, roles, family, weighting)
    not_target = (roles != TARGET)[..., None]
    assert not_target.any()

    # arbitrary logits at source and absent positions: nothing changes
    noise = 100 * torch.randn(B, L, V, generator=torch.Generator().manual_seed(1))
    loss2, stats2 = big_learning_loss(torch.where(not_target, noise, logits), values, roles, family, weighting)
    assert torch.allclose(loss, loss2, atol=1e-6)
    assert torch.allclose(stats, stats2, atol=1e-6)

    # a "model" that copies the sources (all mass on the true value off the targets) gains nothing
    copier = torch.nn.functional.one_hot(values, V).float() * 50.0
    loss3, _ = big_learning_loss(torch.where(not_target, copier, logits), values, roles, family, weighting)
    assert torch.allclose(loss, loss3, atol=1e-6)

    # and the loss has no gradient off the targets
    leaf = logits.clone().requires_grad_(True)
    big_learning_loss(leaf, values, roles, family, weighting)[0].backward()
    assert (leaf.grad[(roles != TARGET)] == 0).all()
    assert (leaf.grad[(roles == TARGET)].abs().sum(-1) > 0).all()

    # changing a target's values or logits does change the loss (the check above can fail)
    loss4, _ = big_learning_loss(torch.where(~not_target, noise, logits), values, roles, family, weighting)
    assert not torch.allclose(loss, loss4)


@pytest.mark.parametrize("weighting", ["inverse_ratio", "uniform"])
def test_perfect_predictor_has_zero_loss(weighting):
    _, values, roles, family = _batch()
    perfect = torch.nn.functional.one_hot(values, V).float() * 60.0
    loss, stats = big_learning_loss(perfect, values, roles, family, weighting)
    assert 0 <= loss.item() < 1e-6
    assert stats[:, 0].abs().max() < 1e-6
    wrong = torch.nn.functional.one_hot((values + 1) % V, V).float() * 60.0
    assert big_learning_loss(wrong, values, roles, family, weighting)[0] > 50


def test_weightings_by_hand():
    # two examples, V = 2: example 0 has targets at 0 and 1; example 1 one target at 2.
    logits = torch.tensor(
        [
            [[0.0, 1.0], [2.0, 0.0], [5.0, -5.0]],
            [[3.0, 3.0], [-1.0, 4.0], [3.0, -3.0]],
        ]
    )
    values = torch.tensor([[1, 1, 0], [0, 1, 1]])
    roles = torch.tensor([[TARGET, TARGET, SOURCE], [ABSENT, SOURCE, TARGET]], dtype=torch.int8)
    family = torch.tensor([2, 4])

    def nll(pair, value):
        return -(pair[value] - math.log(math.exp(pair[0]) + math.exp(pair[1])))

    n00 = nll([0.0, 1.0], 1)
    n01 = nll([2.0, 0.0], 1)
    n12 = nll([3.0, -3.0], 1)
    inverse_ratio = ((n00 + n01) / 2 + n12) / 2
    uniform = (n00 + n01 + n12) / 3
    assert abs(inverse_ratio - uniform) > 0.05  # the example tells the two apart

    got_ir, stats = big_learning_loss(logits, values, roles, family, "inverse_ratio")
    got_u, stats_u = big_learning_loss(logits, values, roles, family, "uniform")
    assert got_ir.item() == pytest.approx(inverse_ratio, rel=1e-6)
    assert got_u.item() == pytest.approx(uniform, rel=1e-6)
    assert torch.equal(stats, stats_u)  # stats are per-example means whatever the weighting

    expected = torch.zeros(len(FAMILIES), 2)
    expected[2] = torch.tensor([(n00 + n01) / 2, 1.0])
    expected[4] = torch.tensor([n12, 1.0])
    assert torch.allclose(stats, expected, atol=1e-6)
    assert not stats.requires_grad


def test_family_stats_sum_and_count():
    logits, values, roles, family = _batch(3)
    _, stats = big_learning_loss(logits, values, roles, family)
    per_example = []
    for b in range(B):
        t = roles[b] == TARGET
        per_example.append(torch.nn.functional.cross_entropy(logits[b][t], values[b][t]).item())
    for index in range(len(FAMILIES)):
        rows = [b for b in range(B) if family[b] == index]
        assert stats[index, 1].item() == len(rows)
        assert stats[index, 0].item() == pytest.approx(sum(per_example[b] for b in rows), abs=1e-5)
    means = family_means(stats)
    present = {FAMILIES[i].value for i in family.tolist()}
    assert set(means) == present
    assert means[Family.conditional.value] == pytest.approx((per_example[1] + per_example[3]) / 2, rel=1e-5)
