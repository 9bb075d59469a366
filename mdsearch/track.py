"""Experiment tracking with MLflow.

Embedded by default: a SQLite store and an artifact folder under `./mlruns` (MLflow 3 no longer
accepts a bare folder as a store). `MLFLOW_TRACKING_URI`, or an explicit `tracking_uri`, is
respected, e.g. `http://127.0.0.1:5000` for a `mlflow server`. A trial logs its flattened
full-size spec, proxy spec and recipe as params, the full-size cost, loss and metrics per step,
and the spec YAML and sample grids as artifacts. A resumed trial continues its MLflow run.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from .errors import MdsearchError
from .rundir import SPEC

RUN_ID_FILE = "mlflow_run_id"
MAX_BATCH = 100  # MLflow's limit on params per log_batch call


def default_tracking_uri(root: str | Path = "mlruns") -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": [1, {"c": 2}]}} -> {"a.b.0": 1, "a.b.1.c": 2}."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, (list, tuple)):
        items = enumerate(data)
    else:
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in items:
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


class TrackingError(MdsearchError):
    """An MLflow tracking server that cannot be used."""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail at once, in one line, when an http(s) tracking server does not answer (MLflow's own
    client would retry for minutes before failing); and a file store, which MLflow 3 refuses
    (maintenance mode) unless MLFLOW_ALLOW_FILE_STORE is set."""
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if scheme == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
        raise TrackingError(f"MLflow tracking URI {uri}: a file store, which this MLflow keeps "
                            "in maintenance mode (it refuses to use it); give a database such as "
                            "sqlite:///runs/mlflow.db (mdsearch's default is sqlite:///"
                            "mlruns/mlflow.db), or set MLFLOW_ALLOW_FILE_STORE=true")
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered (a proxy or an old server without /health)
    except (OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or err
        raise TrackingError(f"MLflow tracking server {uri} does not answer ({reason}); start it, "
                            "fix MLFLOW_TRACKING_URI, or run with --no-mlflow") from None


class MLflowWriter:
    """One MLflow experiment and its runs: the one place mdsearch writes to MLflow (a trial's
    tracker and the sweep driver's callback both go through it). Only finite numbers are logged
    as metrics; params are batched under MLflow's limit."""

    def __init__(self, experiment: str = "mdsearch", tracking_uri: str | None = None,
                 root: str | Path = "mlruns"):
        from mlflow.tracking import MlflowClient

        # MLflow announces, at INFO on stderr, that it creates or migrates a new SQLite store:
        # two lines before anything of ours, on every first run in a folder
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        self.uri = tracking_uri or default_tracking_uri(root)
        check_reachable(self.uri)
        self.client = MlflowClient(self.uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        else:
            artifacts = None
            if self.uri.startswith("sqlite:///"):  # embedded: artifacts beside the database
                artifacts = (Path(self.uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
            self.experiment_id = self.client.create_experiment(experiment,
                                                               artifact_location=artifacts)

    def tag_experiment(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_experiment_tag(self.experiment_id, key, str(value)[:5000])

    def find_run(self, tag: str, value: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.{tag} = '{value}'")
        return runs[0].info.run_id if runs else None

    def create_run(self, name: str, tags: dict[str, str] | None = None,
                   params: dict[str, Any] | None = None) -> str:
        from mlflow.entities import Param

        run_id = self.client.create_run(self.experiment_id, run_name=name,
                                        tags=tags or {}).info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in (params or {}).items()]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(run_id, params=items[i:i + MAX_BATCH])
        return run_id

    def resume_run(self, run_id: str) -> str:
        self.client.update_run(run_id, status="RUNNING")
        return run_id

    def log_metrics(self, run_id: str, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)
                 and math.isfinite(v)]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def log_artifact(self, run_id: str, path: str | Path) -> None:
        if Path(path).is_file():
            self.client.log_artifact(run_id, str(path))

    def finish(self, run_id: str, ok: bool, reason: str | None = None,
               status: str | None = None) -> None:
        self.client.set_tag(run_id, "status", status or ("finished" if ok else "failed"))
        if reason:
            self.client.set_tag(run_id, "reason", reason[:5000])
        self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED")


class MLflowTracker:
    """Logs one trial to one MLflow run in `experiment`."""

    def __init__(self, experiment: str = "mdsearch", run_name: str | None = None,
                 tracking_uri: str | None = None, root: str | Path = "mlruns"):
        self.writer = MLflowWriter(experiment, tracking_uri, root)
        self.uri, self.client = self.writer.uri, self.writer.client
        self.experiment_id = self.writer.experiment_id
        self.run_name, self.run_id = run_name, None

    def start(self, spec, proxy, recipe, full_cost, proxy_params: int, out_dir: Path) -> None:
        params = {**flatten(spec.to_dict(), "spec"), **flatten(proxy.to_dict(), "proxy"),
                  **flatten(recipe.to_dict(), "recipe")}
        if self.start_run(spec.name, params, {"params": full_cost.params,
                                              "gmacs": full_cost.gmacs,
                                              "proxy_params": proxy_params}, out_dir):
            self.log_artifact(Path(out_dir) / SPEC)

    def start_run(self, name: str, params: dict, metrics: dict, out_dir: Path) -> bool:
        """Create the run (params, and `metrics` at step 0); False when the run directory
        already has one (a resumed run continues it)."""
        id_file = Path(out_dir) / RUN_ID_FILE
        if id_file.is_file():
            self.run_id = self.writer.resume_run(id_file.read_text().strip())
            return False
        self.run_id = self.writer.create_run(self.run_name or name, params=params)
        id_file.write_text(self.run_id)
        self.log_metrics(metrics, 0)
        return True

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self.writer.log_metrics(self.run_id, metrics, step)

    def log_artifact(self, path: str | Path) -> None:
        self.writer.log_artifact(self.run_id, path)

    def finish(self, result) -> None:
        self.log_metrics({"steps": result.steps, "seconds": result.seconds}, result.steps)
        self.writer.finish(self.run_id, result.status == "ok", result.reason, result.status)
