"""Promote a sweep's winner to full training: pick the best trial under a budget, train it fully.

    promotion = choose("runs/sweeps/quickstart-...", "md-lite")
    result = promote("runs/sweeps/quickstart-...", "md-lite", trial="full_cpu")

Budgets (full-size cost at 512x512, the paper's "GFLOPs" being multiply-accumulates as in the
sweeps):
    md       <= 400M params and <= 200 GMACs: the paper's search constraints (§5.1); MD itself is
             390.4M / 185.5 here (the paper: 386M / 182).
    md-lite  <= 300M params and <= 160 GMACs: our choice, a tighter budget that MD-Lite meets
             (281.5M / 156.0 here; the paper: 278M / 153) and MD does not.

The best trial is the best *completed* trial (stopped trials never reached the last step, so
their quality is not comparable) by the sweep's quality objective, among those under the budget.
Its full-size spec is the `spec.yaml` its trial wrote. When the metric's noise floor is known
(analysis.reliability.noise_floors), the candidates it cannot be told from are named beside it.
A winner whose text alignment is at chance
is promoted with a warning: a text-blind generator can win an image-only FID (see the ablations).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import yaml

from ..arch.spec import ArchSpec
from ..config import ConfigError
from ..errors import did_you_mean
from ..quality import UnknownMetric, difference_band, direction, noise_floors
from ..progress import quiet
from ..rundir import COMPLETED, RECIPE, RESULTS, SPACE, SPEC, numeric_column, read_results
from .space import Budget, load_space

BUDGETS = {
    "md": Budget(resolution=512, max_params=400e6, max_gmacs=200),
    "md-lite": Budget(resolution=512, max_params=300e6, max_gmacs=160),
}
PROMOTION = "promotion.json"


class PromoteError(ConfigError):
    """Nothing to promote (no completed trial under the budget), or a sweep that cannot be read."""


@dataclass
class Promotion:
    sweep: str
    budget: str
    budget_text: str
    trial_id: str
    metric: str
    mode: str
    value: float
    align: float | None
    align_chance: float | None
    params: int
    gmacs: float
    candidates: int  # completed trials under the budget
    spec: dict
    noise_floor: float | None = None  # the metric's noise floor (analysis.reliability)
    within_noise: list[str] = field(default_factory=list)  # others it cannot be told from
    latency_ms: float | None = None  # predicted by the sweep's latency table, when it had one
    top_by_metric: str | None = None  # the best by the metric, when a cheaper tied one won

    @property
    def text_blind(self) -> bool:
        return (self.align is not None and self.align_chance is not None
                and self.align < self.align_chance + 0.02)

    def describe(self) -> str:
        text = (f"{self.trial_id}: {self.metric} {self.value:.4g}"
                + (f", align {self.align:.3f} (chance {self.align_chance:.3f})"
                   if self.align is not None and self.align_chance is not None else "")
                + f"; {self.params / 1e6:.1f}M params, {self.gmacs:.1f} GMACs"
                + (f", {self.latency_ms:.1f} ms predicted" if self.latency_ms is not None else "")
                + "; best of "
                  f"{self.candidates} completed trial(s) under {self.budget} ({self.budget_text})")
        if self.noise_floor is None:
            text += (f"\nNOTE: the noise floor of {self.metric} is unknown for this sweep's "
                     "recipe; the choice may be noise (mdsearch reliability SWEEP).")
        elif self.within_noise:
            chosen = (f"the cheapest of them was chosen (the best by {self.metric} alone was "
                      f"{self.top_by_metric})" if self.top_by_metric else
                      "this one is also the cheapest of them")
            text += (f"\nNOTE: {len(self.within_noise)} other candidate(s) are within the noise "
                     f"of the best ({self.metric} floor {self.noise_floor:.3g}): "
                     f"{', '.join(self.within_noise)}. The sweep cannot tell them apart, so "
                     f"{chosen}; rerun them with more seeds to rank them.")
        if self.text_blind:
            text += ("\nWARNING: its text alignment is at chance: it ignores the prompt. Check the "
                     "sweep's align column before spending a full training on it.")
        return text


def choose(sweep_dir: str | Path, budget: str = "md", metric: str | None = None,
           max_latency_ms: float | None = None) -> Promotion:
    """The best completed trial of a sweep under a named budget (and, with `max_latency_ms`,
    under that predicted latency: the sweep's space must have named a latency table)."""
    if budget not in BUDGETS:
        raise PromoteError(f"budget {budget!r}: unknown{did_you_mean(budget, BUDGETS)}")
    limits = replace(BUDGETS[budget], max_latency_ms=max_latency_ms)
    sweep = Path(sweep_dir)
    table = read_results(sweep, required=("params", "gmacs", "path"))
    if max_latency_ms is not None and "latency_ms" not in table:
        raise PromoteError(f"{sweep / RESULTS}: no latency_ms column, so --max-latency-ms has "
                           f"nothing to read: sweep a space that names a latency table "
                           f"(latency: {{table: TABLE.csv}}; docs/latency.md)")
    space = load_space(sweep / SPACE) if (sweep / SPACE).is_file() else None
    quality = space.quality if space is not None else None
    metric = metric or (quality.metric if quality is not None else "fid_proxy")
    try:
        mode = direction(metric)
    except UnknownMetric:
        mode = quality.mode if quality is not None and quality.metric == metric else "min"
    if metric not in table:
        raise PromoteError(f"{sweep / RESULTS} has no column {metric!r}"
                           f"{did_you_mean(metric, table.columns)}")
    table[metric] = numeric_column(table, metric, sweep / RESULTS)
    done = table[(table["status"] == COMPLETED) & table[metric].notna()]
    if done.empty:
        counts = ", ".join(f"{v} {k}" for k, v in table["status"].value_counts().items())
        raise PromoteError(f"{sweep}: no completed trial with a {metric} to promote ({counts})")
    fits = done[[not limits.violations(int(r.params), float(r.gmacs), getattr(r, "latency_ms", None))
                 for r in done.itertuples()]]
    if fits.empty:
        cheapest = done.sort_values("params").iloc[0]
        raise PromoteError(
            f"{sweep}: none of the {len(done)} completed trials meets the {budget} budget "
            f"({limits.describe()}); the smallest has {cheapest['params'] / 1e6:.1f}M params and "
            f"{cheapest['gmacs']:.1f} GMACs. Sweep under that budget, or promote with a larger one.")
    dims = [d.name for d in space.dimensions] if space is not None else []
    recipe = yaml.safe_load((sweep / RECIPE).read_text()) if (sweep / RECIPE).is_file() else None
    floor = noise_floors(table, dims, recipe, sweep).get(metric, {}).get("floor")
    floor = floor if floor is not None and math.isfinite(floor) else None
    band = difference_band(floor) if floor is not None else 0.0
    top = fits.sort_values(metric, ascending=mode == "min").iloc[0]
    close = fits[(fits[metric] - top[metric]).abs() <= band]
    # inside the noise the metric does not rank them: the cheapest of the tied candidates wins
    costs = [c for c in ("latency_ms", "gmacs", "params") if c in close]
    best = close.sort_values(costs, kind="stable").iloc[0]
    spec_file = Path(str(best["path"])) / SPEC
    if not spec_file.is_file():
        raise PromoteError(f"trial {best['trial_id']}: its full-size spec {spec_file} is missing "
                           "(was the sweep directory moved? results.csv keeps absolute paths)")
    spec = ArchSpec.from_file(spec_file)

    def number(key):
        value = best.get(key)
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

    return Promotion(sweep=str(sweep.resolve()), budget=budget, budget_text=limits.describe(),
                     trial_id=str(best["trial_id"]), metric=metric, mode=mode,
                     value=float(best[metric]), align=number("align"),
                     align_chance=number("align_chance"), params=int(best["params"]),
                     gmacs=float(best["gmacs"]), candidates=len(fits), spec=spec.to_dict(),
                     noise_floor=floor, within_noise=[str(t) for t in close["trial_id"]
                                                      if str(t) != str(best["trial_id"])],
                     latency_ms=number("latency_ms"),
                     top_by_metric=(str(top["trial_id"]) if top["trial_id"] != best["trial_id"]
                                    else None))


def promote(sweep_dir: str | Path, budget: str = "md", *, trial: str | Path = "full",
            out_dir: str | Path | None = None, metric: str | None = None,
            workers: int | None = None, address: str | None = None, steps: int | None = None,
            train: bool = True, mlflow: dict | None = None,
            progress: Callable[[str], None] | None = None, max_latency_ms: float | None = None):
    """Choose the winner, write OUT/promotion.json and OUT/promoted_spec.yaml, and (unless
    train=False) train it fully per the `trial` recipe into OUT, logging to MLflow when `mlflow`
    holds MLflowTracker's arguments. Returns (Promotion, result)."""
    from ..train.recipe import load_recipe

    say = progress or quiet
    chosen = choose(sweep_dir, budget, metric, max_latency_ms)
    recipe = load_recipe(trial)  # a bad recipe fails before anything is written
    out = Path(out_dir) if out_dir is not None else Path(sweep_dir) / "promoted" / budget
    out.mkdir(parents=True, exist_ok=True)
    spec = ArchSpec.from_dict(chosen.spec, f"trial {chosen.trial_id}")
    (out / "promoted_spec.yaml").write_text(spec.to_yaml())
    (out / PROMOTION).write_text(json.dumps({**asdict(chosen), "recipe": recipe.to_dict()},
                                            indent=1))
    say(f"promoting {chosen.describe()}")
    say(f"full training per {recipe.name} ({recipe.steps} steps in {len(recipe.plan())} "
        f"stage(s)) into {out}")
    if not train:
        return chosen, None
    workers = recipe.workers if workers is None else workers
    if workers > 1 or address is not None:
        from ..train.distributed import train_distributed

        result = train_distributed(spec, recipe, out, workers=workers, address=address,
                                   steps=steps, mlflow=mlflow, progress=say)
    else:
        from ..track import MLflowTracker
        from ..train.trainer import train_trial

        tracker = MLflowTracker(**mlflow) if mlflow is not None else None
        result = train_trial(spec, recipe, out, steps=steps, progress=say, tracker=tracker)
    return chosen, result
