"""The sweep runner: a search space through Ray Tune, with Optuna choosing the configurations.

    result = run_sweep(load_space("quickstart"), name="qs", storage="runs/sweeps")
    result.table      # one row per trial (pandas), also written to runs/sweeps/qs/results.csv

What happens, in order:
1. The space is checked; a space whose budget nothing satisfies fails here, before Ray starts.
2. Ray starts (127.0.0.1 only) or joins the cluster at `address`.
3. Tune asks the searcher for a configuration. `BudgetedSearch` asks Optuna (TPE, NSGA-II,
   random) or walks the grid, costs the full-size spec, and hands Tune only configurations within
   budget; the others are recorded as filtered and Optuna is told they failed.
4. Each trial (`run_trial`) trains the proxy with the trainer and reports at every evaluation,
   with its checkpoint, so `resume=True` (Tuner.restore) continues unfinished trials from their
   last evaluation and never reruns finished ones.
5. The scheduler (the paper's stop rule, ASHA, or none) may stop a trial at an evaluation.
6. Every trial is an MLflow run in one experiment per sweep (logged from the driver).
7. results.csv: one row per trial (filtered configurations included, with status "filtered").

Importing this module imports Ray: a program that wants a local Ray kept on 127.0.0.1 calls
`mdsearch.search.keep_ray_on_loopback()` first (the CLI does).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from ray.tune import Callback
from ray.tune.search import Searcher

from ..config import ConfigError
from ..train.recipe import Recipe, load_recipe
from . import keep_ray_on_loopback
from .space import CostCache, Space, SpaceError, product

RESULTS = "results.csv"
PLOT = "pareto.png"
FILTERED = "filtered.jsonl"
STOP_STATE = "stop_rule.json"
SPACE_COPY = "space.yaml"
RECIPE_COPY = "recipe.yaml"
MAX_CONSECUTIVE_FILTERED = 200
TUNE_KEYS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
             "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip",
             "time_since_restore", "iterations_since_restore", "experiment_tag", "should_checkpoint"}


class SweepError(ConfigError):
    """A sweep that cannot start: existing results, nothing to resume, a bad storage path."""


class TrialFailed(RuntimeError):
    """A trial that ended without a usable result (e.g. a non-finite loss); the reason is kept."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- the trial ------------------------------------------------------------------------------
def run_trial(config: dict, space: Space, recipe: Recipe) -> None:
    """One Tune trial: build the spec of `config`, train its proxy, report every evaluation."""
    import ray
    import torch
    from ray import tune

    from ..arch.cost import cost
    from ..train.trainer import CHECKPOINT, train_trial

    os.chdir(os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd()))  # recipe paths as on the CLI
    torch.set_num_threads(max(1, int(recipe.resources.get("cpu", 1))))
    point = space.point_of(config)
    seed = config.get("seed", recipe.seed)
    spec = space.spec_for(point)
    work = Path(tune.get_context().get_trial_dir())
    work.mkdir(parents=True, exist_ok=True)

    # Tune's last reported checkpoint is the truth: a newer local file may be from steps Tune
    # never saw reported (the driver died first); those steps are replayed, deterministically.
    (work / CHECKPOINT).unlink(missing_ok=True)
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            shutil.copy2(Path(d) / CHECKPOINT, work / CHECKPOINT)

    full = cost(spec, 512)
    node = ray.get_runtime_context().get_node_id()[:12]
    before = 0.0  # training seconds already spent by the run this one resumes
    if (work / CHECKPOINT).is_file():
        before = float(torch.load(work / CHECKPOINT, map_location="cpu",
                                  weights_only=True)["seconds"])
    started = time.time()

    def report(record: dict) -> None:
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        metrics.update(params=full.params, gmacs=round(full.gmacs, 3), steps_total=recipe.steps,
                       seconds=round(before + time.time() - started, 2), node_id=node)
        with tempfile.TemporaryDirectory() as d:
            shutil.copy2(work / CHECKPOINT, Path(d) / CHECKPOINT)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    result = train_trial(spec, recipe.override({"seed": seed}, source="sweep seed"), work,
                         on_eval=report)
    if result.status != "ok":
        raise TrialFailed(result.reason)


# ---- the searcher ---------------------------------------------------------------------------
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

    def save(self, checkpoint_path: str) -> None:
        Path(checkpoint_path).write_text(json.dumps(self.get_state()))

    def restore(self, checkpoint_path: str) -> None:
        self.set_state(json.loads(Path(checkpoint_path).read_text()))


class BudgetedSearch(Searcher):
    """Costs every configuration the inner searcher suggests before Tune sees it.

    Within budget: it becomes a trial. Over budget (or not a valid UNet): it is recorded in
    FILTERED (with its cost and the reason), the inner searcher is told it failed, and the next
    suggestion is costed. A configuration already trained (samplers do repeat themselves) is
    skipped the same way, unrecorded. After MAX_CONSECUTIVE_FILTERED misses in a row the search
    ends."""

    def __init__(self, inner, space: Space, sweep_dir: Path, metric, mode,
                 log: Callable[[str], None] = say, cache: CostCache | None = None):
        super().__init__(metric=metric, mode=mode)
        self.inner, self.space, self.log = inner, space, log
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
            record = {"trial_id": f"filtered_{len(self.filtered) + 1:04d}", "status": "filtered",
                      "stop_reason": why, **config, **(c or {})}
            self.filtered.append(record)
            self._append_filtered(record)
            self.log(f"filtered ({len(self.filtered)}): "
                     + ", ".join(f"{k}={v}" for k, v in point.items()) + f": {why}")
        self.gave_up = (f"{MAX_CONSECUTIVE_FILTERED} suggestions in a row were over budget "
                        f"({self.space.budget.describe()}) or already trained; the search "
                        "stops here")
        self.log(self.gave_up)
        return self.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.ids:
            self.inner.on_trial_result(self.ids[trial_id], result)

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        if trial_id in self.ids:
            self.inner.on_trial_complete(self.ids[trial_id], result=result, error=error)

    # filtered records survive a killed driver: the file is cut back to the restored state
    def _append_filtered(self, record: dict) -> None:
        with open(Path(self.sweep_dir) / FILTERED, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self, checkpoint_path: str) -> None:
        import pickle

        with tempfile.TemporaryDirectory() as d:
            self.inner.save(os.path.join(d, "inner"))
            inner = Path(d, "inner").read_bytes()
        state = {"filtered": self.filtered, "ids": self.ids, "asked": self.asked,
                 "seen": sorted(self.seen), "duplicates": self.duplicates, "inner": inner}
        with open(checkpoint_path, "wb") as f:
            pickle.dump(state, f)

    def restore(self, checkpoint_path: str) -> None:
        import pickle

        with open(checkpoint_path, "rb") as f:  # written by save() above, in the sweep's dir
            state = pickle.load(f)
        with tempfile.TemporaryDirectory() as d:
            Path(d, "inner").write_bytes(state["inner"])
            self.inner.restore(os.path.join(d, "inner"))
        self.filtered, self.ids, self.asked = state["filtered"], state["ids"], state["asked"]
        self.seen, self.duplicates = set(state["seen"]), state["duplicates"]
        with open(Path(self.sweep_dir) / FILTERED, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.filtered)


def make_inner_searcher(space: Space, metric, mode):
    if space.algorithm == "grid":
        return GridSearch(product(space))
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if space.algorithm == "random":
        sampler = optuna.samplers.RandomSampler(seed=space.search_seed)
    elif space.algorithm == "nsga2":
        sampler = optuna.samplers.NSGAIISampler(seed=space.search_seed,
                                                population_size=max(4, space.num_samples // 4))
    else:
        sampler = optuna.samplers.TPESampler(seed=space.search_seed,
                                             n_startup_trials=max(2, space.num_samples // 3))
    return OptunaSearch(space=define_by_run(space), metric=metric, mode=mode, sampler=sampler)


class define_by_run:
    """Optuna's define-by-run view of the space: conditional dimensions asked only when active.
    (A class, not a closure, so the searcher's state can be pickled into the sweep's checkpoint.)"""

    def __init__(self, space: Space):
        self.space = space

    def __call__(self, trial) -> dict[str, Any]:
        point: dict[str, Any] = {}
        for dim in self.space.dimensions:
            if dim.active(point):
                point[dim.name] = dim.suggest(trial)
        return point  # Ray's OptunaSearch adds these to the config (values, not `_rank`s)


# ---- driver-side callbacks ------------------------------------------------------------------
def _point(config: dict, space: Space) -> str:
    return ", ".join(f"{d.name}={config[d.name]}" for d in space.dimensions if d.name in config)


class Progress(Callback):
    """One line per trial start, evaluation, stop and failure, on stderr."""

    def __init__(self, space: Space, total: int, metrics: list[str]):
        self.space, self.total, self.metrics = space, total, metrics
        self.started = time.time()

    def _line(self, trial, text: str) -> None:
        elapsed = time.time() - self.started
        say(f"[{elapsed:6.0f}s] {trial.trial_id} {text}")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(trial, f"start ({len(trials)}/{self.total}): {_point(trial.config, self.space)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        shown = "  ".join(f"{m} {result[m]:.4g}" for m in self.metrics if m in result)
        self._line(trial, f"step {result.get('step')}/{result.get('steps_total')}  {shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, f"FAILED: {_error_text(trial)}")


class MLflowSweepLogger(Callback):
    """Every trial as an MLflow run of one experiment (the sweep's name), written by the driver
    only (one writer, so the embedded SQLite store is safe). A resumed trial continues its run."""

    def __init__(self, experiment: str, tracking_uri: str, space: Space, recipe: Recipe,
                 sweep_dir: Path):
        self.experiment, self.uri, self.space = experiment, tracking_uri, space
        self.recipe_name, self.recipe_yaml = recipe.name, _yaml(recipe.to_dict())
        self.sweep_dir = str(sweep_dir)
        self._client, self._exp_id, self._runs = None, None, {}

    def __getstate__(self):
        return {**self.__dict__, "_client": None, "_runs": {}}

    def _run_id(self, trial) -> str:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if self._client is None:
            self._client = MlflowClient(self.uri)
            found = self._client.get_experiment_by_name(self.experiment)
            self._exp_id = found.experiment_id if found else self._client.create_experiment(
                self.experiment, artifact_location=_artifact_location(self.uri))
            # what `mdsearch report --mlflow` needs to rebuild the sweep without its directory
            space_file = Path(self.sweep_dir) / SPACE_COPY
            tags = {"mdsearch.recipe": self.recipe_yaml, "mdsearch.sweep_dir": self.sweep_dir}
            if space_file.is_file():
                tags["mdsearch.space"] = space_file.read_text()
            for key, value in tags.items():
                self._client.set_experiment_tag(self._exp_id, key, value[:5000])
        if trial.trial_id in self._runs:
            return self._runs[trial.trial_id]
        runs = self._client.search_runs([self._exp_id],
                                        filter_string=f"tags.trial_id = '{trial.trial_id}'")
        if runs:
            run_id = runs[0].info.run_id
            self._client.update_run(run_id, status="RUNNING")
        else:
            run = self._client.create_run(self._exp_id, run_name=trial.trial_id,
                                          tags={"trial_id": trial.trial_id,
                                                "sweep": self.experiment})
            run_id = run.info.run_id
            params = {**{k: v for k, v in trial.config.items()}, "recipe": self.recipe_name,
                      "base": self.space.base.name}
            self._client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        self._runs[trial.trial_id] = run_id
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), int(result.get("step", 0))
        metrics = [Metric(k, float(v), now, step) for k, v in result.items()
                   if k not in TUNE_KEYS and isinstance(v, (int, float))
                   and not isinstance(v, bool) and math.isfinite(v)]
        self._client.log_batch(self._run_id(trial), metrics=metrics)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_id(trial)
        self._client.set_tag(run_id, "status", "finished")
        self._client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_id(trial)
        self._client.set_tag(run_id, "status", "failed")
        self._client.set_tag(run_id, "reason", _error_text(trial)[:5000])
        self._client.set_terminated(run_id, "FAILED")

    def on_experiment_end(self, trials, **info):
        filtered = Path(self.sweep_dir) / FILTERED
        if self._client is not None and filtered.is_file():
            count = len(filtered.read_text().splitlines())
            self._client.set_experiment_tag(self._exp_id, "mdsearch.filtered", str(count))


def _artifact_location(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


def _error_text(trial) -> str:
    """The one line that says why a trial failed (our TrialFailed reason, or the exception)."""
    text = ""
    path = getattr(trial, "error_file", None) or ""
    for candidate in (path, os.path.join(trial.local_path or "", "error.txt")):
        if candidate and os.path.isfile(candidate):
            text = Path(candidate).read_text()
            break
    return _reason_from_traceback(text) or "unknown error"


def _reason_from_traceback(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = re.search(r"TrialFailed: (.*)", ln)
        if m:
            return m.group(1)
    for ln in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Failed)\b", ln):
            return ln
    return lines[-1] if lines else ""


# ---- the sweep ------------------------------------------------------------------------------
@dataclass
class SweepResult:
    path: Path
    table: pd.DataFrame
    filtered: int
    best: pd.DataFrame
    plot: Path | None = None
    floors: dict = field(default_factory=dict)  # metric -> noise floor (analysis.reliability)

    @property
    def results_csv(self) -> Path:
        return self.path / RESULTS


def sweep_recipe(space: Space, trial: str | Path | None = None) -> Recipe:
    """The space's default recipe with its `trial_overrides`, or another recipe as it is."""
    if trial is not None:
        return load_recipe(trial)
    recipe = load_recipe(space.trial)
    if space.trial_overrides:
        recipe = recipe.override(space.trial_overrides, source=f"{space.source}: trial_overrides")
    return recipe


def run_sweep(space: Space, trial: str | Path | None = None, *, name: str | None = None,
              storage: str | Path = "runs/sweeps", address: str | None = None,
              resume: bool = False, num_samples: int | None = None,
              mlflow: bool = True, tracking_uri: str | None = None,
              log: Callable[[str], None] = say) -> SweepResult:
    """Run (or with resume=True, continue) a sweep; returns its results table."""
    if str(storage).startswith(("s3://", "gs://", "abfs://", "hdfs://")):
        raise SweepError(f"--storage {storage}: give a filesystem path (local, or a shared mount "
                         "such as NFS, EFS or a GCS/S3 FUSE mount); see docs/clusters.md")
    root = Path(storage).expanduser().resolve()
    name = name or default_name(space, root, resume)
    sweep_dir = root / name
    recipe = sweep_recipe(space, trial)
    if num_samples is not None:
        space.num_samples = num_samples

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # a killed driver loses <= 2 s
    from ray import tune

    started = sweep_dir.is_dir() and tune.Tuner.can_restore(str(sweep_dir))
    if resume and not started:
        raise SweepError(f"{sweep_dir}: no sweep to resume here (run without --resume to start)")
    if not resume and sweep_dir.exists() and any(sweep_dir.iterdir()):
        raise SweepError(f"{sweep_dir} already holds a sweep; pass --resume to continue it, or "
                         "choose another --name")

    cache = CostCache()
    if not resume:
        if space.algorithm == "grid":
            _check_grid(space, cache)
        else:
            space.check_feasible(cache)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if Path(space.source).is_file():
            shutil.copy2(space.source, sweep_dir / SPACE_COPY)
        (sweep_dir / RECIPE_COPY).write_text(_yaml(recipe.to_dict()))

    _start_ray(address, log)
    from .schedulers import make_scheduler

    objectives = space.objectives
    metric = [o.metric for o in objectives] if len(objectives) > 1 else objectives[0].metric
    mode = [o.mode for o in objectives] if len(objectives) > 1 else objectives[0].mode
    quality = space.quality
    total = len(product(space)) if space.algorithm == "grid" else space.num_samples
    shown = [quality.metric] + [m for m in ("text_gain", "val_loss_mid", "align", "kid_proxy",
                                            "fid_proxy", "fid", "clip_score")
                                if m != quality.metric]
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, space=space, recipe=recipe),
        {"cpu": recipe.resources.get("cpu", 1), "gpu": recipe.resources.get("gpu", 0)})

    if resume:
        log(f"resuming {sweep_dir}")
        tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True,
                                   resume_errored=False)
    else:
        callbacks = [Progress(space, total, shown)]
        if mlflow:
            from ..track import default_tracking_uri

            callbacks.append(MLflowSweepLogger(name, tracking_uri or default_tracking_uri(),
                                               space, recipe, sweep_dir))
        searcher = BudgetedSearch(make_inner_searcher(space, metric, mode), space, sweep_dir,
                                  metric, mode, log=log, cache=cache)
        scheduler = make_scheduler(space.scheduler, quality.metric, quality.mode, recipe.steps,
                                   recipe.eval.every, sweep_dir / STOP_STATE)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=total,
                                        max_concurrent_trials=space.max_concurrent),
            run_config=tune.RunConfig(
                name=name, storage_path=str(sweep_dir.parent), callbacks=callbacks, verbose=0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)))
        log(f"sweep {name}: {total} trials of {space.name} ({space.algorithm}, scheduler "
            f"{space.scheduler['kind']}), recipe {recipe.name}, budget "
            f"{space.budget.describe()}; results in {sweep_dir}")
    grid = tuner.fit()
    table = results_table(grid, space, sweep_dir, recipe.steps)
    _write_csv(table, sweep_dir / RESULTS)
    plot = None
    from ..analysis.reliability import noise_floors

    floors = noise_floors(table, [d.name for d in space.dimensions], recipe.to_dict(), sweep_dir)
    if "gmacs" in table and space.quality.metric in table:
        from ..analysis.plots import pareto_plot, reference_costs

        plot = pareto_plot(table, space.quality.metric, sweep_dir / PLOT, space.quality.mode,
                           space.budget.max_gmacs, title=f"sweep {name} ({space.name}, "
                           f"recipe {recipe.name})", references=reference_costs()["gmacs"],
                           noise=floors.get(space.quality.metric, {}).get("floor"))
    return SweepResult(sweep_dir, table, int((table["status"] == "filtered").sum()),
                       best_trials(table, space), plot, floors)


def default_name(space: Space, root: Path, resume: bool) -> str:
    """A new sweep: SPACE-YYYYmmdd-HHMMSS. With resume: the latest sweep of this space."""
    if resume:
        earlier = sorted(p.name for p in root.glob(f"{space.name}-*") if p.is_dir())
        if not earlier:
            raise SweepError(f"{root}: no earlier sweep of {space.name} to resume (give --name)")
        return earlier[-1]
    return f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _start_ray(address: str | None, log) -> None:
    import ray

    if ray.is_initialized():
        return
    if address is None:
        if not keep_ray_on_loopback():
            log("warning: Ray was imported before mdsearch could keep it on 127.0.0.1; set "
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before importing ray")
        ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    else:
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)


def _check_grid(space: Space, cache: CostCache) -> None:
    points = space.grid()
    ok = [p for p in points if space.screen(p, cache)[1] is None]
    if not ok:
        raise SpaceError(f"{space.source}: constraints: none of the {len(points)} grid points "
                         f"satisfies {space.budget.describe()}")


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


# ---- results --------------------------------------------------------------------------------
def results_table(grid, space: Space, sweep_dir: Path, steps_total: int) -> pd.DataFrame:
    """One row per trial (trained ones from Tune, filtered ones from FILTERED)."""
    reasons = {}
    if (sweep_dir / STOP_STATE).is_file():
        reasons = json.loads((sweep_dir / STOP_STATE).read_text())["reasons"]
    dims = [d.name for d in space.dimensions]
    rows = []
    for r in grid:
        metrics = dict(r.metrics or {})
        trial_id = metrics.get("trial_id") or _trial_id_from_path(r.path)
        row = {"trial_id": trial_id}
        steps = metrics.get("step", 0)
        if r.error is not None:
            row["status"] = "failed"
            row["stop_reason"] = _reason_from_traceback(str(r.error)) or type(r.error).__name__
        elif steps >= steps_total:
            row["status"], row["stop_reason"] = "completed", ""
        elif steps:
            row["status"] = "stopped"
            row["stop_reason"] = reasons.get(trial_id, f"stopped early at step {steps} by the "
                                                       f"{space.scheduler['kind']} scheduler")
        else:
            row["status"], row["stop_reason"] = "not_run", "never reported (interrupted?)"
        row.update({d: r.config.get(d) for d in dims})
        row["seed"] = r.config.get("seed")
        row.update({k: v for k, v in metrics.items()
                    if k not in TUNE_KEYS and not k.startswith("config") and k != "step"})
        row["steps"] = steps
        row["path"] = r.path
        rows.append(row)
    filtered_file = sweep_dir / FILTERED
    if filtered_file.is_file():
        for line in filtered_file.read_text().splitlines():
            rec = json.loads(line)
            rows.append({**{k: rec.get(k) for k in ("trial_id", "status", "stop_reason")},
                         **{d: rec.get(d) for d in dims}, "seed": rec.get("seed"),
                         "params": rec.get("params"), "gmacs": rec.get("gmacs"), "steps": 0})
    table = pd.DataFrame(rows)
    first = ["trial_id", "status", "stop_reason", *dims, "seed", "params", "gmacs"]
    quality = [o.metric for o in space.objectives if not o.is_cost]
    tail = ["steps", "steps_total", "seconds", "node_id", "path"]
    middle = quality + sorted(c for c in table.columns if c not in first + quality + tail)
    table = table.reindex(columns=[c for c in first + middle + tail if c in table.columns])
    return table.sort_values("trial_id", kind="stable").reset_index(drop=True)


def _trial_id_from_path(path: str) -> str:
    m = re.search(r"_([0-9a-f]{5}_\d{5})", Path(path).name)
    return m.group(1) if m else Path(path).name


def _write_csv(table: pd.DataFrame, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    table.to_csv(tmp, index=False)
    tmp.replace(path)


def best_trials(table: pd.DataFrame, space: Space, top: int = 5) -> pd.DataFrame:
    """The best completed trials by the quality objective; with two objectives, the Pareto
    front of the completed trials (nothing better on both)."""
    done = table[table["status"] == "completed"]
    quality = space.quality
    if done.empty or quality.metric not in done:
        return done
    if len(space.objectives) == 1:
        return done.sort_values(quality.metric, ascending=quality.mode == "min").head(top)
    from ..analysis.pareto import pareto_mask

    cols = [o.metric for o in space.objectives]
    signs = [1 if o.mode == "min" else -1 for o in space.objectives]
    values = done[cols].to_numpy(dtype=float) * signs
    return done[pareto_mask(values)].sort_values(cols[0], ascending=signs[0] > 0)


def summary(result: SweepResult, space: Space) -> str:
    """What `mdsearch sweep` prints at the end: counts, the best trials, where the results are."""
    t = result.table
    counts = t["status"].value_counts().to_dict()
    trained = sum(v for k, v in counts.items() if k != "filtered")
    lines = [f"{trained} trials trained ("
             + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()) if k != "filtered")
             + f"); {result.filtered} configurations filtered before training "
               f"({space.budget.describe()})"]
    if "steps" in t:
        lines.append(f"trial-steps trained: {int(t['steps'].fillna(0).sum())}")
    if len(result.best):
        front = "Pareto front" if len(space.objectives) > 1 else "best trials"
        cols = ["trial_id", *[d.name for d in space.dimensions], "seed", "params", "gmacs",
                *[o.metric for o in space.objectives if not o.is_cost], "align", "steps"]
        best = result.best.reindex(columns=list(dict.fromkeys(c for c in cols if c in t)))
        best = best.assign(params=(best["params"] / 1e6).round(1).astype(str) + "M")
        lines.append(f"{front} (by {', '.join(o.mode + ' ' + o.metric for o in space.objectives)}):")
        lines.append(best.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        from ..analysis.report import winner_statement

        lines.append(winner_statement(t, space.quality.metric,
                                      result.floors.get(space.quality.metric)).replace("**", ""))
    else:
        lines.append("no trial completed its full budget")
    if result.plot:
        lines.append(f"Pareto plot: {result.plot}")
    lines.append(f"results: {result.results_csv}")
    return "\n".join(lines)


def load_results(sweep_dir: str | Path) -> pd.DataFrame:
    path = Path(sweep_dir) / RESULTS
    if not path.is_file():
        raise SweepError(f"{path}: no results.csv (is {sweep_dir} a sweep directory?)")
    return pd.read_csv(path, dtype={"trial_id": str})  # "6038e956" is not 6038 x 10^956
