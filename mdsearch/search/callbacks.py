"""Driver-side Tune callbacks of a sweep: progress lines on stderr, and every trial as an MLflow
run (through `mdsearch.track.MLflowWriter`, the one MLflow writer)."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from ray.tune import Callback

from ..progress import say
from ..rundir import FILTERED, SPACE, in_resumed
from ..train.recipe import Recipe
from .space import Space

TUNE_KEYS = {"timestamp", "checkpoint_dir_name", "done", "training_iteration", "trial_id", "date",
             "time_this_iter_s", "time_total_s", "pid", "hostname", "node_ip",
             "time_since_restore", "iterations_since_restore", "experiment_tag", "should_checkpoint"}


def _point(config: dict, space: Space) -> str:
    return ", ".join(f"{d.name}={config[d.name]}" for d in space.dimensions if d.name in config)


def started_number(trial, trials) -> int:
    """Which trial this is to start: 1 + the others that have started before it (running or
    ended). Not len(trials): Tune creates the next trials before they start, so two starting
    together both counted 2 (and a resumed sweep counts the trials it already ran)."""
    return 1 + sum(t is not trial and t.status != "PENDING" for t in trials)


class Progress(Callback):
    """One line per trial start, evaluation, stop and failure, on stderr."""

    def __init__(self, space: Space, total: int, metrics: list[str]):
        self.space, self.total, self.metrics = space, total, metrics
        self.started = time.time()

    def _line(self, trial, text: str) -> None:
        elapsed = time.time() - self.started
        say(f"[{elapsed:6.0f}s] {trial.trial_id} {text}")

    def on_trial_start(self, iteration, trials, trial, **info):
        self._line(trial, f"start ({started_number(trial, trials)}/{self.total}): "
                          f"{_point(trial.config, self.space)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        shown = "  ".join(f"{m} {result[m]:.4g}" for m in self.metrics if m in result)
        self._line(trial, f"step {result.get('step')}/{result.get('steps_total')}  {shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trial, f"FAILED: {error_text(trial)}")


class MLflowSweepLogger(Callback):
    """Every trial as an MLflow run of one experiment (the sweep's name), written by the driver
    only (one writer, so the embedded SQLite store is safe). A resumed trial continues its run."""

    def __init__(self, experiment: str, tracking_uri: str, space: Space, recipe: Recipe,
                 sweep_dir: Path):
        import yaml

        self.experiment, self.uri, self.space = experiment, tracking_uri, space
        self.recipe_name = recipe.name
        self.recipe_yaml = yaml.safe_dump(recipe.to_dict(), sort_keys=False)
        self.sweep_dir = str(sweep_dir)
        self._writer, self._runs = None, {}

    def __setstate__(self, state: dict) -> None:  # a resumed sweep: its folder, wherever it is
        self.__dict__.update(state)
        self.sweep_dir = in_resumed(self.sweep_dir, folder=True)

    def __getstate__(self):
        return {**self.__dict__, "_writer": None, "_runs": {}}

    def _run_id(self, trial) -> str:
        from ..track import MLflowWriter

        if self._writer is None:
            self._writer = MLflowWriter(self.experiment, self.uri)
            # what `mdsearch report --mlflow` needs to rebuild the sweep without its directory
            tags = {"mdsearch.recipe": self.recipe_yaml, "mdsearch.sweep_dir": self.sweep_dir}
            space_file = Path(self.sweep_dir) / SPACE
            if space_file.is_file():
                tags["mdsearch.space"] = space_file.read_text()
            self._writer.tag_experiment(tags)
        if trial.trial_id not in self._runs:
            found = self._writer.find_run("trial_id", trial.trial_id)
            params = {**trial.config, "recipe": self.recipe_name, "base": self.space.base_label}
            self._runs[trial.trial_id] = self._writer.resume_run(found) if found else \
                self._writer.create_run(trial.trial_id, {"trial_id": trial.trial_id,
                                                         "sweep": self.experiment}, params)
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self._run_id(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self._run_id(trial)  # (opens the writer on first use)
        metrics = {k: v for k, v in result.items() if k not in TUNE_KEYS}
        self._writer.log_metrics(run_id, metrics, int(result.get("step", 0)))

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self._run_id(trial)
        self._writer.finish(run_id, ok=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self._run_id(trial)
        self._writer.finish(run_id, ok=False, reason=error_text(trial))

    def on_experiment_end(self, trials, **info):
        filtered = Path(self.sweep_dir) / FILTERED
        if self._writer is not None and filtered.is_file():
            count = len(filtered.read_text().splitlines())
            self._writer.tag_experiment({"mdsearch.filtered": str(count)})


def error_text(trial) -> str:
    """The one line that says why a trial failed (our TrialFailed reason, or the exception)."""
    text = ""
    path = getattr(trial, "error_file", None) or ""
    for candidate in (path, os.path.join(trial.local_path or "", "error.txt")):
        if candidate and os.path.isfile(candidate):
            text = Path(candidate).read_text()
            break
    return reason_from_traceback(text) or "unknown error"


def reason_from_traceback(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = re.search(r"TrialFailed: (.*)", ln)
        if m:
            return m.group(1)
    for ln in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Failed)\b", ln):
            return ln
    return lines[-1] if lines else ""
