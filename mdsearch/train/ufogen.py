"""UFOGen: adversarial fine-tuning of a trained diffusion candidate into a one-step generator.

    result = ufogen_trial("runs/md", load_ufogen_recipe("ufogen_cpu"), "runs/md-ufo")

The paper's section 4 (Eq. 1-3). Generator G and discriminator D are both the starting run's UNet
(its proxy spec), initialised from its EMA weights. One step of training, for a batch of data x0:

    t ~ recipe.timesteps, t' = max(t - recipe.gap, 0)
    x_t   = q(x_t | x0)                      G's input
    x0'   = G(x_t, t)  (as x0)               G's one-step prediction
    real  = q(x_t' | x0),  fake = q(x_t' | x0')    forward-diffused to t' with fresh noise
    D loss: softplus(-D(real)) + softplus(D(sg(fake)))            (non-saturating GAN)
    G loss: adv_weight * softplus(-D(fake)) + recon_weight * reconstruction

D is the UNet with its output averaged over every location and channel into one logit per sample
("aggregates logits across output locations"), conditioned on t' and the caption. The
reconstruction term (`reconstruction`) is measured in the model's own training target (v or
epsilon), so gamma_t of Eq. 1 is the starting model's training weighting:

    diffusion     || target(x0, noise, t) - G(x_t, t) ||^2          Eq. 1
    distill       || sg(teacher(x_t, t)) - G(x_t, t) ||^2, the frozen starting model   Eq. 2
    ema_distill   the same against an EMA of G (decay `ema_distill_decay`; 1 = distill)  Eq. 3

`adapter: lora` trains LoRA adapters on G only (PEFT's `inject_adapter_in_model`: our UNet is a
plain nn.Module, which PEFT wraps by module name; adapters start as a no-op), D is always fully
trained. Separate Adam optimisers and learning rates for G and D, `d_updates` discriminator steps
per generator step, gradient clipping for both.

Evaluation samples G in one step (no guidance: a one-step model has none), and with DDIM-N for
every other N of `eval.steps`, and, once before any fine-tuning, the starting model in one step
and with the starting recipe's own DDIM sampler, so the history holds them side by side
(`sampler`: "1-step" or "ddim-N"); the run's metrics are its last one-step evaluation's. Checkpoints hold both
networks, both optimisers and the EMA teacher; a run resumes exactly (every step's batch, times
and noise come from a generator seeded by (seed, step)). A non-finite G or D loss ends the run as
`failed` with the reason. The checkpoint's `model`/`ema` entries are G with any adapters merged,
so `mdsearch export --checkpoint` exports the one-step generator. The run directory's recipe.yaml
is the starting run's recipe (what the weights are: data, resolution, text encoder), ufogen.yaml
the fine-tuning's.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from .. import config
from ..arch.cost import cost
from ..arch.unet import build
from ..paths import TRIALS
from ..progress import quiet
from ..track import flatten
from ..data.autoencoder import check_latent_channels
from ..rundir import (CHECKPOINT, PROXY_SPEC, RECIPE, SPEC, UFOGEN_RECIPE, atomic_path,
                      atomic_write, check_out_dir, samples_file)
from .gan import AdversarialRun
from .checkpoint import (RESUMED, CheckpointError, checkpoint_path, described,
                         read_checkpoint)
from .diffusion import NoiseSchedule
from .recipe import DEVICES, PRECISIONS, Recipe, RecipeData, RecipeError, same_recipe
from .trainer import (TrialResult, _step_generator, evaluate, lead_locked, make_evaluator,
                      my_slice, pick_device, world)

RECONSTRUCTIONS = ("diffusion", "distill", "ema_distill")
ADAPTERS = ("full", "lora")


def ufogen_start(init_dir: str | Path, state: dict | None = None) -> dict:
    """What a UFOGen fine-tuning starts from (`described`: spec, proxy spec, recipe), checked:
    a diffusion run's checkpoint that says what it trained, not a one-step generator. A
    CheckpointError (one line) otherwise: `train --init` and a UFOGen sweep refuse the same
    runs, before anything trains."""
    state = read_checkpoint(init_dir) if state is None else state
    about = described(init_dir, state)
    if about["proxy_spec"] is None or about["recipe"] is None:
        raise CheckpointError(f"{checkpoint_path(init_dir)}: it does not say which spec "
                              "and recipe it was trained from, so UFOGen cannot rebuild it")
    if state.get("one_step"):
        raise CheckpointError(f"{checkpoint_path(init_dir)}: already a one-step (UFOGen) "
                              "generator; start from a diffusion run")
    return about


@dataclass
class LoRA:
    rank: int = 4
    alpha: float = 4.0
    # nn.Linear / nn.Conv2d module names (PEFT matches name suffixes): attention projections
    targets: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out"])
    lr: float | None = None  # the generator's learning rate under LoRA (None: lr_g)


@dataclass
class Evaluation:
    every: int = 100  # steps between one-step evaluations (and always at the last step)
    prompts: int = 144  # fixed prompts sampled per evaluation
    steps: list[int] = field(default_factory=lambda: [1])  # G sampled with each (1 included):
    #                                                        1-step, and DDIM-N for N > 1


@dataclass
class UFOGenRecipe(RecipeData):
    name: str
    kind: str = "ufogen"
    steps: int = 300
    batch_size: int = 32
    reconstruction: str = "diffusion"  # diffusion | distill | ema_distill
    recon_weight: float = 1.0  # lambda of Eq. 1
    adv_weight: float = 1.0
    ema_distill_decay: float = 0.99
    adapter: str = "full"  # full | lora (generator only)
    lora: LoRA = field(default_factory=LoRA)
    lr_g: float = 1e-5
    lr_d: float = 1e-5
    betas: list[float] = field(default_factory=lambda: [0.0, 0.99])
    d_updates: int = 1  # discriminator steps (on the same batch) per generator step
    grad_clip: float = 1.0
    timesteps: list[int] = field(default_factory=lambda: [999])  # G's input times t
    gap: int = 250  # t' = t - gap: where real and fake are compared
    eval: Evaluation = field(default_factory=Evaluation)
    checkpoint_every: int = 100
    log_every: int = 25
    seed: int = 0
    workers: int = 1  # data-parallel workers; each trains on its slice of every batch
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})  # a worker's
    device: str = "auto"  # auto: this process's GPU if it has one, else the CPU
    precision: str = "fp32"  # or bf16 (autocast of the G and D forward passes)

    def validate(self, source: str) -> None:
        def fail(key, why):
            raise RecipeError(f"{source}: field {key}: {why}")

        if self.kind != "ufogen":
            fail("kind", f"a UFOGen recipe has kind: ufogen, not {self.kind!r}")
        if self.reconstruction not in RECONSTRUCTIONS:
            fail("reconstruction", f"{self.reconstruction!r} is not one of "
                                   f"{', '.join(RECONSTRUCTIONS)}")
        if self.adapter not in ADAPTERS:
            fail("adapter", f"{self.adapter!r} is not one of {', '.join(ADAPTERS)}")
        for key, value in (("steps", self.steps), ("batch_size", self.batch_size),
                           ("d_updates", self.d_updates), ("eval.every", self.eval.every),
                           ("eval.prompts", self.eval.prompts),
                           *((f"eval.steps.{i}", n) for i, n in enumerate(self.eval.steps)),
                           ("checkpoint_every", self.checkpoint_every),
                           ("log_every", self.log_every)):
            if value <= 0:
                fail(key, f"must be positive, got {value}")
        if self.workers < 1 or self.batch_size % self.workers:
            fail("workers", f"{self.workers} must be positive and split batch_size "
                            f"({self.batch_size}) into equal slices")
        if 1 not in self.eval.steps:
            fail("eval.steps", f"must include 1 (the one-step model), got {self.eval.steps}")
        if self.lora.rank <= 0:
            fail("lora.rank", f"must be positive, got {self.lora.rank}")
        if not self.lora.targets:
            fail("lora.targets", "name at least one module")
        if self.lora.lr is not None and not self.lora.lr > 0:
            fail("lora.lr", f"must be positive (or null: lr_g), got {self.lora.lr}")
        for key in ("lr_g", "lr_d", "recon_weight", "adv_weight", "grad_clip"):
            if not getattr(self, key) >= 0:
                fail(key, f"must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.ema_distill_decay <= 1:
            fail("ema_distill_decay", f"must be in [0, 1], got {self.ema_distill_decay}")
        if not self.timesteps or any(not 0 < t < 1000 for t in self.timesteps):
            fail("timesteps", f"a non-empty list of times in 1..999, got {self.timesteps}")
        if not 0 < self.gap < 1000:
            fail("gap", f"must be in 1..999, got {self.gap}")
        if len(self.betas) != 2:
            fail("betas", f"two numbers, got {self.betas}")
        if self.device not in DEVICES:
            fail("device", f"{self.device!r} is not one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            fail("precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")


def load_any_recipe(path_or_name: str | Path):
    """A recipe file (or a name in trials/), read once: a UFOGenRecipe for `kind: ufogen`, a
    VAERecipe for `kind: vae` (mdsearch.train.vae), else a diffusion Recipe."""
    path = config.named_file(path_or_name, TRIALS)
    return any_recipe(config.load_yaml(path, error=RecipeError), str(path))


def any_recipe(data, source: str):
    """A recipe's data as the class its `kind` names (UFOGen, autoencoder, else diffusion)."""
    from .vae import VAERecipe

    kind = data.get("kind") if isinstance(data, dict) else None
    cls = {"ufogen": UFOGenRecipe, "vae": VAERecipe}.get(kind, Recipe)
    return cls.from_dict(data, source=source)


def train_any(spec, recipe, out_dir: str | Path, *, init: str | Path | None = None,
              on_checkpoint=None, **options) -> TrialResult:
    """Train what `recipe` is for into `out_dir`: an autoencoder (a VAERecipe; `init`: the VAE
    whose encoder `train: decoder` keeps), a UFOGen fine-tune of the run `init`, or `spec`'s
    proxy (`on_checkpoint`: the diffusion trainer's hook). `options` (steps, progress, tracker,
    on_eval, device) go to that trainer."""
    from .trainer import train_trial
    from .vae import VAERecipe, vae_train

    if isinstance(recipe, VAERecipe):
        return vae_train(recipe, out_dir, init=init, **options)
    if isinstance(recipe, UFOGenRecipe):
        return ufogen_trial(init, recipe, out_dir, **options)
    return train_trial(spec, recipe, out_dir, on_checkpoint=on_checkpoint, **options)


def load_ufogen_recipe(path_or_name: str | Path) -> UFOGenRecipe:
    path = config.named_file(path_or_name, TRIALS)
    return UFOGenRecipe.from_dict(config.load_yaml(path, error=RecipeError), source=str(path))


class Discriminator(nn.Module):
    """A UNet whose output, averaged over locations and channels, is one logit per sample."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context):
        return self.unet(x, t, context).float().mean(dim=tuple(range(1, x.dim())))


def add_lora(model: nn.Module, lora: LoRA) -> nn.Module:
    """LoRA adapters (PEFT) on `model`'s target modules, as a no-op at start; only they train."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise RecipeError("adapter: lora needs the peft package (pip install peft, with the "
                          "project's constraints file)") from None
    try:
        model = inject_adapter_in_model(LoraConfig(r=lora.rank, lora_alpha=lora.alpha,
                                                   target_modules=list(lora.targets)), model)
    except ValueError as err:  # no module matched the targets
        raise RecipeError(f"field lora.targets {lora.targets}: {err}") from None
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def merged_state(model: nn.Module) -> dict:
    """The plain UNet state dict of `model`, with LoRA adapters (if any) merged into it."""
    if not any("lora_" in n for n, _ in model.named_parameters()):
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    merged = copy.deepcopy(model)
    for module in merged.modules():
        if hasattr(module, "merge") and hasattr(module, "base_layer"):
            module.merge()
    state = {}
    for key, value in merged.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach().clone()
    return state


class UFOGen(AdversarialRun):
    """The state of one UFOGen run: G, D, the teacher, both optimisers, data and history."""

    def __init__(self, init_dir: str | Path, recipe: UFOGenRecipe, out_dir: str | Path, *,
                 seed: int | None = None, progress=None, evaluator=None, tracker=None,
                 device=None):
        self.out = Path(out_dir)
        rank, workers = world()
        if recipe.batch_size % workers:
            raise RecipeError(f"{recipe.name}: field batch_size: {recipe.batch_size} does not "
                              f"split over {workers} workers")
        self.lead = rank == 0
        self.share = 1 / workers  # this rank's slice of every batch (the slices are equal)
        self.tracker = tracker if self.lead else None
        self.device = pick_device(recipe.device, device)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16,
                                       enabled=recipe.precision == "bf16")
        self.out.mkdir(parents=True, exist_ok=True)
        self.init = Path(init_dir)
        self.recipe, self.say = recipe, (progress or quiet) if self.lead else quiet
        self.seed = recipe.seed if seed is None else seed
        start = read_checkpoint(self.init)
        about = ufogen_start(self.init, start)
        self.spec, self.proxy = about["spec"], about["proxy_spec"]
        self.base = Recipe.from_dict(about["recipe"], f"{checkpoint_path(self.init)} (recipe)")
        weights = start.get("ema") or start["model"]
        self.schedule = NoiseSchedule(kind=self.base.noise_schedule,
                                      prediction=self.base.prediction)
        from ..data.pipeline import DataPipeline

        self.data = DataPipeline(self.base.data, self.base.text_encoder, self.base.autoencoder,
                                 self.base.final_resolution, recipe.eval.prompts, 0)
        check_latent_channels(self.data.autoencoder, self.proxy.latent_channels,
                              str(checkpoint_path(self.init)))
        self.evaluator = evaluator  # built on first use; tests pass a cheap stand-in

        def unet():
            model = build(self.proxy)
            model.load_state_dict(weights)
            return model.to(self.device)

        torch.manual_seed(self.seed)
        self.G = unet()
        if recipe.adapter == "lora":
            self.G = add_lora(self.G, recipe.lora)
        self.D = Discriminator(unet())
        self.teacher = None
        if recipe.reconstruction == "distill":
            self.teacher = unet().eval().requires_grad_(False)
        elif recipe.reconstruction == "ema_distill":
            self.teacher = copy.deepcopy(self.G).eval().requires_grad_(False)
        betas = tuple(recipe.betas)
        lr_g = recipe.lora.lr if recipe.adapter == "lora" and recipe.lora.lr else recipe.lr_g
        self.g_params = [p for p in self.G.parameters() if p.requires_grad]  # LoRA: adapters
        self.opt_g = torch.optim.Adam(self.g_params, lr=lr_g, betas=betas)
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=recipe.lr_d, betas=betas)
        self.full = cost(self.spec, 512)
        trainable = sum(p.numel() for p in self.G.parameters() if p.requires_grad)
        self.result = TrialResult("ok", None, 0, 0.0, self.full.params, self.full.gmacs,
                                  trainable, workers=workers)
        self.step, self.elapsed_before, self.started = 0, 0.0, time.time()
        self.ckpt_path = self.out / CHECKPOINT
        if self.ckpt_path.exists():
            self.load()

    # -- checkpoints ---------------------------------------------------------------------------

    def load(self) -> None:
        state = read_checkpoint(self.ckpt_path, RESUMED)
        if not state.get("one_step") or not same_recipe(state.get("ufogen"), self.recipe):
            raise CheckpointError(f"{self.ckpt_path}: not a checkpoint of this UFOGen recipe "
                                  "(another recipe or a diffusion run); use a new --out")
        self.G.load_state_dict(state["generator"])
        self.D.load_state_dict(state["discriminator"])
        if self.teacher is not None and "teacher" in state:
            self.teacher.load_state_dict(state["teacher"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.step, self.elapsed_before = state["step"], state["seconds"]
        self.result.history = json.loads(state["history"])
        self.result.steps = self.step
        self.result.metrics = _last_one_step(self.result.history)
        self.say(f"resumed from {self.ckpt_path} at step {self.step}")

    def save(self) -> None:
        merged = merged_state(self.G)
        texts = {SPEC: self.spec.to_yaml(), PROXY_SPEC: self.proxy.to_yaml()}
        for name, text in texts.items():
            atomic_write(self.out / name, text)
        state = {"model": merged, "ema": merged, "one_step": True,
                 "generator": self.G.state_dict(), "discriminator": self.D.state_dict(),
                 "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                 "step": self.step, "init": str(self.init),
                 "seconds": self.elapsed_before + time.time() - self.started,
                 "history": json.dumps(self.result.history),
                 "spec": texts[SPEC], "proxy_spec": texts[PROXY_SPEC],
                 "recipe": json.dumps(self.base.to_dict()),
                 "ufogen": json.dumps(self.recipe.to_dict())}
        if self.teacher is not None and self.recipe.reconstruction == "ema_distill":
            state["teacher"] = self.teacher.state_dict()
        with atomic_path(self.ckpt_path) as tmp:
            torch.save(state, tmp)

    # -- evaluation ----------------------------------------------------------------------------

    def evaluate_with(self, model, steps: int, guidance: float, tag: str) -> dict:
        if self.evaluator is None:
            self.evaluator = make_evaluator(self.base, self.data)
        recipe = self.base.override({"eval.sample_steps": steps, "eval.guidance": guidance},
                                    source=tag)
        was = model.training
        model.eval()
        grid = self.out / samples_file(self.step, tag)
        metrics = evaluate(model, self.data, self.schedule, recipe, self.evaluator, grid=grid)
        model.train(was)
        record = {"step": self.step, "sampler": tag, **metrics}
        self.result.history.append(record)
        self.say("eval " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in record.items()))
        return record

    def baseline(self) -> None:
        """The starting model, sampled with its own DDIM sampler and in one step."""
        ev = self.base.eval
        self.evaluate_with(self.G, ev.sample_steps, ev.guidance, f"ddim-{ev.sample_steps}")
        self.evaluate_with(self.G, 1, 1.0, "1-step")

    # -- the loop ------------------------------------------------------------------------------

    def losses(self, g: torch.Generator, x0, context) -> tuple:
        """This rank's share of the reconstruction loss, and real and fake at t' for D."""
        r, size, mine = self.recipe, self.recipe.batch_size, my_slice(self.recipe.batch_size)
        times = torch.tensor(r.timesteps)
        t = times[torch.randint(len(times), (size,), generator=g)][mine]
        t_prev = (t - r.gap).clamp_(min=0)
        # drawn on the CPU from the step's generator for the whole batch, so a run is the same
        # on any device and over any number of workers
        noise, noise_real, noise_fake = (
            torch.randn((size, *x0.shape[1:]), generator=g)[mine].to(self.device)
            for _ in range(3))
        t, t_prev = t.to(self.device), t_prev.to(self.device)
        x_t = self.schedule.add_noise(x0, noise, t)
        with self.autocast:
            pred = self.G(x_t, t, context).float()
        fake_x0 = self.schedule.to_x0_eps(x_t, pred, t)[0]
        real = self.schedule.add_noise(x0, noise_real, t_prev)
        fake = self.schedule.add_noise(fake_x0, noise_fake, t_prev)
        if r.reconstruction == "diffusion":
            target = self.schedule.target(x0, noise, t)
        else:
            with torch.no_grad(), self.autocast:
                target = self.teacher(x_t, t, context)
        recon = F.mse_loss(pred, target.float()) * self.share
        return real, fake, t_prev, recon

    def run(self, steps: int | None = None, on_eval=None) -> TrialResult:
        r = self.recipe
        total = r.steps if steps is None else min(steps, r.steps)
        if self.lead:  # recipe.yaml: what the weights are (data, resolution, text encoder)
            atomic_write(self.out / RECIPE, yaml.safe_dump(self.base.to_dict(), sort_keys=False))
            atomic_write(self.out / UFOGEN_RECIPE,
                         yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))
        if self.tracker is not None:
            self.tracker.start_run(f"{self.init.name}-ufogen", {
                **flatten(self.recipe.to_dict(), "ufogen"), "init": str(self.init),
                **flatten(self.proxy.to_dict(), "proxy")},
                {"params": self.full.params, "gmacs": self.full.gmacs}, self.out)
        if not self.result.history and self.lead:
            self.baseline()
        self.G.train()
        self.D.train()
        g_losses, d_losses, last_log = [], [], time.time()
        while self.step < total:
            g = _step_generator(self.seed, self.step)
            idx = torch.randint(len(self.data.train), (r.batch_size,), generator=g)
            x0, captions = self.data.batch(idx[my_slice(r.batch_size)].tolist())
            x0, context = x0.to(self.device), self.data.context(captions).to(self.device)
            real, fake, t_prev, recon = self.losses(g, x0, context)
            for _ in range(r.d_updates):
                with self.autocast:
                    d_loss = (F.softplus(-self.D(real, t_prev, context).float()).mean()
                              + F.softplus(self.D(fake.detach(), t_prev, context).float()).mean())
                d_value = self.descend(d_loss * self.share, self.opt_d, self.D.parameters())
                if not math.isfinite(d_value):
                    return self.fail(f"non-finite discriminator loss ({d_value}) at step "
                                     f"{self.step + 1}")
            self.D.requires_grad_(False)
            with self.autocast:
                adv = F.softplus(-self.D(fake, t_prev, context).float()).mean() * self.share
            self.D.requires_grad_(True)
            g_loss = r.adv_weight * adv + r.recon_weight * recon
            g_value = self.descend(g_loss, self.opt_g, self.g_params)
            if not math.isfinite(g_value):
                return self.fail(f"non-finite generator loss ({g_value}) at step "
                                 f"{self.step + 1}")
            if r.reconstruction == "ema_distill":
                with torch.no_grad():
                    for e, p in zip(self.teacher.parameters(), self.G.parameters()):
                        e.lerp_(p, 1 - r.ema_distill_decay)
            g_losses.append(g_value)
            d_losses.append(d_value)
            self.step += 1
            self.result.steps = self.step
            if self.step % r.log_every == 0 or self.step == total:
                rate = len(g_losses) / max(time.time() - last_log, 1e-9)
                last_log = time.time()
                means = {"g_loss": sum(g_losses) / len(g_losses),
                         "d_loss": sum(d_losses) / len(d_losses)}
                self.say(f"step {self.step}/{total}  g_loss {means['g_loss']:.4f}"
                         f"  d_loss {means['d_loss']:.4f}  {rate:.2f} steps/s")
                if self.tracker is not None:
                    self.tracker.log_metrics(means, self.step)
                g_losses, d_losses = [], []
            record = None
            if self.lead and (self.step % r.eval.every == 0 or self.step == total):
                records = {n: self.evaluate_with(self.G, n, 1.0,
                                                 "1-step" if n == 1 else f"ddim-{n}")
                           for n in r.eval.steps}
                record = records[1]
                if self.tracker is not None:  # ddim-N's metrics as ddimN_<metric>
                    self.tracker.log_metrics({("" if n == 1 else f"ddim{n}_") + k: v
                                              for n, rec in records.items()
                                              for k, v in rec.items()
                                              if isinstance(v, (int, float)) and k != "step"},
                                             self.step)
            if self.lead and (record is not None or self.step % r.checkpoint_every == 0
                              or self.step == total):
                self.save()  # at every evaluation too: a sweep reports it with its checkpoint
            if record is not None and on_eval is not None:
                on_eval(record)
        self.result.metrics = _last_one_step(self.result.history)
        return self.finish()


def _last_one_step(history: list[dict]) -> dict:
    for record in reversed(history):
        if record.get("sampler") == "1-step":
            return {k: v for k, v in record.items() if k not in ("step", "sampler")}
    return {}


def ufogen_trial(init_dir: str | Path, recipe: UFOGenRecipe, out_dir: str | Path, *,
                 steps: int | None = None, seed: int | None = None,
                 progress: Callable[[str], None] | None = None, on_eval=None,
                 evaluator=None, tracker=None, device=None) -> TrialResult:
    """Fine-tune the run in `init_dir` into a one-step generator per `recipe`, in `out_dir`
    (resumed from its checkpoint if there is one). `steps` stops early. Data parallel when
    torch.distributed is initialised (mdsearch.train.gan); rank 0 holds the directory."""
    check_out_dir(out_dir)
    with lead_locked(out_dir, f"UFOGen fine-tuning of {init_dir}"):
        run = UFOGen(init_dir, recipe, out_dir, seed=seed, progress=progress, evaluator=evaluator,
                     tracker=tracker, device=device)
        return run.run(steps, on_eval)
