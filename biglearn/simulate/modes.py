"""The paper's equal-weight Gaussian mixtures (method.md section 4), numpy only: one definition
for the simulations and for the data converters (which do not import torch).

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
