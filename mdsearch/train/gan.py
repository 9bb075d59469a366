"""What the two adversarial trainings share (UFOGen in ufogen.py, autoencoders in vae.py): a
clipped optimiser step that refuses a non-finite loss, and how a run ends, ok or failed with its
reason, written to its result file (and to MLflow when the run has a tracker).

Data parallel (torch.distributed initialised: `mdsearch train --workers N`, or a sweep trial with
`workers: N`): every rank draws the step's whole batch, noise and times from the step's generator
and computes its slice's share of the loss (its mean times slice / batch); the optimiser step sums
the gradients over the ranks first (`sum_gradients`), which gives one process's gradient of the
whole batch. The loss a step checks and logs is the sum of the shares, so every rank agrees on a
non-finite one. Rank 0 (`lead`) evaluates, saves, logs and writes the result; the others train."""

from __future__ import annotations

import json
import math
import time

import torch
import torch.nn as nn

from ..rundir import RESULT, atomic_write
from .trainer import TrialResult, sum_gradients, sum_over_ranks


class AdversarialRun:
    """A base for a run object with `recipe.grad_clip`, `result`, `say`, `out`, `started` and
    `elapsed_before` (seconds of the runs it resumes)."""

    tracker = None  # an MLflowTracker, or None
    lead = True  # rank 0 of a data-parallel run (or the one process)

    def descend(self, loss: torch.Tensor, optimizer, params) -> float:
        """One clipped optimiser step on `loss`, this rank's share of the batch's loss, unless
        the batch's loss (the shares summed over the ranks) is not finite. Returns it."""
        total = self.batch_total(loss.detach())
        if not math.isfinite(total):
            return total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.clipped_step(optimizer, params)
        return total

    def batch_total(self, share: torch.Tensor | float) -> float:
        """A loss share summed over the ranks (the loss of the whole batch)."""
        return self.sum_shares(torch.tensor([float(share)])).item()

    def sum_shares(self, values: torch.Tensor) -> torch.Tensor:
        """Values summed over the ranks, on this run's device (NCCL reduces GPU tensors only)."""
        return sum_over_ranks(values.to(self.device)).cpu()

    def clipped_step(self, optimizer, params) -> None:
        """The optimiser step on the gradients there are (summed over the ranks), clipped to
        `recipe.grad_clip`."""
        params = list(params)
        sum_gradients(params)
        if self.recipe.grad_clip > 0:
            nn.utils.clip_grad_norm_(params, self.recipe.grad_clip)
        optimizer.step()

    def fail(self, reason: str) -> TrialResult:
        self.result.status, self.result.reason = "failed", reason
        self.say(f"FAILED: {reason}")
        return self.finish()

    def finish(self) -> TrialResult:
        self.result.seconds = self.elapsed_before + time.time() - self.started
        if self.lead:
            atomic_write(self.out / RESULT, json.dumps(self.result.to_dict(), indent=1))
        if self.tracker is not None:
            self.tracker.finish(self.result)
        return self.result
