"""1-D k-means for weight sharing (Deep Compression §3.1-3.2).

Initialisations (the paper's Figure 4): "linear" spaces the k centroids evenly over [min, max] of
the weights (the paper's best: it keeps centroids for the rare large weights), "density" places
them at evenly spaced quantiles of the weights' distribution (CDF), "random" picks k distinct
weights (seeded). Lloyd iterations in one dimension: each weight goes to the nearest centroid
(a searchsorted against the midpoints of the sorted centroids), each centroid moves to its
members' mean; a centroid that loses all its members stays where it is. Deterministic for a seed
(only "random" uses it); ties go to the lower centroid.
"""
from __future__ import annotations

import numpy as np

INITS = ("linear", "density", "random")


def init_centroids(values: np.ndarray, k: int, init: str = "linear", seed: int = 0) -> np.ndarray:
    v = np.asarray(values, np.float64).reshape(-1)
    if v.size < k:
        raise ValueError(f"{k} shared values for only {v.size} weights")
    if init == "linear":
        lo, hi = float(v.min()), float(v.max())
        return np.linspace(lo, hi, k) if k > 1 else np.array([v.mean()])
    if init == "density":
        return np.quantile(v, (np.arange(k) + 0.5) / k)
    if init == "random":
        rng = np.random.default_rng(seed)
        return np.sort(rng.choice(v, size=k, replace=False))
    raise ValueError(f"init must be one of {', '.join(INITS)}, not {init!r}")


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid of every value (centroids in any order)."""
    order = np.argsort(centroids, kind="stable")
    c = np.asarray(centroids, np.float64)[order]
    mids = (c[1:] + c[:-1]) / 2
    return order[np.searchsorted(mids, np.asarray(values, np.float64), side="left")]


def kmeans_1d(values: np.ndarray, k: int, init: str = "linear", seed: int = 0, iterations: int = 100,
              tol: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids float64 [k], codes int64 [n]) of Lloyd's k-means from the given initialisation."""
    v = np.asarray(values, np.float64).reshape(-1)
    c = init_centroids(v, k, init, seed)
    codes = assign(v, c)
    for _ in range(iterations):
        sums = np.bincount(codes, weights=v, minlength=k)
        counts = np.bincount(codes, minlength=k)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        new_codes = assign(v, new)
        moved = np.max(np.abs(new - c)) if k else 0.0
        c = new
        if np.array_equal(new_codes, codes) and moved <= tol:
            break
        codes = new_codes
    return c, codes
