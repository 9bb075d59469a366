"""Seed racing: give a trial another group of seeds only while a decision still depends on it.

A space asks for `seeds: {min: 2, max: 8}` (group: how many seeds each step adds, default min).
After each group a trial's quality is a mean over its seeds. The decision that matters is whether
the trial is on the Pareto front of (quality, cost): only the trials at most as costly can push it
off, so it is compared with each of them: a t interval of the difference of their means, with
the training-seed std pooled over every trial of the sweep (seed noise is about the same for
each configuration of a space, so a trial stopped at two seeds is still judged with the field's
precision; its own two seeds alone would give t(1) = 12.7). Against each such trial it is

    worse   its interval lies wholly on the worse side of 0: off the front, stop
    tied    its interval lies inside +-tie_margin: the two cannot matter apart, stop
    better  its interval lies wholly on the better side of 0
    open    anything else: the interval still overlaps

One `worse` stops the trial (off the front); else one `open` asks for the next group; else one
`tied` stops it (tied within the margin); else it is on the front so far, and races on to `max`:
every later trial is judged against its mean, and the front is what a user acts on. With no
cost the front is the best trial and every other trial decides. `max` seeds end any race. This is SMAC3's
intensification (a challenger gets more runs only while it may beat the incumbents) on shared
seeds, with a declared tie margin so that two equal trials do not race to `max`.

The rule is a pure function of the seeds' values (data in, decision out): the sweep's scheduler
keeps those values as a JSON-lines log, so a resumed sweep decides exactly as before, and
benchmarks/noisy_search.py replays it on the stored ground truth.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MORE, STOP = "more", "stop"


@dataclass
class Entrant:
    """One trial's race so far: its quality per seed (seed -> value) and its cost."""

    trial_id: str
    values: dict[int, float] = field(default_factory=dict)
    cost: float = 0.0

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values.values()) / len(self.values)

    @property
    def sum_of_squares(self) -> float:
        m = self.mean
        return sum((v - m) ** 2 for v in self.values.values())


def pooled_seed_std(entrants: list[Entrant]) -> tuple[float, int]:
    """The training-seed std pooled over trials (each around its own mean) and its degrees of
    freedom, sum(n_i - 1): seed noise is about the same for every configuration of a space
    (docs/fidelity.md), so a trial with two seeds borrows the precision of the whole field."""
    dof = sum(e.n - 1 for e in entrants if e.n >= 1)
    if dof < 1:
        return math.inf, 0
    return math.sqrt(sum(e.sum_of_squares for e in entrants if e.n >= 1) / dof), dof


@dataclass(frozen=True)
class Decision:
    action: str  # MORE or STOP
    reason: str


@dataclass(frozen=True)
class SeedRace:
    """The racing rule. `mode`: "min" or "max" for `metric`; `cost`: the cost metric of the
    front (None: no cost, the front is the best trial); `tie_margin`: the absolute difference
    under which two trials count as equal (0: only an exact tie); `level`: the two-sided
    confidence of every interval."""

    metric: str
    mode: str
    min_seeds: int = 2
    max_seeds: int = 8
    group: int | None = None
    tie_margin: float = 0.0
    level: float = 0.95
    cost: str | None = None

    def __post_init__(self):
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be min or max, got {self.mode!r}")
        if not 1 <= self.min_seeds <= self.max_seeds:
            raise ValueError(f"seeds: need 1 <= min ({self.min_seeds}) <= max ({self.max_seeds})")
        if self.group is not None and self.group < 1:
            raise ValueError(f"seeds.group must be at least 1, got {self.group}")
        if not (self.tie_margin >= 0 and math.isfinite(self.tie_margin)):
            raise ValueError(f"tie_margin must be a finite number >= 0, got {self.tie_margin}")

    @property
    def step(self) -> int:
        return self.group or self.min_seeds

    def next_seeds(self, have: int) -> int:
        """How many seeds the next group adds to a trial that has `have` (never past max)."""
        return max(0, min(self.step, self.max_seeds - have))

    def entrant(self, trial_id: str, result: dict) -> Entrant:
        """A trial's race from a report: its per-seed values `<metric>_s<k>` (one seed reports
        the metric alone, seed 0) and its cost."""
        prefix = f"{self.metric}_s"
        values = {int(k[len(prefix):]): float(v) for k, v in result.items()
                  if k.startswith(prefix) and k[len(prefix):].isdigit()
                  and isinstance(v, (int, float)) and math.isfinite(v)}
        one = result.get(self.metric)
        if not values and isinstance(one, (int, float)) and math.isfinite(one):
            values = {0: float(one)}
        cost = float(result.get(self.cost, 0.0)) if self.cost else 0.0
        return Entrant(trial_id, values, cost)

    def interval(self, a: Entrant, b: Entrant,
                 field: list[Entrant] | None = None) -> tuple[float, float]:
        """The confidence interval of (a - b) in "better is positive" units, with the seed
        noise pooled over `field` (default: a and b): sigma^2 (1/n_a + 1/n_b), Student's t
        with the pooled degrees of freedom. Infinite while nothing in the field has two seeds."""
        from scipy import stats

        sd, dof = pooled_seed_std(field if field is not None else [a, b])
        if dof < 1:
            return -math.inf, math.inf
        sign = 1.0 if self.mode == "max" else -1.0
        m = sign * (a.mean - b.mean)
        half = float(stats.t.ppf(0.5 + self.level / 2, dof)) * sd * math.sqrt(1 / a.n + 1 / b.n)
        return m - half, m + half

    def compare(self, a: Entrant, b: Entrant, field: list[Entrant] | None = None) -> str:
        """"worse", "tied", "better" or "open": a against b (see the module's docstring)."""
        lo, hi = self.interval(a, b, field)
        if hi < 0:
            return "worse"
        if self.tie_margin > 0 and -self.tie_margin <= lo and hi <= self.tie_margin:
            return "tied"
        if lo > 0:
            return "better"
        return "open"

    def decide(self, trial: Entrant, others: list[Entrant]) -> Decision:
        """Whether `trial` gets another group of seeds, given the other trials' races."""
        rivals = [o for o in others if o.trial_id != trial.trial_id and o.n >= 1
                  and o.cost <= trial.cost]
        field = [trial, *[o for o in others if o.trial_id != trial.trial_id]]
        verdicts = {o.trial_id: self.compare(trial, o, field) for o in rivals}
        worse = [t for t, v in verdicts.items() if v == "worse"]
        if worse:
            return Decision(STOP, f"off the front: {self.metric} confidently worse than "
                                  f"{', '.join(worse)} at no more cost ({trial.n} seeds)")
        if trial.n >= self.max_seeds:
            return Decision(STOP, f"max seeds ({self.max_seeds})")
        open_ = [t for t, v in verdicts.items() if v == "open"]
        if open_:
            return Decision(MORE, f"{self.metric} interval overlaps {', '.join(open_)}")
        tied = [t for t, v in verdicts.items() if v == "tied"]
        if tied:
            return Decision(STOP, f"tied with {', '.join(tied)} within {self.tie_margin:g} "
                                  f"({trial.n} seeds)")
        # on the front so far: every later trial is judged against its mean, so it races on
        return Decision(MORE, "on the front so far" if rivals else
                        "nothing at its cost or less: on the front so far")


def racing_line(table, race, steps_total: int) -> str | None:
    """What seed racing spent: seed-steps trained (each trial's steps x its seeds) against
    every trial trained to `max` seeds; None for a sweep that does not race."""
    from ..rundir import COMPLETED, STOPPED

    if race is None or "seeds_measured" not in table:
        return None
    done = table[table["status"].isin([COMPLETED, STOPPED])]
    seeds = done["seeds_measured"].fillna(race.min_seeds)
    spent = int((seeds * done["steps"].fillna(0)).sum())
    full = len(done) * race.max_seeds * steps_total
    counts = ", ".join(f"{int(v)} x {int(k)}" for k, v in seeds.value_counts().sort_index().items())
    return (f"seed racing ({race.min_seeds} to {race.max_seeds} seeds on {race.metric}, tie "
            f"margin {race.tie_margin:g}): {spent} seed-steps trained, {full - spent} "
            f"({(full - spent) / max(full, 1):.0%}) fewer than {race.max_seeds} seeds for every "
            f"trial (trials x seeds: {counts})")
