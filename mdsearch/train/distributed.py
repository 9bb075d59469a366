"""Data-parallel training through Ray Train: the same loop as `train_trial`, on N workers.

    result = train_distributed(spec, load_recipe("full_cpu"), "runs/full/md", workers=2)

Ray Train's TorchTrainer starts the workers (one per GPU when the recipe asks for GPUs, else CPU
workers with gloo), sets up torch.distributed and places each worker on its device; the loop in
mdsearch.train.trainer does the rest (each rank trains on its slice of the same global batch;
DistributedDataParallel averages the gradients). Rank 0 evaluates and writes the checkpoint into
`out_dir`, and reports it to Ray Train, whose copy under `out_dir/ray` is the fallback when a
worker group restarts (FailureConfig) on a node that cannot see `out_dir`. On a multi-node cluster
`out_dir` should be on shared storage, as a sweep's storage is.

Without `address`, Ray starts locally on 127.0.0.1 (no port open to the network).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ..arch.spec import ArchSpec
from .recipe import Recipe
from ..progress import quiet, say
from ..rundir import CHECKPOINT, RESULT
from .trainer import TrainError, TrialResult


def _worker(config: dict) -> None:
    """One Ray Train worker: restore the latest checkpoint if this run has one, then train."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from .trainer import train_trial

    spec = ArchSpec.from_dict(config["spec"], "promoted spec")
    recipe = Recipe.from_dict(config["recipe"], config["recipe_source"])
    out = Path(config["out_dir"])
    rank = ray.train.get_context().get_world_rank()
    restored = ray.train.get_checkpoint()
    if rank == 0 and restored is not None:  # Ray's copy, if it is newer than the local one
        with restored.as_directory() as d:
            theirs = Path(d) / CHECKPOINT
            mine = out / CHECKPOINT
            step = lambda p: torch.load(p, map_location="cpu", weights_only=True)["step"]  # noqa: E731
            if not mine.is_file() or step(theirs) > step(mine):
                out.mkdir(parents=True, exist_ok=True)
                shutil.copy2(theirs, mine)
    if dist.is_initialized():
        dist.barrier()  # every rank loads the same checkpoint

    def report(step: int, path: Path | None) -> None:
        """Every rank reports at every checkpoint (Ray Train's report is a barrier); rank 0
        attaches the checkpoint."""
        metrics = {"step": step}
        if path is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            shutil.copy2(path, Path(d) / CHECKPOINT)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    tracker = None
    if rank == 0 and config["mlflow"] is not None:
        from ..track import MLflowTracker

        tracker = MLflowTracker(**config["mlflow"])
    train_trial(spec, recipe, out, steps=config["steps"], progress=say, on_checkpoint=report,
                tracker=tracker, device=ray.train.torch.get_device())


def train_distributed(spec: ArchSpec, recipe: Recipe, out_dir: str | Path, *,
                      workers: int | None = None, address: str | None = None,
                      steps: int | None = None, max_failures: int = 0,
                      mlflow: dict | None = None,
                      progress: Callable[[str], None] | None = None) -> TrialResult:
    """Train on `workers` (default: the recipe's) Ray Train workers; each gets the recipe's
    `resources` (cpu, gpu). Rank 0 logs to MLflow when `mlflow` holds MLflowTracker's arguments
    (experiment, run_name, tracking_uri: give an absolute URI, workers do not share the driver's
    working directory). Returns rank 0's result, also saved as out_dir/result.json."""
    workers = recipe.workers if workers is None else workers
    if workers != recipe.workers:
        recipe = recipe.override({"workers": workers}, source="--workers")  # checks the batch
    say = progress or quiet
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from ..raylocal import keep_ray_on_loopback, start_ray

    if address is None:
        keep_ray_on_loopback()
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    gpus = float(recipe.resources.get("gpu", 0))
    cpus = float(recipe.resources.get("cpu", 1))
    if recipe.device == "cuda" and gpus == 0:
        raise TrainError("recipe: device cuda but resources.gpu is 0; give each worker a GPU "
                         "(resources: {gpu: 1}) or use device: auto")
    started_ray = start_ray(address, log_to_driver=True, **(
        {} if address else {"num_cpus": max(int(cpus * workers), 1)}))
    (out / RESULT).unlink(missing_ok=True)
    say(f"Ray Train: {workers} worker(s), each {cpus:g} CPU / {gpus:g} GPU, into {out}")
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"spec": spec.to_dict(), "recipe": recipe.to_dict(),
                           "recipe_source": recipe.name, "out_dir": str(out), "steps": steps,
                           "mlflow": mlflow},
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo", timeout_s=3600),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0,
                                     resources_per_worker={"CPU": cpus,
                                                           **({"GPU": gpus} if gpus else {})}),
        run_config=RunConfig(name="ray", storage_path=str(out),
                             failure_config=FailureConfig(max_failures=max_failures)))
    try:
        trainer.fit()
    except Exception as exc:  # a worker's error, already printed by Ray; keep its last line
        raise TrainError(f"distributed training into {out} failed: "
                         f"{str(exc).strip().splitlines()[-1][:400]}") from exc
    finally:
        if started_ray:
            ray.shutdown()
    if not (out / RESULT).is_file():
        raise TrainError(f"distributed training into {out} ended without rank 0's {RESULT}")
    return TrialResult(**json.loads((out / RESULT).read_text()))
