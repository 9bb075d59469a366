"""The searchers a sweep hands to Ray Tune: a grid, Optuna's samplers over the space
(define-by-run, so conditional dimensions are asked only when active), and `BudgetedSearch`, which
costs every suggestion before Tune sees it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from ray.tune.search import Searcher

from ..errors import MdsearchError
from ..progress import say
from ..rundir import FILTERED, FILTERED_STATUS, append_jsonl, fault_point, in_resumed
from .space import CostCache, Space, product

MAX_CONSECUTIVE_FILTERED = 200
OPTUNA_JOURNAL = "optuna_journal.log"  # the Optuna study of a sweep (Optuna's journal format)
STATE_FORMAT = "mdsearch-budgeted-search-v2"


class SearcherStateError(MdsearchError):
    """A sweep's saved searcher state that cannot be read back."""


class GridSearch(Searcher):
    """Every point of a list, once, in order (the `grid` algorithm; seeds already crossed in)."""

    def __init__(self, points: list[dict]):
        super().__init__()
        self.points, self.next = points, 0

    def suggest(self, trial_id: str):
        if self.next >= len(self.points):
            return self.FINISHED
        self.next += 1
        return dict(self.points[self.next - 1])

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass

    def get_state(self) -> dict:
        return {"points": self.points, "next": self.next}

    def set_state(self, state: dict) -> None:
        self.points, self.next = state["points"], state["next"]


class BudgetedSearch(Searcher):
    """Costs every configuration the inner searcher suggests before Tune sees it.

    Within budget: it becomes a trial. Over budget (or not a valid UNet): it is recorded in
    FILTERED (with its cost and the reason), the inner searcher is told it failed, and the next
    suggestion is costed. A configuration already trained (samplers do repeat themselves) is
    skipped the same way, unrecorded. After MAX_CONSECUTIVE_FILTERED misses in a row the search
    ends."""

    def __init__(self, inner, space: Space, sweep_dir: Path, metric, mode,
                 progress: Callable[[str], None] = say, cache: CostCache | None = None):
        super().__init__(metric=metric, mode=mode)
        self.inner, self.space, self.log = inner, space, progress
        self.sweep_dir = str(sweep_dir)
        self.filtered: list[dict] = []
        self.ids: dict[str, str] = {}  # Tune trial id -> the inner searcher's id
        self.asked = 0
        self.seen: set[str] = set()  # configurations handed to Tune
        self.duplicates = 0
        self.gave_up: str | None = None
        self._cache = cache or CostCache()  # shared with the feasibility check

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str):
        for _ in range(MAX_CONSECUTIVE_FILTERED):
            self.asked += 1
            inner_id = f"{trial_id}-{self.asked}"
            config = self.inner.suggest(inner_id)
            if config is None or config == self.FINISHED:
                return config
            config = {**self.space.point_of(config), "seed": config.get("seed", self.space.seeds[0])}
            point = self.space.point_of(config)
            key = json.dumps(config, sort_keys=True)
            if key in self.seen:
                self.duplicates += 1
                self.inner.on_trial_complete(inner_id, None, error=True)
                continue
            c, why = self.space.screen(point, self._cache)
            if why is None:
                self.ids[trial_id] = inner_id
                self.seen.add(key)
                return config
            self.inner.on_trial_complete(inner_id, None, error=True)
            if key in self._filtered_keys():  # filtered before: one row, one count
                self.duplicates += 1
                continue
            record = {"trial_id": f"filtered_{len(self.filtered) + 1:04d}",
                      "status": FILTERED_STATUS, "stop_reason": why, **config, **(c or {})}
            self.filtered.append(record)
            self._append_filtered(record)
            self.log(f"filtered ({len(self.filtered)}): "
                     + ", ".join(f"{k}={v}" for k, v in point.items()) + f": {why}")
        self.gave_up = (f"{MAX_CONSECUTIVE_FILTERED} suggestions in a row were over budget "
                        f"({self.space.budget.describe()}) or already trained; the search "
                        "stops here")
        self.log(self.gave_up)
        return self.FINISHED

    def __setstate__(self, state: dict) -> None:  # a resumed sweep: its folder, wherever it is
        self.__dict__.update(state)
        self.sweep_dir = in_resumed(self.sweep_dir, folder=True)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.ids:
            self.inner.on_trial_result(self.ids[trial_id], result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        if trial_id in self.ids:
            self.inner.on_trial_complete(self.ids[trial_id], result=result, error=error)

    def _filtered_keys(self) -> set[str]:
        """The configurations filtered so far (the config fields of each record)."""
        names = [d.name for d in self.space.dimensions] + ["seed"]
        return {json.dumps({k: r[k] for k in names if k in r}, sort_keys=True)
                for r in self.filtered}

    # filtered records survive a killed driver: the file is cut back to the restored state
    def _append_filtered(self, record: dict) -> None:
        append_jsonl(Path(self.sweep_dir) / FILTERED, record)

    def save(self, checkpoint_path: str) -> None:
        """The state as JSON data (Tune names the file searcher-state-*.pkl), the inner
        searcher's own state (`get_state`) inside it (the Optuna study itself is in its
        journal)."""
        state = {"format": STATE_FORMAT, "filtered": self.filtered, "ids": self.ids,
                 "asked": self.asked, "seen": sorted(self.seen), "duplicates": self.duplicates,
                 "inner": self.inner.get_state()}
        Path(checkpoint_path).write_text(json.dumps(state))
        fault_point("searcher-state")  # (tests: a kill while Tune saves the sweep's state)

    @staticmethod
    def read_state(path: str | Path) -> dict:
        """A saved state, checked: a damaged or foreign file is a SearcherStateError."""
        try:
            state = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise SearcherStateError(
                f"{path}: the sweep's searcher state is damaged ({type(err).__name__}: "
                f"{str(err)[:120]}); nothing was changed. Restore the file from a copy, or "
                "start a new sweep (another --name)") from None
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise SearcherStateError(
                f"{path}: not a searcher state this mdsearch wrote (format "
                f"{state.get('format') if isinstance(state, dict) else type(state).__name__!r}, "
                f"expected {STATE_FORMAT}); nothing was changed. Start a new sweep (another "
                "--name)")
        return state

    def restore(self, checkpoint_path: str) -> None:
        state = self.read_state(checkpoint_path)
        self.inner.set_state(state["inner"])
        self.filtered, self.ids, self.asked = state["filtered"], state["ids"], state["asked"]
        self.seen, self.duplicates = set(state["seen"]), state["duplicates"]
        with open(Path(self.sweep_dir) / FILTERED, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.filtered)


def make_inner_searcher(space: Space, metric, mode, sweep_dir: Path):
    if space.algorithm == "grid":
        return GridSearch(product(space))
    return OptunaJournalSearch(space, metric, mode, Path(sweep_dir) / OPTUNA_JOURNAL)


def make_sampler(space: Space):
    """The Optuna sampler of the space's `search.algorithm`, seeded by `search.seed`."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if space.algorithm == "random":
        return optuna.samplers.RandomSampler(seed=space.search_seed)
    if space.algorithm == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=space.search_seed,
                                             population_size=max(4, space.num_samples // 4))
    return optuna.samplers.TPESampler(seed=space.search_seed,
                                      n_startup_trials=max(2, space.num_samples // 3))


class OptunaJournalSearch(Searcher):
    """Optuna's ask-and-tell inside Tune, with the study kept in Optuna's own journal file in the
    sweep directory (JSON lines: data, never unpickled). A resumed sweep reloads the study from
    the journal; this searcher's own state is the map from Tune's trials to Optuna's (JSON).
    Like Ray's OptunaSearch: a trial that reports its metric(s) is told COMPLETE, a failed one
    FAIL, one that ended without a value PRUNED; non-finite values are told FAIL."""

    def __init__(self, space: Space, metric, mode, journal: Path):
        super().__init__(metric=metric, mode=mode)
        self.space, self.journal = space, str(journal)
        self.metrics = metric if isinstance(metric, list) else [metric]
        modes = mode if isinstance(mode, list) else [mode]
        self.directions = ["minimize" if m == "min" else "maximize" for m in modes]
        self.numbers: dict[str, int] = {}  # Tune trial id -> Optuna trial number (open trials)
        self._study = None

    def __getstate__(self):
        """Tune pickles its searcher (at Tuner creation, and into tuner.pkl): the study and its
        sampler stay out and are rebuilt from the space when first used. Optuna's own objects
        are not made to be pickled (Optuna 5.1's GA samplers hold a threading.Lock)."""
        return {**self.__dict__, "_study": None}

    def __setstate__(self, state: dict) -> None:  # a resumed sweep: its journal, wherever it is
        self.__dict__.update(state)
        self.journal = in_resumed(self.journal)

    @property
    def study(self):
        if self._study is None:
            import optuna
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            storage = JournalStorage(JournalFileBackend(self.journal))
            self._study = optuna.create_study(study_name="sweep", storage=storage,
                                              sampler=make_sampler(self.space),
                                              directions=self.directions,
                                              load_if_exists=True)
        return self._study

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str):
        trial = self.study.ask()
        self.numbers[trial_id] = trial.number
        return define_by_run(self.space)(trial)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        import optuna

        number = self.numbers.pop(trial_id, None)
        if number is None:
            return
        if self.study.get_trials(deepcopy=False)[number].state.is_finished():
            return  # told before the driver died (the journal is ahead of the saved map)
        values = [(result or {}).get(m) for m in self.metrics]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            self.study.tell(number, values if len(values) > 1 else values[0])
        else:
            failed = error or any(v is not None for v in values)
            self.study.tell(number, state=optuna.trial.TrialState.FAIL if failed
                            else optuna.trial.TrialState.PRUNED)

    def get_state(self) -> dict:
        return {"open_trials": self.numbers}

    def set_state(self, state: dict) -> None:
        self.numbers = {str(k): int(v) for k, v in state["open_trials"].items()}


class define_by_run:
    """Optuna's define-by-run view of the space: conditional dimensions asked only when active.
    (A class, not a closure: Tune pickles the searcher object into its tuner.pkl.)"""

    def __init__(self, space: Space):
        self.space = space

    def __call__(self, trial) -> dict[str, Any]:
        point: dict[str, Any] = {}
        for dim in self.space.dimensions:
            if dim.active(point):
                point[dim.name] = dim.suggest(trial)
        return point  # values (an uneven dimension's Optuna parameter is its `<dim>_rank`)
