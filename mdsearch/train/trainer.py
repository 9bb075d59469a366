"""One candidate, trained and judged: the proxy training loop behind every trial.

    result = train_trial(presets.get("md"), load_recipe("cpu_quick"), out_dir="runs/md")

Costs come from the full-size spec at 512x512; quality from the proxy the recipe shrinks it to.
The loop is deterministic by seed on the CPU: every step draws its batch, timesteps, noise and
caption dropout from a generator seeded by (seed, step), so a run resumed from a checkpoint
replays exactly the steps an uninterrupted run would have taken. A non-finite loss ends the trial
with status "failed" and the reason; it never raises into the caller.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..arch.cost import cost
from ..arch.proxy import proxy_spec
from ..arch.spec import ArchSpec
from ..arch.unet import build
from ..data import make_dataset
from ..data.autoencoder import make_autoencoder
from ..data.errors import DataError
from ..data.text import cached_embeddings, get_text_encoder
from .diffusion import NoiseSchedule, ddim_sample
from .recipe import Recipe

CHECKPOINT = "checkpoint.pt"


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

    def to_dict(self) -> dict:
        return asdict(self)


class DataPipeline:
    """Dataset, frozen text embeddings, autoencoder, and the fixed evaluation set of a recipe."""

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.autoencoder = make_autoencoder(recipe.autoencoder)
        if recipe.resolution % self.autoencoder.factor:
            raise DataError(f"resolution {recipe.resolution} is not divisible by the "
                            f"autoencoder's factor {self.autoencoder.factor}")
        self.latent_size = recipe.resolution // self.autoencoder.factor
        self.train = make_dataset(recipe.data, recipe.resolution, "train")
        self.val = make_dataset(recipe.data, recipe.resolution, "val")
        encoder_cfg = dict(recipe.text_encoder)
        self.encoder = get_text_encoder(**encoder_cfg)
        self.prompts, self.prompt_labels = self._eval_prompts()
        self.embeddings = cached_embeddings(
            self.encoder, list(self.train.captions()) + self.prompts)
        self.null_context = self.embeddings.null.tokens

    def _eval_prompts(self):
        n = self.recipe.eval.prompts
        if self.recipe.data["kind"] == "synthetic":
            from ..data.synthetic import eval_prompts

            pairs = eval_prompts()
            pairs = [pairs[i % len(pairs)] for i in range(n)]
            return [c for c, _ in pairs], torch.stack([lab for _, lab in pairs])
        captions = list(self.val.captions())
        return [captions[i % len(captions)] for i in range(n)], None

    def context(self, captions: list[str]) -> torch.Tensor:
        return self.embeddings.lookup(captions).tokens

    def batch(self, generator: torch.Generator, size: int):
        """A random training batch: latents and captions."""
        idx = torch.randint(len(self.train), (size,), generator=generator).tolist()
        items = [self.train[i] for i in idx]
        images = torch.stack([item["image"] for item in items])
        return self.autoencoder.encode(images), [item["caption"] for item in items]

    def reference_images(self, count: int) -> torch.Tensor:
        count = min(count, len(self.val))
        return torch.stack([self.val[i]["image"] for i in range(count)])


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


def _lr_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def train_trial(spec: ArchSpec, recipe: Recipe, out_dir: str | Path, *,
                steps: int | None = None, seed: int | None = None,
                progress: Callable[[str], None] | None = None,
                on_eval: Callable[[dict], None] | None = None,
                tracker=None, evaluator=None) -> TrialResult:
    """Train the proxy of `spec` per `recipe`, evaluating as it goes; resume from `out_dir`'s
    checkpoint if there is one. `on_eval(record)` is called after every evaluation (Ray Tune's
    report hook); `tracker` (see mdsearch.track) receives params, metrics and artifacts."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed = recipe.seed if seed is None else seed
    total = recipe.steps if steps is None else steps
    say = progress or (lambda msg: None)
    started = time.time()

    full = cost(spec, 512)
    data = DataPipeline(recipe)
    proxy = proxy_spec(spec, recipe.width, data.autoencoder.channels, data.encoder.dim,
                       data.encoder.max_length)
    (out / "spec.yaml").write_text(spec.to_yaml())
    (out / "proxy_spec.yaml").write_text(proxy.to_yaml())

    torch.manual_seed(seed)
    model = build(proxy)
    ema = EMA(model, recipe.ema_decay)
    opt = recipe.optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.betas),
                                  weight_decay=opt.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(opt.warmup_steps))
    schedule = NoiseSchedule(kind=recipe.noise_schedule, prediction=recipe.prediction)
    proxy_params = sum(p.numel() for p in model.parameters())

    result = TrialResult("ok", None, 0, 0.0, full.params, full.gmacs, proxy_params)
    start_step, elapsed_before = 0, 0.0
    ckpt_path = out / CHECKPOINT
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        ema.updates = state["ema_updates"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_step, elapsed_before = state["step"], state["seconds"]
        result.history = json.loads(state["history"])
        result.steps = start_step
        if result.history:
            result.metrics = {k: v for k, v in result.history[-1].items()
                              if k not in ("step", "loss")}
        say(f"resumed from {ckpt_path} at step {start_step}")

    if evaluator is None and total > start_step:
        evaluator = make_evaluator(recipe, data)
    if tracker is not None:
        tracker.start(spec, proxy, recipe, full, proxy_params, out)

    def save(step: int) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "ema": ema.model.state_dict(),
                    "ema_updates": ema.updates, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "step": step,
                    "seconds": elapsed_before + time.time() - started,
                    "history": json.dumps(result.history)}, tmp)
        tmp.replace(ckpt_path)  # atomic: a kill mid-save never leaves a torn checkpoint

    model.train()
    losses: list[float] = []
    last_log = time.time()
    for step in range(start_step, total):
        g = _step_generator(seed, step)
        latents, captions = data.batch(g, recipe.batch_size)
        drop = torch.rand(len(captions), generator=g) < recipe.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        t = torch.randint(0, schedule.steps, (len(captions),), generator=g)
        noise = torch.randn(latents.shape, generator=g)
        pred = model(schedule.add_noise(latents, noise, t), t, data.context(captions))
        loss = F.mse_loss(pred, schedule.target(latents, noise, t))
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            result.status = "failed"
            result.reason = f"non-finite loss ({loss_value}) at step {step + 1}"
            say(f"FAILED: {result.reason}")
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if opt.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
        optimizer.step()
        scheduler.step()
        ema.update(model)
        losses.append(loss_value)
        done = step + 1
        result.steps = done

        if done % recipe.log_every == 0 or done == total:
            rate = recipe.log_every / max(time.time() - last_log, 1e-9)
            last_log = time.time()
            eta = (total - done) / max(rate, 1e-9)
            recent = losses[-recipe.log_every:]
            say(f"step {done}/{total}  loss {sum(recent) / len(recent):.4f}  {rate:.2f} steps/s"
                f"  eta {eta:.0f}s")
            if tracker is not None:
                tracker.log_metrics({"loss": losses[-1]}, done)
        if done % recipe.eval.every == 0 or done == total:
            metrics = evaluate(ema.model, data, schedule, recipe, evaluator,
                               grid=out / f"samples_{done:06d}.png")
            record = {"step": done, "loss": sum(losses) / len(losses), **metrics}
            losses = []
            result.history.append(record)
            result.metrics = metrics
            say("eval " + "  ".join(f"{k} {v:.4g}" for k, v in record.items()
                                     if isinstance(v, (int, float))))
            if tracker is not None:
                tracker.log_metrics(record, done)
                tracker.log_artifact(out / f"samples_{done:06d}.png")
        if done % recipe.checkpoint_every == 0 or done == total:
            save(done)
        if on_eval is not None and result.history and result.history[-1]["step"] == done:
            on_eval(record)  # after the save, so a checkpoint reported with it is current

    result.seconds = elapsed_before + time.time() - started
    if tracker is not None:
        tracker.finish(result)
    return result


JUDGE_SEED = 0  # every trial, whatever its own seed, is judged by the same attribute classifier


def make_evaluator(recipe: Recipe, data: DataPipeline):
    from .metrics import Evaluator

    return Evaluator(recipe.resolution, data.reference_images(recipe.eval.reference_images),
                     inception_path=recipe.eval.inception_path, clip_path=recipe.eval.clip_path,
                     seed=JUDGE_SEED)


@torch.no_grad()
def evaluate(model, data: DataPipeline, schedule: NoiseSchedule, recipe: Recipe, evaluator,
             grid: Path | None = None) -> dict[str, float]:
    """Sample the fixed prompts with DDIM + CFG (fixed noise) and score them."""
    from .metrics import save_grid

    ev = recipe.eval
    shape = (len(data.prompts), data.autoencoder.channels, data.latent_size, data.latent_size)
    latents = ddim_sample(model, schedule, data.context(data.prompts), data.null_context, shape,
                          steps=ev.sample_steps, guidance=ev.guidance,
                          generator=torch.Generator().manual_seed(12345),
                          clip_x0=1.0 if data.autoencoder.name == "identity" else None)
    images = data.autoencoder.decode(latents)
    if grid is not None:
        save_grid(images[:32], data.prompts[:32], grid)
    return evaluator.evaluate(images, data.prompts, data.prompt_labels)
