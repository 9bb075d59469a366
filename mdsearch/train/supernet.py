"""Training the elastic supernet of a search space (issue 27): one set of weights in which
every configuration of the space is a sub-network (`mdsearch.arch.supernet`), trained by the
sandwich rule (BigNAS): at every step the largest configuration, the smallest, and `random`
others drawn from (seed, step), each on the same batch, their diffusion losses averaged (or by
the uniform rule: `random` configurations drawn, nothing fixed).

    run = SupernetTraining(space, recipe, "runs/qs-supernet", random=2)
    run.run()                    # resumes from runs/qs-supernet/supernet.pt if it is there
    model = run.extract(spec)    # a configuration's UNet with its trained (EMA) weights

Everything a step draws (the batch's items, caption dropout, timesteps, noise and the random
configurations) comes from a generator seeded by (seed, step), so a run killed after any
checkpoint and started again equals the uninterrupted run bit for bit. The checkpoint
(`supernet.pt`, weights only, written atomically) holds the supernet spec, the configurations
(as the space's points), the recipe, the weights, the EMA, the optimiser and the step.

Scoring is `score` / `score_one` (and `mdsearch sweep SPACE --supernet DIR`, which calls them
per trial); `write_run` turns a slice into a run directory. Not yet: evaluation during
training, data-parallel workers, stages.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..arch.cost import cost
from ..arch.proxy import proxy_spec
from ..arch.spec import ArchSpec
from ..arch.supernet import build_supernet, extract, run_subnet, sub_model, supernet_spec
from ..data.pipeline import DataPipeline
from ..progress import quiet
from ..rundir import SPACE, atomic_path, atomic_write
from ..track import flatten
from .checkpoint import RESUMED, read_checkpoint
from .diffusion import NoiseSchedule
from .heldout import EvalBank, heldout_metrics
from .recipe import Recipe
from .trainer import EMA, TrainError, _step_generator, lr_factor

SUPERNET_CHECKPOINT = "supernet.pt"
SUPERNET_SPEC = "supernet_spec.yaml"


def configurations(space) -> list[tuple[dict, ArchSpec]]:
    """Every valid configuration of a space: (point, full-size spec)."""
    out = space.valid_points()
    if not out:
        raise TrainError(f"{space.source}: no valid configuration to build a supernet of")
    return out


def read_supernet(folder: str | Path, space) -> tuple[dict, Recipe]:
    """A supernet folder's checkpoint and recipe, once checked to hold exactly `space`'s
    configurations (else one line naming the folder)."""
    ckpt = Path(folder) / SUPERNET_CHECKPOINT
    if not ckpt.is_file():
        raise TrainError(f"{folder}: no {SUPERNET_CHECKPOINT} here; train one with mdsearch "
                         f"supernet train --space {space.name} --out {folder}")
    state = read_checkpoint(ckpt)
    if "supernet_spec" not in state:
        raise TrainError(f"{ckpt}: not a supernet checkpoint")
    points = [p for p, _ in configurations(space)]
    if json.loads(state["points"]) != json.loads(json.dumps(points)):
        raise TrainError(f"{ckpt}: a supernet of other configurations than those of "
                         f"{space.source}; give the space it was trained for")
    return state, Recipe.from_dict(json.loads(state["recipe"]), str(ckpt))


def open_supernet(folder: str | Path, space, progress=None) -> "SupernetTraining":
    """A trained supernet's folder, as it was trained: its recipe, seed and sandwich from the
    checkpoint; `space`: its space (FOLDER/space.yaml is a copy of it)."""
    state, recipe = read_supernet(folder, space)
    return SupernetTraining(space, recipe, folder, random=state["random"], seed=state["seed"],
                            rule=state.get("rule", "sandwich"), progress=progress)


_OPENED: dict[tuple, "SupernetTraining"] = {}


def open_cached(folder: str | Path, space) -> "SupernetTraining":
    """`open_supernet`, kept per process for as long as the checkpoint is unchanged (a sweep's
    trials on one worker score many slices of the same weights)."""
    ckpt = Path(folder) / SUPERNET_CHECKPOINT
    key = (str(ckpt.resolve()), ckpt.stat().st_mtime_ns if ckpt.is_file() else None)
    if key not in _OPENED:
        _OPENED.clear()
        _OPENED[key] = open_supernet(folder, space)
    return _OPENED[key]


def finetune_recipe(recipe: Recipe, steps: int) -> Recipe:
    """A supernet's recipe as a `steps`-step fine-tune of one configuration's slice: evaluated
    and checkpointed at its end, with at most a tenth of it as warm-up (the optimiser's moments
    start from zero)."""
    if steps < 1:
        raise TrainError(f"--finetune {steps}: give the fine-tune's steps (>= 1), or leave it out")
    return recipe.override({"steps": steps, "eval.every": steps, "checkpoint_every": steps,
                            "optimizer.warmup_steps": min(recipe.optimizer.warmup_steps,
                                                          steps // 10)},
                           source=f"--finetune {steps}")


def write_run(shared: "SupernetTraining", spec: ArchSpec, out_dir: str | Path) -> Path:
    """A configuration's slice (its EMA weights) written as a run directory at step 0 of the
    supernet's recipe, in the format `mdsearch train` writes: `mdsearch export --checkpoint`
    exports it, and `mdsearch train --out` on it trains on from the slice."""
    import yaml

    from ..rundir import RECIPE, check_out_dir, locked
    from .trainer import Training

    check_out_dir(out_dir)
    with locked(out_dir, f"writing {spec.name}"):
        run = Training(spec, shared.recipe, out_dir)
        if run.step:
            raise TrainError(f"{run.ckpt_path}: a run that has trained already; write the slice "
                             "into a new folder")
        run.start_from(shared.slice_of(spec).state_dict())
        atomic_write(run.out / RECIPE, yaml.safe_dump(shared.recipe.to_dict(), sort_keys=False))
        run.save(run.attention[0])
    return run.ckpt_path


def check_recipe(recipe: Recipe) -> None:
    """What the supernet loop does not do yet, refused in one line each."""
    refusals = [(len(recipe.plan()) > 1, "stages", "one stage"),
                (recipe.seeds > 1, "seeds", "1"), (recipe.workers > 1, "workers", "1"),
                (recipe.accumulate > 1, "accumulate", "1"),
                (bool(recipe.teacher.run), "teacher", "none")]
    for bad, field, allowed in refusals:
        if bad:
            raise TrainError(f"{recipe.name}: field {field}: supernet training takes {allowed} "
                             "(not supported yet)")


RULES = ("sandwich", "uniform")
"""How a step picks its configurations: `sandwich` (BigNAS): the largest, the smallest and
`random` others; `uniform`: `random` configurations, each equally likely (every configuration's
slices trained equally often on average)."""


class SupernetTraining:
    def __init__(self, space, recipe: Recipe, out_dir: str | Path, *, random: int = 2,
                 seed: int | None = None, rule: str = "sandwich", progress=None, tracker=None):
        check_recipe(recipe)
        if rule not in RULES:
            raise TrainError(f"--rule {rule}: one of {', '.join(RULES)}")
        if random < (1 if rule == "uniform" else 0):
            raise TrainError(f"--random {random}: the random configurations per step must be "
                             + (">= 1 with --rule uniform" if rule == "uniform" else ">= 0"))
        self.space, self.recipe, self.out = space, recipe, Path(out_dir)
        self.seed = recipe.seed if seed is None else seed
        self.random, self.rule, self.say = random, rule, progress or quiet
        self.tracker = tracker  # an MLflowTracker (mdsearch.track): params, losses, the spec
        self.data = DataPipeline(recipe.data, recipe.text_encoder, recipe.autoencoder,
                                 recipe.resolution, recipe.eval.prompts, recipe.eval.bank)
        self.points, self.specs = [], []
        for point, spec in configurations(space):
            self.points.append(point)
            self.specs.append(self.proxy(spec))
        self.spec = supernet_spec(self.specs)  # refuses what slicing cannot hold, by field
        size = [sum(p.numel() for p in sub_model(s).parameters()) for s in self.specs]
        self.largest = max(range(len(size)), key=size.__getitem__)
        self.smallest = min(range(len(size)), key=size.__getitem__)
        torch.manual_seed(self.seed)
        self.net = build_supernet(self.spec)
        self.ema = EMA(self.net, recipe.ema_decay)
        opt = recipe.optimizer
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=opt.lr,
                                           betas=tuple(opt.betas), weight_decay=opt.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, opt.warmup_steps, recipe.steps, opt.anneal))
        self.schedule = NoiseSchedule(kind=recipe.noise_schedule, prediction=recipe.prediction)
        self.step, self.losses, self.seconds = 0, [], 0.0  # seconds: training, all sessions
        self.ckpt = self.out / SUPERNET_CHECKPOINT
        if self.ckpt.exists():
            self.load()

    def proxy(self, spec: ArchSpec) -> ArchSpec:
        """A full-size spec as this supernet's recipe trains it (its width and conditioning)."""
        d = self.data
        return proxy_spec(spec, self.recipe.width, d.autoencoder.channels, d.encoder.dim,
                          d.encoder.max_length)

    @property
    def per_step(self) -> int:
        """Configurations trained per step."""
        return self.random + (2 if self.rule == "sandwich" else 0)

    def step_configurations(self, g: torch.Generator) -> list[int]:
        """A step's configurations (indices): the sandwich's largest and smallest, then
        `random` drawn uniformly."""
        chosen = [self.largest, self.smallest] if self.rule == "sandwich" else []
        if self.random:
            chosen += torch.randint(len(self.specs), (self.random,), generator=g).tolist()
        return chosen

    def run(self, steps: int | None = None) -> dict:
        """Train to the recipe's steps (or stop at `steps`); a checkpoint every
        `checkpoint_every` steps and at the end."""
        recipe, data, size = self.recipe, self.data, self.recipe.batch_size
        end = min(steps or recipe.steps, recipe.steps)
        self.out.mkdir(parents=True, exist_ok=True)
        self.say(f"supernet of {len(self.specs)} configurations of {self.space.name}: "
                 f"{sum(p.numel() for p in self.net.parameters()) / 1e6:.2f}M shared weights; "
                 + (f"per step the largest, the smallest and {self.random} random"
                    if self.rule == "sandwich" else f"per step {self.random} at random")
                 + "; steps "
                 f"{self.step}-{end}")
        self.save_spec()
        if self.tracker is not None:  # a resumed folder continues its MLflow run
            if self.tracker.start_run(f"supernet-{self.space.name}", {
                    **flatten(self.recipe.to_dict(), "recipe"), "rule": self.rule,
                    "random": self.random, "seed": self.seed, "space": self.space.name,
                    "configurations": len(self.specs)},
                    {"shared_params": sum(p.numel() for p in self.net.parameters())}, self.out):
                self.tracker.log_artifact(self.out / SUPERNET_SPEC)
        subs = {}
        last = started = time.time()
        before = self.seconds
        while self.step < end:
            g = _step_generator(self.seed, self.step)
            idx = torch.randint(len(data.train), (size,), generator=g)
            drop = torch.rand(size, generator=g) < recipe.caption_dropout
            t = torch.randint(0, self.schedule.steps, (size,), generator=g)
            noise = torch.randn(data.latent_shape(size), generator=g)
            chosen = self.step_configurations(g)
            latents, captions = data.batch(idx.tolist())
            context = data.context(["" if d else c for c, d in zip(captions, drop.tolist())])
            noisy = self.schedule.add_noise(latents, noise, t)
            target = self.schedule.target(latents, noise, t)
            self.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for k in chosen:
                sub = subs.setdefault(k, sub_model(self.specs[k]))
                pred = run_subnet(self.net, self.specs[k], noisy, t, context, sub=sub)
                loss = F.mse_loss(pred.float(), target) / len(chosen)
                loss.backward()
                total += loss.item()
            if not torch.isfinite(torch.tensor(total)):
                raise TrainError(f"supernet training diverged at step {self.step} (loss "
                                 f"{total}); the checkpoint at {self.ckpt} is the last good "
                                 "state: lower the optimizer's lr")
            if recipe.optimizer.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.net.parameters(), recipe.optimizer.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.ema.update(self.net)
            self.losses.append(total)
            self.step += 1
            self.seconds = before + time.time() - started
            if self.step % recipe.log_every == 0 or self.step == end:
                recent = self.losses[-recipe.log_every:]
                rate = len(recent) / max(time.time() - last, 1e-9)
                last = time.time()
                self.say(f"step {self.step}/{end}  loss {sum(recent) / len(recent):.4f}  "
                         f"{rate:.2f} steps/s  eta {(end - self.step) / max(rate, 1e-9):.0f}s")
                if self.tracker is not None:
                    self.tracker.log_metrics({"loss": sum(recent) / len(recent),
                                              "steps_per_s": rate,
                                              "lr": self.scheduler.get_last_lr()[0]}, self.step)
            if self.step % recipe.checkpoint_every == 0 or self.step == end:
                self.save()
        if self.tracker is not None:
            self.tracker.log_metrics({"seconds": self.seconds}, self.step)
            self.tracker.writer.finish(self.tracker.run_id, True,
                                       status="finished" if self.step >= self.recipe.steps
                                       else f"stopped at step {self.step}")
        return {"steps": self.step, "configurations": len(self.specs),
                "loss": self.losses[-1] if self.losses else None, "checkpoint": str(self.ckpt),
                "seconds": round(self.seconds, 1)}

    def save_spec(self) -> None:
        """The supernet's spec and a copy of its space (`score DIR` reads it) in its folder."""
        atomic_write(self.out / SUPERNET_SPEC, self.spec.to_yaml())
        source = Path(self.space.source)
        if source.is_file() and not (self.out / SPACE).exists():
            atomic_write(self.out / SPACE, source.read_text())

    def save(self) -> None:
        with atomic_path(self.ckpt) as tmp:
            torch.save({"model": self.net.state_dict(), "ema": self.ema.model.state_dict(),
                        "ema_updates": self.ema.updates,
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "step": self.step,
                        "seed": self.seed, "random": self.random, "rule": self.rule,
                        "seconds": self.seconds,
                        "losses": json.dumps(self.losses),
                        "supernet_spec": json.dumps(self.spec.to_dict()),
                        "points": json.dumps(self.points),
                        "recipe": json.dumps(self.recipe.to_dict())}, tmp)

    def load(self) -> None:
        state = read_checkpoint(self.ckpt, RESUMED)
        saved = ArchSpec.from_dict(json.loads(state["supernet_spec"]), str(self.ckpt))
        if saved != self.spec or json.loads(state["points"]) != self.points:
            raise TrainError(f"{self.ckpt}: a supernet of other configurations than this "
                             "space's; train into a new --out")
        saved = (state["seed"], state["random"], state.get("rule", "sandwich"))
        if saved != (self.seed, self.random, self.rule):
            raise TrainError(f"{self.ckpt}: trained with seed {saved[0]}, {saved[1]} random "
                             f"configurations per step and rule {saved[2]}; resume with the "
                             "same, or train into a new --out")
        self.net.load_state_dict(state["model"])
        self.ema.model.load_state_dict(state["ema"])
        self.ema.updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.losses = state["step"], json.loads(state["losses"])
        self.seconds = float(state.get("seconds", 0.0))
        self.say(f"resuming {self.ckpt} at step {self.step}")

    def score(self, configs: list[tuple[dict, ArchSpec]] | None = None,
              progress=None) -> list[dict]:
        """Configurations scored on the recipe's held-out bank (`score_one`), beside their
        full-size params and GMACs at 512 px: one record each. `configs`: (label fields,
        full-size spec) pairs; default every configuration of the space (labelled by its
        point). A spec that is not a sub-network is a SupernetError."""
        say = progress or quiet
        if configs is None:
            configs = [(p, self.space.spec_for(p)) for p in self.points]
        records = []
        for n, (label, spec) in enumerate(configs, 1):
            full = cost(spec, 512)
            metrics = self.score_one(spec)
            records.append({**label, "params": full.params, "gmacs": round(full.gmacs, 3),
                            **metrics, "supernet_step": self.step})
            say(f"[{n}/{len(configs)}] {label}: text_gain {metrics['text_gain']:.4g}, "
                f"val_loss_mid {metrics['val_loss_mid']:.4g}")
        return records

    def score_one(self, spec: ArchSpec) -> dict[str, float]:
        """A full-size spec's slice of the EMA weights on the recipe's held-out bank:
        `val_loss`, its bands, `text_gain` (the same items, timesteps and noise for every
        configuration, and as a trained trial of this recipe is evaluated)."""
        if not self.recipe.eval.bank:
            raise TrainError(f"{self.recipe.name}: field eval.bank: 0; scoring needs the "
                             "held-out bank")
        if self.data.bank is None:
            self.data.bank = EvalBank(self.data, self.recipe.eval.bank, self.schedule.steps)
        with torch.no_grad():
            return heldout_metrics(self.slice_of(spec), self.data.bank, self.schedule)

    def extract(self, spec: ArchSpec, ema: bool = True):
        """A configuration (a proxy spec of this supernet) as a plain UNet with its trained
        weights (the EMA's by default)."""
        return extract(self.ema.model if ema else self.net, spec)

    def slice_of(self, spec: ArchSpec):
        """A full-size spec's configuration as this supernet trains it (its proxy), as a plain
        UNet with the EMA weights: what is scored, fine-tuned from and written as a run."""
        return self.extract(self.proxy(spec))
