"""When to stop a candidate early: the paper's rule as a Ray Tune scheduler, and ASHA.

The paper (§5.1) stops a candidate "when the FID and CLIP scores show signs of slower improvement
compared to previous candidates". `PaperStopRule` makes that precise: at every evaluation step s a
trial's metrics are compared with the best value any other trial reported at the same step s; a
trial worse than that best by more than `margin` (relative) on *every* watched metric is stopped.
Trials are compared at equal steps, so a slow start is judged against other slow starts, never
against finished runs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from ..quality import mean_difference_band
from ..rundir import (STOP_STATE_V1, RunDirError, append_jsonl, fault_point, in_resumed,
                      read_jsonl)
from .racing import STOP as RACE_STOP


class PaperStopRule(FIFOScheduler):
    """Stop a trial whose metrics at step s are worse than the other candidates' best at s.

    metrics:   metric -> "min" | "max" (e.g. {"fid_proxy": "min", "align": "max"})
    margin:    relative tolerance: for "min", stop when value > best * (1 + margin)
    tolerance: metric -> absolute tolerance, used instead of `margin` for that metric (e.g. a
               multiple of its noise floor: a trial is stopped only when it is worse than the
               best by more than the noise can explain)
               Trials trained with several stacked seeds report `<metric>_se`: where the trial
               and the best peer both have it, the slack is instead the 95% band of a
               difference of their means (quality.mean_difference_band), with no floor needed.
    grace:     the first evaluation (1-based) at which a trial may be stopped
    min_peers: how many other trials must have reported at that step before anyone is judged
    state_file: a JSON-lines log of every judgement (trial, step, values, and the reason when
               it was stopped), appended as the rule judges; the rule's state is rebuilt from it,
               so --resume keeps what was seen. A trial resumed from a checkpoint reports some
               steps again: an evaluation counts once per step.
    """

    def __init__(self, metrics: dict[str, str], margin: float = 0.1, grace: int = 1,
                 min_peers: int = 1, time_attr: str = "step", state_file: str | Path | None = None,
                 tolerance: dict[str, float] | None = None):
        super().__init__()
        self.metrics, self.margin = dict(metrics), float(margin)
        self.tolerance = {k: float(v) for k, v in (tolerance or {}).items()}
        self.grace, self.min_peers, self.time_attr = grace, min_peers, time_attr
        self.state_file = Path(state_file) if state_file else None
        self.seen: dict[str, dict[str, dict[str, float]]] = {}  # step -> trial -> metric -> value
        self.evals: dict[str, int] = {}  # trial -> evaluations seen
        self.reasons: dict[str, str] = {}  # trial -> why it was stopped
        self._load()

    def __setstate__(self, state: dict) -> None:
        # Tune unpickles the scheduler saved when the sweep began; on --resume the file is newer
        self.__dict__.update(state)
        if self.state_file is not None:  # a resumed sweep: its log, wherever the folder is
            self.state_file = Path(in_resumed(self.state_file))
        self._load()

    def _load(self) -> None:
        self.seen, self.evals, self.reasons = {}, {}, {}
        if self.state_file is None:
            return
        if not self.state_file.exists():
            convert_v1_state(self.state_file)
        for record in read_jsonl(self.state_file):
            self._record(record["trial"], record["step"], record["values"], record.get("reason"))

    def _record(self, trial_id: str, step, values: dict, reason: str | None) -> None:
        at_step = self.seen.setdefault(str(step), {})
        if trial_id not in at_step:
            self.evals[trial_id] = self.evals.get(trial_id, 0) + 1
        at_step[trial_id] = values
        if reason:
            self.reasons[trial_id] = reason

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        return self.judge(trial.trial_id, result)

    def judge(self, trial_id: str, result: dict) -> str:
        """CONTINUE or STOP for `trial_id` reporting `result` (the rule, free of Tune objects)."""
        step = result.get(self.time_attr)
        values = {m: result.get(m) for m in self.metrics}
        own = {f"{m}_se": result.get(f"{m}_se") for m in self.metrics}
        values.update({k: v for k, v in own.items() if _finite(v)})
        n = result.get("seeds_measured")
        if _finite(n):
            values["seeds_measured"] = n
        if step is None or any(not _finite(v) for v in values.values()):
            return TrialScheduler.CONTINUE
        at_step = self.seen.get(str(step), {})
        peers = {t: v for t, v in at_step.items() if t != trial_id}
        evals = self.evals.get(trial_id, 0) + (trial_id not in at_step)  # with this one
        reason = None
        if evals >= self.grace and len(peers) >= self.min_peers:
            why, by_own = [], []
            for metric, mode in self.metrics.items():
                best_trial, best = _best(peers, metric, mode)
                slack = self.tolerance.get(metric, self.margin * abs(best))
                se, peer = f"{metric}_se", peers[best_trial]
                if se in values and se in peer:
                    slack = mean_difference_band(values[se], peer[se],
                                                 int(values.get("seeds_measured", 2)),
                                                 int(peer.get("seeds_measured", 2)))
                    by_own.append(f"{metric} {slack:.3g}")
                limit = best + slack * (1 if mode == "min" else -1)
                worse = values[metric] > limit if mode == "min" else values[metric] < limit
                if not worse:
                    break
                why.append(f"{metric} {values[metric]:.4g} vs best {best:.4g} ({best_trial})")
            else:
                by = ("more than the 95% band of a difference of seed means (" +
                      ", ".join(by_own) + ")" if len(by_own) == len(self.metrics) else None)
                by = by or "more than " + ", ".join(
                    f"{m} {self.tolerance[m]:.3g}" if m in self.tolerance
                    else (f"{self.margin:.0%}" if len(self.metrics) == 1 else
                          f"{m} {self.margin:.0%}") for m in self.metrics)
                reason = (f"paper rule at step {step}: worse than the best other candidate by "
                          f"{by} on " + "; ".join(why))
        self._record(trial_id, step, values, reason)
        if self.state_file is not None:
            append_jsonl(self.state_file, {"trial": trial_id, "step": step, "values": values,
                                           **({"reason": reason} if reason else {})})
        return TrialScheduler.STOP if reason else TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return f"PaperStopRule: {len(self.reasons)} stopped"


class SeedRacing(TrialScheduler):
    """Seed racing (search/racing.py) around the sweep's scheduler. A racing trial reports every
    evaluation of its first seed group, then one record after each further group (step = the
    full budget, its values the means over all its seeds so far). At a report that ends a group
    (step >= the budget) the race decides: STOP ends the trial (completed: it trained its whole
    budget on every seed it has), CONTINUE lets it train the next group. Before that, the
    sweep's own scheduler (the paper rule, ASHA) decides as in any sweep; it sees the group ends
    too, for its bookkeeping, but does not decide them (ASHA would stop every trial at max_t).

    Each decision is appended to `log` (JSON lines: trial, seeds' values, cost, action, reason),
    and the race is rebuilt from it, so a resumed sweep decides as the first would have."""

    def __init__(self, race, steps_total: int, log: str | Path, inner=None):
        super().__init__()
        self.race, self.steps_total, self.log = race, steps_total, Path(log)
        self.inner = inner if inner is not None else FIFOScheduler()
        self.entrants: dict = {}
        self.decided: dict = {}  # (trial, seeds) -> (action, reason), as logged
        self._load()

    def __setstate__(self, state: dict) -> None:  # a resumed sweep: its log, wherever it is
        self.__dict__.update(state)
        self.log = Path(in_resumed(self.log))
        self._load()

    def _load(self) -> None:
        from .racing import Entrant

        self.entrants, self.decided = {}, {}
        for r in read_jsonl(self.log):
            self.entrants[r["trial"]] = Entrant(r["trial"], {int(k): v for k, v in
                                                             r["seeds"].items()}, r["cost"])
            self.decided[(r["trial"], len(r["seeds"]))] = (r["action"], r["reason"])

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return self.inner.set_search_properties(metric, mode, **spec)

    def on_trial_add(self, tune_controller, trial) -> None:
        self.inner.on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial) -> None:
        self.inner.on_trial_error(tune_controller, trial)

    def on_trial_complete(self, tune_controller, trial, result) -> None:
        self.inner.on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller, trial) -> None:
        self.inner.on_trial_remove(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        return self.inner.choose_trial_to_run(tune_controller)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        decision = self.inner.on_trial_result(tune_controller, trial, result)
        if result.get("step", 0) < self.steps_total:
            return decision
        return self.judge(trial.trial_id, result)

    def judge(self, trial_id: str, result: dict) -> str:
        """CONTINUE (train the next seed group) or STOP for a report that ends a group."""
        entrant = self.race.entrant(trial_id, result)
        if entrant.n == 0:
            raise RunDirError(f"seed racing on {self.race.metric}: trial {trial_id} reported no "
                              f"per-seed values ({self.race.metric}_s0, ...); race on a held-out "
                              "metric (val_loss, val_loss_mid, text_gain, ...)")
        # a resumed trial reports a group again: the logged decision stands (and a stop logged
        # at fewer seeds, which a killed driver could not enact, still stops it)
        logged = self.decided.get((trial_id, entrant.n)) or next(
            (d for (t, n), d in self.decided.items()
             if t == trial_id and n < entrant.n and d[0] == RACE_STOP), None)
        if logged is not None:
            return TrialScheduler.STOP if logged[0] == RACE_STOP else TrialScheduler.CONTINUE
        self.entrants[trial_id] = entrant
        decision = self.race.decide(entrant, list(self.entrants.values()))
        self.decided[(trial_id, entrant.n)] = (decision.action, decision.reason)
        append_jsonl(self.log, {"trial": trial_id, "seeds": {str(k): v for k, v in
                                                             entrant.values.items()},
                                "cost": entrant.cost, "action": decision.action,
                                "reason": decision.reason})
        fault_point("seed-race")  # (tests: a driver killed after logging, before enacting)
        return TrialScheduler.STOP if decision.action == RACE_STOP else TrialScheduler.CONTINUE

    def debug_string(self) -> str:
        return f"SeedRacing ({len(self.entrants)} raced) over {self.inner.debug_string()}"


def convert_v1_state(log: Path) -> None:
    """A sweep from before the judgement log kept the rule's state in STOP_STATE_V1 (one JSON
    object: step -> trial -> values, and the reasons); write it as the log, so that resuming such
    a sweep keeps what its rule saw and why it stopped trials. The old file is left as it was."""
    old = log.with_name(STOP_STATE_V1)
    if not old.is_file():
        return
    try:
        state = json.loads(old.read_text())
        seen, reasons = state["seen"], state["reasons"]
    except (ValueError, KeyError, TypeError) as err:
        raise RunDirError(f"{old}: the paper stop rule's state is damaged ({type(err).__name__})"
                          "; restore it from a copy, or delete it to judge afresh") from None
    steps = sorted(seen, key=float)
    last = {trial: step for step in steps for trial in seen[step]}  # each trial's last step
    for step in steps:
        for trial, values in seen[step].items():
            reason = reasons.get(trial) if last[trial] == step else None
            append_jsonl(log, {"trial": trial, "step": float(step) if "." in step else int(step),
                               "values": values, **({"reason": reason} if reason else {})})


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _best(peers: dict[str, dict[str, float]], metric: str, mode: str) -> tuple[str, float]:
    pick = min if mode == "min" else max
    return pick(((t, v[metric]) for t, v in peers.items()), key=lambda tv: tv[1])


def make_scheduler(settings: dict, quality_metric: str, quality_mode: str, max_steps: int,
                   eval_every: int, state_file: Path | None, race=None,
                   race_log: Path | None = None):
    """The Tune scheduler a search space's `scheduler:` section asks for (None: run to the end),
    inside seed racing when the space races seeds (`race`: its SeedRace)."""
    inner = _scheduler(settings, quality_metric, quality_mode, max_steps, eval_every, state_file)
    if race is None:
        return inner
    return SeedRacing(race, max_steps, race_log, inner)


def _scheduler(settings: dict, quality_metric: str, quality_mode: str, max_steps: int,
               eval_every: int, state_file: Path | None):
    kind = settings.get("kind", "none")
    if kind == "paper":
        return PaperStopRule(settings["metrics"], margin=settings.get("margin", 0.1),
                             grace=settings.get("grace", 1), min_peers=settings.get("min_peers", 1),
                             state_file=state_file, tolerance=settings.get("tolerance"))
    if kind == "asha":
        metric = settings.get("metric", quality_metric)
        mode = quality_mode if metric == quality_metric else "min"
        grace = min(max_steps, eval_every * settings.get("grace", 1))
        return ASHAScheduler(time_attr="step", metric=metric, mode=mode, max_t=max_steps,
                             grace_period=grace,
                             reduction_factor=settings.get("reduction_factor", 3))
    return None
