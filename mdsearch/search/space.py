"""Search spaces as data: a small YAML language over ArchSpec fields (`search_space/*.yaml`).

    name: quickstart
    base: md                          # a preset name, or an ArchSpec file (relative to this file)
    set: {ffn_expansion: 3}           # fixed changes to the base (optional)
    trial: cpu_quick                  # the default trial recipe (a name in trials/ or a file)
    trial_overrides: {steps: 240}     # dotted recipe changes (optional)
    dimensions:                       # what varies; each name becomes a results column
      inner_channels:
        field: levels.2.channels      # or `fields: [a, b]`: all set to the same value (tied)
        values: [640, 768, 896]       # choice
      inner_layers:
        fields: [levels.2.down.layers, levels.2.up.layers]
        range: [1, 4]                 # inclusive; `step` (default 1); ints unless a bound is float
      kv_share: {field: kv_share, bool: true}
      kernel:
        field: levels.2.kernel_size
        values: [3, 7]
        when: {conv: separable}       # only sampled when dimension `conv` has this value (or list)
      variant:                        # named bundles of changes (one-factor ablations)
        variants: {baseline: {}, no_kv_share: {kv_share: false}}
      lr:                             # `recipe.` fields change the trial recipe, not the spec
        field: recipe.optimizer.lr
        values: [5.0e-4, 1.0e-3]
    ties: {levels.1.up.layers: levels.1.down.layers}   # field <- dimension name or field
    constraints: {resolution: 512, max_params: 400_000_000, max_gmacs: 200}
                                      # max_latency_ms: 900 (needs `latency`)
    latency: {table: TABLE.csv}       # a latency table (mdsearch latency table): its predicted
                                      # latency_ms is a cost, a constraint and an objective
    objectives: [{fid_proxy: min}, {gmacs: min}]
    search: {algorithm: tpe, num_samples: 16, seed: 0, max_concurrent: 2}
    seeds: [0]                        # training seeds per configuration (several: grid only)
    seeds_per_trial: 3                # every trial trains seeds seed..seed+2 as one stacked
                                      # model and reports their mean (any searcher)
    seeds_per_trial: {min: 2, max: 8, tie_margin: 0.001}   # or: seed racing (search/racing.py):
                                      # min seeds first, then groups of `group` (default min)
                                      # while the trial may still be on the front
    scheduler: {kind: paper, margin: 0.1}   # paper | asha | none (see search/schedulers.py)

Everything is checked when the file is loaded: unknown keys, unknown fields, values a field cannot
take, conditions on unknown dimensions. Errors name the file, the key path and the reason.
`recipe.` fields are checked against the trial recipe when a sweep starts (`check_recipe_fields`).

`base: init` with a UFOGen recipe as `trial` (kind: ufogen) is a space of one-step fine-tunes of
the run given at sweep time (`mdsearch sweep SPACE --init RUN_DIR`): its spec is that run's, and
its dimensions may only be `recipe.` fields (search_space/ufogen_ablation.yaml: the paper's
Table 5). `base: autoencoder` with an autoencoder recipe (kind: vae) is a space of autoencoder
trainings (search_space/vae_channels.yaml: the paper's latent-channel study): no UNet at all,
only `recipe.` fields vary, and a configuration's costs are its autoencoder's
(`mdsearch.train.vae.cost_of`: params of encoder and decoder, GMACs of the decoder, which is what
runs on the phone).
Costs are always of the full-size spec; `Budget.check` is what keeps a configuration from training.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config
from ..errors import did_you_mean
from ..quality import DIRECTIONS, UnknownMetric, direction
from ..arch import presets
from ..arch.cost import BlockCosts, cost
from ..arch.spec import ArchSpec, SpecError
from ..paths import SEARCH_SPACES

RECIPE_PREFIX = "recipe."  # a dimension field that changes the trial recipe, not the spec
INIT_BASE = "init"  # `base: init`: the spec of the run given with --init (UFOGen spaces)
AUTOENCODER_BASE = "autoencoder"  # `base: autoencoder`: autoencoder trainings (no UNet spec)
RECIPE_ONLY_BASES = (INIT_BASE, AUTOENCODER_BASE)
ALGORITHMS = ("tpe", "nsga2", "random", "grid")
SCHEDULERS = ("paper", "asha", "none")
COST_METRICS = ("params", "gmacs", "latency_ms")  # objectives known before training
TOP_KEYS = ("name", "description", "base", "set", "trial", "trial_overrides", "dimensions",
            "ties", "constraints", "objectives", "search", "seeds", "seeds_per_trial",
            "scheduler", "latency")
DIM_KINDS = ("values", "range", "bool", "variants")
MAX_DIMENSION_VALUES = 10_000  # a range longer than this is a typo


class SpaceError(config.ConfigError):
    """A malformed search space: names the file, the key path and the reason."""


@dataclass
class Dimension:
    name: str
    fields: list[str]  # set to the sampled value (empty for `variants`)
    values: list[Any]  # the finite list of values (ranges expanded)
    variants: dict[str, dict[str, Any]] | None = None  # value name -> field changes
    when: dict[str, list[Any]] = field(default_factory=dict)  # dimension -> allowed values

    def changes(self, value: Any) -> dict[str, Any]:
        if self.variants is not None:
            return dict(self.variants[value])
        return {f: value for f in self.fields}

    def active(self, point: dict[str, Any]) -> bool:
        return all(point.get(dim) in allowed for dim, allowed in self.when.items())

    @property
    def ordered(self) -> bool:
        """A numeric dimension (a range, or values that are all numbers): its order means
        something, so a searcher should see it as a number, not as a category."""
        return (self.variants is None and len(self.values) > 1 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values))

    def suggest(self, trial) -> Any:
        """This dimension's value from an Optuna trial: an int / float distribution (with its
        step) for an evenly spaced numeric dimension, an int over the sorted values' positions
        for an unevenly spaced one (its order kept), a categorical for the rest."""
        if not self.ordered:
            return trial.suggest_categorical(self.name, self.values)
        values = sorted(self.values)
        steps = {round(b - a, 10) for a, b in zip(values, values[1:])}
        if len(steps) == 1:
            step = steps.pop()
            if all(isinstance(v, int) for v in values) and float(step).is_integer():
                return trial.suggest_int(self.name, values[0], values[-1], step=int(step))
            return trial.suggest_float(self.name, float(values[0]), float(values[-1]), step=step)
        return values[trial.suggest_int(self.name + "_rank", 0, len(values) - 1)]


@dataclass
class Budget:
    resolution: int = 512
    max_params: float | None = None
    max_gmacs: float | None = None
    max_latency_ms: float | None = None  # predicted by the space's latency table

    @property
    def limited(self) -> bool:
        return any(v is not None for v in (self.max_params, self.max_gmacs, self.max_latency_ms))

    def violations(self, params: int, gmacs: float, latency_ms: float | None = None) -> list[str]:
        out = []
        if self.max_params is not None and params > self.max_params:
            out.append(f"params {params / 1e6:.1f}M > {self.max_params / 1e6:.1f}M")
        if self.max_gmacs is not None and gmacs > self.max_gmacs:
            out.append(f"GMACs {gmacs:.1f} > {self.max_gmacs:.1f}")
        if self.max_latency_ms is not None and latency_ms is not None and \
                latency_ms > self.max_latency_ms:
            out.append(f"latency {latency_ms:.1f} ms > {self.max_latency_ms:g} ms")
        return out

    def describe(self) -> str:
        parts = []
        if self.max_params is not None:
            parts.append(f"params <= {self.max_params / 1e6:.0f}M")
        if self.max_gmacs is not None:
            parts.append(f"GMACs <= {self.max_gmacs:g}")
        if self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms:g} ms")
        return (" and ".join(parts) or "no budget") + f" at {self.resolution}x{self.resolution}"


@dataclass
class Objective:
    metric: str
    mode: str  # "min" | "max"

    @property
    def is_cost(self) -> bool:
        return self.metric in COST_METRICS


@dataclass
class Space:
    name: str
    source: str
    base: ArchSpec | None  # None for `base: init` until a sweep binds the --init run's spec,
    #                        and for `base: autoencoder`
    trial: str
    trial_overrides: dict[str, Any]
    dimensions: list[Dimension]
    ties: dict[str, str]
    budget: Budget
    objectives: list[Objective]
    algorithm: str = "tpe"
    num_samples: int = 8
    search_seed: int = 0
    max_concurrent: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    seeds_per_trial: int = 1  # training seeds stacked in every trial (the recipe's `seeds`)
    race: Any = None  # seeds_per_trial: {min, max}: the racing rule (search.racing.SeedRace)
    scheduler: dict[str, Any] = field(default_factory=lambda: {"kind": "none"})
    description: str = ""
    base_name: str = ""  # as written: a preset, a spec file, init or autoencoder
    autoencoder: Any = None  # `base: autoencoder`: the sweep's VAERecipe (bound by the sweep)
    latency_table: Path | None = None  # `latency: {table: PATH}` (relative to the space file)
    latency: Any = None  # its arch.latency.Table, once `load_latency` read it

    def load_latency(self):
        """The space's latency table (read and checked once; None when it names none): a
        table measured at another resolution than the constraints' is refused."""
        if self.latency_table is not None and self.latency is None:
            from ..arch.latency import Table

            table = Table(self.latency_table)
            if table.resolution != self.budget.resolution:
                raise SpaceError(f"{self.source}: latency.table: {self.latency_table} was "
                                 f"measured at {table.resolution}x{table.resolution}, the "
                                 f"constraints' resolution is {self.budget.resolution}")
            self.latency = table
        return self.latency

    @property
    def base_label(self) -> str:
        if self.base is not None:
            return self.base.name
        return "the --init run" if self.base_name == INIT_BASE else "an autoencoder recipe"

    # ---- configurations ------------------------------------------------------------------
    def dimension(self, name: str) -> Dimension:
        return next(d for d in self.dimensions if d.name == name)

    def point_of(self, config: dict[str, Any]) -> dict[str, Any]:
        """The dimensions' values in a trial's config (without its seed or a searcher's own
        bookkeeping such as `<dim>_rank`)."""
        names = {d.name for d in self.dimensions}
        return {k: v for k, v in config.items() if k in names}

    def _all_changes(self, point: dict[str, Any]) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        for dim in self.dimensions:
            if dim.name in point and point[dim.name] is not None:
                changes.update(dim.changes(point[dim.name]))
        return changes

    def recipe_changes(self, point: dict[str, Any]) -> dict[str, Any]:
        """The dotted trial-recipe changes a point makes (its `recipe.` fields)."""
        return {k[len(RECIPE_PREFIX):]: v for k, v in self._all_changes(point).items()
                if k.startswith(RECIPE_PREFIX)}

    def changes(self, point: dict[str, Any]) -> dict[str, Any]:
        """The field changes a point (dimension name -> value) makes to the base spec."""
        changes = {k: v for k, v in self._all_changes(point).items()
                   if not k.startswith(RECIPE_PREFIX)}
        if self.ties:
            data = self.base.to_dict()
            for key, value in changes.items():
                config.set_path(data, key, value, self.source, error=SpaceError)
            for target, source in self.ties.items():
                changes[target] = point[source] if source in point else _get_path(data, source)
        return changes

    def spec_for(self, point: dict[str, Any]) -> ArchSpec:
        """The full-size spec of a point; a SpecError if the combination is not a valid UNet."""
        label = ", ".join(f"{k}={v}" for k, v in point.items() if k != "seed")
        spec = self.base.override(self.changes(point), source=f"{self.source} [{label}]")
        spec.name = f"{self.name}[{label}]" if label else self.name
        return spec

    def sample(self, rng: random.Random) -> dict[str, Any]:
        """A uniformly random point (conditional dimensions only where active)."""
        point: dict[str, Any] = {}
        for dim in self.dimensions:
            if dim.active(point):
                point[dim.name] = rng.choice(dim.values)
        return point

    def grid(self) -> list[dict[str, Any]]:
        """Every point of the space (conditionals respected), in declaration order."""
        points: list[dict[str, Any]] = [{}]
        for dim in self.dimensions:
            grown = []
            for point in points:
                if dim.active(point):
                    grown.extend({**point, dim.name: v} for v in dim.values)
                else:
                    grown.append(point)
            points = grown
        return points

    def valid_points(self) -> list[tuple[dict[str, Any], ArchSpec]]:
        """Every point of the grid whose combination is a valid UNet, with its full-size spec
        (an invalid combination is never trained, so never timed or held by a supernet)."""
        out = []
        for point in self.grid():
            try:
                out.append((point, self.spec_for(point)))
            except SpecError:
                continue
        return out

    # ---- budget --------------------------------------------------------------------------
    def screen(self, point: dict[str, Any], cache: "CostCache") -> tuple[dict | None, str | None]:
        """Cost a point's full-size spec: (cost summary, None) or (summary|None, why filtered)."""
        if self.autoencoder is not None:
            recipe = self.autoencoder.override(self.recipe_changes(point), source="sweep point")
            c = cache.get_autoencoder(recipe, self.budget.resolution)
        else:
            try:
                spec = self.spec_for(point)
            except SpecError as err:
                return None, f"invalid spec: {err}"
            c = cache.get(spec, self.budget.resolution)
        broken = self.budget.violations(c["params"], c["gmacs"], c.get("latency_ms"))
        return c, ("over budget: " + ", ".join(broken)) if broken else None

    def check_feasible(self, cache: "CostCache", tries: int = 32) -> None:
        """Fail at once, with the cheapest configuration found, when nothing fits the budget.

        The cheapest corner is found by one pass of coordinate descent over the dimensions,
        then random points are tried; a grid is checked exhaustively by the runner."""
        if not self.budget.limited:
            return
        point = self.grid_fill({})
        best, best_why = None, None
        for dim in self.dimensions:
            if not dim.active(point):
                continue
            scores = []
            for value in dim.values:
                trial = self.grid_fill({**point, dim.name: value})
                c, why = self.screen(trial, cache)
                if c is not None and why is None:
                    return
                if c is not None:
                    scores.append((self._excess(c), value, c, why))
            if scores:
                scores.sort(key=lambda s: s[0])
                point = self.grid_fill({**point, dim.name: scores[0][1]})
                best, best_why = scores[0][2], scores[0][3]
        rng = random.Random(0)
        for _ in range(tries):
            c, why = self.screen(self.sample(rng), cache)
            if c is not None and why is None:
                return
        latency = f", {best['latency_ms']:.1f} ms" if best and "latency_ms" in best else ""
        cheapest = (f"; the cheapest configuration found has {best['params'] / 1e6:.1f}M params"
                    f", {best['gmacs']:.1f} GMACs{latency} ({best_why})") if best else ""
        raise SpaceError(f"{self.source}: constraints: no configuration of this space satisfies "
                         f"{self.budget.describe()}{cheapest}. Loosen the constraints or "
                         f"allow smaller configurations.")

    def grid_fill(self, point: dict[str, Any]) -> dict[str, Any]:
        """`point` with conditional dimensions added (first value) or removed as they apply."""
        out: dict[str, Any] = {}
        for dim in self.dimensions:
            if dim.active(out):
                out[dim.name] = point.get(dim.name, dim.values[0])
        return out

    def _excess(self, c: dict) -> float:
        b = self.budget
        excess = 0.0
        if b.max_params is not None:
            excess += max(0.0, c["params"] / b.max_params - 1)
        if b.max_gmacs is not None:
            excess += max(0.0, c["gmacs"] / b.max_gmacs - 1)
        if b.max_latency_ms is not None and "latency_ms" in c:
            excess += max(0.0, c["latency_ms"] / b.max_latency_ms - 1)
        return excess

    # ---- objectives ----------------------------------------------------------------------
    @property
    def quality(self) -> Objective:
        """The first objective measured by training (what schedulers and 'best' look at)."""
        return next(o for o in self.objectives if not o.is_cost)


class CostCache:
    """Full-size costs by spec, so a configuration sampled twice is costed once; a new spec
    reuses the costs of the blocks it shares with those before it (arch.cost.BlockCosts).
    With a latency table (arch.latency.Table), a spec's predicted latency_ms too."""

    def __init__(self, latency=None):
        self._cache: dict[tuple[str, int], dict] = {}
        self.blocks = BlockCosts()
        self.latency = latency

    def get(self, spec: ArchSpec, resolution: int) -> dict:
        data = spec.to_dict()
        data.pop("name")
        key = (json.dumps(data, sort_keys=True), resolution)
        if key not in self._cache:
            c = cost(spec, resolution, cache=self.blocks)
            self._cache[key] = {"params": c.params, "gmacs": round(c.gmacs, 3)}
            if self.latency is not None:
                self._cache[key]["latency_ms"] = round(self.latency.predict(spec).total_ms, 3)
        return self._cache[key]

    def get_autoencoder(self, recipe, resolution: int) -> dict:
        """An autoencoder recipe's costs: params of encoder + decoder, GMACs of the decoder."""
        from ..train.vae import cost_of

        reads = {"arch": recipe.arch.__dict__, "train": recipe.train}  # all that cost_of reads
        key = (json.dumps(reads, sort_keys=True), resolution)
        if key not in self._cache:
            c = cost_of(recipe, resolution)
            self._cache[key] = {"params": c.encoder_params + c.decoder_params,
                                "gmacs": round(c.decoder_gmacs, 3)}
        return self._cache[key]


# ---- loading ---------------------------------------------------------------------------------
def load_space(path_or_name: str | Path) -> Space:
    """A search space file, or the name of one in search_space/ (`quickstart`)."""
    path = config.named_file(path_or_name, SEARCH_SPACES)
    data = config.load_yaml(path, error=SpaceError)
    return parse_space(data, str(path), base_dir=path.parent)


def parse_space(data: Any, source: str = "space", base_dir: Path | None = None) -> Space:
    def fail(where: str, reason: str):
        raise SpaceError(f"{source}: {where}: {reason}")

    if not isinstance(data, dict):
        fail("top level", f"must be a mapping, got {type(data).__name__}")
    for key in data:
        if key not in TOP_KEYS:
            fail(f"key {key!r}", "unknown" + did_you_mean(key, TOP_KEYS))
    for key in ("base", "dimensions", "objectives"):
        if key not in data:
            fail(key, "missing (required)")

    base_name = str(data["base"])
    base = None if base_name in RECIPE_ONLY_BASES else _load_base(data["base"], base_dir, fail)
    if data.get("set"):
        if base is None:
            fail("set", f"`base: {base_name}` has no spec to change: vary `recipe.` fields")
        base = base.override(_mapping(data["set"], "set", fail), source=f"{source}: set")
    name = str(data.get("name") or Path(source).stem)

    dims = _parse_dimensions(data["dimensions"], base, fail, base_name)
    ties = _mapping(data.get("ties") or {}, "ties", fail)
    if base is None and ties:
        fail("ties", f"`base: {base_name}` spaces vary only recipe fields")
    dim_names = {d.name for d in dims}
    for target, src in ties.items():
        _check_exists(base, target, f"ties.{target}", fail)
        if src not in dim_names:
            _check_exists(base, src, f"ties.{target}", fail)

    budget = _parse_budget(data.get("constraints") or {}, fail)
    objectives = _parse_objectives(data["objectives"], fail)
    latency_table = _parse_latency(data.get("latency"), base_dir, fail)
    wants = [w for w, on in (("constraints.max_latency_ms", budget.max_latency_ms is not None),
                             ("objectives: latency_ms",
                              any(o.metric == "latency_ms" for o in objectives))) if on]
    if wants and latency_table is None:
        fail(wants[0], "needs `latency: {table: TABLE.csv}` (a table from `mdsearch latency "
                       "table`), which predicts each configuration's latency")
    if latency_table is not None and base is None:
        fail("latency", f"`base: {base_name}` has no UNet to time")
    search = _mapping(data.get("search") or {}, "search", fail)
    for key in search:
        if key not in ("algorithm", "num_samples", "seed", "max_concurrent"):
            fail(f"search.{key}", "unknown" + did_you_mean(
                key, ("algorithm", "num_samples", "seed", "max_concurrent")))
    algorithm = search.get("algorithm", "tpe" if len(objectives) == 1 else "nsga2")
    if algorithm not in ALGORITHMS:
        fail("search.algorithm", f"{algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    num_samples = search.get("num_samples", 8)
    if not isinstance(num_samples, int) or num_samples < 1:
        fail("search.num_samples", f"must be a positive integer, got {num_samples!r}")
    max_conc = search.get("max_concurrent")
    if max_conc is not None and (not isinstance(max_conc, int) or max_conc < 1):
        fail("search.max_concurrent", f"must be a positive integer, got {max_conc!r}")
    seeds = data.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        fail("seeds", f"must be a non-empty list of integers, got {seeds!r}")
    if len(seeds) > 1 and algorithm != "grid":
        fail("seeds", "repeats over several seeds need `search.algorithm: grid` (a sampler "
                      "would treat seeds as different configurations)")
    from ..train.recipe import MAX_SEEDS

    per_trial, race = _parse_seeds_per_trial(data.get("seeds_per_trial", 1), objectives, fail)
    if per_trial > 1 and len(seeds) > 1:
        fail("seeds_per_trial", "give either seeds (grid repeats, one seed per trial) or "
                                "seeds_per_trial (several seeds inside every trial), not both")
    scheduler = _parse_scheduler(data.get("scheduler") or {"kind": "none"}, objectives, fail)
    trial = str(data.get("trial", "cpu_quick"))
    trial_overrides = _mapping(data.get("trial_overrides") or {}, "trial_overrides", fail)

    return Space(name=name, source=source, base=base, trial=trial,
                 trial_overrides=trial_overrides, dimensions=dims, ties=ties, budget=budget,
                 objectives=objectives, algorithm=algorithm, num_samples=num_samples,
                 search_seed=int(search.get("seed", 0)), max_concurrent=max_conc, seeds=seeds,
                 seeds_per_trial=per_trial, race=race,
                 scheduler=scheduler, description=str(data.get("description", "")).strip(),
                 base_name=base_name, latency_table=latency_table)


def _load_base(base: Any, base_dir: Path | None, fail) -> ArchSpec:
    if not isinstance(base, str):
        fail("base", f"a preset name or an ArchSpec file, got {base!r}")
    if base in presets.PRESETS:
        return presets.get(base)
    path = Path(base)
    if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
        path = base_dir / path
    if not path.exists():
        fail("base", f"{base!r} is neither a preset ({', '.join(presets.PRESETS)}) "
                     "nor an existing spec file")
    return ArchSpec.from_file(path)


def _mapping(value: Any, where: str, fail) -> dict:
    if not isinstance(value, dict):
        fail(where, f"must be a mapping, got {value!r}")
    return value


def _get_path(data: Any, key: str) -> Any:
    node = data
    for part in key.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _check_exists(base: ArchSpec, key: str, where: str, fail) -> None:
    """`key` names a field of the base spec (config.set_path's error carries the did-you-mean)."""
    try:
        config.set_path(base.to_dict(), key, None, "", error=SpaceError)
    except SpaceError as err:
        fail(where, str(err).lstrip(": "))


def _check_field(base: ArchSpec, key: str, value: Any, where: str, fail) -> None:
    """The base spec's field `key` accepts `value` (type and range; combinations come later)."""
    _check_exists(base, key, where, fail)
    data = base.to_dict()
    config.set_path(data, key, value, "", error=SpaceError)
    try:
        config.from_dict(ArchSpec, data, "", error=SpaceError)
    except SpaceError as err:
        fail(where, f"value {value!r} for {key}: {str(err).split(': ', 2)[-1]}")


def _parse_dimensions(raw: Any, base: ArchSpec | None, fail,
                      base_name: str = "") -> list[Dimension]:
    if not isinstance(raw, dict) or not raw:
        fail("dimensions", "must be a non-empty mapping of dimension name -> definition")
    dims: list[Dimension] = []
    for name, d in raw.items():
        at = f"dimensions.{name}"
        if not isinstance(d, dict):
            fail(at, f"must be a mapping, got {d!r}")
        known = ("field", "fields", "when", "step") + DIM_KINDS
        for key in d:
            if key not in known:
                fail(f"{at}.{key}", "unknown" + did_you_mean(key, known))
        kinds = [k for k in DIM_KINDS if k in d]
        if len(kinds) != 1:
            fail(at, f"give exactly one of {', '.join(DIM_KINDS)} (got {kinds or 'none'})")
        kind = kinds[0]
        if kind == "variants":
            if "field" in d or "fields" in d:
                fail(at, "`variants` name their own fields; drop field/fields")
            variants = _mapping(d["variants"], f"{at}.variants", fail)
            if not variants:
                fail(f"{at}.variants", "needs at least one variant")
            for vname, changes in variants.items():
                changes = _mapping(changes or {}, f"{at}.variants.{vname}", fail)
                spec_changes = {k: v for k, v in changes.items()
                                if not str(k).startswith(RECIPE_PREFIX)}
                if spec_changes and base is None:
                    fail(f"{at}.variants.{vname}", f"`base: {base_name}` spaces vary only "
                                                   "`recipe.` fields")
                try:
                    if spec_changes:
                        base.override(spec_changes, source="")
                except SpecError as err:
                    fail(f"{at}.variants.{vname}", str(err).split(": ", 1)[-1].lstrip(": "))
                variants[vname] = changes
            dims.append(Dimension(str(name), [], list(variants), variants=variants))
            continue
        fields = d.get("fields", [d["field"]] if "field" in d else None)
        if not fields or not isinstance(fields, list):
            fail(at, "needs `field: PATH` or `fields: [PATH, ...]`")
        if kind == "values":
            values = d["values"]
            if not isinstance(values, list) or not values:
                fail(f"{at}.values", f"must be a non-empty list, got {values!r}")
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    fail(f"{at}.values", f"must be finite numbers, got {v!r}")
        elif kind == "bool":
            values = [False, True]
        else:
            values = _expand_range(d["range"], d.get("step", 1), f"{at}.range", fail)
        if "step" in d and kind != "range":
            fail(f"{at}.step", "only ranges take a step")
        if len(set(map(repr, values))) != len(values):
            fail(f"{at}.values", f"has duplicates: {values!r}")
        for f in fields:
            if str(f).startswith(RECIPE_PREFIX):
                continue  # checked against the trial recipe when a sweep starts
            if base is None:
                fail(at, f"field {f}: `base: {base_name}` spaces vary only `recipe.` fields")
            for v in values:
                _check_field(base, str(f), v, f"{at}", fail)
        dims.append(Dimension(str(name), [str(f) for f in fields], values))

    names = [d.name for d in dims]
    for d, (name, raw_d) in zip(dims, raw.items()):
        when = raw_d.get("when") or {}
        when = _mapping(when, f"dimensions.{name}.when", fail)
        for dep, allowed in when.items():
            if dep not in names:
                fail(f"dimensions.{name}.when.{dep}",
                     "not a dimension" + did_you_mean(dep, names))
            if names.index(dep) >= names.index(name):
                fail(f"dimensions.{name}.when.{dep}",
                     "conditions may only refer to dimensions declared before this one")
            allowed = allowed if isinstance(allowed, list) else [allowed]
            bad = [a for a in allowed if a not in dims[names.index(dep)].values]
            if bad:
                fail(f"dimensions.{name}.when.{dep}", f"{bad!r} not among {dep}'s values "
                                                      f"{dims[names.index(dep)].values!r}")
            d.when[dep] = allowed
    return dims


def _expand_range(rng: Any, step: Any, where: str, fail) -> list:
    if (not isinstance(rng, list) or len(rng) != 2
            or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in rng)):
        fail(where, f"must be [low, high], got {rng!r}")
    low, high = rng
    if not all(math.isfinite(x) for x in rng):
        fail(where, f"bounds must be finite numbers, got {rng!r}")
    if not isinstance(step, (int, float)) or not math.isfinite(step) or step <= 0:
        fail(where, f"step must be positive, got {step!r}")
    if (high - low) / step > MAX_DIMENSION_VALUES:
        fail(where, f"{rng!r} in steps of {step} gives more than {MAX_DIMENSION_VALUES} values")
    if high < low:
        fail(where, f"high {high} < low {low}")
    as_int = all(isinstance(x, int) for x in (low, high, step))
    count = int((high - low) / step + 1e-9) + 1
    values = [low + i * step for i in range(count)]
    return values if as_int else [round(float(v), 10) for v in values]


def _parse_latency(raw: Any, base_dir: Path | None, fail) -> Path | None:
    if raw is None:
        return None
    raw = _mapping(raw, "latency", fail)
    for key in raw:
        if key != "table":
            fail(f"latency.{key}", "unknown; the one key is `table: TABLE.csv`")
    if not isinstance(raw.get("table"), str) or not raw["table"].strip():
        fail("latency.table", "a latency table file (mdsearch latency table --out TABLE.csv)")
    path = Path(raw["table"]).expanduser()
    return path if path.is_absolute() or base_dir is None else base_dir / path


def _parse_budget(raw: Any, fail) -> Budget:
    raw = _mapping(raw, "constraints", fail)
    known = ("resolution", "max_params", "max_gmacs", "max_latency_ms")
    for key in raw:
        if key not in known:
            fail(f"constraints.{key}", "unknown" + did_you_mean(key, known))
    budget = Budget()
    if "resolution" in raw:
        if not isinstance(raw["resolution"], int) or raw["resolution"] < 8:
            fail("constraints.resolution", f"an image size in pixels, got {raw['resolution']!r}")
        budget.resolution = raw["resolution"]
    for key in ("max_params", "max_gmacs", "max_latency_ms"):
        if key in raw and raw[key] is not None:
            value = _number(raw[key])
            if value is None or value <= 0:
                fail(f"constraints.{key}", f"a positive number (e.g. 400_000_000 or 400M), "
                                           f"got {raw[key]!r}")
            setattr(budget, key, value)
    return budget


def _number(value: Any) -> float | None:
    """400, 400.5, '400M', '1.2G', '400e6' -> a float (None if not a number)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip().replace("_", "")
        scale = {"K": 1e3, "M": 1e6, "G": 1e9}.get(text[-1:].upper(), 1.0)
        if scale != 1.0:
            text = text[:-1]
        try:
            return float(text) * scale
        except ValueError:
            return None
    return None


def _parse_objectives(raw: Any, fail) -> list[Objective]:
    if not isinstance(raw, list) or not raw:
        fail("objectives", "a non-empty list like [{fid_proxy: min}, {gmacs: min}]")
    objectives = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            item = {item: None}
        if not isinstance(item, dict) or len(item) != 1:
            fail(f"objectives[{i}]", f"a metric name or one `metric: min|max` mapping, "
                                     f"got {item!r}")
        (metric, mode), = item.items()
        objectives.append(Objective(str(metric), _mode(str(metric), mode,
                                                       f"objectives[{i}].{metric}", fail)))
    if all(o.is_cost for o in objectives):
        fail("objectives", "needs at least one quality metric measured by training "
                           "(e.g. fid_proxy: min); params, gmacs and latency_ms alone need no "
                           "sweep")
    if len(objectives) > 2:
        fail("objectives", "at most two (one for TPE, two for NSGA-II)")
    return objectives


def _mode(metric: str, mode: Any, where: str, fail) -> str:
    """The direction of `metric`: the registry's (mdsearch.quality); a given `mode` must agree
    with it, and a metric the registry does not know needs one."""
    try:
        known = direction(metric)
    except UnknownMetric:
        known = None
    if mode is None and known is None:
        fail(where, f"unknown metric: give its direction (`{metric}: min` or `{metric}: max`); "
                    f"known metrics: {', '.join(DIRECTIONS)}")
    if mode is not None and mode not in ("min", "max"):
        fail(where, f"mode must be min or max, got {mode!r}")
    if mode is not None and known is not None and mode != known:
        fail(where, f"{metric} is better when {'lower' if known == 'min' else 'higher'}: "
                    f"its direction is {known}, not {mode}")
    return mode or known


RACE_KEYS = ("min", "max", "group", "tie_margin")


def _parse_seeds_per_trial(raw: Any, objectives: list[Objective], fail):
    """`seeds_per_trial`: K (every trial K stacked seeds) or {min, max, group, tie_margin} (seed
    racing on the space's quality objective, the front taken against its first cost objective).
    Returns (the seeds a trial starts with, the SeedRace or None)."""
    from ..train.recipe import MAX_SEEDS
    from .racing import SeedRace

    def count(value, where):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_SEEDS:
            fail(where, f"must be an integer in 1..{MAX_SEEDS}, got {value!r}")
        return value

    if not isinstance(raw, dict):
        return count(raw, "seeds_per_trial"), None
    for key in raw:
        if key not in RACE_KEYS:
            fail(f"seeds_per_trial.{key}", "unknown" + did_you_mean(str(key), RACE_KEYS))
    low = count(raw.get("min", 2), "seeds_per_trial.min")
    high = count(raw.get("max", 8), "seeds_per_trial.max")
    if high <= low:
        fail("seeds_per_trial.max", f"must be more than min ({low}), got {high}")
    group = count(raw.get("group", low), "seeds_per_trial.group")
    margin = raw.get("tie_margin", 0.0)
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not \
            math.isfinite(margin) or margin < 0:
        fail("seeds_per_trial.tie_margin", f"must be a finite number >= 0 (in units of the "
                                           f"quality metric), got {margin!r}")
    quality = next(o for o in objectives if not o.is_cost)
    from ..train.heldout import PER_SEED

    if quality.metric not in PER_SEED:
        fail("seeds_per_trial", f"seed racing compares every seed's {quality.metric}, which a "
                                f"stack of seeds reports for {', '.join(PER_SEED)} only; make "
                                "one of them the first quality objective")
    cost = next((o.metric for o in objectives if o.is_cost), None)
    return low, SeedRace(quality.metric, quality.mode, min_seeds=low, max_seeds=high,
                         group=group, tie_margin=float(margin), cost=cost)


def _parse_scheduler(raw: Any, objectives: list[Objective], fail) -> dict:
    raw = dict(_mapping(raw, "scheduler", fail))
    kind = raw.get("kind", "none")
    if kind not in SCHEDULERS:
        fail("scheduler.kind", f"{kind!r} is not one of {', '.join(SCHEDULERS)}")
    known = {"paper": ("kind", "metrics", "margin", "tolerance", "grace", "min_peers"),
             "asha": ("kind", "metric", "reduction_factor", "grace"),
             "none": ("kind",)}[kind]
    for key in raw:
        if key not in known:
            fail(f"scheduler.{key}", f"unknown for kind {kind}" + did_you_mean(key, known))
    main = next(o for o in objectives if not o.is_cost)
    if kind == "paper":
        metrics = raw.get("metrics", {main.metric: main.mode})
        if isinstance(metrics, list):
            metrics = {m: None for m in metrics}
        if not isinstance(metrics, dict) or not metrics:
            fail("scheduler.metrics", f"a list of metrics or a mapping metric -> min|max, "
                                      f"got {metrics!r}")
        raw["metrics"] = {str(m): _mode(str(m), mode, f"scheduler.metrics.{m}", fail)
                          for m, mode in metrics.items()}
        margin = raw.setdefault("margin", 0.1)
        if not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
            fail("scheduler.margin", f"a non-negative fraction, got {margin!r}")
        tolerance = _mapping(raw.get("tolerance") or {}, "scheduler.tolerance", fail)
        for m, v in tolerance.items():
            if m not in raw["metrics"]:
                fail(f"scheduler.tolerance.{m}", "not one of scheduler.metrics"
                     + did_you_mean(str(m), list(raw["metrics"])))
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not \
                    math.isfinite(v) or v < 0:
                fail(f"scheduler.tolerance.{m}", f"a non-negative number, got {v!r}")
        raw["tolerance"] = tolerance
    for key in ("grace", "min_peers", "reduction_factor"):
        if key in raw and (not isinstance(raw[key], int) or raw[key] < 1):
            fail(f"scheduler.{key}", f"a positive integer, got {raw[key]!r}")
    raw["kind"] = kind
    return raw


def describe(space: Space) -> str:
    dims = "; ".join(f"{d.name} in {d.values}" + (f" when {d.when}" if d.when else "")
                     for d in space.dimensions)
    return (f"{space.name}: base {space.base_label}, {len(space.grid())} configurations "
            f"({dims}); {space.budget.describe()}; objectives "
            + ", ".join(f"{o.mode} {o.metric}" for o in space.objectives))


def product(space: Space) -> list[dict[str, Any]]:
    """Grid points crossed with the training seeds."""
    return [{**p, "seed": s} for p, s in itertools.product(space.grid(), space.seeds)]


def sweep_recipe(space: Space, trial: str | Path | None = None):
    """The space's default recipe with its `trial_overrides`, or another recipe as it is: a
    Recipe, a UFOGenRecipe for a recipe of kind: ufogen, a VAERecipe for kind: vae."""
    from ..train.ufogen import load_any_recipe

    from ..train.recipe import Recipe

    recipe = load_any_recipe(trial if trial is not None else space.trial)
    if trial is None and space.trial_overrides:
        recipe = recipe.override(space.trial_overrides, source=f"{space.source}: trial_overrides")
    if space.seeds_per_trial > 1:
        if not isinstance(recipe, Recipe):
            raise SpaceError(f"{space.source}: seeds_per_trial: {space.seeds_per_trial}: only a "
                             f"diffusion trial recipe trains stacked seeds; {recipe.name} is not "
                             "one")
        recipe = recipe.override({"seeds": space.seeds_per_trial},
                                 source=f"{space.source}: seeds_per_trial")
    return recipe


def check_recipe_fields(space: Space, recipe) -> None:
    """Every value of every `recipe.` field is one the recipe accepts, and none is a layout field
    (workers, resources) (a SpaceError naming the space file, the dimension and the reason
    otherwise)."""
    from ..train.recipe import LAYOUT_FIELDS, RecipeError

    for dim in space.dimensions:
        for value in dim.values:
            changes = space.recipe_changes({dim.name: value})
            if not changes:
                continue
            layout = sorted(k for k in changes if k.split(".")[0] in LAYOUT_FIELDS)
            if layout:  # Tune reserves one shape of trial for the whole sweep
                raise SpaceError(f"{space.source}: dimensions.{dim.name}: recipe.{layout[0]} is "
                                 "how a trial is laid out over processes, the same for every "
                                 "trial of a sweep; set it in the trial recipe")
            try:
                recipe.override(changes, source=f"{space.source}: dimensions.{dim.name}")
            except RecipeError as err:
                raise SpaceError(f"{space.source}: dimensions.{dim.name}: value {value!r}: "
                                 f"{str(err).split(': ', 1)[-1]}") from None
