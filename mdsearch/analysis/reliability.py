"""How far a proxy's numbers can be trusted: noise floors, rank agreement, paired verdicts.

Every quality number of a proxy training moves for three reasons: the architecture (the signal),
the training seed (init, data order, noise draws) and the evaluation draw (which noise, timesteps
and sampler noise the evaluation happened to use). This module measures the last two against the
first, from plain tables:

    noise_table(runs, metrics)   per metric: training-seed std (pooled within configurations),
                                 the std across configurations, their ratio, the evaluation std
                                 (when redraws are given) and its ratio, and Kendall tau-b between
                                 the rankings of two seeds
    paired_delta(a, b)           a variant against a baseline, paired by seed: mean difference,
                                 its 95% t-interval, and a verdict (better / worse / no detectable
                                 difference / not enough seeds to tell)
    resolvable(values, floor)    whether the best of a set is ahead of the rest by more than a
                                 noise floor (what a report may call a winner)

`runs` is a DataFrame with one row per (configuration, seed): a `config` column (any hashable
label), a `seed` column and one column per metric.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..quality import UnknownMetric, direction

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


def seed_std(runs: pd.DataFrame, metric: str) -> tuple[float, int]:
    """Pooled within-configuration std over seeds (ddof 1 per configuration) and its degrees of
    freedom; nan with no configuration trained with two seeds."""
    return pooled_std([group[metric] for _, group in runs.groupby("config", sort=False)])


def by_config(table: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """`table` with a `config` column: its values of `columns` (the varied fields) joined."""
    return table.assign(config=table[columns].astype(str).agg("|".join, axis=1))


def rms(stds) -> float:
    """Standard deviations pooled as the root mean square (equal sample sizes)."""
    stds = list(stds)
    return math.sqrt(sum(s * s for s in stds) / len(stds)) if stds else math.nan


def difference_band(floor: float) -> float:
    """The 95% band of a difference between two values that each carry noise of std `floor`:
    1.96 * sqrt(2) * floor. Two trials closer than this cannot be told apart."""
    return 1.96 * math.sqrt(2) * floor


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
        seeds = sorted(runs["seed"].dropna().unique())
        if len(seeds) >= 2:
            wide = runs.pivot_table(index="config", columns="seed", values=metric).dropna()
            row["seed_tau"] = kendall_tau_b(wide[seeds[0]], wide[seeds[1]])
        if eval_std and metric in eval_std:
            row["eval_std"] = eval_std[metric]
            row["eval_ratio"] = eval_std[metric] / c_std if c_std else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _t95(dof: int) -> float:
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def paired_delta(variant: pd.Series, baseline: pd.Series, metric: str,
                 floor: float | None = None, pooled: tuple[float, int] | None = None) -> dict:
    """`variant - baseline` paired by index (the seed): mean, std, n, the 95% t-interval and a
    verdict in the metric's direction. `pooled` = (std of one paired difference, its degrees of
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
        half = _t95(pooled[1]) * pooled[0] / math.sqrt(n)
    elif n >= 2:
        half = _t95(n - 1) * out["delta_std"] / math.sqrt(n)
    elif n == 1 and floor is not None and math.isfinite(floor) and floor > 0:
        half = difference_band(floor)
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


def pooled_std(deltas: list[pd.Series]) -> tuple[float, int]:
    """The std of one paired difference pooled over several comparisons' per-seed differences
    (each contributes len - 1 degrees of freedom), assuming they share one noise level; (nan, 0)
    when none has two seeds."""
    ss, dof = 0.0, 0
    for d in deltas:
        d = d.dropna().astype(float)
        if len(d) > 1:
            ss += float(((d - d.mean()) ** 2).sum())
            dof += len(d) - 1
    return (math.sqrt(ss / dof), dof) if dof else (math.nan, 0)


def verdict_text(delta: dict, digits: int = 3) -> str:
    """`no detectable difference (|Δ| < 0.0012)`, `worse (+0.004 .. +0.009)`, ..."""
    if delta["verdict"] == VERDICTS[3]:
        return delta["verdict"]
    if delta["verdict"] == VERDICTS[2]:
        bound = max(abs(delta["low"]), abs(delta["high"]))
        return f"{delta['verdict']} (|Δ| < {bound:.{digits}g})"
    return f"{delta['verdict']} ({delta['low']:+.{digits}g} .. {delta['high']:+.{digits}g})"


def resolvable(values: pd.Series, metric: str, floor: float) -> tuple[bool, float]:
    """Whether the best value is ahead of the runner-up by more than the 95% band of a
    difference of two values that each carry noise of std `floor` (1.96 * sqrt(2) * floor).
    Returns (resolvable, the gap). An unknown (nan) floor is never resolvable."""
    ordered = values.dropna().astype(float).sort_values(ascending=direction(metric) == "min")
    if len(ordered) < 2 or floor is None or not math.isfinite(floor):
        return False, math.nan
    gap = abs(float(ordered.iloc[1] - ordered.iloc[0]))
    return gap > difference_band(floor), gap


# --- a sweep's noise floors ---------------------------------------------------------------------

RELIABILITY_FILE = "reliability.json"  # written by `mdsearch reliability SWEEP` into the sweep
NOISE_FLOORS = "noise_floors.yaml"  # analysis/: floors measured by the proxy-fidelity study
RECIPE_KEYS = ("name", "data", "resolution", "width", "batch_size", "steps", "optimizer",
               "ema_decay", "prediction", "noise_schedule", "caption_dropout")
"""The recipe fields a measured noise floor holds for (not evaluation cadence or resources)."""


def _recipe_matches(recipe: dict, measured: dict) -> bool:
    return all(recipe.get(k) == measured.get(k) for k in RECIPE_KEYS if k in measured)


def noise_floors(table: pd.DataFrame, config_cols: list[str], recipe: dict | None = None,
                 run_dir=None) -> dict[str, dict]:
    """metric -> {"seed_std", "eval_std", "floor", "source"} for a sweep's quality metrics.

    Each part is taken from the best source that has it. Training-seed std: the sweep itself
    (configurations trained with several seeds), else `mdsearch reliability`'s file in the sweep
    directory, else the floors the proxy-fidelity study measured for this exact recipe
    (analysis/noise_floors.yaml). Evaluation std: the reliability file, else the study. `floor`
    = sqrt(seed_std^2 + eval_std^2), the std of one trial's value around its configuration's
    mean (evaluation noise alone when the seed noise is unknown: the source says so). Metrics
    with no known part are left out."""
    import json
    from pathlib import Path

    import yaml

    from ..paths import ANALYSIS

    sources: list[tuple[str, dict]] = []  # (name, metric -> {seed_std, eval_std}), best first
    done = table[table["status"] == "completed"] if "status" in table else table
    if "seed" in done and config_cols and done["seed"].nunique() > 1:
        runs = by_config(done, config_cols)
        own = {}
        for metric in [c for c in done.columns if _is_quality(c)]:
            std, dof = seed_std(runs, metric)
            if dof:
                own[metric] = {"seed_std": std}
        sources.append(("this sweep's seeds", own))
    measured = Path(run_dir) / RELIABILITY_FILE if run_dir is not None else None
    if measured is not None and measured.is_file():
        sources.append((RELIABILITY_FILE, json.loads(measured.read_text()).get("metrics", {})))
    study = ANALYSIS / NOISE_FLOORS
    if recipe and study.is_file():
        for entry in yaml.safe_load(study.read_text()) or []:
            if _recipe_matches(recipe, entry.get("recipe", {})):
                sources.append((entry.get("source", study.name), entry["metrics"]))
                break

    floors: dict[str, dict] = {}
    for name, metrics in sources:
        for metric, values in metrics.items():
            entry = floors.setdefault(metric, {"seed_std": None, "eval_std": None, "source": {}})
            for part in ("seed_std", "eval_std"):
                value = values.get(part)
                if entry[part] is None and value is not None and math.isfinite(value):
                    entry[part] = value
                    entry["source"].setdefault(name, []).append(part.split("_")[0])
    for entry in floors.values():
        parts = [v for v in (entry["seed_std"], entry["eval_std"]) if v is not None]
        entry["floor"] = math.sqrt(sum(v * v for v in parts)) if parts else math.nan
        text = [f"{' and '.join(kinds)}: {name}" for name, kinds in entry["source"].items()]
        if entry["seed_std"] is None:
            text.append("seed noise unknown, the floor is evaluation noise only")
        entry["source"] = "; ".join(text)
    return {m: e for m, e in floors.items() if math.isfinite(e["floor"])}


def _is_quality(column: str) -> bool:
    try:
        direction(column)
    except UnknownMetric:
        return False
    return column not in ("params", "gmacs", "loss")


# --- `mdsearch reliability` ----------------------------------------------------------------------

def measure(path, redraws: int = 3, trials: int = 3, sampled: bool = True,
            progress=None) -> dict:
    """The reliability of a run directory (evaluation noise of its weights) or of a sweep
    directory (evaluation noise of up to `trials` completed trials, the best, the median and the
    worst by its quality metric; training-seed noise from configurations trained with several
    seeds; both against the spread across configurations). A sweep's result is also written to
    SWEEP/reliability.json, where `mdsearch report` reads its noise floors."""
    import json
    from pathlib import Path

    from ..search.runner import RESULTS, SPACE_COPY, load_results
    from ..search.space import load_space
    from ..train.noise import evaluation_noise

    path = Path(path)
    if not (path / RESULTS).is_file():
        noise = evaluation_noise(path, redraws, sampled=sampled, progress=progress)
        return {"run": str(path), "redraws": redraws,
                "metrics": {m: {"eval_std": v["std"], "values": v["values"]}
                            for m, v in noise.items() if _is_quality(m)}}
    table = load_results(path)
    space = load_space(path / SPACE_COPY)
    dims = [d.name for d in space.dimensions]
    metric = space.quality.metric
    done = table[(table["status"] == "completed")].dropna(subset=[metric])
    done = done.sort_values(metric, ascending=space.quality.mode == "min")
    picks = sorted({0, len(done) // 2, len(done) - 1})[:trials] if len(done) else []
    evals = []
    for i in picks:
        row = done.iloc[i]
        evals.append(evaluation_noise(row["path"], redraws, sampled=sampled, progress=progress))
    eval_std = {m: rms(e[m]["std"] for e in evals if m in e) for m in (evals[0] if evals else {})}
    runs = by_config(done, dims)
    metrics = [c for c in done.columns if _is_quality(c) and done[c].notna().any()]
    table_ = noise_table(runs, metrics, eval_std)
    result = {"sweep": str(path), "redraws": redraws, "trials_redrawn": len(evals),
              "seeds": sorted(int(s) for s in done["seed"].dropna().unique())
              if "seed" in done else [], "metrics": {}}
    for _, r in table_.iterrows():
        result["metrics"][r["metric"]] = {k: (None if isinstance(v, float) and math.isnan(v)
                                              else v) for k, v in r.items() if k != "metric"}
    (path / RELIABILITY_FILE).write_text(json.dumps(result, indent=1, default=float))
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
