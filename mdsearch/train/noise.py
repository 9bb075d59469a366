"""Evaluation noise: the same trained weights judged again under redrawn evaluation randomness.

A run's recorded metrics use one fixed draw: the held-out bank's noise and timesteps (seed 777)
and the sampler's starting noise (seed 12345). `evaluation_noise(run_dir, redraws)` loads the
run's checkpoint (EMA weights), evaluates it `redraws` times with other draws of both, and
returns each metric's values and standard deviation: the part of a metric's spread that is the
evaluation's, not the weights'. (Comparisons inside a sweep use one shared draw for every trial,
common random numbers, so the noise of a *difference* between two trials is smaller still.)
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..progress import quiet
from ..rundir import CHECKPOINT, RECIPE, SPEC, RunDirError
from .checkpoint import described, read_checkpoint, run_kind
from .heldout import BANK_SEED, heldout_metrics
from .recipe import Recipe
from .trainer import Training, evaluate, make_evaluator

NOISY_KEYS = ("num_generated", "num_reference", "align_chance", "align_ceiling")


def load_run(run_dir: str | Path) -> Training:
    """A run directory's training state (model, EMA, data), restored from its checkpoint, which
    names its spec and recipe (older runs: the YAML files beside it)."""
    run_dir = Path(run_dir)
    if not (run_dir / CHECKPOINT).is_file():
        raise RunDirError(f"{run_dir}: not a trained run directory (no {CHECKPOINT})")
    about = described(run_dir)
    missing = [name for key, name in (("spec", SPEC), ("recipe", RECIPE)) if about[key] is None]
    if missing:
        raise RunDirError(f"{run_dir}: not a trained run directory (its checkpoint names no "
                          f"spec or recipe, and {', '.join(missing)} is missing)")
    state = read_checkpoint(run_dir / CHECKPOINT)
    kind = run_kind(state, about)
    if kind is not None:  # a UFOGen or autoencoder run: another loop, another checkpoint
        raise RunDirError(f"{run_dir}: a {kind} run; noise floors are measured on diffusion "
                          "training runs (mdsearch train) and their sweeps")
    recipe = Recipe.from_dict(about["recipe"], source=f"{run_dir / CHECKPOINT} (recipe)")
    return Training(about["spec"], recipe, run_dir)


def evaluation_noise(run_dir: str | Path, redraws: int = 3, sampled: bool = True,
                     progress=None) -> dict[str, dict]:
    """metric -> {"values": [...], "std": std over the redraws (ddof 1)} for the run's final
    weights. `sampled=False` redraws only the held-out bank (val_loss, text_gain: fast)."""
    say = progress or quiet
    if redraws < 2:
        raise ValueError(f"evaluation noise needs at least 2 redraws, got {redraws}")
    run = load_run(run_dir)
    data = run.pipeline(run.plan[-1].resolution)
    if run.recipe.eval.bank:
        run.heldout(data)  # builds the recipe's bank
    evaluator = make_evaluator(run.recipe, data) if sampled else None
    model = run.ema.model.unet(run.training_seeds()[0])  # (a stacked run: its first live seed)
    values: dict[str, list[float]] = {}
    for k in range(redraws):
        seed = BANK_SEED + 1000 * (k + 1)
        metrics = {}
        if run.recipe.eval.bank:
            bank = data.bank.redraw(data, run.schedule.steps, seed)
            metrics.update(heldout_metrics(model, bank, run.schedule))
        if sampled:
            metrics.update(evaluate(model, data, run.schedule, run.recipe, evaluator,
                                    sample_seed=seed))
        for key, value in metrics.items():
            if key not in NOISY_KEYS and isinstance(value, (int, float)):
                values.setdefault(key, []).append(float(value))
        say(f"{run_dir}: redraw {k + 1}/{redraws}")
    out = {}
    for key, vals in values.items():
        t = torch.tensor(vals, dtype=torch.float64)
        out[key] = {"values": vals, "std": float(t.std()) if len(vals) > 1 else math.nan}
    return out
