"""Gaussian mixtures in closed form: densities, linear views, marginals, conditionals, sampling.

Everything big learning asks of a Gaussian mixture has a closed form: a linear view y = A x of a
mixture is a mixture (means A mu_k, covariances A Sigma_k A^T), a marginal keeps some
coordinates of every component, and a conditional p(y_T | y_S = s) is a mixture whose weights
are the components' responsibilities for s and whose components are the Gaussian conditionals.
The simulations use these instead of sample-based density estimates.

Legend: K = components, D = dimension, N = points (samples or conditioning values),
M = samples per conditioning value, S/T = source/target coordinates; a leading `...` is any
batch of mixtures (runs, grid points, views).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from biglearn.simulate import modes

LOG_2PI = math.log(2 * math.pi)


def paper_modes(name: str, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, float]:
    """(means [K, 2], per-coordinate variance) of the paper's mixtures, gmm2 or gmm25 (see modes)."""
    means, variance = modes.paper_modes(name)
    return torch.tensor(means, dtype=dtype), variance


@dataclass(frozen=True)
class Mixture:
    """A batch of Gaussian mixtures.

    log_weights [..., K] (normalised over K), means [..., K, D], covs [..., K, D, D]
    (symmetric positive definite). Batch dimensions broadcast between the three.
    """

    log_weights: torch.Tensor
    means: torch.Tensor
    covs: torch.Tensor

    @staticmethod
    def equal(means_KD: torch.Tensor, covs_KDD: torch.Tensor) -> Mixture:
        k = means_KD.shape[-2]
        log_w = torch.full(means_KD.shape[:-1], -math.log(k), dtype=means_KD.dtype, device=means_KD.device)
        return Mixture(log_w, means_KD, covs_KDD)

    @staticmethod
    def paper(name: str, dtype: torch.dtype = torch.float64) -> Mixture:
        means, variance = paper_modes(name, dtype)
        eye = torch.eye(2, dtype=dtype)
        return Mixture.equal(means, variance * eye.expand(len(means), 2, 2).clone())

    @property
    def dim(self) -> int:
        return self.means.shape[-1]

    def detach(self) -> Mixture:
        return Mixture(self.log_weights.detach(), self.means.detach(), self.covs.detach())

    def component_log_probs(self, x_ND: torch.Tensor) -> torch.Tensor:
        """log w_k + log N(x; mu_k, Sigma_k) for x [..., N, D]; returns [..., N, K]."""
        if self.dim == 1:  # the common case of views and conditionals: no triangular solves
            var_1K = self.covs[..., 0, 0].unsqueeze(-2)
            delta_NK = x_ND - self.means[..., 0].unsqueeze(-2)
            log_normal_NK = -0.5 * (delta_NK.square() / var_1K + LOG_2PI + var_1K.log())
            return self.log_weights.unsqueeze(-2) + log_normal_NK
        if self.dim == 2:  # the simulations' data dimension: explicit 2x2 algebra, no batched solves
            chol_KDD = torch.linalg.cholesky(self.covs)
            l11, l21, l22 = (chol_KDD[..., i, j].unsqueeze(-2) for i, j in ((0, 0), (1, 0), (1, 1)))
            delta_NKD = x_ND.unsqueeze(-2) - self.means.unsqueeze(-3)
            w1 = delta_NKD[..., 0] / l11
            w2 = (delta_NKD[..., 1] - l21 * w1) / l22
            log_normal_NK = -0.5 * (w1.square() + w2.square()) - LOG_2PI - l11.log() - l22.log()
            return self.log_weights.unsqueeze(-2) + log_normal_NK
        chol_1KDD = torch.linalg.cholesky(self.covs).unsqueeze(-4)
        delta_NKD = x_ND.unsqueeze(-2) - self.means.unsqueeze(-3)
        white_NKD = torch.linalg.solve_triangular(chol_1KDD, delta_NKD.unsqueeze(-1), upper=False).squeeze(-1)
        half_logdet_1K = torch.diagonal(chol_1KDD, dim1=-2, dim2=-1).log().sum(-1)
        log_normal_NK = -0.5 * (white_NKD.square().sum(-1) + self.dim * LOG_2PI) - half_logdet_1K
        return self.log_weights.unsqueeze(-2) + log_normal_NK

    def log_prob(self, x_ND: torch.Tensor) -> torch.Tensor:
        """log p(x) for x [..., N, D]; returns [..., N]."""
        return torch.logsumexp(self.component_log_probs(x_ND), dim=-1)

    def linear(self, a_ED: torch.Tensor) -> Mixture:
        """The mixture of y = A x, A [..., E, D] (E <= D rows: a view, or its first rows)."""
        a_1ED = a_ED.unsqueeze(-3)
        means = torch.einsum("...ed,...kd->...ke", a_ED, self.means)
        covs = a_1ED @ self.covs @ a_1ED.transpose(-1, -2)
        return Mixture(self.log_weights, means, covs)

    def marginal(self, dims: list[int]) -> Mixture:
        """The marginal of the coordinates `dims` (closed form: keep them in every component)."""
        index = torch.tensor(dims, device=self.means.device)
        covs = self.covs.index_select(-2, index).index_select(-1, index)
        return Mixture(self.log_weights, self.means.index_select(-1, index), covs)

    def condition(self, s_NS: torch.Tensor, source: list[int], target: list[int]) -> Mixture:
        """p(x_T | x_S = s) for each of N values s [..., N, |S|]: a mixture with batch [..., N].

        Weights are the responsibilities of the components for s; component k is the Gaussian
        conditional mu_T + Sigma_TS Sigma_SS^-1 (s - mu_S), Sigma_TT - Sigma_TS Sigma_SS^-1 Sigma_ST.
        """
        src = torch.tensor(source, device=self.means.device)
        tgt = torch.tensor(target, device=self.means.device)
        covs_ss = self.covs.index_select(-2, src).index_select(-1, src)
        covs_ts = self.covs.index_select(-2, tgt).index_select(-1, src)
        covs_tt = self.covs.index_select(-2, tgt).index_select(-1, tgt)
        gain_KTS = torch.linalg.solve(covs_ss, covs_ts.transpose(-1, -2)).transpose(-1, -2)
        mu_s, mu_t = self.means.index_select(-1, src), self.means.index_select(-1, tgt)
        source_mixture = Mixture(self.log_weights, mu_s, covs_ss)
        log_resp_NK = source_mixture.component_log_probs(s_NS)
        log_resp_NK = log_resp_NK - torch.logsumexp(log_resp_NK, dim=-1, keepdim=True)
        delta_NKS = s_NS.unsqueeze(-2) - mu_s.unsqueeze(-3)
        means_NKT = mu_t.unsqueeze(-3) + torch.einsum("...kts,...nks->...nkt", gain_KTS, delta_NKS)
        covs_1KTT = (covs_tt - gain_KTS @ covs_ts.transpose(-1, -2)).unsqueeze(-4)
        return Mixture(log_resp_NK, means_NKT, covs_1KTT)

    def sample(self, num: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """num samples per mixture in the batch: (x [..., num, D], component z [..., num]).

        Reparameterised: x = mu_z + L_z eps keeps gradients to means and covariances.
        """
        batch = torch.broadcast_shapes(self.log_weights.shape[:-1], self.means.shape[:-2], self.covs.shape[:-3])
        probs = self.log_weights.detach().exp().expand(*batch, -1).reshape(-1, self.log_weights.shape[-1])
        z = torch.multinomial(probs, num, replacement=True, generator=generator).reshape(*batch, num)
        eps = torch.randn(*batch, num, self.dim, generator=generator, dtype=self.means.dtype, device=self.means.device)
        return self.sample_with(z, eps), z

    def sample_with(self, z_N: torch.Tensor, eps_ND: torch.Tensor) -> torch.Tensor:
        """x = mu_z + L_z eps for given components z [..., N] and standard normals eps [..., N, D]."""
        batch = z_N.shape[:-1]
        chol = torch.linalg.cholesky(self.covs).expand(*batch, -1, -1, -1)
        means = self.means.expand(*batch, -1, -1)
        d = self.dim
        mu_ND = torch.gather(means, -2, z_N.unsqueeze(-1).expand(*z_N.shape, d))
        chol_NDD = torch.gather(chol, -3, z_N[..., None, None].expand(*z_N.shape, d, d))
        return mu_ND + (chol_NDD @ eps_ND.unsqueeze(-1)).squeeze(-1)


def gauss_hermite(num: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes t [num] and weights w [num] (summing to 1) with sum_i w_i f(t_i) ~= E f(Z), Z ~ N(0, 1)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(num)
    return torch.tensor(nodes, dtype=dtype), torch.tensor(weights / weights.sum(), dtype=dtype)


def quadrature_points(mixture: Mixture, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points and weights for E_{x ~ mixture} f(x) ~= sum_n w_n f(x_n) (Gauss-Hermite, tensor product).

    Per component num^D nodes mapped through its Cholesky factor, weighted by the component's
    weight. Exact for polynomials of degree < 2 num in each coordinate; for the smooth log-ratio
    integrands of the simulations 32-48 nodes agree with large Monte Carlo to ~1e-4.
    Returns x [..., K * num^D, D] and w [..., K * num^D].
    """
    nodes, weights = gauss_hermite(num, mixture.means.dtype)
    d = mixture.dim
    grid_GD = torch.cartesian_prod(*[nodes] * d).reshape(-1, d)
    w_G = torch.cartesian_prod(*[weights] * d).reshape(-1, d).prod(-1) if d > 1 else weights
    chol = torch.linalg.cholesky(mixture.covs)
    x_KGD = mixture.means.unsqueeze(-2) + torch.einsum("...kde,ge->...kgd", chol, grid_GD)
    w_KG = mixture.log_weights.exp().unsqueeze(-1) * w_G
    batch = x_KGD.shape[:-3]
    return x_KGD.reshape(*batch, -1, d), w_KG.expand(*x_KGD.shape[:-1]).reshape(*batch, -1)
