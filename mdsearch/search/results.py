"""A sweep's results table from Tune's trials and the filtered configurations, the best trials,
and the summary `mdsearch sweep` prints."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from ray.tune import Callback

from ..quality import winner_statement
from ..rundir import (COMPLETED, FAILED, FILTERED, FILTERED_STATUS, RACE_LOG, RESULTS, STOP_STATE,
                      STOPPED,
                      SWEEP_SUPERNET, front, in_resumed, read_jsonl, trial_folder_name,
                      trial_status, write_results)
from .racing import racing_line
from .callbacks import TUNE_KEYS, error_text, reason_from_traceback
from .space import COST_METRICS as COSTS, Space


@dataclass
class SweepResult:
    path: Path
    table: pd.DataFrame
    filtered: int
    best: pd.DataFrame
    plot: Path | None = None  # set by mdsearch.analysis.plots.sweep_plot
    floors: dict = field(default_factory=dict)  # metric -> noise floor (quality.noise_floors)
    recipe: str = ""  # the name of the recipe its trials ran

    @property
    def results_csv(self) -> Path:
        return self.path / RESULTS


def results_table(grid, space: Space, sweep_dir: Path, steps_total: int) -> pd.DataFrame:
    """One row per trial: trained ones from Tune (`grid`: a ResultGrid, or `Ended` records of
    Tune's trials as they end), filtered ones from FILTERED."""
    reasons = {r["trial"]: r["reason"] for r in read_jsonl(sweep_dir / STOP_STATE)
               if r.get("reason")}
    raced = {r["trial"]: r["reason"] for r in read_jsonl(sweep_dir / RACE_LOG)}  # the last
    dims = [d.name for d in space.dimensions]
    rows = []
    for r in grid:
        metrics = dict(r.metrics or {})
        trial_id = metrics.get("trial_id") or _trial_id_from_path(r.path)
        row = {"trial_id": trial_id}
        steps = metrics.get("step", 0)
        row["status"] = status = trial_status(steps, steps_total, r.error is not None)
        if status == FAILED:
            row["stop_reason"] = reason_from_traceback(str(r.error)) or type(r.error).__name__
        elif status == STOPPED:
            row["stop_reason"] = reasons.get(trial_id, f"stopped early at step {steps} by the "
                                                       f"{space.scheduler['kind']} scheduler")
        else:
            row["stop_reason"] = "" if status == COMPLETED else "never reported (interrupted?)"
        config = r.config or {}  # (None for a trial that failed before its first report)
        row.update({d: config.get(d) for d in dims})
        row["seed"] = config.get("seed")
        row.update({k: v for k, v in metrics.items()
                    if k not in TUNE_KEYS and not k.startswith("config") and k != "step"})
        if trial_id in raced:
            row["seeds_reason"] = raced[trial_id]
        row["steps"] = steps
        row["path"] = trial_folder_name(r.path)
        rows.append(row)
    for rec in read_jsonl(sweep_dir / FILTERED):
        rows.append({**{k: rec.get(k) for k in ("trial_id", "status", "stop_reason")},
                     **{d: rec.get(d) for d in dims}, "seed": rec.get("seed"),
                     **{k: rec.get(k) for k in COSTS if k in rec}, "steps": 0})
    table = pd.DataFrame(rows)
    first = ["trial_id", "status", "stop_reason", *dims, "seed", *COSTS]
    quality = [o.metric for o in space.objectives if not o.is_cost]
    tail = ["steps", "steps_total", "workers", "seconds", "node_id", "path"]
    middle = quality + sorted(c for c in table.columns if c not in first + quality + tail)
    table = table.reindex(columns=[c for c in first + middle + tail if c in table.columns])
    return table.sort_values("trial_id", kind="stable").reset_index(drop=True)


def _trial_id_from_path(path: str) -> str:
    m = re.search(r"_([0-9a-f]{5}_\d{5})", Path(path).name)
    return m.group(1) if m else Path(path).name


class Ended(NamedTuple):
    """A Tune trial that has ended, as `results_table` reads it (the fields of Tune's Result)."""
    metrics: dict
    path: str
    error: Exception | None
    config: dict


class ResultsWriter(Callback):
    """Rewrites results.csv as each trial ends, so the table is always current: a sweep killed
    or still running can be reported and promoted from. Rows are never lost
    (`rundir.write_results` keeps those of trials this driver has not seen)."""

    def __init__(self, space: Space, sweep_dir: Path, steps_total: int):
        self.space, self.sweep_dir, self.steps_total = space, Path(sweep_dir), steps_total

    def __setstate__(self, state: dict) -> None:  # a resumed sweep: its folder, wherever it is
        self.__dict__.update(state)
        self.sweep_dir = Path(in_resumed(self.sweep_dir, folder=True))

    def _write(self, trials, ending, failed: bool) -> None:
        # Tune calls these hooks before it marks the ending trial TERMINATED or ERROR
        ended = [Ended(t.last_result or {}, t.path or "",
                       RuntimeError(error_text(t)) if (t.status == "ERROR" or
                                                       (t is ending and failed)) else None,
                       t.config)
                 for t in trials if t is ending or t.status in ("TERMINATED", "ERROR")]
        write_results(results_table(ended, self.space, self.sweep_dir, self.steps_total),
                      self.sweep_dir)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._write(trials, trial, failed=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._write(trials, trial, failed=True)


def best_trials(table: pd.DataFrame, space: Space, top: int = 5) -> pd.DataFrame:
    """The best completed trials by the quality objective; with two objectives, the Pareto
    front of the completed trials (nothing better on both)."""
    quality = space.quality
    done = table[table["status"] == COMPLETED]
    if done.empty or quality.metric not in done:
        return done
    if len(space.objectives) == 1:
        return done.sort_values(quality.metric, ascending=quality.mode == "min").head(top)
    return front(table, [(o.metric, o.mode) for o in space.objectives])


def summary(result: SweepResult, space: Space) -> str:
    """What `mdsearch sweep` prints at the end: counts, the best trials, where the results are."""
    t = result.table
    scored = result.path / SWEEP_SUPERNET  # a sweep scored on a supernet
    counts = t["status"].value_counts().to_dict()
    trained = sum(v for k, v in counts.items() if k != FILTERED_STATUS)
    lines = [f"{trained} trials trained ("
             + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()) if k != FILTERED_STATUS)
             + f"); {result.filtered} configurations filtered before training "
               f"({space.budget.describe()})"]
    if "steps" in t:
        lines.append(f"trial-steps trained: {int(t['steps'].fillna(0).sum())}")
    if "steps_total" in t and (raced := racing_line(t, space.race, int(t["steps_total"].max()))):
        lines.append(raced)
    if len(result.best):
        front = "Pareto front" if len(space.objectives) > 1 else "best trials"
        cols = ["trial_id", *[d.name for d in space.dimensions], "seed", *COSTS,
                *[o.metric for o in space.objectives if not o.is_cost], "align", "steps"]
        best = result.best.reindex(columns=list(dict.fromkeys(c for c in cols if c in t)))
        best = best.assign(params=(best["params"] / 1e6).round(1).astype(str) + "M")
        lines.append(f"{front} (by {', '.join(o.mode + ' ' + o.metric for o in space.objectives)}):")
        lines.append(best.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        if not scored.is_file():
            lines.append(winner_statement(t, space.quality.metric,
                                          result.floors.get(space.quality.metric))
                         .replace("**", ""))
        if "p_front" in t and t["p_front"].notna().any():
            likely = t[t["p_front"] >= 0.05].sort_values("p_front", ascending=False)
            what = "on the Pareto front" if len(space.objectives) > 1 else "the best"
            lines.append(f"P({what}), from each trial's mean and its noise: " + ", ".join(
                f"{r['trial_id']} {r['p_front']:.2f}" for _, r in likely.iterrows())
                + (f" (the other {int(t['p_front'].notna().sum()) - len(likely)} below 0.05)"
                   if t["p_front"].notna().sum() > len(likely) else ""))
    else:
        lines.append("no trial completed its full budget")
    if scored.is_file():  # no per-trial seed floor applies: say what moves these scores
        used = json.loads(scored.read_text())
        lines.append(f"Scored on the supernet {used['supernet']}"
                     + (f" after {used['finetune']}-step fine-tunes" if used["finetune"] else
                        ", no training per trial")
                     + ": a screen, not a winner. What moves its order (the supernet's own seed) "
                       "and how far it agrees with stand-alone training: docs/supernet.md")
    if result.plot:
        lines.append(f"Pareto plot: {result.plot}")
    lines.append(f"results: {result.results_csv}")
    return "\n".join(lines)
