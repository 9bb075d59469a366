"""One candidate, trained and judged: the training loop behind every trial and full training.

    result = train_trial(presets.get("md"), load_recipe("cpu_quick"), out_dir="runs/md")

Costs come from the full-size spec at 512x512; quality from the model the recipe trains (a proxy
shrunk by `width`, or the full-size model at width 1). The loop is deterministic by seed on the
CPU: every step draws its batch, timesteps, noise and caption dropout from a generator seeded by
(seed, step), so a run resumed from a checkpoint replays exactly the steps an uninterrupted run
would have taken. A non-finite loss ends the trial with status "failed" and the reason; it never
raises into the caller.

Stages (recipe.plan()) run one after another in the same loop: a new resolution gets its own data
pipeline, a new attention nonlinearity is switched in place (the relu fine-tune), and optimiser,
LR schedule and EMA carry over. A stage that switches attention is evaluated right after the
switch, before any fine-tuning, so the history shows quality before the switch (the previous
stage's last evaluation), just after it, and after fine-tuning.

Seeds: a recipe's `seeds: K` trains seeds seed .. seed + K - 1 of the spec together as one
`SeedStack` (one stacked model, mdsearch.arch.seeds). Each seed draws its own batch, timesteps,
noise and caption dropout from (its seed, step), as it would alone; gradient clipping and the
non-finite check are per seed (a diverging seed stops alone and the others go on). Held-out
metrics are measured per seed and reported as their mean, with `<metric>_std`, `<metric>_se` and
each seed's `<metric>_s<k>`; sampled metrics (fid_proxy, kid_proxy, align) and sample grids come
from one seed (`sampled_seed`: the first still training). K = 1 is the plain run, bit for bit.

Data parallel: when torch.distributed is initialised (Ray Train's TorchTrainer, or torchrun),
every rank draws the same global batch from the step's generator and trains on its own slice of
it under DistributedDataParallel, so N workers take the same steps as one process with the whole
batch. Rank 0 evaluates, checkpoints and reports; the others only train.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from ..progress import quiet
from ..arch.blocks import set_attn_nonlinearity
from ..arch.cost import cost
from ..arch.proxy import proxy_spec
from ..arch.seeds import SeedStack
from ..arch.spec import ArchSpec
from ..config import ConfigError
from .checkpoint import RESUMED, described, read_checkpoint
from ..rundir import (CHECKPOINT, PROXY_SPEC, RECIPE, RESULT, SPEC, atomic_path, atomic_write,
                      check_out_dir, locked, samples_file)
from ..data.autoencoder import check_latent_channels
from ..data.pipeline import DataPipeline
from .diffusion import NoiseSchedule, ddim_sample
from .heldout import EvalBank, heldout_metrics, seed_summary, teacher_predictions
from .recipe import PlannedStage, Recipe
from .teacher import load_teacher, teacher_target



class TrainError(ConfigError):
    """A run that cannot start as asked (no GPU for device: cuda, a batch that does not split)."""


@dataclass
class TrialResult:
    status: str  # "ok" | "failed"
    reason: str | None
    steps: int
    seconds: float
    params: int  # full-size spec
    gmacs: float  # full-size spec at 512x512
    proxy_params: int
    metrics: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)  # the training seeds (several: one stack)
    seed_failures: dict[str, str] = field(default_factory=dict)  # seed -> why it stopped
    workers: int = 1  # data-parallel processes that trained it (this session's)

    def to_dict(self) -> dict:
        return asdict(self)


class EMA:
    """Exponential moving average of the weights, with the usual warm-up of the decay."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p, 1 - d)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def lr_factor(step: int, warmup: int, total: int, anneal: float) -> float:
    """The learning rate of step `step` (0-based) relative to the recipe's: linear warm-up over
    `warmup` steps, constant, then (anneal > 0) a linear decay to 0 over the last `anneal`
    fraction of the `total` steps, so the final weights are not a random point of a noisy
    trajectory (warmup-stable-decay)."""
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    decay = round(anneal * total)
    if decay > 0 and step >= total - decay:
        factor = min(factor, (total - step) / decay)
    return factor


def world() -> tuple[int, int]:
    """(rank, world size) of this process in torch.distributed; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def lead_locked(out_dir: str | Path, what: str):
    """The run directory's lock, held by rank 0 for all ranks (nothing on the others)."""
    return locked(out_dir, what) if world()[0] == 0 else nullcontext()


def my_slice(size: int) -> slice:
    """This rank's part of a global batch of `size` (all of it in one process)."""
    rank, workers = world()
    return slice(rank * size // workers, (rank + 1) * size // workers)


def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over the ranks, in place (unchanged in one process)."""
    if world()[1] > 1:
        dist.all_reduce(values)
    return values


def sum_gradients(params) -> None:
    """Sum the gradients of `params` over the ranks, in one collective: where each rank's loss
    is its share of the global batch's loss (its slice's mean times slice / batch), the sum is
    the gradient one process computes on the whole batch. What DDP does for the diffusion
    trainer, for the adversarial trainers whose two networks and gradient-norm weighting DDP's
    hooks do not fit."""
    if world()[1] == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def pick_device(setting: str, device: str | torch.device | None = None) -> torch.device:
    """The device to train on: an explicit `device` (Ray Train's choice for this worker) wins;
    else the recipe's setting, where `auto` means this process's GPU if it has one."""
    if device is not None:
        return torch.device(device)
    if setting == "cuda" and not torch.cuda.is_available():
        raise TrainError("recipe field device: 'cuda', but torch sees no CUDA GPU here "
                         "(use device: auto to fall back to the CPU)")
    if setting in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def stage_attention(plan: list[PlannedStage], spec: ArchSpec) -> list[str]:
    """Each stage's attention nonlinearity: its own, else the one before it (else the spec's)."""
    current, out = spec.attn_nonlinearity, []
    for stage in plan:
        current = stage.attn_nonlinearity or current
        out.append(current)
    return out


def train_trial(spec: ArchSpec, recipe: Recipe, out_dir: str | Path, *,
                steps: int | None = None, seed: int | None = None,
                progress: Callable[[str], None] | None = None,
                on_eval: Callable[[dict], None] | None = None,
                on_checkpoint: Callable[[int, Path | None], None] | None = None,
                tracker=None, evaluator=None,
                device: str | torch.device | None = None,
                start: dict[str, torch.Tensor] | None = None) -> TrialResult:
    """Train `spec` per `recipe` (its proxy when recipe.width < 1), evaluating as it goes; resume
    from `out_dir`'s checkpoint if there is one, else start from `start` (the proxy's weights, a
    state dict: a fine-tune, e.g. of a supernet's slice) or a fresh initialisation. `steps` stops early (after that many steps in
    all). `on_eval(record)` is called after every evaluation (Ray Tune's report hook);
    `on_checkpoint(step, path)` on every rank after every checkpoint (path is None except on rank
    0; Ray Train's report hook); `tracker` (see mdsearch.track) receives params, metrics and
    artifacts. Only rank 0 evaluates, saves, tracks and shows progress."""
    check_out_dir(out_dir)
    with lead_locked(out_dir, f"training {spec.name}"):
        run = Training(spec, recipe, out_dir, seed=seed, progress=progress, tracker=tracker,
                       evaluator=evaluator, device=device)
        if start is not None and run.step == 0:
            run.start_from(start)
        return run.run(steps, on_eval=on_eval, on_checkpoint=on_checkpoint)


class CompiledOrEager:
    """`torch.compile(model)` for the training forward, or the model itself when compiling
    fails. Compilation happens at a call (the first, and again at a stage's new resolution: shapes
    are static, since a dynamic-shape recompile of the md proxy failed in torch 2.13's inductor
    on CPU, benchmarks/train_step.py), so a compiled call that raises is redone eagerly and the
    run stays eager after saying why, in one line.
    Compiled CPU kernels fuse element-wise work, so losses match eager runs to float rounding,
    not bit for bit."""

    def __init__(self, model, say):
        self.model, self.say = model, say
        try:
            self.forward = torch.compile(model, dynamic=False)
        except Exception as err:  # e.g. no C++ compiler for the CPU backend
            self._fall_back(err)

    def _fall_back(self, err: Exception) -> None:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        self.say(f"torch.compile unavailable ({type(err).__name__}: {reason}); training eagerly")
        self.forward = self.model

    def train(self, mode: bool = True):
        self.model.train(mode)
        return self

    def __call__(self, *args, **kwargs):
        if self.forward is self.model:
            return self.model(*args, **kwargs)
        try:
            return self.forward(*args, **kwargs)
        except Exception as err:  # compiling failed: the eager model computes the same
            self._fall_back(err)
            return self.model(*args, **kwargs)


class Training:
    """The state of one run: model, EMA, optimiser, schedule, data pipelines and history."""

    def __init__(self, spec: ArchSpec, recipe: Recipe, out_dir: str | Path, *, seed=None,
                 progress=None, tracker=None, evaluator=None, device=None):
        self.out = Path(out_dir)
        self.rank, self.workers = world()
        self.lead = self.rank == 0
        self.spec, self.recipe = spec, recipe
        self.seed = recipe.seed if seed is None else seed
        self.seeds = [self.seed + k for k in range(recipe.seeds)]
        self.plan = recipe.plan()
        self.attention = stage_attention(self.plan, spec)
        self.staged = len(self.plan) > 1
        for stage in self.plan:
            if stage.batch_size % self.workers:
                raise TrainError(f"stage {stage.name}: batch size {stage.batch_size} does not "
                                 f"split over {self.workers} workers")
        self.device = pick_device(recipe.device, device)
        self.teacher = None  # a trained run to be judged against and distilled toward
        if recipe.teacher.run:
            self.teacher = load_teacher(recipe, self.device)
        self.out.mkdir(parents=True, exist_ok=True)
        self.say = (progress or quiet) if self.lead else quiet
        self.tracker = tracker if self.lead else None
        self.evaluator = evaluator
        self.started = time.time()
        self.pipelines: dict[int, DataPipeline] = {}

        self.full = cost(spec, 512)
        data = self.pipeline(self.plan[0].resolution)
        factor = 2 ** (len(spec.levels) - 1)  # the UNet's total downsampling of its latents
        for stage in self.plan:
            latent = stage.resolution // data.autoencoder.factor
            if stage.resolution % data.autoencoder.factor or latent % factor:
                where = f"stages ({stage.name}).resolution" if self.staged else "resolution"
                raise TrainError(
                    f"{recipe.name}: field {where}: {stage.resolution} px gives "
                    f"{stage.resolution / data.autoencoder.factor:g} latent pixels, which "
                    f"{spec.name}'s {len(spec.levels)} levels cannot halve {len(spec.levels) - 1}"
                    f" times; use a multiple of {factor * data.autoencoder.factor}")
        self.proxy = proxy_spec(spec, recipe.width, data.autoencoder.channels, data.encoder.dim,
                                data.encoder.max_length)
        self.model = SeedStack.build(self.proxy, self.seeds, self.device)
        self.ema = EMA(self.model, recipe.ema_decay)
        opt = recipe.optimizer
        # fused: one kernel over all parameters (10% faster proxy steps on a 2-core CPU than the
        # default for-each form, benchmarks/train_step.py's proxy shapes)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt.lr,
                                           betas=tuple(opt.betas), weight_decay=opt.weight_decay,
                                           fused=self.device.type in ("cpu", "cuda"))
        total = self.plan[-1].end
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, opt.warmup_steps, total, opt.anneal))
        self.schedule = NoiseSchedule(kind=recipe.noise_schedule, prediction=recipe.prediction)
        proxy_params = sum(p.numel() for p in self.model.structure.parameters())  # one seed's
        self.result = TrialResult("ok", None, 0, 0.0, self.full.params, self.full.gmacs,
                                  proxy_params, seeds=list(self.seeds), workers=self.workers)
        self.step, self.elapsed_before = 0, 0.0
        self.losses: list[float] = []  # since the last evaluation (its record averages them)
        self.ckpt_path = self.out / CHECKPOINT
        if self.ckpt_path.exists():  # (read_checkpoint refuses a folder or a damaged file)
            self.load()
        self.ddp = None
        if self.workers > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.trained = self.ddp if self.ddp is not None else self.model
        if recipe.compile:
            self.trained = CompiledOrEager(self.trained, self.say)

    def pipeline(self, resolution: int) -> DataPipeline:
        if resolution not in self.pipelines:
            r = self.recipe
            self.pipelines[resolution] = DataPipeline(r.data, r.text_encoder, r.autoencoder,
                                                      resolution, r.eval.prompts, r.eval.bank)
        return self.pipelines[resolution]

    def start_from(self, weights: dict[str, torch.Tensor]) -> None:
        """Begin from given proxy weights (model and EMA) instead of the initialisation."""
        if len(self.seeds) > 1:
            raise TrainError(f"{self.recipe.name}: field seeds: {len(self.seeds)}; a fine-tune "
                             "from given weights trains one seed")
        for model in (self.model.single, self.ema.model.single):
            model.load_state_dict(weights)

    # -- checkpoints ---------------------------------------------------------------------------

    def load(self) -> None:
        state = read_checkpoint(self.ckpt_path, RESUMED)
        saved = described(self.ckpt_path, state)["proxy_spec"]
        if saved is not None:  # the same UNet, but another autoencoder's latents
            check_latent_channels(self.pipeline(self.plan[0].resolution).autoencoder,
                                  saved.latent_channels, str(self.ckpt_path))
        saved_seeds = state.get("seeds", [self.seed])  # (a checkpoint of one seed may not say)
        if len(saved_seeds) != len(self.seeds) or ("seeds" in state
                                                   and saved_seeds != self.seeds):
            raise TrainError(f"{self.ckpt_path}: this checkpoint trained seeds {saved_seeds}, "
                             f"the recipe asks for {self.seeds} (seed {self.seed}, seeds "
                             f"{len(self.seeds)}); train into a new --out, or give the same "
                             "seeds")
        stacked = len(self.seeds) > 1
        try:
            if stacked:
                self.model.load_state_dict(state["stack"]["model"])
                self.ema.model.load_state_dict(state["stack"]["ema"])
            else:
                self.model.single.load_state_dict(state["model"])
                self.ema.model.single.load_state_dict(state["ema"])
        except (KeyError, RuntimeError) as err:  # another spec's (or recipe's) checkpoint
            first = (str(err).strip().splitlines()[1:2] or [str(err)])[0].strip()[:160]
            raise TrainError(
                f"{self.ckpt_path}: this checkpoint is of another model than {self.spec.name} "
                f"with this recipe ({first}); train into a new --out, or delete it to start "
                "over") from None
        self.ema.updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.elapsed_before = state["step"], state["seconds"]
        self.result.history = json.loads(state["history"])
        self.losses = json.loads(state.get("losses", "[]"))
        self.result.seed_failures = json.loads(state.get("seed_failures", "{}"))
        self.result.steps = self.step
        if self.result.history:
            self.result.metrics = _metrics_of(self.result.history[-1])
        self.say(f"resumed from {self.ckpt_path} at step {self.step}")

    def write_specs(self, attn: str) -> dict[str, str]:
        """spec.yaml (full size) and proxy_spec.yaml (what is trained), with the attention the
        weights are trained for; returns their texts."""
        texts = self.spec_texts(attn)
        for name, text in texts.items():
            atomic_write(self.out / name, text)
        return texts

    def spec_texts(self, attn: str) -> dict[str, str]:
        """spec.yaml and proxy_spec.yaml as text, with the attention the weights are trained
        for."""
        texts = {}
        for name, s in ((SPEC, self.spec), (PROXY_SPEC, self.proxy)):
            if s.attn_nonlinearity != attn:
                s = s.override({"attn_nonlinearity": attn}, source=f"stage attention {attn}")
            texts[name] = s.to_yaml()
        return texts

    def save(self, attn: str) -> None:
        """The checkpoint, self-describing (nanoGPT-style: it carries the spec, proxy spec and
        recipe it was trained from; the YAML files beside it are readable copies), written
        atomically: a kill mid-save never leaves a torn checkpoint."""
        texts = self.write_specs(attn)
        # "model" and "ema": the UNet of the first seed still training (`model_seed`), which
        # every reader of a run loads (export, promote, reliability); "stack": all seeds,
        # stacked, to resume from
        stack = ({"stack": {"model": self.model.state_dict(), "ema": self.ema.model.state_dict()}}
                 if len(self.seeds) > 1 else {})
        k = (self.training_seeds() or [0])[0]
        with atomic_path(self.ckpt_path) as tmp:
            torch.save({"model": self.model.unet(k).state_dict(),
                        "ema": self.ema.model.unet(k).state_dict(), **stack,
                        "seeds": self.seeds, "model_seed": self.seeds[k],
                        "seed_failures": json.dumps(self.result.seed_failures),
                        "ema_updates": self.ema.updates, "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "step": self.step,
                        "attn_nonlinearity": attn,
                        "seconds": self.elapsed_before + time.time() - self.started,
                        "history": json.dumps(self.result.history),
                        "losses": json.dumps(self.losses),
                        "spec": texts[SPEC], "proxy_spec": texts[PROXY_SPEC],
                        "recipe": json.dumps(self.recipe.to_dict())}, tmp)

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate(self, data: DataPipeline, extra: dict, sampled: bool = True) -> dict:
        """Judge the EMA weights now: the held-out bank always, the sampled metrics (and a
        sample grid) when `sampled`; the record goes into the history (rank 0 only)."""
        metrics, grid = self.heldout(data), None
        if sampled or not metrics:
            if self.evaluator is None:
                self.evaluator = make_evaluator(self.recipe,
                                                self.pipeline(self.plan[-1].resolution))
            grid = self.out / samples_file(self.step, extra.get("event", ""))  # a switch: its own
            k = self.training_seeds()[0]
            if len(self.seeds) > 1:
                metrics["sampled_seed"] = self.seeds[k]
            metrics.update(evaluate(self.ema.model.unet(k), data, self.schedule, self.recipe,
                                    self.evaluator, grid=grid))
        record = {"step": self.step, **extra, **metrics}
        self.result.history.append(record)
        self.result.metrics = metrics
        shown = {k: v for k, v in record.items()  # (each seed's own values: in the record)
                 if not re.search(r"_s\d+$", k) and f"{k[:-4]}_se" not in record}
        self.say("eval " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in shown.items()))
        if self.tracker is not None:
            self.tracker.log_metrics({k: v for k, v in record.items()
                                      if k != "step" and isinstance(v, (int, float))}, self.step)
            if grid is not None:
                self.tracker.log_artifact(grid)
        return record

    def heldout(self, data: DataPipeline) -> dict[str, float]:
        """val_loss, its noise bands and text_gain of the EMA weights on the recipe's bank (the
        same items, timesteps and noise for every trial with this data and resolution)."""
        if not self.recipe.eval.bank:
            return {}
        if data.bank is None:
            data.bank = EvalBank(data, self.recipe.eval.bank, self.schedule.steps)
            if self.teacher is not None:
                data.bank.teacher = teacher_predictions(self.teacher, data.bank, self.schedule)
        if len(self.seeds) == 1:
            return heldout_metrics(self.ema.model.unet(0), data.bank, self.schedule)
        return seed_summary({k: heldout_metrics(self.ema.model.unet(k), data.bank, self.schedule)
                             for k in self.training_seeds()})

    def training_seeds(self) -> list[int]:
        """Indices of the seeds still training (not stopped by a divergence)."""
        return [k for k, s in enumerate(self.seeds) if str(s) not in self.result.seed_failures]

    # -- the loop ------------------------------------------------------------------------------

    def run(self, steps: int | None = None, on_eval=None, on_checkpoint=None) -> TrialResult:
        total = self.plan[-1].end if steps is None else min(steps, self.plan[-1].end)
        if self.lead:
            existing = self.out / SPEC
            if not self.ckpt_path.is_file() and existing.is_file() and \
                    existing.read_text() != self.spec_texts(self.attention[0])[SPEC]:
                raise TrainError(f"{existing} holds another spec than the one being trained "
                                 f"({self.spec.name}) and there is no checkpoint beside it; "
                                 "train into another --out, or delete the file")
            atomic_write(self.out / RECIPE, yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))
            if not self.ckpt_path.is_file():
                self.write_specs(self.attention[0])
            if self.tracker is not None:  # after the specs: it logs spec.yaml as an artifact
                self.tracker.start(self.spec, self.proxy, self.recipe, self.full,
                                   self.result.proxy_params, self.out)
        for i, (stage, attn) in enumerate(zip(self.plan, self.attention)):
            if self.step >= min(stage.end, total) or self.result.status != "ok":
                continue
            data = self.pipeline(stage.resolution)
            set_attn_nonlinearity(self.model.structure, attn)
            set_attn_nonlinearity(self.ema.model.structure, attn)
            tag = {"stage": stage.name, "resolution": stage.resolution} if self.staged else {}
            self.say(f"stage {stage.name}: steps {stage.start}-{stage.end} at "
                     f"{stage.resolution}px, batch {stage.batch_size}"
                     + (f" over {self.workers} workers" if self.workers > 1 else "")
                     + (f", seeds {self.seeds[0]}-{self.seeds[-1]} stacked"
                        if len(self.seeds) > 1 else "")
                     + f", {attn} attention, on {self.device}")
            before = self.attention[i - 1] if i > 0 else attn
            if self.lead and self.step == stage.start and attn != before and not any(
                    r.get("event") == "switch" and r.get("stage") == stage.name
                    for r in self.result.history):
                self.say(f"attention {before} -> {attn}: evaluating before fine-tuning")
                self.evaluate(data, {**tag, "event": "switch"})
            self.train_stage(stage, attn, min(stage.end, total), data, tag, on_eval,
                             on_checkpoint)
        self.result.seconds = self.elapsed_before + time.time() - self.started
        if self.lead:
            atomic_write(self.out / RESULT, json.dumps(self.result.to_dict(), indent=1))
            if self.tracker is not None:
                self.tracker.finish(self.result)
        return self.result

    def train_stage(self, stage: PlannedStage, attn: str, end: int, data: DataPipeline,
                    tag: dict, on_eval, on_checkpoint) -> None:
        """Steps [self.step, end) of one stage."""
        recipe, opt, result = self.recipe, self.recipe.optimizer, self.result
        size, dev = stage.batch_size, self.device
        mine = my_slice(size)
        autocast = torch.autocast(dev.type, dtype=torch.bfloat16,
                                  enabled=recipe.precision == "bf16")
        self.trained.train()
        losses = self.losses
        last_log = time.time()
        while self.step < end:
            # each seed's global batch, drawn from (seed, step): the same on every rank, and
            # the same as that seed's solo run
            drawn = []
            for seed in self.seeds:
                g = _step_generator(seed, self.step)
                idx = torch.randint(len(data.train), (size,), generator=g)
                drop = torch.rand(size, generator=g) < recipe.caption_dropout
                t = torch.randint(0, self.schedule.steps, (size,), generator=g)
                noise = torch.randn(data.latent_shape(size), generator=g)
                latents, captions = data.batch(idx[mine].tolist())  # this rank's slice of it
                captions = ["" if d else c for c, d in zip(captions, drop[mine].tolist())]
                drawn.append((latents, noise[mine], t[mine], data.context(captions)))
            # (K seeds, this rank's batch, ...)
            latents, noise, t, context = (torch.stack(x).to(dev) for x in zip(*drawn))
            self.optimizer.zero_grad(set_to_none=True)
            mean_loss = torch.zeros(len(self.seeds), device=dev)  # per seed
            n = recipe.accumulate  # micro-batches (views of the batch): their gradients add up
            parts = zip(*(x.chunk(n, dim=1) for x in (latents, noise, t, context)))
            for i, (x0, eps, tp, ctx) in enumerate(parts):
                # DDP averages the gradients over the workers in the last backward only
                last = i == n - 1
                with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
                    noisy = self.schedule.add_noise(x0, eps, tp)
                    with autocast:
                        pred = self.trained(noisy, tp, ctx)
                    target = self.schedule.target(x0, eps, tp)
                    if recipe.teacher.weight > 0:  # output distillation (teacher.py)
                        target = teacher_target(self.teacher, target, noisy, tp, ctx,
                                                recipe.teacher.weight)
                    # each seed's mean over the whole batch; seeds add up (their gradients are
                    # each seed's own: no weight is shared between seeds)
                    loss = torch.stack([F.mse_loss(pred[k].float(), target[k])
                                        for k in range(len(self.seeds))])
                    loss = loss * (x0.shape[1] / latents.shape[1])
                    loss.sum().backward()
                mean_loss += loss.detach()
            if self.workers > 1:  # every rank sees the same mean, so all agree on a divergence
                sum_over_ranks(mean_loss).div_(self.workers)
            if not self.stop_diverged(mean_loss.tolist()):
                return
            values = [mean_loss[k].item() for k in self.training_seeds()]
            loss_value = sum(values) / len(values)
            if opt.grad_clip > 0:  # per seed
                self.model.clip_grad_norm_(opt.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.ema.update(self.model)
            losses.append(loss_value)
            self.step = done = self.step + 1
            result.steps = done

            if done % recipe.log_every == 0 or done == end:
                rate = recipe.log_every / max(time.time() - last_log, 1e-9)
                last_log = time.time()
                recent = losses[-recipe.log_every:]
                self.say(f"step {done}/{end}  loss {sum(recent) / len(recent):.4f}  "
                         f"{rate:.2f} steps/s  eta {(end - done) / max(rate, 1e-9):.0f}s")
                if self.tracker is not None:
                    self.tracker.log_metrics({"loss": losses[-1]}, done)
            at_end = done == end  # of the stage, or of a run stopped early by `steps`
            record = None
            if self.lead and (done % recipe.eval.every == 0 or at_end):
                sampled = at_end or done % (recipe.eval.every * recipe.eval.sample_every) == 0
                record = self.evaluate(data, {**tag, "loss": sum(losses) / len(losses)},
                                       sampled=sampled)
                losses.clear()
            if done % recipe.checkpoint_every == 0 or at_end:
                if self.lead:
                    self.save(attn)
                if on_checkpoint is not None:
                    on_checkpoint(done, self.ckpt_path if self.lead else None)
            if record is not None and on_eval is not None:
                on_eval(record)  # after the save, so a checkpoint reported with it is current

    def stop_diverged(self, seed_losses: list[float]) -> bool:
        """Stop every seed whose loss is not finite (its gradients are dropped, never applied).
        False when no seed is left: the run has failed, with the reason."""
        result, failures = self.result, self.result.seed_failures
        for k in self.training_seeds():
            if not math.isfinite(seed_losses[k]):
                failures[str(self.seeds[k])] = (f"non-finite loss ({seed_losses[k]}) at step "
                                                f"{self.step + 1}")
                if len(self.seeds) > 1:
                    self.say(f"seed {self.seeds[k]} FAILED: {failures[str(self.seeds[k])]}; the "
                             "other seeds go on")
        alive = self.training_seeds()
        if not alive:
            result.status = "failed"
            result.reason = (failures[str(self.seeds[0])] if len(self.seeds) == 1 else
                             "every seed failed: " + "; ".join(f"seed {s}: {why}" for s, why
                                                               in failures.items()))
            self.say(f"FAILED: {result.reason}")
            return False
        if len(alive) < len(self.seeds):
            self.model.zero_seed_grads_(torch.tensor([k not in alive
                                                      for k in range(len(self.seeds))]))
        return True


def _metrics_of(record: dict) -> dict[str, float]:
    return {k: v for k, v in record.items()
            if k not in ("step", "loss", "stage", "resolution", "event")}


SAMPLE_SEED = 12345  # the sampler's starting noise: the same for every trial and evaluation
SAMPLE_BATCH = 256  # prompts sampled at once in an evaluation (bounds its device memory)
JUDGE_SEED = 0  # every trial, whatever its own seed, is judged by the same attribute classifier


def make_evaluator(recipe: Recipe, data: DataPipeline):
    from .metrics import Evaluator

    return Evaluator(recipe.final_resolution, data.reference_images(recipe.eval.reference_images),
                     inception_path=recipe.eval.inception_path, clip_path=recipe.eval.clip_path,
                     seed=JUDGE_SEED)


def x0_clip(autoencoder) -> float | None:
    """How far sampling clamps its x0 estimate: to [-1, 1] in pixel space (the images' range),
    not at all for VAE latents (their range is the VAE's)."""
    return 1.0 if autoencoder.name == "identity" else None


@torch.no_grad()
def evaluate(model, data: DataPipeline, schedule: NoiseSchedule, recipe: Recipe, evaluator,
             grid: Path | None = None, sample_seed: int = SAMPLE_SEED) -> dict[str, float]:
    """Sample the fixed prompts with DDIM + CFG (fixed noise, from `sample_seed`) and score
    them. Sampled and decoded SAMPLE_BATCH prompts at a time, so the device holds one batch
    whatever `eval.prompts` is (a paper recipe's 30,000 would not fit at once); each prompt's
    noise is its part of one draw for all of them, so the batching changes no image."""
    from .grid import save_grid

    ev = recipe.eval
    device = next(model.parameters()).device
    count = len(data.prompts)
    noise = torch.randn(data.latent_shape(count),
                        generator=torch.Generator().manual_seed(sample_seed))
    images = []
    for start in range(0, count, SAMPLE_BATCH):
        part = slice(start, start + SAMPLE_BATCH)
        latents = ddim_sample(model, schedule, data.context(data.prompts[part]).to(device),
                              data.null_context.to(device), noise[part].shape,
                              steps=ev.sample_steps, guidance=ev.guidance, noise=noise[part],
                              clip_x0=x0_clip(data.autoencoder))
        images.append(data.autoencoder.decode(latents.cpu()))
    images = torch.cat(images)
    if grid is not None:
        save_grid(images[:32], data.prompts[:32], grid)
    return evaluator.evaluate(images, data.prompts, data.prompt_labels)
