"""Judging samples as a distribution, not one at a time.

A collapsed sampler is confident and a memorising one is sharp: per-sample scores (a
classifier's confidence, a sample's likelihood) pass both. These measures compare sets of
samples with sets of real examples instead, and each is meant to be read beside the same
measure between two real sets of the same sizes (the reference):

- `class_histogram` / `total_variation`: how the samples spread over classes.
- `mmd`: a kernel two-sample distance (Gaussian kernel, biased V-statistic). It is never 0 for
  finite samples, so it is read against the reference distance between two real sets.
- `nearest_distances`: each sample's distance to its nearest training example; a sampler that
  copies training examples sits nearer to them than held-out real examples do.
- `pairwise_agreement`: how often two draws for the same input fall in the same class, against
  sum_c p_c^2 under a reference posterior: above it is under-dispersed, below it over-dispersed.

All take numpy arrays of flattened examples ([N, F]) or class ids ([N]).
"""

from __future__ import annotations

import numpy as np


def class_histogram(classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Shares of each class among `classes` (sums to 1)."""
    counts = np.bincount(np.asarray(classes, dtype=np.int64), minlength=num_classes)
    return counts / max(1, counts.sum())


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Half the L1 distance between two histograms: 0 equal, 1 disjoint."""
    return float(0.5 * np.abs(p - q).sum())


def _squared_distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    x, y = x.astype(np.float64), y.astype(np.float64)
    return np.maximum((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2 * x @ y.T, 0.0)


def median_bandwidth(x: np.ndarray) -> float:
    """The median squared distance between distinct examples of `x`: the Gaussian kernel's
    width, fixed per real set so that every distance against it uses the same kernel."""
    d = _squared_distances(x, x)
    return float(np.median(d[np.triu_indices(len(x), 1)]))


def mmd(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Maximum mean discrepancy between the sets `x` and `y` under exp(-|a-b|^2 / bandwidth),
    the biased (V-statistic) estimate, square-rooted."""
    k_xx = np.exp(-_squared_distances(x, x) / bandwidth).mean()
    k_yy = np.exp(-_squared_distances(y, y) / bandwidth).mean()
    k_xy = np.exp(-_squared_distances(x, y) / bandwidth).mean()
    return float(np.sqrt(max(0.0, k_xx + k_yy - 2 * k_xy)))


def nearest_distances(x: np.ndarray, memory: np.ndarray, chunk: int = 1024) -> np.ndarray:
    """The Euclidean distance from each row of `x` to its nearest row of `memory`."""
    out = [np.sqrt(_squared_distances(x[i : i + chunk], memory).min(1)) for i in range(0, len(x), chunk)]
    return np.concatenate(out) if out else np.zeros(0)


def pairwise_agreement(classes_NK: np.ndarray) -> float:
    """The share of pairs among each input's K draws that have the same class, averaged over inputs."""
    n, k = classes_NK.shape
    if k < 2:
        raise ValueError("pairwise agreement needs at least 2 draws per input")
    same = (classes_NK[:, :, None] == classes_NK[:, None, :]).sum((1, 2)) - k
    return float((same / (k * (k - 1))).mean())


def expected_agreement(posterior_NC: np.ndarray) -> float:
    """The pairwise agreement of independent draws from each row's posterior: mean of sum_c p_c^2."""
    return float((posterior_NC**2).sum(1).mean())
