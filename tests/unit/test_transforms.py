"""Haar-random orthogonal transforms: orthogonal, Haar (the QR sign fix), reproducible."""

from __future__ import annotations

import pytest
import torch

from biglearn.transforms import apply_orthogonal, haar_orthogonal


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_matrices_are_orthogonal(n, dtype, tol):
    a = haar_orthogonal(n, gen(0), batch=50, dtype=dtype)
    assert a.shape == (50, n, n) and a.dtype == dtype
    eye = torch.eye(n, dtype=dtype)
    assert torch.allclose(a @ a.transpose(-1, -2), eye.expand(50, n, n), atol=tol)
    assert torch.allclose(a.transpose(-1, -2) @ a, eye.expand(50, n, n), atol=tol)
    single = haar_orthogonal(n, gen(0), dtype=dtype)
    assert single.shape == (n, n)


def test_reproducible_from_a_seed_and_different_across_seeds():
    assert torch.equal(haar_orthogonal(5, gen(7), batch=3), haar_orthogonal(5, gen(7), batch=3))
    assert not torch.allclose(haar_orthogonal(5, gen(7), batch=3), haar_orthogonal(5, gen(8), batch=3))
    # the global RNG is neither used nor disturbed
    torch.manual_seed(0)
    before = torch.rand(1)
    torch.manual_seed(0)
    haar_orthogonal(4, gen(1), batch=2)
    assert torch.equal(torch.rand(1), before)


def test_haar_sign_fix_centres_every_entry():
    # Haar: E[A_ij] = 0 and E[A_ij^2] = 1/n. Plain QR (no sign fix) gives diagonal means near
    # -0.48 for n = 3, so this fails without the fix.
    n, draws = 3, 20000
    a = haar_orthogonal(n, gen(0), batch=draws, dtype=torch.float64)
    assert a.mean(0).abs().max() < 0.025
    assert torch.allclose(a.square().mean(0), torch.full((n, n), 1 / n, dtype=torch.float64), atol=0.02)
    positive = (torch.linalg.det(a) > 0).double().mean()
    assert abs(positive - 0.5) < 0.02  # rotations and reflections alike


def test_two_dimensional_angles_are_uniform():
    a = haar_orthogonal(2, gen(1), batch=16000, dtype=torch.float64)
    angle = torch.atan2(a[:, 1, 0], a[:, 0, 0])
    counts = torch.histc(angle, bins=8, min=-torch.pi, max=torch.pi)
    expected = 16000 / 8
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 24.3  # 7 degrees of freedom, p = 0.001


def test_apply_orthogonal_broadcasts_and_keeps_norms():
    a = haar_orthogonal(3, gen(2), batch=4, dtype=torch.float64)  # [4, 3, 3]
    x = torch.randn(4, 10, 3, generator=gen(3), dtype=torch.float64)
    y = apply_orthogonal(a.unsqueeze(1), x)  # one matrix per row of x, shared over its 10 samples
    assert y.shape == (4, 10, 3)
    assert torch.allclose(y, x @ a.transpose(-1, -2))
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))
    with pytest.raises(ValueError, match="does not act"):
        apply_orthogonal(a, torch.zeros(4, 2))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="n >= 1"):
        haar_orthogonal(0, gen(0))
    with pytest.raises(ValueError, match="batch >= 1"):
        haar_orthogonal(2, gen(0), batch=0)
