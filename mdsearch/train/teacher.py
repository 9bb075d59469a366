"""The teacher-relative arm of the fidelity study: a candidate judged, and optionally trained,
against a trained run's predictions.

A recipe's `teacher.run` names a diffusion run (mdsearch train) trained on the same data, text
encoder, autoencoder, resolution and prediction target. Its EMA weights (its first live seed)
are loaded once per trial, frozen, and used twice:

    teacher_gap   held-out metric: the mean squared distance between the candidate's prediction
                  and the teacher's on the held-out bank (true captions), each item with its own
                  fixed timestep and noise (`heldout.py`); lower is closer to the teacher
    weight w > 0  output distillation: the training target is (1 - w) * the true target
                  + w * the teacher's prediction for the same noisy input, timestep and caption
                  (the gradient of the MSE to that blend equals the gradient of
                  (1 - w) * task loss + w * distillation loss)

Why it might rank better: the true target is the sampled noise, whose variance is most of the
loss and all of it irreducible; the teacher's prediction is a smoother target (its estimate of
the conditional mean), so distillation trains with less gradient noise, and teacher_gap leaves
out the noise a finite bank adds to val_loss. Whether it does is measured in docs/fidelity.md.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..rundir import RunDirError
from .checkpoint import CheckpointError, described, ema_model, read_checkpoint, run_kind
from .recipe import Recipe

MATCHED = ("data", "text_encoder", "autoencoder", "prediction", "noise_schedule")
"""Recipe fields a teacher shares with the student: what makes the two predict the same
quantity for the same inputs."""


def check_teacher(recipe: Recipe) -> dict:
    """A RunDirError (one line naming the field) unless `recipe.teacher.run` is a diffusion run
    trained on the same data, text encoder, autoencoder, target and resolution. Reads the
    teacher's checkpoint only (a sweep checks this before any trial starts) and returns it."""
    where = f"{recipe.name}: field teacher.run: {recipe.teacher.run}"
    if not Path(recipe.teacher.run).is_dir():
        raise RunDirError(f"{where}: not a directory (give a trained run, mdsearch train --out)")
    try:
        state = read_checkpoint(recipe.teacher.run)
        about = described(recipe.teacher.run, state)
    except CheckpointError as err:
        raise RunDirError(f"{where}: {err}") from None
    if about["recipe"] is None or about["spec"] is None or run_kind(state, about) is not None:
        raise RunDirError(f"{where}: not a diffusion training run (mdsearch train)")
    theirs = Recipe.from_dict(about["recipe"], source=f"{where} (its recipe)")
    for name in MATCHED:
        if getattr(theirs, name) != getattr(recipe, name):
            raise RunDirError(f"{where}: trained with another {name} ({getattr(theirs, name)} "
                              f"against this recipe's {getattr(recipe, name)})")
    if theirs.final_resolution != recipe.final_resolution:
        raise RunDirError(f"{where}: trained at {theirs.final_resolution} px, this recipe at "
                          f"{recipe.final_resolution} px")
    return state


def load_teacher(recipe: Recipe, device: torch.device) -> torch.nn.Module:
    """The frozen teacher model of `recipe.teacher.run` (its EMA weights, first live seed),
    after `check_teacher`; built from the checkpoint alone."""
    try:
        _, model = ema_model(recipe.teacher.run, check_teacher(recipe))
    except CheckpointError as err:
        raise RunDirError(f"{recipe.name}: field teacher.run: {err}") from None
    return model.to(device).requires_grad_(False)


@torch.no_grad()
def teacher_target(teacher: torch.nn.Module, target: torch.Tensor, noisy: torch.Tensor,
                   t: torch.Tensor, context: torch.Tensor, weight: float) -> torch.Tensor:
    """The distillation target for a stacked batch (K seeds, B items, ...): the blend of the true
    target and the teacher's prediction on the same inputs (one teacher pass over all K x B)."""
    k, b = t.shape[:2]
    pred = teacher(noisy.flatten(0, 1), t.flatten(0, 1), context.flatten(0, 1)).float()
    return torch.lerp(target, pred.view(k, b, *pred.shape[1:]), weight)
