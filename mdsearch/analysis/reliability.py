"""How far a proxy's numbers can be trusted: noise floors, rank agreement, paired verdicts.

Every quality number of a proxy training moves for three reasons: the architecture (the signal),
the training seed (init, data order, noise draws) and the evaluation draw (which noise, timesteps
and sampler noise the evaluation happened to use). This module measures the last two against the
first, from plain tables:

    noise_table(runs, metrics)   per metric: training-seed std (pooled within configurations),
                                 the std across configurations, their ratio, the evaluation std
                                 (when redraws are given) and its ratio, Kendall tau-b between
                                 the rankings of two seeds, and how many seeds per configuration
                                 a ranking needs (seeds_to_resolve)
    paired_delta(a, b)           a variant against a baseline, paired by seed: mean difference,
                                 its 95% t-interval, and a verdict (better / worse / no detectable
                                 difference / not enough seeds to tell)
    resolvable(values, floor)    whether the best of a set is ahead of the rest by more than a
                                 noise floor (what a report may call a winner)

`runs` is a DataFrame with one row per (configuration, seed): a `config` column (any hashable
label), a `seed` column and one column per metric.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..quality import by_config, difference_band, direction, is_quality, rms, seed_std
from ..rundir import COMPLETED, RELIABILITY, RESULTS, SPACE, atomic_write, read_results

VERDICTS = ("better", "worse", "no detectable difference", "not enough seeds to tell")


def kendall_tau_b(x, y) -> float:
    """Kendall's tau-b (ties in either ranking handled); nan with fewer than 2 pairs."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    if n < 2:
        return math.nan
    concordant = discordant = ties_x = ties_y = 0
    for i in range(n):
        dx, dy = np.sign(x[i + 1:] - x[i]), np.sign(y[i + 1:] - y[i])
        concordant += int(np.sum(dx * dy > 0))
        discordant += int(np.sum(dx * dy < 0))
        ties_x += int(np.sum((dx == 0) & (dy != 0)))
        ties_y += int(np.sum((dy == 0) & (dx != 0)))
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denom if denom else math.nan


def noise_table(runs: pd.DataFrame, metrics: list[str],
                eval_std: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per metric (see the module docstring). `eval_std`: metric -> std of the same
    weights under redrawn evaluation noise (`mdsearch.train.reliability`)."""
    rows = []
    for metric in metrics:
        if metric not in runs:
            continue
        means = runs.groupby("config", sort=False)[metric].mean().dropna()
        s_std, dof = seed_std(runs, metric)
        c_std = float(means.std(ddof=1)) if len(means) > 1 else math.nan
        row = {"metric": metric, "direction": direction(metric), "configs": len(means),
               "mean": float(runs[metric].mean()), "config_std": c_std, "seed_std": s_std,
               "seed_dof": dof, "seed_ratio": s_std / c_std if c_std else math.nan}
        row.update(seeds_to_resolve(runs, metric, s_std, c_std))
        wide = runs.pivot_table(index="config", columns="seed", values=metric).dropna()
        if wide.shape[1] >= 2:  # a metric measured at this budget, with at least two seeds
            row["seed_tau"] = kendall_tau_b(wide[wide.columns[0]], wide[wide.columns[1]])
        if eval_std and metric in eval_std:
            row["eval_std"] = eval_std[metric]
            row["eval_ratio"] = eval_std[metric] / c_std if c_std else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def seeds_to_resolve(runs: pd.DataFrame, metric: str, s_std: float, c_std: float,
                     goal: float = 1 / 3) -> dict:
    """What averaging seeds per configuration buys. The spread of the per-configuration means
    (`c_std`) holds the configurations' true spread plus s_std^2 / k of seed noise (k seeds per
    configuration); `config_std_true` is that true spread, and `seeds_needed` the number of seeds
    whose mean has a seed std of at most `goal` x the true spread (inf when the configurations
    show no spread beyond their seed noise)."""
    k = float(runs.dropna(subset=[metric]).groupby("config").size().mean())
    if not (k >= 2 and math.isfinite(s_std) and math.isfinite(c_std)):
        return {"config_std_true": math.nan, "seeds_needed": math.nan}
    true_var = c_std ** 2 - s_std ** 2 / k
    if true_var <= 0:
        return {"config_std_true": 0.0, "seeds_needed": math.inf}
    true = math.sqrt(true_var)
    return {"config_std_true": true, "seeds_needed": math.ceil((s_std / (goal * true)) ** 2)}


def _t95(dof: int, comparisons: int = 1) -> float:
    """The t quantile of a two-sided 95% interval, Bonferroni-adjusted for `comparisons`
    intervals read together (each at 1 - 0.05 / comparisons); dof=inf: the normal one."""
    from scipy.stats import norm, t

    q = 1 - 0.025 / max(1, comparisons)
    return float(norm.ppf(q) if math.isinf(dof) else t.ppf(q, dof))


def paired_delta(variant: pd.Series, baseline: pd.Series, metric: str,
                 floor: float | None = None, pooled: tuple[float, int] | None = None,
                 comparisons: int = 1) -> dict:
    """`variant - baseline` paired by index (the seed): mean, std, n, the 95% t-interval and a
    verdict in the metric's direction. `comparisons`: how many such intervals are read together
    (an ablation table's variants); the interval is then simultaneous (Bonferroni: each at
    1 - 0.05 / comparisons), so a table of 11 variants that all equal the baseline shows a
    spurious "better" or "worse" with probability 5%, not 11 x 5%. `pooled` = (std of one paired difference, its degrees of
    freedom) pooled over several comparisons (see `pooled_std`) replaces this pair's own spread:
    with 2 seeds a difference's own std has 1 degree of freedom (t = 12.7), pooled over an
    ablation's variants it has one per variant. With one pair and nothing pooled, `floor` (the
    metric's training-seed std) stands in (sqrt(2) * floor, normal quantile); otherwise the
    verdict is "not enough seeds to tell"."""
    pairs = pd.concat([variant.rename("v"), baseline.rename("b")], axis=1).dropna()
    d = (pairs["v"] - pairs["b"]).astype(float)
    n = len(d)
    out = {"delta": float(d.mean()) if n else math.nan, "delta_std": math.nan, "n": n,
           "low": math.nan, "high": math.nan, "verdict": VERDICTS[3]}
    if n >= 2:
        out["delta_std"] = float(d.std(ddof=1))
    if n >= 1 and pooled is not None and pooled[1] >= 1 and math.isfinite(pooled[0]):
        half = _t95(pooled[1], comparisons) * pooled[0] / math.sqrt(n)
    elif n >= 2:
        half = _t95(n - 1, comparisons) * out["delta_std"] / math.sqrt(n)
    elif n == 1 and floor is not None and math.isfinite(floor) and floor > 0:
        half = difference_band(floor) * _t95(math.inf, comparisons) / _t95(math.inf)
    else:
        return out
    out["low"], out["high"] = out["delta"] - half, out["delta"] + half
    if out["low"] > 0 or out["high"] < 0:
        lower_is_better = direction(metric) == "min"
        improved = (out["high"] < 0) == lower_is_better
        out["verdict"] = VERDICTS[0] if improved else VERDICTS[1]
    else:
        out["verdict"] = VERDICTS[2]
    return out


def verdict_text(delta: dict, digits: int = 3) -> str:
    """`no detectable difference (|Δ| < 0.0012)`, `worse (+0.004 .. +0.009)`, ..."""
    if delta["verdict"] == VERDICTS[3]:
        return delta["verdict"]
    if delta["verdict"] == VERDICTS[2]:
        bound = max(abs(delta["low"]), abs(delta["high"]))
        return f"{delta['verdict']} (|Δ| < {bound:.{digits}g})"
    return f"{delta['verdict']} ({delta['low']:+.{digits}g} .. {delta['high']:+.{digits}g})"


# --- `mdsearch reliability` ----------------------------------------------------------------------

def measure(path, redraws: int = 3, trials: int = 3, sampled: bool = True,
            progress=None) -> dict:
    """The reliability of a run directory (evaluation noise of its weights) or of a sweep
    directory (evaluation noise of up to `trials` completed trials, the best, the median and the
    worst by its quality metric; training-seed noise from configurations trained with several
    seeds; both against the spread across configurations). A sweep's result is also written to
    SWEEP/reliability.json, where `mdsearch report` reads its noise floors."""
    from ..search.space import load_space
    from ..train.noise import evaluation_noise

    path = Path(path)
    if not (path / RESULTS).is_file():
        noise = evaluation_noise(path, redraws, sampled=sampled, progress=progress)
        return {"run": str(path), "redraws": redraws,
                "metrics": {m: {"eval_std": v["std"], "values": v["values"]}
                            for m, v in noise.items() if is_quality(m)}}
    table = read_results(path)
    space = load_space(path / SPACE)
    dims = [d.name for d in space.dimensions]
    metric = space.quality.metric
    done = table[(table["status"] == COMPLETED)].dropna(subset=[metric])
    done = done.sort_values(metric, ascending=space.quality.mode == "min")
    picks = sorted({0, len(done) // 2, len(done) - 1})[:trials] if len(done) else []
    evals = []
    for i in picks:
        row = done.iloc[i]
        evals.append(evaluation_noise(row["path"], redraws, sampled=sampled, progress=progress))
    eval_std = {m: rms(e[m]["std"] for e in evals if m in e) for m in (evals[0] if evals else {})}
    runs = by_config(done, dims)
    metrics = [c for c in done.columns if is_quality(c) and done[c].notna().any()]
    table_ = noise_table(runs, metrics, eval_std)
    result = {"sweep": str(path), "redraws": redraws, "trials_redrawn": len(evals),
              "seeds": sorted(int(s) for s in done["seed"].dropna().unique())
              if "seed" in done else [], "metrics": {}}
    for _, r in table_.iterrows():
        result["metrics"][r["metric"]] = {k: (None if isinstance(v, float) and math.isnan(v)
                                              else v) for k, v in r.items() if k != "metric"}
    atomic_write(path / RELIABILITY, json.dumps(result, indent=1, default=float))
    return result


def show(result: dict) -> str:
    """The reliability table as text."""
    cols = ["direction", "mean", "config_std", "seed_std", "seed_ratio", "seed_tau", "eval_std",
            "eval_ratio"]
    rows = []
    for metric, entry in result["metrics"].items():
        rows.append({"metric": metric, **{c: entry.get(c) for c in cols}})
    frame = pd.DataFrame(rows).dropna(axis=1, how="all")
    return frame.to_string(index=False, float_format=lambda v: f"{v:.4g}")
