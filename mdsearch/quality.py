"""Every quality metric the platform reports: its direction and what it is, defined once.

The stop rule, the searchers, `promote`, the Pareto fronts and the reports read a metric's
direction from here; a search space may name a metric without one (`objectives: [val_loss_mid]`)
and a space that gives a direction contrary to this table is an error. Cost metrics (params,
gmacs) are minimised.

This module imports nothing else of mdsearch.
"""

from __future__ import annotations

DIRECTIONS: dict[str, str] = {
    # deterministic held-out metrics (mdsearch.train.heldout): one fixed bank per data+resolution
    "val_loss": "min",
    "val_loss_low": "min",
    "val_loss_mid": "min",
    "val_loss_high": "min",
    "text_gain": "max",
    # sample-based metrics (mdsearch.train.metrics)
    "fid_proxy": "min",
    "kid_proxy": "min",
    "fid": "min",
    "clip_score": "max",
    "align": "max",
    # costs of the full-size spec
    "params": "min",
    "gmacs": "min",
    # training
    "loss": "min",
}

DEFAULT_QUALITY = "text_gain"
"""The metric the built-in spaces rank by: the one whose quickstart-budget ranking predicted the
4x-budget ranking of another training seed in the proxy-fidelity study (docs/fidelity.md)."""


class UnknownMetric(KeyError):
    pass


def direction(metric: str) -> str:
    """"min" or "max" for a known metric (align_<attribute> are "max"); UnknownMetric else."""
    if metric in DIRECTIONS:
        return DIRECTIONS[metric]
    if metric.startswith("align_") and metric not in ("align_chance", "align_ceiling"):
        return "max"
    raise UnknownMetric(metric)


def better(metric: str, a: float, b: float) -> bool:
    """Whether value `a` of `metric` is strictly better than `b`."""
    return a < b if direction(metric) == "min" else a > b


def signed(metric: str, value: float) -> float:
    """The value turned so that smaller is better (for fronts and sorting)."""
    return value if direction(metric) == "min" else -value
