"""Every quality metric the platform reports: its direction and what it is, defined once.

The stop rule, the searchers, `promote`, the Pareto fronts and the reports read a metric's
direction from here; a search space may name a metric without one (`objectives: [val_loss_mid]`)
and a space that gives a direction contrary to this table is an error. Cost metrics (params,
gmacs) are minimised.

It also holds what makes a number comparable: its noise floor (the std of one trial's value
around its configuration's mean, from training seeds and evaluation redraws), the band inside
which two values cannot be told apart, and the statement a sweep may make about its winner.
`mdsearch.analysis.reliability` measures the floors; sweeps, promote and reports read them here.

A bottom-layer module: it imports only the run directory's names and the package paths.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from .rundir import COMPLETED, RELIABILITY, RunDirError

DIRECTIONS: dict[str, str] = {
    # deterministic held-out metrics (mdsearch.train.heldout): one fixed bank per data+resolution
    "val_loss": "min",
    "val_loss_low": "min",
    "val_loss_mid": "min",
    "val_loss_high": "min",
    "text_gain": "max",
    # with a recipe's teacher (mdsearch.train.teacher): distance to a trained run's predictions
    "teacher_gap": "min",
    # sample-based metrics (mdsearch.train.metrics)
    "fid_proxy": "min",
    "kid_proxy": "min",
    "fid": "min",
    "clip_score": "max",
    "align": "max",
    # autoencoders (mdsearch.train.vae): reconstructions of held-out images
    "psnr": "max",
    "ssim": "max",
    "rfid_proxy": "min",
    "rkid_proxy": "min",
    "ralign": "max",
    # costs of the full-size spec (an autoencoder's: params of both halves, decoder GMACs)
    "params": "min",
    "gmacs": "min",
    "latency_ms": "min",  # predicted by a space's latency table (arch.latency)
    # training
    "loss": "min",
}

DEFAULT_QUALITY = "text_gain"
"""The metric the built-in spaces rank by: the one whose quickstart-budget ranking predicted the
4x-budget ranking of another training seed in the proxy-fidelity study (docs/fidelity.md)."""


TAIL = "_tail"
"""`<metric>_tail`: a metric averaged over a run's evaluations in the last half of its budget
(the trajectory-average arm of the proxy-fidelity study); the direction of its metric."""


class UnknownMetric(KeyError):
    pass


def direction(metric: str) -> str:
    """"min" or "max" for a known metric (align_<attribute> are "max"); UnknownMetric else."""
    if metric in DIRECTIONS:
        return DIRECTIONS[metric]
    if metric.endswith(TAIL) and metric[:-len(TAIL)] in DIRECTIONS:
        return DIRECTIONS[metric[:-len(TAIL)]]
    if metric.startswith("align_") and metric not in ("align_chance", "align_ceiling"):
        return "max"
    raise UnknownMetric(metric)


def better(metric: str, a: float, b: float) -> bool:
    """Whether value `a` of `metric` is strictly better than `b`."""
    return a < b if direction(metric) == "min" else a > b


def signed(metric: str, value: float) -> float:
    """The value turned so that smaller is better (for fronts and sorting)."""
    return value if direction(metric) == "min" else -value


# --- noise floors --------------------------------------------------------------------------------

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
    import yaml

    from .paths import ANALYSIS

    sources: list[tuple[str, dict]] = []  # (name, metric -> {seed_std, eval_std}), best first
    done = table[table["status"] == COMPLETED] if "status" in table else table
    if "seed" in done and config_cols and done["seed"].nunique() > 1:
        runs = by_config(done, config_cols)
        own = {}
        for metric in [c for c in done.columns if is_quality(c)]:
            std, dof = seed_std(runs, metric)
            if dof:
                own[metric] = {"seed_std": std}
        sources.append(("this sweep's seeds", own))
    measured = Path(run_dir) / RELIABILITY if run_dir is not None else None
    if measured is not None and measured.is_file():
        sources.append((RELIABILITY, read_reliability(measured)))
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


def read_reliability(path: Path) -> dict[str, dict]:
    """`mdsearch reliability`'s file: metric -> {seed_std, eval_std, ...}, checked; a damaged
    or foreign one is a RunDirError naming it (rerun `mdsearch reliability` to rewrite it)."""
    try:
        data = json.loads(path.read_text())
        metrics = data["metrics"]
        ok = isinstance(metrics, dict) and all(
            isinstance(v, dict) and all(isinstance(x, (int, float)) or x is None
                                        for k, x in v.items() if k in ("seed_std", "eval_std"))
            for v in metrics.values())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise RunDirError(f"{path}: not a noise-floor file mdsearch reliability wrote (damaged "
                          "or of another format); rerun mdsearch reliability on this folder, or "
                          "delete the file")
    return metrics


def is_quality(column: str) -> bool:
    try:
        direction(column)
    except UnknownMetric:
        return False
    return column not in ("params", "gmacs", "latency_ms", "loss")



# --- trials with their own seeds (a recipe's `seeds: K`) ----------------------------------------

def has_own_seeds(table: pd.DataFrame, metric: str) -> bool:
    """Whether the trials of `table` carry their own seed noise for `metric` (`<metric>_se`, the
    standard error of a K-seed mean, from trials trained with several stacked seeds)."""
    column = f"{metric}_se"
    return column in table and bool(table[column].notna().all()) and len(table) > 0


def mean_difference_band(se_a: float, se_b: float, n_a: int, n_b: int) -> float:
    """The 95% band of a difference between two K-seed means with standard errors se_a, se_b:
    t(0.975, Welch's degrees of freedom) * sqrt(se_a^2 + se_b^2)."""
    from scipy import stats

    var = se_a ** 2 + se_b ** 2
    if var == 0:
        return 0.0
    dof = var ** 2 / (se_a ** 4 / max(n_a - 1, 1) + se_b ** 4 / max(n_b - 1, 1))
    return float(stats.t.ppf(0.975, dof)) * math.sqrt(var)


def seed_tied(done: pd.DataFrame, metric: str) -> tuple[pd.DataFrame, pd.Series]:
    """`done` ordered best first by its K-seed means, and for each row the band of its
    difference from the best (mean_difference_band with both rows' own standard errors)."""
    ordered = done.sort_values(metric, ascending=direction(metric) == "min")
    n = ordered.get("seeds_measured", pd.Series(2, index=ordered.index)).fillna(2).astype(int)
    se = ordered[f"{metric}_se"].astype(float)
    bands = pd.Series([mean_difference_band(float(se.iloc[0]), float(se.loc[i]),
                                            int(n.iloc[0]), int(n.loc[i]))
                       for i in ordered.index], index=ordered.index)
    return ordered, bands


def front_chances(table: pd.DataFrame, objectives: list[tuple[str, str]],
                  floors: dict | None = None, draws: int = 4000) -> pd.Series:
    """Each completed trial's probability of being on the Pareto front of `objectives`
    ((column, "min"|"max") pairs; one pair: of being the best), from its means and their
    noise: a trial's own standard error (`<metric>_se`, trials with several seeds), else the
    metric's noise floor (`floors[metric]["floor"]`, one trial's std around its mean); costs
    are exact. Empty when a quality metric has neither (nothing to say)."""
    from .rundir import front_probability

    done = table[(table["status"] == COMPLETED)] if "status" in table else table
    cols = [c for c, _ in objectives]
    if done.empty or any(c not in done for c in cols):
        return pd.Series(dtype=float)
    errors = []
    for c in cols:
        if not is_quality(c):
            errors.append(pd.Series(0.0, index=done.index))
        elif has_own_seeds(done, c):
            errors.append(done[f"{c}_se"].astype(float))
        elif floors and math.isfinite((floors.get(c) or {}).get("floor", math.nan)):
            errors.append(pd.Series(float(floors[c]["floor"]), index=done.index))
        else:
            return pd.Series(dtype=float)
    signs = [1.0 if mode == "min" else -1.0 for _, mode in objectives]
    means = done[cols].astype(float).to_numpy() * signs
    p = front_probability(means, pd.concat(errors, axis=1).to_numpy(), draws=draws)
    return pd.Series(p, index=done.index)


def winner_statement(table: pd.DataFrame, metric: str, floor: dict | None) -> str:
    """Whether the best completed trial can be called the winner: only when it is ahead of
    the runner-up by more than the noise of a difference (1.96 * sqrt(2) * floor). Trials with
    their own seeds (`<metric>_se`) are compared by their means and their own standard errors
    instead, with no floor needed."""
    done = table[(table["status"] == COMPLETED) & table[metric].notna()] if metric in table \
        else table.iloc[:0]
    if len(done) < 2:
        return "Fewer than two completed trials: nothing to rank."
    if has_own_seeds(done, metric):
        ordered, bands = seed_tied(done, metric)
        best = ordered.iloc[0][metric]
        gaps = (ordered[metric] - best).abs()
        tied = ordered[gaps <= bands]
        k = int(ordered["seeds_measured"].min()) if "seeds_measured" in ordered else 0
        about = (f"the 95% interval of a difference of {k}-seed means, from each trial's own "
                 f"seeds (standard errors {ordered[f'{metric}_se'].min():.2g} to "
                 f"{ordered[f'{metric}_se'].max():.2g})")
        if len(tied) == 1:
            return (f"Winner: {ordered.iloc[0]['trial_id']}, ahead of the runner-up by "
                    f"{gaps.iloc[1]:.3g}, more than {about}: {bands.iloc[1]:.3g}.")
        return (f"**No winner at this budget**: {len(tied)} trials "
                f"({', '.join(map(str, tied['trial_id']))}) are within {about} of the best "
                f"{metric}; their order is noise.")
    if not floor or not math.isfinite(floor.get("floor", math.nan)):
        return (f"**Noise floor of {metric} unknown** for this recipe: the order above may be "
                "noise. Measure it with `mdsearch reliability` (or train with `seeds: [0, 1]`).")
    ok, gap = resolvable(done[metric], metric, floor["floor"])
    band = difference_band(floor["floor"])
    ordered = done.sort_values(metric, ascending=direction(metric) == "min")
    best = ordered.iloc[0][metric]
    tied = ordered[(ordered[metric] - best).abs() <= band]
    if ok:
        return (f"Winner: {ordered.iloc[0]['trial_id']}, ahead of the runner-up by {gap:.3g}, "
                f"more than the noise of a difference ({band:.3g}; {metric} noise floor "
                f"{floor['floor']:.3g}, from {floor['source']}).")
    return (f"**No winner at this budget**: {len(tied)} trials "
            f"({', '.join(map(str, tied['trial_id']))}) "
            f"are within {band:.3g} of the best {metric} (1.96 x sqrt 2 x its noise floor "
            f"{floor['floor']:.3g}, from {floor['source']}); their order is noise.")
