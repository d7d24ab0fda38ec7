"""The 2-GMM landscape study (paper Section 3.3; docs/method.md section 6).

Data q = 1/2 N((-1, 0), 0.1 I) + 1/2 N((1, 0), 0.1 I). Model p: the same family with the two
x_1-means (mu1, mu2) free; the x_2-means stay 0, the covariances 0.1 I, the weights 1/2.

Objectives, all reverse KL, computed by Gauss-Hermite quadrature (no sampling noise):
  joint:        KL(p(x) || q(x)).
  marginal:     the mean over V rotated views y = A_theta x, theta = v pi / V, of
                KL(p(y_1) || q(y_1)) (the paper sums over views; the mean keeps the scale of
                the joint and moves no minimum).
  conditional:  the mean over the same views of E_{s ~ q(y_2)} KL(p(y_1 | y_2 = s) || q(y_1 | y_2 = s)):
                the big-learning conditional task, with the conditioning values drawn from the
                data (the public script instead sums over a fixed grid of s values).

The study evaluates each objective on a grid of (mu1, mu2), lists the grid's interior local
minima, and runs gradient descent (autograd through the quadrature) on each from the joint's
collapsed minimum, where both components sit on one data mode. That minimum is found by
descending the joint from (1, 1) nudged off the mu1 = mu2 diagonal: on the diagonal the two
components are interchangeable, so no gradient could separate them (the diagonal is a saddle).

Legend: P = grid points (parameter pairs), V = views, S = conditioning values, Q = quadrature
points, K = 2 components.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from biglearn.config import Config
from biglearn.simulate.mixture import Mixture, quadrature_points

OBJECTIVES = ("joint", "marginal", "conditional")
MODEL_VARIANCE = 0.1


class DescentSpec(Config):
    lr: PositiveFloat = 0.05
    """Gradient descent step size."""
    steps: PositiveInt = 3000
    """Gradient descent steps of each descent."""
    nudge: PositiveFloat = 0.05
    """Start offset of the joint's descent to its bad minimum: (1 - nudge, 1 + nudge)."""
    record_every: PositiveInt = 25
    """Descent steps between the points recorded on each path."""


class LandscapeConfig(Config):
    low: float = -2.0
    """Lowest mu1 and mu2 of the grid."""
    high: float = 2.0
    """Highest mu1 and mu2 of the grid."""
    points: int = Field(default=81, ge=5)
    """Grid points per axis (0.05 apart by default)."""
    views: PositiveInt = 12
    """Rotated views y = A_theta x, theta = v pi / views, the view tasks average over."""
    nodes: int = Field(default=32, ge=4, le=128)
    """Gauss-Hermite quadrature nodes per dimension."""
    chunk: PositiveInt = 128
    """Grid points evaluated per batch (bounds memory)."""
    descent: DescentSpec = DescentSpec()

    @model_validator(mode="after")
    def _check(self) -> LandscapeConfig:
        if self.high <= self.low:
            raise ValueError(f"landscape.high ({self.high}) must exceed landscape.low ({self.low})")
        return self


def model_mixture(mu_P2: torch.Tensor) -> Mixture:
    """The model at parameter pairs mu [P, 2] = (mu1, mu2)."""
    means = torch.stack([mu_P2, torch.zeros_like(mu_P2)], -1)  # [P, K=2, D=2]
    covs = MODEL_VARIANCE * torch.eye(2, dtype=mu_P2.dtype).expand(*means.shape[:-1], 2, 2)
    return Mixture.equal(means, covs)


def rotations(views: int, dtype=torch.float64) -> torch.Tensor:
    """A_theta [V, 2, 2] for theta = v pi / V: y_1 = cos x_1 + sin x_2, y_2 = -sin x_1 + cos x_2."""
    theta = torch.arange(views, dtype=dtype) * math.pi / views
    c, s = theta.cos(), theta.sin()
    return torch.stack([torch.stack([c, s], -1), torch.stack([-s, c], -1)], -2)


def joint_kl(model: Mixture, data: Mixture, nodes: int) -> torch.Tensor:
    """KL(p || q) per mixture in the batch, by quadrature under p."""
    x, w = quadrature_points(model, nodes)
    return (w * (model.log_prob(x) - data.log_prob(x))).sum(-1)


def marginal_kl(model: Mixture, data: Mixture, a_VDD: torch.Tensor, nodes: int) -> torch.Tensor:
    """Mean over views of KL(p(y_1) || q(y_1)); model batch [P] -> [P]."""
    first = a_VDD[:, :1, :]
    p_view = Mixture(model.log_weights.unsqueeze(-2), model.means.unsqueeze(-3), model.covs.unsqueeze(-4)).linear(first)
    return joint_kl(p_view, data.linear(first), nodes).mean(-1)


def conditional_kl(model: Mixture, data: Mixture, a_VDD: torch.Tensor, nodes: int) -> torch.Tensor:
    """Mean over views of E_{s ~ q(y_2)} KL(p(y_1 | s) || q(y_1 | s)); model batch [P] -> [P]."""
    q_view = data.linear(a_VDD)  # [V]
    s_VS1, w_VS = quadrature_points(q_view.marginal([1]), nodes)
    p_view = Mixture(model.log_weights.unsqueeze(-2), model.means.unsqueeze(-3), model.covs.unsqueeze(-4)).linear(a_VDD)
    p_cond = p_view.condition(s_VS1, source=[1], target=[0])  # batch [P, V, S]
    q_cond = q_view.condition(s_VS1, source=[1], target=[0])  # batch [V, S]
    t, w_t = quadrature_points(p_cond, nodes)  # [P, V, S, Q, 1]
    kl_PVS = (w_t * (p_cond.log_prob(t) - q_cond.log_prob(t))).sum(-1)
    return (w_VS * kl_PVS).sum(-1).mean(-1)


def objective(name: str, cfg: LandscapeConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    """mu [P, 2] -> objective [P] (differentiable)."""
    data = Mixture.paper("gmm2")
    a = rotations(cfg.views)
    fns = {
        "joint": lambda m: joint_kl(m, data, cfg.nodes),
        "marginal": lambda m: marginal_kl(m, data, a, cfg.nodes),
        "conditional": lambda m: conditional_kl(m, data, a, cfg.nodes),
    }
    return lambda mu_P2: fns[name](model_mixture(mu_P2))


def grid_values(fn: Callable, cfg: LandscapeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(axis [G], values [G, G]) with values[i, j] = fn at (mu1 = axis[i], mu2 = axis[j])."""
    axis = torch.linspace(cfg.low, cfg.high, cfg.points, dtype=torch.float64)
    mu = torch.cartesian_prod(axis, axis)
    with torch.no_grad():
        values = torch.cat([fn(chunk) for chunk in mu.split(cfg.chunk)])
    return axis, values.reshape(cfg.points, cfg.points)


def local_minima(axis: torch.Tensor, values: torch.Tensor) -> list[dict]:
    """Interior grid points lower than all 8 neighbours, lowest first."""
    centre = values[1:-1, 1:-1]
    lower = torch.ones_like(centre, dtype=torch.bool)
    g = values.shape[0]
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di or dj:
                lower &= centre < values[1 + di : g - 1 + di, 1 + dj : g - 1 + dj]
    found = [
        {"mu": [float(axis[i + 1]), float(axis[j + 1])], "value": float(centre[i, j])}
        for i, j in lower.nonzero().tolist()
    ]
    return sorted(found, key=lambda m: m["value"])


def descend(fn: Callable, start: tuple[float, float], spec: DescentSpec) -> dict:
    """Plain gradient descent on mu = (mu1, mu2) from `start`; returns the path and the end."""
    mu = torch.tensor([start], dtype=torch.float64, requires_grad=True)
    path = [list(start)]
    for step in range(1, spec.steps + 1):
        (grad,) = torch.autograd.grad(fn(mu).sum(), [mu])
        with torch.no_grad():
            mu -= spec.lr * grad
        if step % spec.record_every == 0 or step == spec.steps:
            path.append(mu[0].tolist())
    with torch.no_grad():
        end_value = float(fn(mu)[0])
    return {"start": list(start), "end": mu[0].tolist(), "end_value": end_value, "path": path}


def study(cfg: LandscapeConfig, log: Callable[[str], None] = print) -> dict:
    """The whole 2-GMM study: grids, minima, descents, and the values at the reference points."""
    start_time = time.perf_counter()
    fns = {name: objective(name, cfg) for name in OBJECTIVES}
    # The joint's bad minimum: descend from (1, 1) nudged off the diagonal (on the diagonal the
    # components are interchangeable and the diagonal is a saddle, not the minimum).
    nudge = cfg.descent.nudge
    collapsed = descend(fns["joint"], (1.0 - nudge, 1.0 + nudge), cfg.descent)["end"]
    log(f"[gmm2] the joint's collapsed (bad) minimum: mu = ({collapsed[0]:.4f}, {collapsed[1]:.4f})")
    optimum = (-1.0, 1.0)
    start = tuple(collapsed)
    results: dict = {"collapsed_point": collapsed, "optimum": list(optimum), "start": list(start), "objectives": {}}
    for name, fn in fns.items():
        tick = time.perf_counter()
        axis, values = grid_values(fn, cfg)
        with torch.no_grad():
            at = fn(torch.tensor([optimum, collapsed], dtype=torch.float64)).tolist()
        run = descend(fn, start, cfg.descent)
        minima = local_minima(axis, values)
        results["objectives"][name] = {
            "at_optimum": at[0],
            "at_collapsed": at[1],
            "grid_local_minima": minima,
            "descent": run,
            "grid": values.tolist(),
        }
        end = run["end"]
        listed = ", ".join(f"({m['mu'][0]:.2f}, {m['mu'][1]:.2f}) {m['value']:.3f}" for m in minima)
        log(
            f"[gmm2] {name}: value at optimum {at[0]:.4f}, at collapsed {at[1]:.4f}; "
            f"{len(minima)} grid minima ({listed}); "
            f"descent from ({start[0]:.2f}, {start[1]:.2f}) ends at ({end[0]:.3f}, {end[1]:.3f}) value {run['end_value']:.4f} "
            f"[{time.perf_counter() - tick:.0f}s]"
        )
    results["axis"] = torch.linspace(cfg.low, cfg.high, cfg.points, dtype=torch.float64).tolist()
    results["wall_seconds"] = time.perf_counter() - start_time
    return results
