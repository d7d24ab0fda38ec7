"""Transformed domains: tasks posed on linear views y = A x with a Haar-random orthogonal A.

Big learning also matches marginals and conditionals of rotated/reflected copies of the data
(docs/method.md section 5): a fresh orthogonal A per task, then e.g. the 1-D marginal of (A x)_1 or
the conditional of (A x)_1 given (A x)_2. Because A is orthogonal, the joint of y carries the
same information as the joint of x, so the global optimum is shared by every view, while each
view's marginals and conditionals see directions that the coordinate axes do not.

Where A acts (the rule the BigLearn-GAN follows; this module only samples and applies it):
  * an example is L positions of P values each (P = 1 for scalar columns, P = patch size for
    images). When the flattened example is small, L * P <= 256 (the 2-D Gaussian mixtures,
    tables, 8x8 digits), A is one [L*P, L*P] matrix applied to the whole flattened example, so
    a view mixes every position;
  * otherwise (MNIST 28x28, CelebA 64x64) A is one [P, P] matrix applied to every patch of the
    example alike: positions keep their identity, which is what source/target roles refer to,
    and the QR cost stays O(P^3) instead of O((L*P)^3).
  A is drawn fresh per task (per outer step in the authors' habit, per example when tasks are
  drawn per example), always from an explicit torch.Generator.

Legend: B = batch of matrices, n = dimension transformed.
"""

from __future__ import annotations

import torch


def haar_orthogonal(
    n: int,
    generator: torch.Generator,
    batch: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Haar-distributed (uniform) random orthogonal matrices, rotations and reflections alike.

    QR of a standard Gaussian matrix, with each column of Q multiplied by the sign of the
    matching diagonal entry of R (Mezzadri 2007): without that fix the distribution depends on
    the QR routine's sign convention and is not Haar.

    Args:
        n: the dimension; each matrix is [n, n].
        generator: the only source of randomness (the result is on its device).
        batch: how many matrices; None returns one matrix.
    Returns:
        A_nn, or A_Bnn when `batch` is given.
    """
    if n < 1:
        raise ValueError(f"haar_orthogonal needs n >= 1, got {n}")
    if batch is not None and batch < 1:
        raise ValueError(f"haar_orthogonal needs batch >= 1, got {batch}")
    shape = (batch if batch is not None else 1, n, n)
    gauss_Bnn = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    q_Bnn, r_Bnn = torch.linalg.qr(gauss_Bnn)
    diag_Bn = torch.diagonal(r_Bnn, dim1=-2, dim2=-1)
    sign_Bn = torch.where(diag_Bn < 0, -1.0, 1.0).to(dtype)  # a zero diagonal (probability 0) counts as +
    a_Bnn = q_Bnn * sign_Bn.unsqueeze(-2)
    return a_Bnn if batch is not None else a_Bnn[0]


def apply_orthogonal(a_nn: torch.Tensor, x_n: torch.Tensor) -> torch.Tensor:
    """y = A x over the last dimension: A [..., n, n] and x [..., n] broadcast over their
    leading dimensions (give A a singleton dimension to share one matrix across samples).
    Returns y [..., n]."""
    if a_nn.shape[-1] != x_n.shape[-1] or a_nn.shape[-2] != a_nn.shape[-1]:
        raise ValueError(f"apply_orthogonal: A {tuple(a_nn.shape)} does not act on x {tuple(x_n.shape)}")
    return torch.einsum("...ij,...j->...i", a_nn, x_n)
