"""The exact Pareto front of a set of points (every objective minimised).

A point is on the front when no other point dominates it: at most as large in every objective and
strictly smaller in at least one. Duplicates dominate neither each other, so both stay on the front;
rows with a missing (NaN) value are never on it.
"""

from __future__ import annotations

import numpy as np


def pareto_mask(values) -> np.ndarray:
    """Boolean mask of the non-dominated rows of an (n, k) array (minimise every column)."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2:
        raise ValueError(f"expected an (n, k) array, got shape {v.shape}")
    valid = ~np.isnan(v).any(axis=1)
    mask = valid.copy()
    for i in np.flatnonzero(valid):
        others = v[valid]
        dominated = np.any(np.all(others <= v[i], axis=1) & np.any(others < v[i], axis=1))
        mask[i] = not dominated
    return mask
