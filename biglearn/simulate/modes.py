"""The paper's equal-weight Gaussian mixtures (paper Sections 3.3 and 4.1; docs/method.md section 6),
numpy only: one definition for the simulations and for the data converters (which do not import
torch).

gmm2:  1/2 N((-1, 0), 0.1 I) + 1/2 N((1, 0), 0.1 I)
gmm25: 25 components at {-4, -2, 0, 2, 4}^2 (row-major over x_1, x_2), covariance 0.05 I
"""

from __future__ import annotations

import numpy as np


def paper_modes(name: str) -> tuple[np.ndarray, float]:
    """(means [K, 2] float64, per-coordinate variance)."""
    if name == "gmm2":
        return np.array([[-1.0, 0.0], [1.0, 0.0]]), 0.1
    if name == "gmm25":
        grid = np.arange(-4.0, 5.0, 2.0)
        return np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2), 0.05
    raise ValueError(f"unknown mixture {name!r}: gmm2 or gmm25")


def sample_coverage(samples_N2: np.ndarray, name: str) -> dict[str, float]:
    """How well samples of a generative model cover the mixture's modes (the usual GAN measure).

    A sample is of high quality when it lies within 3 standard deviations of its nearest mode;
    a mode is covered when it holds at least a fifth of the high-quality samples it would get
    under the data (N / K / 5), so a few stray samples do not count as covering it.
    Returns modes_covered (of K), high_quality (share of samples).
    """
    means, variance = paper_modes(name)
    distance_NK = np.linalg.norm(samples_N2[:, None, :] - means[None], axis=-1)
    nearest_N = distance_NK.argmin(1)
    good_N = distance_NK.min(1) <= 3 * np.sqrt(variance)
    counts_K = np.bincount(nearest_N[good_N], minlength=len(means))
    return {
        "modes_covered": int((counts_K >= len(samples_N2) / len(means) / 5).sum()),
        "modes": len(means),
        "high_quality": float(good_N.mean()),
    }
