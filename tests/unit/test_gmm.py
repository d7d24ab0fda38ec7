"""The Gaussian-mixture simulations: closed forms against Monte Carlo, the path-gradient
estimators (hand-written gradients against autograd, unbiased, zero at the optimum), short
training runs, the 2-GMM landscape facts, and the job end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import biglearn.simulate.run as run_module
from biglearn.cli import simulate as main
from biglearn.config import ConfigError, validate_config
from biglearn.simulate.gmm25 import (
    Gmm25Config,
    Phase,
    Target,
    conditional_grad,
    joint_grad,
    marginal_grad,
    model_mixture,
    reference_conditional_loss,
    reference_joint_loss,
    reference_marginal_loss,
    train_gmm25,
)
from biglearn.simulate.landscape import LandscapeConfig, conditional_kl, descend, joint_kl, objective
from biglearn.simulate.mixture import Mixture, paper_modes, quadrature_points
from biglearn.transforms import haar_orthogonal

REPO = Path(__file__).resolve().parents[2]

CONFIGS = REPO / "biglearn" / "recipes"

F64 = torch.float64
DATA = Mixture.paper("gmm25")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_mixture(seed: int, k: int = 3) -> Mixture:
    g = gen(seed)
    raw = 0.6 * torch.randn(k, 2, 2, generator=g, dtype=F64)
    covs = raw @ raw.transpose(-1, -2) + 0.1 * torch.eye(2, dtype=F64)
    log_w = torch.log_softmax(torch.randn(k, generator=g, dtype=F64), -1)
    return Mixture(log_w, 2 * torch.randn(k, 2, generator=g, dtype=F64), covs)


def random_theta(seed: int, runs: int = 3, k: int = 25) -> torch.Tensor:
    g = gen(seed)
    theta = torch.randn(runs, k, 5, generator=g, dtype=F64)
    theta[..., :2] *= 3
    theta[..., 2:] *= 0.4
    theta[..., 2] -= 1.0
    theta[..., 4] -= 1.0
    return theta


def data_theta(runs: int = 2) -> torch.Tensor:
    """The model exactly at the data: means on the grid, covariance 0.05 I."""
    theta = torch.zeros(runs, 25, 5, dtype=F64)
    theta[..., :2] = paper_modes("gmm25")[0]
    theta[..., 2] = theta[..., 4] = 0.5 * math.log(0.05)
    return theta


# --- closed forms ----------------------------------------------------------------------------


def test_paper_mixtures():
    means, variance = paper_modes("gmm25")
    assert means.shape == (25, 2) and variance == 0.05
    assert sorted(set(means[:, 0].tolist())) == [-4.0, -2.0, 0.0, 2.0, 4.0]
    means2, variance2 = paper_modes("gmm2")
    assert means2.tolist() == [[-1.0, 0.0], [1.0, 0.0]] and variance2 == 0.1
    with pytest.raises(ValueError, match="unknown mixture"):
        paper_modes("gmm3")


def test_linear_view_marginal_density_matches_monte_carlo():
    mix = random_mixture(0)
    u = torch.tensor([[0.6, -0.8]], dtype=F64)
    view = mix.linear(u)
    x, _ = mix.sample(200_000, gen(1))
    y = (x @ u.T).squeeze(-1)
    edges = torch.arange(-8.0, 8.0001, 0.25, dtype=F64)
    counts = torch.histc(y, bins=len(edges) - 1, min=-8.0, max=8.0)
    fine = torch.linspace(-8.0, 8.0, (len(edges) - 1) * 20 + 1, dtype=F64)
    density = view.log_prob(fine.unsqueeze(-1)).exp()
    cells = (density[:-1] + density[1:]) / 2 * (fine[1] - fine[0])
    expected = cells.reshape(len(edges) - 1, 20).sum(-1)
    observed = counts / len(y)
    sd = (expected * (1 - expected) / len(y)).sqrt()
    assert expected.sum() > 0.995  # the bins hold (almost) all the mass
    assert ((observed - expected).abs() <= 4.5 * sd + 2e-4).all()


def test_conditional_density_is_the_joint_ratio_and_matches_monte_carlo():
    mix = random_mixture(2)
    a = haar_orthogonal(2, gen(3), dtype=F64)
    view = mix.linear(a)
    s0 = float(view.means[view.log_weights.argmax(), 1])  # a well-populated slice
    cond = view.condition(torch.tensor([[s0]], dtype=F64), source=[1], target=[0])  # batch [1]
    t = torch.linspace(-6, 6, 61, dtype=F64)
    closed = cond.log_prob(t.view(1, -1, 1))[0]
    points = torch.stack([t, torch.full_like(t, s0)], -1)
    ratio = view.log_prob(points) - view.marginal([1]).log_prob(torch.tensor([[s0]], dtype=F64))
    assert torch.allclose(closed, ratio, atol=1e-10)
    # Monte Carlo: joint samples whose y_2 falls in a thin window around s0
    x, _ = mix.sample(1_000_000, gen(5))
    y = x @ a.T
    kept = y[(y[:, 1] - s0).abs() < 0.03, 0]
    assert len(kept) > 1000
    w = cond.log_weights[0].exp()
    m, v = cond.means[0, :, 0], cond.covs[0, :, 0, 0]
    mean = (w * m).sum()
    var = (w * (v + m.square())).sum() - mean.square()
    assert abs(kept.mean() - mean) < 4.5 * math.sqrt(var / len(kept)) + 0.01
    assert abs(kept.var() / var - 1) < 0.12


def test_quadrature_agrees_with_monte_carlo():
    model = Mixture.equal(
        torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=F64), 0.1 * torch.eye(2, dtype=F64).expand(2, 2, 2)
    )
    data = Mixture.paper("gmm2")
    quad = joint_kl(model, data, 32)
    x, _ = model.sample(200_000, gen(6))
    ratio = model.log_prob(x) - data.log_prob(x)
    assert abs(quad - ratio.mean()) < 4 * ratio.std() / math.sqrt(len(ratio))
    assert abs(quad - math.log(2)) < 0.01  # both components on one mode: about log 2
    points, weights = quadrature_points(model, 8)
    assert points.shape == (2 * 64, 2) and torch.allclose(weights.sum(), torch.tensor(1.0, dtype=F64))


# --- the path-gradient estimators ------------------------------------------------------------


def noise(seed: int, runs: int, n: int = 100, c: int = 4, k: int = 25):
    g = gen(seed)
    z = torch.randint(0, k, (runs, n), generator=g)
    eps = torch.randn(runs, n, 2, generator=g, dtype=F64)
    a = haar_orthogonal(2, g, batch=runs, dtype=F64)
    x, _ = DATA.sample(runs * c, g)
    s = torch.einsum("rd,rcd->rc", a[:, 1], x.reshape(runs, c, 2))  # y_2 of data draws
    cond_eps = torch.randn(runs, c, k, generator=g, dtype=F64)
    return z, eps, a, s, cond_eps


@pytest.mark.parametrize("kind", ["joint", "marginal", "conditional"])
def test_hand_gradients_match_autograd(kind):
    theta = random_theta(0)
    z, eps, a, s, cond_eps = noise(1, 3)
    if kind == "joint":
        reference = lambda th: reference_joint_loss(th, DATA, z, eps)  # noqa: E731
        loss, grad = joint_grad(theta, Target.joint(DATA), z, eps)
    elif kind == "marginal":
        reference = lambda th: reference_marginal_loss(th, a[:, 0], DATA, z, eps)  # noqa: E731
        loss, grad = marginal_grad(theta, a[:, 0], Target.view(DATA, a), z, eps)
    else:
        reference = lambda th: reference_conditional_loss(th, a, DATA, s, cond_eps)  # noqa: E731
        loss, grad = conditional_grad(theta, a, Target.view(DATA, a), s, cond_eps)
    leaf = theta.clone().requires_grad_()
    ref_loss = reference(leaf)
    (ref_grad,) = torch.autograd.grad(ref_loss.sum(), [leaf])
    assert torch.isfinite(grad).all() and grad.abs().max() > 1e-3
    assert torch.allclose(loss, ref_loss, atol=1e-9)
    assert torch.allclose(grad, ref_grad, atol=1e-9, rtol=1e-7)


def test_gradient_is_exactly_zero_at_the_optimum():
    # log p is evaluated on detached parameters: at p = q every sample's log ratio and score
    # difference vanish, so the estimate is 0 for every draw (a score term would not vanish).
    theta = data_theta()
    z, eps, a, s, cond_eps = noise(2, 2)
    for loss, grad in [
        joint_grad(theta, Target.joint(DATA), z, eps),
        marginal_grad(theta, a[:, 0], Target.view(DATA, a), z, eps),
        conditional_grad(theta, a, Target.view(DATA, a), s, cond_eps),
    ]:
        assert loss.abs().max() < 1e-9 and grad.abs().max() < 1e-9
    # the autograd reference without the detach would carry the score term
    leaf = theta.clone().requires_grad_()
    model = model_mixture(leaf)
    x = model.sample_with(z, eps)
    attached = (model.log_prob(x) - DATA.log_prob(x)).mean(-1).sum()
    assert torch.autograd.grad(attached, [leaf])[0].abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["joint", "marginal", "conditional"])
def test_path_gradient_is_unbiased(kind):
    # The mean of many estimates matches the gradient of the exact objective, by quadrature.
    # q is the 2-GMM here: its log density is smooth enough over the model's components for
    # Gauss-Hermite to converge (over the 25 narrow modes it does not, at any affordable order).
    data, k, draws, c = Mixture.paper("gmm2"), 3, 1500, 4
    theta = random_theta(3, runs=1, k=k)
    theta[..., :2] = torch.tensor([[-1.0, 0.5], [1.5, -0.5], [0.2, 1.0]], dtype=F64)
    copies = theta.expand(draws, -1, -1).contiguous()
    z, eps, _, _, cond_eps = noise(4, draws, k=k)
    view = haar_orthogonal(2, gen(5), batch=1, dtype=F64)
    a = view.expand(draws, -1, -1)
    x, _ = data.sample(draws * c, gen(6))
    s = torch.einsum("d,rcd->rc", view[0, 1], x.reshape(draws, c, 2))  # data values of y_2
    if kind == "joint":
        _, grads = joint_grad(copies, Target.joint(data), z, eps)
        exact = lambda m: joint_kl(m, data, 48)  # noqa: E731
    elif kind == "marginal":
        _, grads = marginal_grad(copies, a[:, 0], Target.view(data, a), z, eps)
        exact = lambda m: joint_kl(m.linear(view[:, :1]), data.linear(view[:, :1]), 64)  # noqa: E731
    else:
        _, grads = conditional_grad(copies, a, Target.view(data, a), s, cond_eps)
        exact = lambda m: conditional_kl(m, data, view, 48)  # noqa: E731
    leaf = theta.clone().requires_grad_()
    (truth,) = torch.autograd.grad(exact(model_mixture(leaf)).sum(), [leaf])
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(draws)
    assert truth.abs().max() > 0.05
    assert ((mean - truth[0]).abs() <= 5 * se + 2e-3).all(), (mean - truth[0]) / (se + 1e-12)


# --- training --------------------------------------------------------------------------------


def short(schedule: list[Phase], seeds=(888, 5079), **kw) -> dict:
    cfg = Gmm25Config(seeds=list(seeds), outer_steps=150, log_every=150, schedule=schedule, **kw)
    return train_gmm25(cfg, log=lambda line: None)


def test_joint_only_stays_collapsed_while_transformed_marginals_spread():
    joint = short([Phase(until=1.0, joint=1.0)])
    marginal = short([Phase(until=1.0, marginal=1.0, lr=0.3)])
    joint_modes = [p["modes_covered"] for p in joint["per_seed"]]
    marginal_modes = [p["modes_covered"] for p in marginal["per_seed"]]
    assert max(joint_modes) <= 2, joint_modes
    assert min(marginal_modes) >= 8, marginal_modes  # 10-15 measured over 8 seeds
    assert all(p["reverse_kl"] > 2.5 for p in joint["per_seed"])  # about log 25 = 3.2 in the corner


def test_a_seed_does_not_depend_on_its_batch_companions():
    both = short([Phase(until=1.0, marginal=0.5, conditional=0.5)], seeds=(1, 2), clip_norm=2.0)
    alone = short([Phase(until=1.0, marginal=0.5, conditional=0.5)], seeds=(2,), clip_norm=2.0)
    a, b = both["per_seed"][1], alone["per_seed"][0]
    assert a["seed"] == b["seed"] == 2
    assert np.allclose(a["means"], b["means"], atol=1e-9)
    assert a["reverse_kl"] == pytest.approx(b["reverse_kl"], abs=1e-9)


def test_schedule_validation():
    with pytest.raises(ConfigError, match="increasing 'until' ending at 1.0"):
        validate_config(Gmm25Config, {"schedule": [{"until": 0.5, "marginal": 1}]})
    with pytest.raises(ConfigError, match="every task weight 0"):
        validate_config(Gmm25Config, {"schedule": [{"until": 1.0}]})
    with pytest.raises(ConfigError, match="seeds repeat"):
        validate_config(Gmm25Config, {"seeds": [1, 1]})
    cfg = validate_config(
        Gmm25Config,
        {"outer_steps": 10, "schedule": [{"until": 0.5, "marginal": 1, "lr": 0.3}, {"until": 1.0, "joint": 1}]},
    )
    assert [cfg.step_size(i) for i in (0, 4, 5, 9)] == [0.3, 0.3, 0.1, 0.1]
    assert cfg.phase(5).weights() == [1.0, 0.0, 0.0]


# --- the 2-GMM landscape ---------------------------------------------------------------------


def test_landscape_joint_keeps_its_collapsed_minimum_and_conditionals_lose_it():
    cfg = LandscapeConfig(views=6, nodes=16)
    joint, conditional = objective("joint", cfg), objective("conditional", cfg)
    collapsed = torch.tensor([[0.945, 1.049]], dtype=F64)
    assert abs(float(joint(collapsed)) - math.log(2)) < 0.01
    spec = cfg.descent.model_copy(update={"steps": 150, "lr": 0.1})
    stays = descend(joint, (0.945, 1.049), spec)
    assert np.allclose(stays["end"], [0.945, 1.049], atol=0.05) and stays["end_value"] > 0.6
    leaves = descend(conditional, (0.945, 1.049), spec)
    assert np.allclose(leaves["end"], [-1.0, 1.0], atol=0.05) and leaves["end_value"] < 0.01


# --- the job ---------------------------------------------------------------------------------


def test_job_runs_end_to_end_and_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "tiny"
    args = ["--config", str(CONFIGS / "gmm25-ours.yaml"), "--set", f"output={out}", "--set", "gmm25.seeds=[3, 4]"]
    args += ["--set", "gmm25.outer_steps=8", "--set", "gmm25.log_every=4", "--set", "gmm25.eval.num_samples=500"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "[gmm25] step 4/8" in printed and "median modes covered" in printed
    result = json.loads((out / "results.json").read_text())
    assert [p["seed"] for p in result["per_seed"]] == [3, 4]
    assert {"modes_covered", "reverse_kl", "forward_kl", "means", "covs"} <= set(result["per_seed"][0])
    assert [h["outer_step"] for h in result["history"]] == [0, 4, 8]
    assert json.loads((out / "config.json").read_text())["gmm25"]["outer_steps"] == 8
    with Image.open(out / "fit.png") as image:
        assert image.format == "PNG" and image.width > 400
    assert not list(out.glob("*.partial"))


def test_landscape_job_writes_heat_maps(tmp_path):
    out = tmp_path / "land"
    args = ["--config", str(CONFIGS / "gmm2-landscape.yaml"), "--set", f"output={out}", "--set", "landscape.points=9"]
    args += ["--set", "landscape.nodes=8", "--set", "landscape.views=4", "--set", "landscape.descent.steps=10"]
    assert main(args) == 0
    result = json.loads((out / "results.json").read_text())
    assert set(result["objectives"]) == {"joint", "marginal", "conditional"}
    assert len(result["objectives"]["joint"]["grid"]) == 9
    with Image.open(out / "landscape.png") as image:
        assert image.format == "PNG"


def test_bad_config_key_exits_2_with_a_clear_message(tmp_path, capsys):
    out = tmp_path / "never"
    assert (
        main(
            ["--config", str(CONFIGS / "gmm25-published.yaml"), "--set", "gmm25.outer_step=5", "--set", f"output={out}"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "unknown key 'gmm25.outer_step'" in err and "outer_steps" in err
    assert main(["--config", str(CONFIGS / "gmm25-published.yaml"), "--set", "landscape.points=9"]) == 2
    assert "section 'landscape' is set but experiment is gmm25" in capsys.readouterr().err
    assert main(["--config", str(CONFIGS / "no-such.yaml")]) == 2
    assert not out.exists()


def test_an_interrupted_run_leaves_no_results(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "results.json").write_text("{}")  # an older finished run in the same folder

    def fail(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module.figures, "fit_panels", fail)
    with pytest.raises(KeyboardInterrupt):
        main(
            [
                "--config",
                str(CONFIGS / "gmm25-joint.yaml"),
                "--set",
                f"output={out}",
                "--set",
                "gmm25.outer_steps=2",
                "--set",
                "gmm25.seeds=[1]",
            ]
        )
    assert not (out / "results.json").exists()
