"""What the two adversarial trainings share (UFOGen in ufogen.py, autoencoders in vae.py): a
clipped optimiser step that refuses a non-finite loss, and how a run ends, ok or failed with its
reason, written to its result file (and to MLflow when the run has a tracker)."""

from __future__ import annotations

import json
import time

import torch
import torch.nn as nn

from ..rundir import RESULT, atomic_write
from .trainer import TrialResult


class AdversarialRun:
    """A base for a run object with `recipe.grad_clip`, `result`, `say`, `out`, `started` and
    `elapsed_before` (seconds of the runs it resumes)."""

    tracker = None  # an MLflowTracker, or None

    def descend(self, loss: torch.Tensor, optimizer, params) -> bool:
        """One clipped optimiser step on `loss`; False (and no step) when it is not finite."""
        if not torch.isfinite(loss):
            return False
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.clipped_step(optimizer, params)
        return True

    def clipped_step(self, optimizer, params) -> None:
        """The optimiser step on the gradients there are, clipped to `recipe.grad_clip`."""
        if self.recipe.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, self.recipe.grad_clip)
        optimizer.step()

    def fail(self, reason: str) -> TrialResult:
        self.result.status, self.result.reason = "failed", reason
        self.say(f"FAILED: {reason}")
        return self.finish()

    def finish(self) -> TrialResult:
        self.result.seconds = self.elapsed_before + time.time() - self.started
        atomic_write(self.out / RESULT, json.dumps(self.result.to_dict(), indent=1))
        if self.tracker is not None:
            self.tracker.finish(self.result)
        return self.result
