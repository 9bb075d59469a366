"""Running a sweep: a search space through Ray Tune, with Optuna choosing the configurations.

    result = run_sweep(load_space("quickstart"), name="qs", storage="runs/sweeps")
    result.table      # one row per trial (pandas), also written to runs/sweeps/qs/results.csv

What happens, in order:
1. The space is checked; a space whose budget nothing satisfies fails here, before Ray starts.
2. Ray starts (127.0.0.1 only) or joins the cluster at `address`.
3. Tune asks the searcher for a configuration (`searchers.py`). `BudgetedSearch` asks Optuna
   (TPE, NSGA-II, random) or walks the grid, costs the full-size spec, and hands Tune only
   configurations within budget; the others are recorded as filtered and Optuna is told they
   failed.
4. Each trial (`trainable.run_trial`) trains the proxy with the trainer and reports at every
   evaluation, with its checkpoint, so `resume=True` (Tuner.restore) continues unfinished trials
   from their last evaluation and never reruns finished ones.
5. The scheduler (the paper's stop rule, ASHA, or none; `schedulers.py`) may stop a trial at an
   evaluation.
6. Every trial is an MLflow run in one experiment per sweep (`callbacks.py`, from the driver).
7. results.csv: one row per trial (filtered configurations included, with status "filtered";
   `results.py`). The Pareto plot is drawn by `mdsearch.analysis.plots.sweep_plot`.

Importing this module imports Ray: a program that wants a local Ray kept on 127.0.0.1 calls
`mdsearch.raylocal.keep_ray_on_loopback()` first (the CLI does).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import yaml

from ..config import ConfigError
from ..quality import front_chances, noise_floors
from ..arch.latency import copy_table
from ..rundir import (FILTERED_STATUS, LATENCY_TABLE, LATEST, LOCK, RACE_LOG, RECIPE, SPACE,
                      STOP_STATE,
                      SWEEP_INIT, SWEEP_SUPERNET, atomic_write, link_duplicate_checkpoints,
                      locked, resuming, write_results)
from ..raylocal import check_address, start_ray
from ..progress import say
from .callbacks import MLflowSweepLogger, Progress
from .results import ResultsWriter, SweepResult, best_trials, results_table
from . import signing
from .searchers import OPTUNA_JOURNAL, BudgetedSearch, make_inner_searcher
from .storage import atomic_local_fs, remove_partials
from .space import (AUTOENCODER_BASE, CostCache, Space, SpaceError, check_recipe_fields, product,
                    sweep_recipe)
from .trainable import run_trial


class SweepError(ConfigError):
    """A sweep that cannot start: existing results, nothing to resume, a bad storage path."""


def run_sweep(space: Space, trial: str | Path | None = None, *, name: str | None = None,
              storage: str | Path = "runs/sweeps", address: str | None = None,
              resume: bool = False, num_samples: int | None = None,
              mlflow: bool = True, tracking_uri: str | None = None, init: str | None = None,
              trust_state: bool = False, supernet: str | Path | None = None, finetune: int = 0,
              progress: Callable[[str], None] = say) -> SweepResult:
    """Run (or with resume=True, continue) a sweep; returns its results table. The sweep
    directory is locked for the duration: a second sweep on it fails at once. `init`: the
    trained run a UFOGen space (`base: init`, a trial recipe of kind: ufogen) fine-tunes; a
    resumed UFOGen sweep remembers it. `trust_state`: sign the folder's Ray Tune pickles as they
    are before resuming (a sweep made before mdsearch signed them, or with another key;
    `signing.py`): only for a folder whose every writer you trust. `supernet`: a folder of
    `mdsearch supernet train` for this space; every trial scores its configuration's slice of
    it (after a `finetune`-step fine-tune when `finetune` > 0) instead of training from scratch,
    with the supernet's recipe; a resumed sweep remembers both."""
    if str(storage).startswith(("s3://", "gs://", "abfs://", "hdfs://")):
        raise SweepError(f"--storage {storage}: give a filesystem path (local, or a shared mount "
                         "such as NFS, EFS or a GCS/S3 FUSE mount); see docs/clusters.md")
    root = Path(storage).expanduser().resolve()
    if name is not None and (name in ("", ".", "..") or Path(name).name != name
                             or "\\" in name):
        raise SweepError(f"--name {name!r}: give one folder name, created inside --storage "
                         f"{storage} (no '/', '..' or absolute path)")
    if trust_state and not resume:
        raise SweepError("--trust-state signs an existing sweep's state: it goes with --resume")
    check_address(address)  # before anything is written: nothing answering is one line
    name = name or default_name(space, root, resume)
    sweep_dir = root / name
    if resume and supernet is None and (sweep_dir / SWEEP_SUPERNET).is_file():
        saved = json.loads((sweep_dir / SWEEP_SUPERNET).read_text())
        supernet, finetune = saved["supernet"], saved["finetune"]
    if supernet is not None:
        recipe = bind_supernet(space, trial, supernet, finetune)
        supernet = str(Path(supernet).resolve())
    else:
        recipe = sweep_recipe(space, trial)
    if resume and init is None and (sweep_dir / SWEEP_INIT).is_file():
        init = (sweep_dir / SWEEP_INIT).read_text().strip()
    init = bind_init(space, recipe, init)
    check_recipe_fields(space, recipe)
    check_trial_resources(recipe)
    short = None if address else trial_shortfall(recipe, local_resources())
    if short:
        raise SweepError(f"{short}; a local Ray here cannot start it: lower workers or "
                         "resources, or join a cluster with --address")
    if getattr(recipe, "teacher", None) is not None and recipe.teacher.run:
        from ..train.teacher import check_teacher

        check_teacher(recipe)  # every trial would fail on it inside Ray
    from ray import tune

    if resume and not (sweep_dir.is_dir() and tune.Tuner.can_restore(str(sweep_dir))):
        raise SweepError(f"{sweep_dir}: no sweep to resume here (run without --resume to start)")
    with locked(sweep_dir, f"sweep {name}"):
        link_latest(root, name)
        if resume and trust_state:
            progress(f"--trust-state: signed {signing.sign_all(sweep_dir)} Ray Tune state files "
                     f"of {sweep_dir} as they are")
        return _run_sweep(space, recipe, name, sweep_dir, address, resume, num_samples, mlflow,
                          tracking_uri, progress, init, supernet, finetune)


def check_trial_resources(recipe) -> None:
    """A trial's worker trains on one device: a recipe asking for several GPUs per worker would
    reserve what its trials never use (several GPUs per trial: `workers: N`, one GPU each)."""
    gpus = recipe.resources.get("gpu", 0)
    if gpus > 1:
        raise SweepError(
            f"recipe {recipe.name}: field resources.gpu: {gpus:g}: each of a trial's workers "
            "trains on one GPU (or a fraction, to share one); give a trial N GPUs with workers: "
            "N and gpu: 1, and accumulate: N to reach a large batch in less memory")


def trial_resources(recipe):
    """What Tune reserves for one trial: the recipe's resources, or with `workers: N` a
    placement group of N such bundles, reserved whole (mdsearch.train.distributed)."""
    from ray import tune

    if recipe.workers == 1:
        return {"cpu": recipe.resources.get("cpu", 1), "gpu": recipe.resources.get("gpu", 0)}
    from ..train.distributed import trial_bundles

    return tune.PlacementGroupFactory(trial_bundles(recipe), strategy="PACK")


def trial_shortfall(recipe, have: dict[str, float]) -> str | None:
    """What one trial needs beyond the resources `have` (Ray's names: CPU, GPU), in words; None
    when it fits. A trial that fits nowhere would wait forever."""
    from ..train.distributed import trial_bundles

    need: dict[str, float] = {}
    for bundle in trial_bundles(recipe):
        for key, value in bundle.items():
            need[key] = need.get(key, 0) + value
    short = [f"{k} {need[k]:g} (there are {have.get(k, 0):g})" for k in sorted(need)
             if need[k] > have.get(k, 0)]
    if not short:
        return None
    return (f"recipe {recipe.name}: one trial needs {', '.join(short)}"
            + (f" for its {recipe.workers} workers" if recipe.workers > 1 else ""))


def local_resources() -> dict[str, float]:
    """What a local Ray started here has: this process's CPUs and torch's GPUs."""
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"CPU": float(cpus or 1), "GPU": float(torch.cuda.device_count())}


def bind_supernet(space: Space, trial, folder: str | Path, finetune: int):
    """The recipe of a supernet-scored sweep: the one `folder`'s supernet was trained with (or
    its `finetune`-step fine-tune), once the supernet is checked to hold this space; what a
    supernet cannot score is refused in one line."""
    from ..train.supernet import finetune_recipe, read_supernet

    if trial is not None:
        raise SweepError(f"--trial {trial} with --supernet: the trials are scored with the "
                         "recipe the supernet was trained with; leave --trial out")
    changed = sorted({k for p in space.grid() for k in space.recipe_changes(p)})
    if changed:
        raise SweepError(f"{space.source}: dimensions change the recipe ({', '.join(changed)}); "
                         "one supernet is trained with one recipe, so it cannot score them")
    if space.seeds_per_trial > 1 or space.race is not None:
        raise SweepError(f"{space.source}: field seeds_per_trial: {space.seeds_per_trial}; a "
                         "supernet-scored trial starts one seed from the supernet's weights")
    if len(space.seeds) > 1 and not finetune:
        raise SweepError(f"{space.source}: field seeds: {space.seeds}; a supernet score "
                         "involves no training seed (the same for every seed): give --finetune N "
                         "to fine-tune each seed, or one seed")
    _, recipe = read_supernet(folder, space)
    return finetune_recipe(recipe, finetune) if finetune else recipe


def bind_init(space: Space, recipe, init: str | None) -> str | None:
    """Give a recipe-only space what it lacks: a UFOGen space the spec of the --init run, an
    autoencoder space (`base: autoencoder`) its recipe, which costs its configurations. Checks
    --init; returns the run's absolute path (None where the trials start from scratch)."""
    from ..train.ufogen import UFOGenRecipe, ufogen_start
    from ..train.vae import VAERecipe

    if (space.base_name == AUTOENCODER_BASE) != isinstance(recipe, VAERecipe):
        raise SweepError(f"{space.source}: base: autoencoder goes with an autoencoder trial "
                         f"recipe (kind: vae, e.g. vae_cpu) and only with one; the trial is "
                         f"{recipe.name} and the base {space.base_name}")
    if isinstance(recipe, VAERecipe):
        space.autoencoder = recipe
        if (init is None) != (recipe.train == "all"):
            raise SweepError(f"{space.source}: trial {recipe.name} has train: {recipe.train}: "
                             + ("give the autoencoder whose encoder it keeps with --init VAE_DIR"
                                if init is None else "it trains from scratch; drop --init"))
        return None if init is None else str(Path(init).resolve())
    if not isinstance(recipe, UFOGenRecipe):
        if init is not None:
            raise SweepError(f"--init {init}: only a UFOGen sweep (a trial recipe of kind: "
                             f"ufogen) starts from a trained run; {recipe.name} is not one")
        if space.base is None:
            raise SweepError(f"{space.source}: base: init fine-tunes a trained run: it needs a "
                             f"trial recipe of kind: ufogen (not {recipe.name}) and --init")
        return None
    if init is None:
        raise SweepError(f"{space.source}: trial {recipe.name} is a UFOGen recipe (kind: ufogen):"
                         " give the trained run every trial fine-tunes with --init RUN_DIR")
    if space.base is not None:
        raise SweepError(f"{space.source}: a UFOGen space takes its spec from --init: write "
                         "base: init")
    space.base = ufogen_start(init)["spec"]  # a CheckpointError (one line) for a wrong run
    return str(Path(init).resolve())


def _run_sweep(space: Space, recipe, name: str, sweep_dir: Path, address, resume, num_samples,
               mlflow, tracking_uri, progress, init=None, supernet=None,
               finetune=0) -> SweepResult:
    if num_samples is not None:
        space.num_samples = num_samples

    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")  # a killed driver loses <= 2 s
    # Tune's newer console output prints a configuration box and a TensorBoard hint (TensorBoard
    # is not installed) even at verbose=0; the classic reporter at verbose=0 prints nothing, and
    # mdsearch's own progress lines say what happens
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray import tune
    from ray.tune.search import ConcurrencyLimiter

    if resume:
        check_resumable(sweep_dir)
        remove_partials(sweep_dir)
    if not resume and any(p.name != LOCK for p in sweep_dir.iterdir()):
        raise SweepError(f"{sweep_dir} already holds a sweep; pass --resume to continue it, or "
                         "choose another --name")

    steps_total = 0 if supernet is not None and not finetune else recipe.steps
    cache = CostCache(space.load_latency())  # a missing or foreign table: one line, here
    if not resume:
        if space.algorithm == "grid":
            _check_grid(space, cache)
        else:
            space.check_feasible(cache)
        if Path(space.source).is_file():
            shutil.copy2(space.source, sweep_dir / SPACE)
        if space.latency is not None:  # the folder stays readable when it moves (report)
            copy_table(space.latency.path, sweep_dir / LATENCY_TABLE)
        atomic_write(sweep_dir / RECIPE, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        if init is not None:
            atomic_write(sweep_dir / SWEEP_INIT, init + "\n")
        if supernet is not None:
            atomic_write(sweep_dir / SWEEP_SUPERNET,
                         json.dumps({"supernet": supernet, "finetune": finetune}) + "\n")

    if mlflow and not resume:
        from ..track import check_reachable, default_tracking_uri

        tracking_uri = tracking_uri or default_tracking_uri()
        check_reachable(tracking_uri)  # before Ray starts: one line, not minutes of retries
    start_ray(address, progress)
    import ray

    from .schedulers import make_scheduler

    objectives = space.objectives
    metric = [o.metric for o in objectives] if len(objectives) > 1 else objectives[0].metric
    mode = [o.mode for o in objectives] if len(objectives) > 1 else objectives[0].mode
    quality = space.quality
    total = space.num_samples
    if space.algorithm == "grid":  # every point, or with --num-samples N the first N in budget
        points = len(product(space))
        total = points if num_samples is None else min(num_samples, points)
    shown = [quality.metric] + [m for m in ("text_gain", "val_loss_mid", "align", "kid_proxy",
                                            "fid_proxy", "fid", "clip_score")
                                if m != quality.metric]
    if address and (short := trial_shortfall(recipe, ray.cluster_resources())):
        progress(f"warning: {short} in the cluster; its trials wait until the cluster grows")
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, space=space, recipe=recipe, init=init,
                             supernet=supernet, finetune=finetune),
        trial_resources(recipe))

    if resume:
        progress(f"resuming {sweep_dir}")
        with resuming(sweep_dir):
            tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True,
                                       resume_errored=False, storage_filesystem=atomic_local_fs())
    else:
        callbacks = [Progress(space, total, shown), ResultsWriter(space, sweep_dir, steps_total),
                     signing.SignErrors()]
        if mlflow:
            callbacks.append(MLflowSweepLogger(name, tracking_uri, space, recipe, sweep_dir))
        inner = make_inner_searcher(space, metric, mode, sweep_dir)
        searcher = BudgetedSearch(inner, space, sweep_dir, metric, mode, progress=progress,
                                  cache=cache)
        # Tune's own wrappers, made here so that its state files are signed as they are written
        if space.max_concurrent:
            searcher = ConcurrencyLimiter(searcher, max_concurrent=space.max_concurrent)
        searcher = signing.SignedSearchGenerator(searcher)
        scheduler = None  # a supernet-scored trial reports once: nothing to stop early
        if supernet is None:
            scheduler = make_scheduler(space.scheduler, quality.metric, quality.mode,
                                       recipe.steps, recipe.eval.every, sweep_dir / STOP_STATE,
                                       space.race, sweep_dir / RACE_LOG)
        tuner = tune.Tuner(
            trainable,
            # a supernet's scoring trials reuse their worker, which keeps the supernet it opened
            # (not fine-tunes: a reused worker's trial folder is its first trial's)
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler,
                                        num_samples=total,
                                        reuse_actors=supernet is not None and not finetune),
            run_config=tune.RunConfig(
                name=name, storage_path=str(sweep_dir.parent), callbacks=callbacks, verbose=0,
                storage_filesystem=atomic_local_fs(),  # a killed copy never leaves a cut file
                checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False)))
        signing.sign(sweep_dir / "tuner.pkl")  # written by Tuner() itself
        how = (f"scheduler {space.scheduler['kind']}), recipe {recipe.name}" if supernet is None
               else f"scored on supernet {supernet}"
               + (f" after {finetune}-step fine-tunes)" if finetune else ", no training)"))
        progress(f"sweep {name}: {total} trials of {space.name} ({space.algorithm}, {how}, "
                 f"budget {space.budget.describe()}; results in {sweep_dir}")
    with resuming(sweep_dir) if resume else nullcontext():
        grid = tuner.fit()
    table = results_table(grid, space, sweep_dir, steps_total)
    # a supernet's scores carry none of the study's training-seed noise (one shared training)
    floors = noise_floors(table, [d.name for d in space.dimensions],
                          None if supernet else recipe.to_dict(), sweep_dir)
    chances = front_chances(table, [(o.metric, o.mode) for o in space.objectives], floors)
    if len(chances):  # each completed trial's probability of being on the front (or the best)
        table.loc[chances.index, "p_front"] = chances.round(3)
    write_results(table, sweep_dir)
    link_duplicate_checkpoints(sweep_dir)
    return SweepResult(sweep_dir, table, int((table["status"] == FILTERED_STATUS).sum()),
                       best_trials(table, space), None, floors, recipe.name)


def check_resumable(sweep_dir: Path) -> None:
    """Refuse to resume from damaged state, before Ray touches anything: Tune would log "Failed
    to restore the run state" and start the sweep over."""

    signing.check(sweep_dir)  # Ray Tune's pickles, before Ray loads any of them
    for pattern in ("experiment_state-*.json",):  # (Ray's search_gen_state-*.json is a pickle)
        for path in sorted(sweep_dir.glob(pattern)):
            try:
                json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, ValueError) as err:
                raise SweepError(f"{path}: the sweep's state is damaged ({type(err).__name__}); "
                                 "nothing was changed. Restore the file from a copy, or start "
                                 "a new sweep (another --name)") from None
    check_journal(sweep_dir / OPTUNA_JOURNAL)
    states = sorted(sweep_dir.glob("searcher-state-*.pkl"))
    if not states:
        raise SweepError(f"{sweep_dir}: no searcher state (searcher-state-*.pkl) to resume from; "
                         "nothing was changed")
    for path in states:
        BudgetedSearch.read_state(path)


def check_journal(path: Path) -> None:
    """The Optuna journal, line by line: every complete line one JSON object (a last line
    without its newline, torn by a kill, is what Optuna itself skips). Refused naming the line,
    before Ray starts: a damaged study would fail inside Tune and turn completed trials into
    failed ones."""
    if not path.is_file():
        return
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):
                break
            try:
                ok = isinstance(json.loads(line), dict)
            except (UnicodeDecodeError, ValueError):
                ok = False
            if not ok:
                raise SweepError(f"{path}: line {number} is not an Optuna journal record (one "
                                 "JSON object per line); nothing was changed. Restore the file "
                                 "from a copy, or start a new sweep (another --name)")


def link_latest(root: Path, name: str) -> None:
    """STORAGE/latest -> the sweep started last (a relative link, so README's paths work
    whatever --name a sweep got). Where links cannot be made (some shared mounts), nothing."""
    if name == LATEST:
        return
    tmp = root / f".{LATEST}.{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(name, target_is_directory=True)
        os.replace(tmp, root / LATEST)
    except OSError:
        tmp.unlink(missing_ok=True)


def default_name(space: Space, root: Path, resume: bool) -> str:
    """A new sweep: SPACE-YYYYmmdd-HHMMSS. With resume: the latest sweep of this space."""
    if resume:
        earlier = sorted(p.name for p in root.glob(f"{space.name}-*") if p.is_dir())
        if not earlier:
            raise SweepError(f"{root}: no earlier sweep of {space.name} to resume (give --name)")
        return earlier[-1]
    return f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_grid(space: Space, cache: CostCache) -> None:
    points = space.grid()
    ok = [p for p in points if space.screen(p, cache)[1] is None]
    if not ok:
        raise SpaceError(f"{space.source}: constraints: none of the {len(points)} grid points "
                         f"satisfies {space.budget.describe()}")
