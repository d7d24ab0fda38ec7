"""BigLearn-GAN: adversarial big learning for continuous data (docs/method.md section 4, our design).

A generator G (a `UniversalTransformer` with per-target noise) fills the targets of x given its
sources: x_hat = (x_S, G(x_S, z; S, T)_T). A critic D (a `UniversalTransformer` with a class
token) sees sources and targets with their roles and tells real (x_S, x_T) from (x_S, x_hat_T):
both share x_S, so each (S, T) term compares q(x_S) q(x_T | x_S) with q(x_S) p_G(x_T | x_S).
Losses: the non-saturating GAN loss, and an R1 penalty (squared gradient of D's score with
respect to its input) on real examples only.

Transformed domains (the rule of biglearn/transforms.py): with probability
`transform_probability` a task is posed on y = A x for a fresh Haar-orthogonal A, drawn per
example (or once per batch when the schedule draws one task per batch):
  * small examples, L * P <= FLATTEN_MAX: A mixes the whole flattened example. A view
    coordinate then depends on every position, so y_S is not a function of x_S: the task
    becomes the marginal of y over the positions of S and T (G draws the whole example
    jointly, D judges y at those positions as targets; the rest stays absent). With L = 2,
    P = 1 and one target this is the authors' transformed marginal of (A x)_1.
  * larger examples: the same [P, P] matrix rotates every patch. Positions keep their
    identity, so the task keeps its roles: real and fake still share y_S = A x_S.
D is told that an example is transformed (its `view` embedding) but not which A: within a
transformed batch it learns to tell apart the views it is shown.

Legend: B = batch, L = positions, P = patch dimension, Z = noise dimension, n = dimension A acts on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import nn

from biglearn.model import ModelSpec
from biglearn.roles import ABSENT, TARGET
from biglearn.transforms import apply_orthogonal, haar_orthogonal

FLATTEN_MAX = 256


class GanTask(NamedTuple):
    """What G fills and what D judges, for a batch of tasks drawn by the schedule."""

    roles_BL: torch.Tensor
    """The schedule's tasks (int8)."""
    generator_roles_BL: torch.Tensor
    """The targets G fills: the task's own, or every position for a flattened transformed view."""
    critic_roles_BL: torch.Tensor
    """The roles D is told."""
    transformed_B: torch.Tensor
    """bool: the example is judged on y = A x."""
    a: torch.Tensor | None
    """A_Bnn (n = L*P flattened, else P), None when no example of the batch is transformed."""


def flattens(length: int, patch_dim: int) -> bool:
    """Whether transformed views mix the whole example (else: every patch alike)."""
    return length * patch_dim <= FLATTEN_MAX


def pose_tasks(
    roles_BL: torch.Tensor,
    patch_dim: int,
    transform_probability: float,
    generator: torch.Generator,
    per_batch: bool = False,
) -> GanTask:
    """Decides which tasks are posed in a transformed domain and draws their A.

    Nothing is drawn from `generator` when transform_probability is 0, so plain schedules
    consume the same random numbers as before transforms existed. `per_batch` shares one
    decision and one A across the batch (the schedule's granularity='batch').
    """
    B, L = roles_BL.shape
    device = roles_BL.device
    if transform_probability <= 0:
        none_B = torch.zeros(B, dtype=torch.bool, device=device)
        return GanTask(roles_BL, roles_BL, roles_BL, none_B, None)
    draws = 1 if per_batch else B
    transformed_B = torch.rand(draws, generator=generator, device=generator.device) < transform_probability
    n = L * patch_dim if flattens(L, patch_dim) else patch_dim
    a = haar_orthogonal(n, generator, batch=draws)
    transformed_B, a = transformed_B.to(device).expand(B), a.to(device).expand(B, n, n)
    if not flattens(L, patch_dim):
        return GanTask(roles_BL, roles_BL, roles_BL, transformed_B, a)
    everything_BL = torch.full_like(roles_BL, TARGET)
    generator_roles_BL = torch.where(transformed_B[:, None], everything_BL, roles_BL)
    judged_BL = transformed_B[:, None] & (roles_BL != ABSENT)
    critic_roles_BL = torch.where(judged_BL, everything_BL, roles_BL)
    return GanTask(roles_BL, generator_roles_BL, critic_roles_BL, transformed_B, a)


def view(values_BLP: torch.Tensor, task: GanTask) -> torch.Tensor:
    """The examples as D judges them: y = A x for transformed ones, x itself for the rest."""
    if task.a is None:
        return values_BLP
    B, L, P = values_BLP.shape
    a = task.a.to(values_BLP.dtype)
    if a.shape[-1] == L * P and a.shape[-1] != P:
        y_BLP = apply_orthogonal(a, values_BLP.reshape(B, L * P)).reshape(B, L, P)
    else:
        y_BLP = apply_orthogonal(a[:, None], values_BLP)
    return torch.where(task.transformed_B[:, None, None], y_BLP, values_BLP)


def draw_noise(
    values_BLP: torch.Tensor, noise_dim: int, generator: torch.Generator | Sequence[torch.Generator]
) -> torch.Tensor:
    """noise_BLZ from one generator for the batch, or from one per row: then a row's noise does
    not depend on the other rows (a server batches unrelated requests this way)."""
    B, L, _ = values_BLP.shape
    if isinstance(generator, torch.Generator):
        noise_BLZ = torch.randn(B, L, noise_dim, generator=generator, device=generator.device)
    else:
        if len(generator) != B:
            raise ValueError(f"got {len(generator)} generators for {B} rows")
        noise_BLZ = torch.stack([torch.randn(L, noise_dim, generator=g, device=g.device) for g in generator])
    return noise_BLZ.to(values_BLP.device)


def fill_targets(
    generator_model: nn.Module, values_BLP: torch.Tensor, roles_BL: torch.Tensor, noise_BLZ: torch.Tensor
) -> torch.Tensor:
    """x_hat: G's values at TARGET positions, `values_BLP` unchanged everywhere else."""
    out_BLP = generator_model(values_BLP, roles_BL, noise_BLZ)
    return torch.where((roles_BL == TARGET)[..., None], out_BLP.to(values_BLP.dtype), values_BLP)


@torch.no_grad()
def generate(
    generator_model: nn.Module,
    values_BLP: torch.Tensor,
    roles_BL: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator],
) -> torch.Tensor:
    """One sample per row in one generator pass: sources (and absent positions) pass through
    unchanged, targets are drawn with noise from `generator` (one, or one per row)."""
    spec = cast(ModelSpec, generator_model.spec)
    noise_BLZ = draw_noise(values_BLP, spec.noise_dim, generator)
    return fill_targets(generator_model, values_BLP, roles_BL, noise_BLZ)


class CriticLoss(NamedTuple):
    loss: torch.Tensor
    """What D minimises: mean adversarial loss + r1_weight / 2 * mean R1."""
    adversarial_B: torch.Tensor
    """softplus(-D(real)) + softplus(D(fake)) per example (detached)."""
    r1_B: torch.Tensor
    """|grad_x D(real)|^2 per example (detached); zeros when r1_weight is 0."""


def critic_loss(
    critic: nn.Module,
    real_BLP: torch.Tensor,
    fake_BLP: torch.Tensor,
    roles_BL: torch.Tensor,
    transformed_B: torch.Tensor | None,
    r1_weight: float,
    r1_critic: nn.Module | None = None,
) -> CriticLoss:
    """D's non-saturating loss with the R1 penalty, which looks at the real examples only.

    R1 runs its own forward pass of D on the real examples, through `r1_critic` (default:
    `critic`): the same network, but given unwrapped where `critic` is a DeepSpeed engine, whose
    forward hooks D's output so that any backward through it, the input-gradient one included,
    counts as the engine's backward pass and reduces gradients before they exist.
    """
    real_B = critic(real_BLP.detach(), roles_BL, transformed_B=transformed_B).float()
    fake_B = critic(fake_BLP.detach(), roles_BL, transformed_B=transformed_B).float()
    adversarial_B = F.softplus(-real_B) + F.softplus(fake_B)
    loss = adversarial_B.mean()
    r1_B = torch.zeros_like(real_B)
    if r1_weight > 0:
        r1_B = r1_penalty(r1_critic or critic, real_BLP, roles_BL, transformed_B)
        loss = loss + 0.5 * r1_weight * r1_B.mean()
    return CriticLoss(loss, adversarial_B.detach(), r1_B.detach())


def r1_penalty(
    critic: nn.Module, real_BLP: torch.Tensor, roles_BL: torch.Tensor, transformed_B: torch.Tensor | None
) -> torch.Tensor:
    """r1_B = |grad_x D(x)|^2 at the real examples, differentiable in D's parameters."""
    real_BLP = real_BLP.detach().requires_grad_(True)
    score_B = critic(real_BLP, roles_BL, transformed_B=transformed_B).float()
    (grad_BLP,) = torch.autograd.grad(score_B.sum(), real_BLP, create_graph=True)
    return grad_BLP.float().square().flatten(1).sum(1)


def generator_loss(
    critic: nn.Module, fake_BLP: torch.Tensor, roles_BL: torch.Tensor, transformed_B: torch.Tensor | None
) -> torch.Tensor:
    """loss_B: the non-saturating generator loss softplus(-D(fake)) per example."""
    return F.softplus(-critic(fake_BLP, roles_BL, transformed_B=transformed_B).float())


CHANCE_LOSS = 2 * math.log(2)
"""The critic's adversarial loss when it scores every example 0: it cannot tell real from fake."""


def critic_at_chance(adversarial: float) -> bool:
    """Whether a logging window's critic scored real and generated examples alike: its mean
    adversarial loss within 0.002 of log 4, i.e. scores of about +-0.09 where a working critic's
    differ by units. The generator learns next to nothing from such a critic. A generator that
    matched the data exactly would also leave its critic there, but a stalled critic is the
    usual cause: on the 25-GMM, critics sat there for hundreds of steps (benchmarks/README.md,
    "A critic at chance")."""
    return abs(adversarial - CHANCE_LOSS) < 2e-3


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """D's parameters take no gradient while G learns through D (its score is G's loss): they
    must not accumulate gradients, nor fire the gradient hooks a DeepSpeed engine puts on them."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    for param in trainable:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in trainable:
            param.requires_grad_(True)
