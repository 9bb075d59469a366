"""Data-parallel training through Ray Train: the same loops as one process, on N workers.

    result = train_distributed(spec, load_recipe("full_cpu"), "runs/full/md", workers=2)
    result = train_distributed(None, load_ufogen_recipe("ufogen_cpu"), "runs/md-ufo",
                               workers=2, init="runs/md")          # UFOGen (mdsearch.train.gan)
    result = train_distributed(None, load_vae_recipe("vae_cpu"), "runs/vae", workers=2)

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
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from ..arch.spec import ArchSpec
from ..progress import quiet, say
from ..rundir import CHECKPOINT, RESULT, fault_point
from .trainer import TrainError, TrialResult


# How long a collective may wait. Rank 0 evaluates alone while the others wait in the next step's
# all-reduce: proxy_30k's 30,000 sampled prompts (50 DDIM steps with guidance) take most of an
# hour on one H200 by our estimate, so one hour (Ray Train's usual setting) would cut them off.
PROCESS_GROUP_TIMEOUT_S = 4 * 3600


def _worker(config: dict) -> None:
    """One Ray Train worker: restore the latest checkpoint if this run has one, then train."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from .ufogen import any_recipe, train_any

    recipe = any_recipe(config["recipe"], config["recipe_source"])
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
    spec = None if config["spec"] is None else ArchSpec.from_dict(config["spec"], "promoted spec")
    train_any(spec, recipe, out, init=config["init"], steps=config["steps"], progress=say,
              on_checkpoint=report, tracker=tracker, device=ray.train.torch.get_device())


def train_distributed(spec: ArchSpec | None, recipe, out_dir: str | Path, *,
                      workers: int | None = None, address: str | None = None,
                      steps: int | None = None, max_failures: int = 0,
                      mlflow: dict | None = None, init: str | Path | None = None,
                      progress: Callable[[str], None] | None = None) -> TrialResult:
    """Train on `workers` (default: the recipe's) Ray Train workers; each gets the recipe's
    `resources` (cpu, gpu). The recipe is a diffusion Recipe (train `spec`), a UFOGenRecipe
    (fine-tune the run `init`; spec None) or a VAERecipe (an autoencoder; `init`: the VAE whose
    encoder `train: decoder` keeps). Rank 0 logs to MLflow when `mlflow` holds MLflowTracker's
    arguments (experiment, run_name, tracking_uri: give an absolute URI, workers do not share the
    driver's working directory). Returns rank 0's result, also saved as out_dir/result.json.
    Only diffusion runs hand their checkpoints to Ray Train (for a restarted worker group on a
    node that cannot see `out_dir`); the others restart from `out_dir`'s."""
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
        train_loop_config={"spec": None if spec is None else spec.to_dict(),
                           "recipe": recipe.to_dict(), "recipe_source": recipe.name,
                           "init": None if init is None else str(Path(init).resolve()),
                           "out_dir": str(out), "steps": steps, "mlflow": mlflow},
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo",
                                 timeout_s=PROCESS_GROUP_TIMEOUT_S),
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


# -- a sweep trial over several workers ----------------------------------------------------------
#
# A data-parallel sweep trial keeps Ray Tune's trial as it is: the trial's process is rank 0 (it
# restores Tune's checkpoint, trains, evaluates and reports with tune.report, exactly as a
# one-process trial does), and ranks 1..N-1 are actors in the other bundles of the trial's
# placement group, which Tune reserves whole before the trial starts (PlacementGroupFactory, one
# bundle per worker): two trials can never each hold half of what they need. A stopped or killed
# trial takes its ranks with it (an actor dies with the process that created it).



def trial_bundles(recipe) -> list[dict[str, float]]:
    """The placement group of one trial: a bundle per worker (bundle 0: the trial's process)."""
    cpus, gpus = float(recipe.resources.get("cpu", 1)), float(recipe.resources.get("gpu", 0))
    return [{"CPU": cpus, **({"GPU": gpus} if gpus else {})}] * recipe.workers


def _join(backend: str, master: str, rank: int, world: int) -> None:
    from datetime import timedelta

    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://{master}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=PROCESS_GROUP_TIMEOUT_S))


class _Rank:
    """One rank > 0 of a data-parallel sweep trial (a Ray actor in its trial's placement group)."""

    def ready(self) -> bool:
        return True

    def run(self, train: Callable[[], object], rank: int, world: int, master: str, backend: str,
            cwd: str, threads: int) -> None:
        import torch
        import torch.distributed as dist

        os.chdir(cwd)  # recipe paths as the sweep's driver sees them
        torch.set_num_threads(threads)
        _join(backend, master, rank, world)
        fault_point(f"data-parallel-rank-{rank}")  # the reliability test kills a rank here
        try:
            train()
        finally:  # closing the connections fails the other ranks' pending collectives
            dist.destroy_process_group()


@contextmanager
def trial_ranks(recipe, train: Callable[[], object]):
    """Inside a Ray Tune trial whose resources are `trial_bundles(recipe)`: make this process
    rank 0 of `recipe.workers` data-parallel ranks, the others running `train()` (the same
    training as rank 0's, which reports nothing: only rank 0 evaluates and saves). Inside the
    block torch.distributed is initialised; leaving it waits for the other ranks and removes
    them. A rank's error is raised here as a TrainError naming the rank."""
    import ray
    import torch.distributed as dist
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = get_current_placement_group()
    if group is None:
        raise TrainError(f"recipe {recipe.name}: workers: {recipe.workers} needs the trial's "
                         "placement group (run it through mdsearch sweep)")
    bundle = trial_bundles(recipe)[0]
    gpus = bundle.get("GPU", 0)
    actor = ray.remote(_Rank)
    others = [actor.options(num_cpus=bundle["CPU"], num_gpus=gpus, scheduling_strategy=(
        PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i))).remote()
              for i in range(1, recipe.workers)]
    try:
        ray.get([a.ready.remote() for a in others])
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:  # a free port on this node for the process group's store
            s.bind((host, 0))
            port = s.getsockname()[1]
        backend = "nccl" if gpus and recipe.device != "cpu" else "gloo"  # (device: cpu on GPUs)
        master = f"{host}:{port}"
        threads = max(1, int(bundle["CPU"]))
        runs = [a.run.remote(train, i, recipe.workers, master, backend, os.getcwd(), threads)
                for i, a in enumerate(others, 1)]
        _join(backend, master, 0, recipe.workers)
        try:
            yield
            ray.get(runs)
        except Exception as err:  # a rank's own error explains a broken collective best
            done, _ = ray.wait(runs, num_returns=len(runs), timeout=10)
            for i, ref in enumerate(runs, 1):
                if ref in done:
                    try:
                        ray.get(ref)
                    except Exception as theirs:
                        last = (str(theirs).strip().splitlines() or [type(theirs).__name__])[-1]
                        raise TrainError(f"data-parallel rank {i} of {recipe.workers} failed: "
                                         f"{last[:400]}") from err
            raise
        finally:
            dist.destroy_process_group()
    finally:
        for a in others:
            ray.kill(a)
