"""The trial: what Ray Tune runs for one configuration of a sweep, on whichever worker.

It builds the configuration's spec, trains its proxy with the trainer, and reports at every
evaluation with its checkpoint, so Tune can stop it (the scheduler) or resume it (Tuner.restore)
from its last evaluation. It knows nothing about the cluster.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from pathlib import Path

import json

from ..rundir import CHECKPOINT, RACE_STATE, atomic_write
from .space import CostCache, Space


class TrialFailed(RuntimeError):
    """A trial that ended without a usable result (e.g. a non-finite loss); the reason is kept."""


def run_trial(config: dict, space: Space, recipe, init: str | None = None,
              supernet: str | None = None, finetune: int = 0) -> None:
    """One Tune trial: build the spec of `config`, train its proxy, report every evaluation.
    `recipe` is the sweep's Recipe, or its UFOGenRecipe with `init` the run every trial
    fine-tunes into a one-step generator, or its VAERecipe (an autoencoder space; `init`: the
    autoencoder whose encoder a `train: decoder` recipe keeps). The config's `recipe.` fields
    and seed change the recipe. With `supernet` (a folder of `mdsearch supernet train`, `recipe`
    its recipe) nothing is trained from scratch: the configuration's slice of the supernet is
    scored on the held-out bank as it is (one report, step 0), or after a `finetune`-step
    fine-tune from it (`recipe` then the fine-tune's, reporting as a trained trial)."""
    import ray
    import torch
    from ray import tune

    from ..train.checkpoint import RESUMED, read_checkpoint
    from ..train.trainer import train_trial, world

    os.chdir(os.environ.get("TUNE_ORIG_WORKING_DIR", os.getcwd()))  # recipe paths as on the CLI
    torch.set_num_threads(max(1, int(recipe.resources.get("cpu", 1))))
    point = space.point_of(config)
    seed = config.get("seed", recipe.seed)
    trial_recipe = recipe.override({**space.recipe_changes(point), "seed": seed},
                                   source="sweep point")
    work = Path(tune.get_context().get_trial_dir())
    work.mkdir(parents=True, exist_ok=True)

    # Tune's last reported checkpoint is the truth: a newer local file may be from steps Tune
    # never saw reported (the driver died first); those steps are replayed, deterministically.
    (work / CHECKPOINT).unlink(missing_ok=True)
    (work / RACE_STATE).unlink(missing_ok=True)
    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as d:
            for name in (CHECKPOINT, RACE_STATE):
                if (Path(d) / name).is_file():
                    shutil.copy2(Path(d) / name, work / name)

    cache = CostCache(space.latency)  # full-size costs at 512 px, as the sweep's screen rounds them
    if space.autoencoder is not None:  # the autoencoder's params, its decoder's GMACs
        full = cache.get_autoencoder(trial_recipe, 512)
    else:
        spec = space.spec_for(point)
        full = cache.get(spec, 512)
    node = ray.get_runtime_context().get_node_id()[:12]
    before = 0.0  # training seconds already spent by the run this one resumes
    if (work / CHECKPOINT).is_file():
        before = float(read_checkpoint(work / CHECKPOINT, RESUMED)["seconds"])
    started = time.time()

    def report(record: dict) -> None:
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        metrics.update(full)  # params, gmacs and, with a latency table, latency_ms
        metrics.update(steps_total=0 if supernet is not None and not finetune else recipe.steps,
                       seconds=round(before + time.time() - started, 2), node_id=node,
                       workers=world()[1])  # the processes training it (data parallel: N)
        if not (work / CHECKPOINT).is_file():  # a supernet score: nothing to resume from
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            for name in (CHECKPOINT, RACE_STATE):
                if (work / name).is_file():
                    shutil.copy2(work / name, Path(d) / name)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))

    if supernet is not None:
        from ..train.supernet import open_cached

        shared = open_cached(supernet, space)
        if not finetune:
            report({"step": 0, **shared.score_one(spec), "supernet_step": shared.step})
            return
        start = shared.slice_of(spec).state_dict()
        result = train_trial(spec, trial_recipe, work, start=start,
                             on_eval=lambda r: report({**r, "supernet_step": shared.step}))
    else:
        from ..train.ufogen import train_any

        def train(recipe, folder, on_eval):
            # every rank trains the same; only rank 0 (this process) reports
            run = functools.partial(train_any, None if space.autoencoder else spec, recipe,
                                    folder, init=init)
            if recipe.workers == 1:
                return run(on_eval=on_eval)
            from ..train.distributed import trial_ranks  # rank 0 of the trial's workers

            with trial_ranks(recipe, run):
                return run(on_eval=on_eval)

        if space.race is None:
            result = train(trial_recipe, work, report)
        else:
            result = race_seeds(space.race, trial_recipe, work, train, report)
    if result.status != "ok":
        raise TrialFailed(result.reason)


def race_seeds(race, recipe, work: Path, train, report):
    """A racing trial (search/racing.py): its first seed group in `work`, reporting every
    evaluation as any trial does; then group after group of `race.next_seeds` more seeds, each
    a stacked run in its own folder, reporting once at its end the means over every seed so far.
    Between groups the sweep's SeedRacing scheduler stops it or lets it go on. The groups done
    are kept in RACE_STATE, which travels in the trial's checkpoints, so a resumed trial goes
    on with the next group."""
    from ..train.heldout import seed_summary

    state = work / RACE_STATE
    per_seed = {int(k): v for k, v in json.loads(state.read_text()).items()} \
        if state.is_file() else {}
    result = train(recipe, work, None if per_seed else report)
    if result.status != "ok" or race.max_seeds <= recipe.seeds:
        return result
    first = dict(result.metrics)
    per_seed = per_seed or seeds_of(first, 0, recipe.seeds)
    while (k := race.next_seeds(len(per_seed))) > 0:
        n = len(per_seed)  # seeds trained so far (a diverged one stays, empty)
        group = recipe.override({"seed": recipe.seed + n, "seeds": k,
                                 "eval.every": recipe.steps},  # nothing reads the others
                                source="seed racing")
        done = train(group, work / f"seeds_{n}-{n + k - 1}", None)
        if done.status != "ok":
            return done
        per_seed.update(seeds_of(done.metrics, n, k))
        atomic_write(state, json.dumps({str(s): v for s, v in sorted(per_seed.items())}) + "\n")
        summary = seed_summary({s: v for s, v in per_seed.items() if v})
        # the first group's other metrics (sampled ones come from one seed) with every seed's
        result.metrics = {**{m: v for m, v in first.items() if m not in summary
                             and not m.rpartition("_s")[2].isdigit()}, **summary}
        report({**result.metrics, "step": recipe.steps})
    return result


def seeds_of(metrics: dict, offset: int, k: int) -> dict[int, dict[str, float]]:
    """A group's per-seed held-out metrics, keyed by the seed's place in the whole race (a seed
    that diverged: empty)."""
    from ..train.heldout import PER_SEED

    names = [m for m in PER_SEED if m in metrics]
    if k == 1:
        return {offset: {m: metrics[m] for m in names}}
    out = {}
    for i in range(k):
        values = {m: metrics.get(f"{m}_s{i}") for m in names}
        out[offset + i] = values if None not in values.values() else {}
    return out
