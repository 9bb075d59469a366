"""Deterministic held-out metrics: the training objective on one fixed evaluation bank.

Sampled metrics (`fid_proxy`, `align`) of a short proxy training move with the sampler's noise and
with the classifier; a proxy ranking needs a number that moves only when the weights do. The bank
is a fixed set of held-out (image, caption) pairs, each with its own timestep and noise, built
from the recipe's data, resolution, bank size and bank seed alone: every candidate of a sweep
that shares those is judged on exactly the same items (common random numbers), so a difference
between two candidates is a difference between their weights, never between their draws.

    key              what it is                                                direction
    val_loss         the training objective (same prediction target, plain     min
                     MSE as in training) on the bank, true captions
    val_loss_low     the same over the bank items with t in the lowest third   min
    val_loss_mid     ... the middle third of the schedule                       min
    val_loss_high    ... the top third (mostly noise)                           min
    text_gain        val_loss with the empty caption minus val_loss with the   max
                     true caption: what the text is worth to the model; 0 for
                     a model that ignores its text
    teacher_gap      with a recipe's teacher (`teacher.py`): the MSE between    min
                     the model's and the teacher's predictions, true captions

Timesteps are stratified: item i of N has t_i = floor((i + 0.5) / N * T), so every band has a
third of the items and the mean is a stratified estimate of the training loss. One forward pass
per item and caption (no sampling). `redraw` gives a bank with another noise / timestep draw
over the same items: the evaluation noise of these metrics (see `mdsearch.analysis.reliability`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BANDS = ("low", "mid", "high")
BANK_SEED = 777
_BATCH = 256


class EvalBank:
    """N held-out items of a data pipeline with fixed timesteps and noise.

    `data` is a `DataPipeline` (or anything with `val`, `autoencoder`, `latent_shape` and
    `embeddings`); `offset` shifts the timestep strata (0 <= offset < 1; 0.5 is the centre),
    `seed` draws the noise. The bank holds latents, caption embeddings (true and empty),
    timesteps and noise as tensors: evaluating it twice on the same weights is bit-identical.
    """

    def __init__(self, data, size: int, schedule_steps: int, seed: int = BANK_SEED,
                 offset: float = 0.5):
        size = min(int(size), len(data.val))
        if size < len(BANDS):
            raise ValueError(f"evaluation bank needs at least {len(BANDS)} items, got {size}")
        self.size, self.seed = size, seed
        items = [data.val[i] for i in range(size)]
        images = torch.stack([item["image"] for item in items])
        self.captions = [item["caption"] for item in items]
        self.latents = data.autoencoder.encode(images)
        self.context = data.embeddings.lookup(self.captions).tokens
        self.null = data.embeddings.null.tokens.expand(size, *self.context.shape[1:])
        strata = (torch.arange(size, dtype=torch.float64) + offset) / size
        self.t = (strata * schedule_steps).floor().long().clamp_(0, schedule_steps - 1)
        self.band = (torch.arange(size) * len(BANDS)) // size  # 0, 1, 2 by thirds of the bank
        self.noise = torch.randn(self.latents.shape, generator=torch.Generator().manual_seed(seed))
        self.teacher: torch.Tensor | None = None  # a teacher's predictions (`predictions`)

    def redraw(self, data, schedule_steps: int, seed: int) -> "EvalBank":
        """The same items with another draw of noise and of the timesteps within their strata."""
        offset = float(torch.rand(1, generator=torch.Generator().manual_seed(seed + 1)))
        return EvalBank(data, self.size, schedule_steps, seed=seed, offset=offset)


@torch.no_grad()
def predictions(model, bank: EvalBank, schedule, context: torch.Tensor):
    """`model`'s prediction for each bank item, with the true target beside it: batches of
    (prediction, target), on the model's device."""
    device = next(model.parameters()).device
    for lo in range(0, bank.size, _BATCH):
        sl = slice(lo, lo + _BATCH)
        x0, noise, t = bank.latents[sl].to(device), bank.noise[sl].to(device), bank.t[sl].to(device)
        pred = model(schedule.add_noise(x0, noise, t), t, context[sl].to(device))
        yield pred.float(), schedule.target(x0, noise, t)


def item_losses(model, bank: EvalBank, schedule, context: torch.Tensor,
                against: torch.Tensor | None = None) -> torch.Tensor:
    """Per-item training loss (mean over the latent's elements) of `model` on the bank; against
    another prediction of the bank's items (a teacher's) instead of the true target if given."""
    out, lo = [], 0
    for pred, target in predictions(model, bank, schedule, context):
        if against is not None:
            target = against[lo:lo + len(pred)].to(pred.device)
        lo += len(pred)
        out.append(F.mse_loss(pred, target, reduction="none").flatten(1).mean(1).cpu())
    return torch.cat(out).double()


def teacher_predictions(teacher, bank: EvalBank, schedule) -> torch.Tensor:
    """A teacher's predictions of the bank's items (true captions), kept on the CPU."""
    return torch.cat([pred.cpu() for pred, _ in predictions(teacher, bank, schedule,
                                                            bank.context)])


PER_SEED = ("val_loss", "val_loss_low", "val_loss_mid", "val_loss_high", "text_gain",
            "teacher_gap")
"""The metrics a stack of seeds reports per seed (`<metric>_s<k>`): heldout_metrics' names."""


@torch.no_grad()
def heldout_metrics(model, bank: EvalBank, schedule) -> dict[str, float]:
    """val_loss, val_loss_low / _mid / _high, text_gain (and teacher_gap, where the bank holds a
    teacher's predictions) of `model` (in eval mode) on `bank`."""
    was_training = model.training
    model.eval()
    true = item_losses(model, bank, schedule, bank.context)
    null = item_losses(model, bank, schedule, bank.null)
    out = {"val_loss": float(true.mean())}
    for i, name in enumerate(BANDS):
        out[f"val_loss_{name}"] = float(true[bank.band == i].mean())
    out["text_gain"] = float((null - true).mean())
    if bank.teacher is not None:
        out["teacher_gap"] = float(item_losses(model, bank, schedule, bank.context,
                                               against=bank.teacher).mean())
    model.train(was_training)
    return out


def seed_summary(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """Several training seeds' metrics (seed index -> metrics) as one record: each metric's mean
    over the seeds, `<metric>_std` (sample std, ddof 1), `<metric>_se` (std / sqrt(n): the
    standard error of the mean) and every seed's own `<metric>_s<k>`; `seeds_measured`: n."""
    import statistics

    ks = sorted(per_seed)
    out: dict[str, float] = {}
    for name in per_seed[ks[0]]:
        values = [per_seed[k][name] for k in ks]
        out[name] = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        out[f"{name}_std"], out[f"{name}_se"] = std, std / len(values) ** 0.5
        out.update({f"{name}_s{k}": v for k, v in zip(ks, values)})
    out["seeds_measured"] = len(ks)
    return out
