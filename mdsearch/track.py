"""Experiment tracking with MLflow.

Embedded by default: a SQLite store and an artifact folder under `./mlruns` (MLflow 3 no longer
accepts a bare folder as a store). `MLFLOW_TRACKING_URI`, or an explicit `tracking_uri`, is
respected, e.g. `http://127.0.0.1:5000` for a `mlflow server`. A trial logs its flattened
full-size spec, proxy spec and recipe as params, the full-size cost, loss and metrics per step,
and the spec YAML and sample grids as artifacts. A resumed trial continues its MLflow run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

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


class MLflowTracker:
    """Logs one trial to one MLflow run in `experiment`."""

    def __init__(self, experiment: str = "mdsearch", run_name: str | None = None,
                 tracking_uri: str | None = None, root: str | Path = "mlruns"):
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri or default_tracking_uri(root)
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
        self.run_name, self.run_id = run_name, None

    def start(self, spec, proxy, recipe, full_cost, proxy_params: int, out_dir: Path) -> None:
        from mlflow.entities import Param

        id_file = Path(out_dir) / RUN_ID_FILE
        if id_file.is_file():  # a resumed trial continues its run
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
            return
        run = self.client.create_run(self.experiment_id, run_name=self.run_name or spec.name)
        self.run_id = run.info.run_id
        id_file.write_text(self.run_id)
        params = {**flatten(spec.to_dict(), "spec"), **flatten(proxy.to_dict(), "proxy"),
                  **flatten(recipe.to_dict(), "recipe")}
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), MAX_BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + MAX_BATCH])
        self.log_metrics({"params": full_cost.params, "gmacs": full_cost.gmacs,
                          "proxy_params": proxy_params}, 0)
        spec_file = Path(out_dir) / "spec.yaml"
        if spec_file.is_file():
            self.client.log_artifact(self.run_id, str(spec_file))

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_artifact(self, path: str | Path) -> None:
        if Path(path).is_file():
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, result) -> None:
        self.client.set_tag(self.run_id, "status", result.status)
        if result.reason:
            self.client.set_tag(self.run_id, "reason", result.reason)
        self.log_metrics({"steps": result.steps, "seconds": result.seconds}, result.steps)
        self.client.set_terminated(self.run_id, "FINISHED" if result.status == "ok" else "FAILED")
