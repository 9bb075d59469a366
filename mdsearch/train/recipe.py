"""Trial recipes: how one candidate is trained and judged, as data (`trials/*.yaml`).

A recipe names the data, the frozen text encoder, the autoencoder, how the full-size spec is shrunk
for the proxy (a width multiplier; topology unchanged) and at which resolution it trains, the
optimiser and schedule, and how often and how thoroughly the candidate is evaluated.

Full training (trials/full.yaml) adds `stages`: consecutive phases of one run, each with its own
steps and, optionally, resolution, batch size and attention nonlinearity (the paper's 256 -> 512
progressive training, then the softmax -> relu fine-tune). Optimiser, schedule and EMA carry over
from stage to stage. A recipe without stages is one stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import config
from ..paths import TRIALS
from .diffusion import SCHEDULES


def _numbers(obj, prefix: str = ""):
    """(dotted field, value) of every number in a recipe dataclass, nested ones included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, f"{prefix}{f.name}.")
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if dataclasses.is_dataclass(item):
                    yield from _numbers(item, f"{prefix}{f.name}.{i}.")
                elif isinstance(item, (int, float)):
                    yield f"{prefix}{f.name}.{i}", item
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{f.name}", value


class RecipeError(config.ConfigError):
    """A malformed trial recipe."""


class RecipeData:
    """What every recipe dataclass (diffusion, UFOGen, autoencoder) does with its data: as a dict,
    changed by dotted fields, and built from a dict strictly and validated (`validate(source)`)."""

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, changes: dict[str, Any], source: str = "overrides"):
        data = self.to_dict()
        for key, value in changes.items():
            config.set_path(data, key, value, source, error=RecipeError)
        return type(self).from_dict(self.changed(data, changes), f"{self.name} + {source}")

    def changed(self, data: dict, changes: dict[str, Any]) -> dict:
        """The overridden data, adjusted where a change implies another (default: none)."""
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe"):
        recipe = config.from_dict(cls, data, source, error=RecipeError)
        recipe.validate(source)
        return recipe


# how a run is laid out over processes and machines, not what it trains: a checkpoint resumes
# under another layout (one process, or N data-parallel workers give the same steps)
LAYOUT_FIELDS = ("workers", "resources")


def same_recipe(saved: str | None, recipe: RecipeData) -> bool:
    """Whether a checkpoint's recipe (its JSON) is `recipe`, apart from the layout fields."""
    try:
        data = json.loads(saved) if saved else None
    except ValueError:
        return False
    if not isinstance(data, dict):
        return False
    ours = recipe.to_dict()
    return ({k: v for k, v in data.items() if k not in LAYOUT_FIELDS}
            == {k: v for k, v in ours.items() if k not in LAYOUT_FIELDS})


@dataclass
class Optimizer:
    """AdamW, as the paper trains (lr 1e-3, betas 0.9/0.999, weight decay 0.01)."""

    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    anneal: float = 0.0  # fraction of the run, at its end, over which lr decays linearly to 0


@dataclass
class Evaluation:
    every: int = 1000  # steps between evaluations (and always at the last step)
    sample_steps: int = 20  # DDIM steps
    guidance: float = 3.0  # classifier-free guidance scale (the paper: ~3)
    prompts: int = 72  # generated images per evaluation (the fixed prompt set, cycled)
    bank: int = 512  # held-out items of the val_loss / text_gain bank (0: none)
    sample_every: int = 1  # sampled metrics (fid_proxy, kid_proxy, align, grids) at every k-th
    #                        evaluation and at the last; the held-out bank at every evaluation
    reference_images: int = 512  # real images for the FID reference statistics
    inception_path: str | None = None  # local FID Inception weights -> `fid` (else `fid_proxy`)
    clip_path: str | None = None  # local CLIP for CLIPScore -> `clip_score`


@dataclass
class Teacher:
    """A trained run the candidate is measured against (the teacher-relative arm of the fidelity
    study, `mdsearch.train.teacher`): `teacher_gap` on the held-out bank and, with weight > 0,
    training toward the teacher's prediction (output distillation, as BK-SDM and KOALA distil)."""

    run: str | None = None  # a diffusion run directory (mdsearch train), on the same data
    weight: float = 0.0  # target = (1 - weight) * the true target + weight * the teacher's


@dataclass
class Stage:
    """One phase of a run. Unset fields take the recipe's top-level value."""

    name: str
    steps: int
    resolution: int | None = None
    batch_size: int | None = None
    attn_nonlinearity: str | None = None  # "relu": switch the attention, keep the weights


@dataclass
class PlannedStage:
    """A stage with every field resolved, and where it sits in the run: steps [start, end)."""

    name: str
    start: int
    end: int
    resolution: int
    batch_size: int
    attn_nonlinearity: str | None


DEVICES = ("auto", "cpu", "cuda")
MAX_SEEDS = 64
MAX_SEED = 2 ** 31  # a seed's per-step generators are derived from it (torch takes 64 bits)
PRECISIONS = ("fp32", "bf16")


@dataclass
class Recipe(RecipeData):
    name: str
    data: dict[str, Any] = field(default_factory=lambda: {"kind": "synthetic"})
    text_encoder: dict[str, Any] = field(default_factory=lambda: {"name": "minilm"})
    autoencoder: dict[str, Any] = field(default_factory=lambda: {"kind": "identity"})
    resolution: int = 256  # training image resolution
    width: float = 1.0  # proxy width multiplier applied to the full-size spec
    batch_size: int = 64
    steps: int = 30000
    optimizer: Optimizer = field(default_factory=Optimizer)
    ema_decay: float = 0.9999
    prediction: str = "epsilon"  # or "v"
    noise_schedule: str = "scaled_linear"  # SD's; or "linear" (DDPM's, for pixel space)
    caption_dropout: float = 0.1  # for classifier-free guidance
    eval: Evaluation = field(default_factory=Evaluation)
    teacher: Teacher = field(default_factory=Teacher)
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    # training seeds trained together as one stacked model (seed, seed + 1, ..., seed + K - 1;
    # mdsearch.arch.seeds): held-out metrics per seed, reported with their mean and standard error
    seeds: int = 1
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})  # per worker
    stages: list[Stage] = field(default_factory=list)
    workers: int = 1  # data-parallel workers (Ray Train); the batch is split between them
    # micro-batches per step: each worker's share of the batch runs as this many forward and
    # backward passes whose gradients add up (the paper's batch in less memory)
    accumulate: int = 1
    device: str = "auto"  # auto: the worker's GPU when it has one, else the CPU
    precision: str = "fp32"  # or bf16 (autocast of the forward pass)
    compile: bool = False  # torch.compile the training forward (falls back to eager, saying why)

    @property
    def final_resolution(self) -> int:
        return self.plan()[-1].resolution

    def plan(self) -> list[PlannedStage]:
        """The run as consecutive stages (one stage when the recipe has none)."""
        stages = self.stages or [Stage("train", self.steps)]
        planned, start = [], 0
        for st in stages:
            planned.append(PlannedStage(st.name, start, start + st.steps,
                                        st.resolution or self.resolution,
                                        st.batch_size or self.batch_size, st.attn_nonlinearity))
            start += st.steps
        return planned

    def validate(self, source: str) -> None:
        def fail(where, reason):
            raise RecipeError(f"{source}: field {where}: {reason}")

        for where, value in _numbers(self):
            if isinstance(value, float) and not math.isfinite(value):
                fail(where, f"must be a finite number, got {value}")
        for name in ("resolution", "batch_size", "steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                fail(name, f"must be positive, got {getattr(self, name)}")
        if not 0 < self.width <= 1:
            fail("width", f"must be in (0, 1], got {self.width}")
        if self.prediction not in ("epsilon", "v"):
            fail("prediction", f"{self.prediction!r} is not one of epsilon, v")
        if self.noise_schedule not in SCHEDULES:
            fail("noise_schedule", f"{self.noise_schedule!r} is not one of {', '.join(SCHEDULES)}")
        if not 0 <= self.caption_dropout < 1:
            fail("caption_dropout", f"must be in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.ema_decay < 1:
            fail("ema_decay", f"must be in [0, 1), got {self.ema_decay}")
        if len(self.optimizer.betas) != 2:
            fail("optimizer.betas", f"expected two values, got {self.optimizer.betas}")
        if self.optimizer.lr <= 0:
            fail("optimizer.lr", f"must be positive, got {self.optimizer.lr}")
        if not 0 <= self.optimizer.anneal <= 1:
            fail("optimizer.anneal", f"must be in [0, 1], got {self.optimizer.anneal}")
        if (self.eval.every < 1 or self.eval.prompts < 2 or self.eval.sample_steps < 1
                or self.eval.sample_every < 1):
            fail("eval", "every, sample_every and sample_steps must be >= 1, prompts >= 2")
        if self.eval.reference_images < 2:
            fail("eval.reference_images", "FID's reference statistics need at least 2 images, "
                                          f"got {self.eval.reference_images}")
        if self.eval.bank != 0 and self.eval.bank < 3:
            fail("eval.bank", f"0 (no held-out bank) or at least 3 items, got {self.eval.bank}")
        if not 0 <= self.teacher.weight <= 1:
            fail("teacher.weight", f"must be in [0, 1], got {self.teacher.weight}")
        if self.teacher.weight > 0 and not self.teacher.run:
            fail("teacher.weight", "distilling needs teacher.run (a trained run directory)")
        if self.teacher.run is not None and self.eval.bank == 0 and self.teacher.weight == 0:
            fail("teacher.run", "a teacher without eval.bank (teacher_gap) or teacher.weight "
                                "(distillation) is not used")
        if "kind" not in self.data:
            fail("data.kind", "missing (synthetic, folder or coco)")
        if self.workers < 1:
            fail("workers", f"must be positive, got {self.workers}")
        if not 0 <= self.seed < MAX_SEED:
            fail("seed", f"must be in 0..{MAX_SEED - 1}, got {self.seed}")
        if not 1 <= self.seeds <= MAX_SEEDS:
            fail("seeds", f"must be in 1..{MAX_SEEDS}, got {self.seeds}")
        if self.device not in DEVICES:
            fail("device", f"{self.device!r} is not one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            fail("precision", f"{self.precision!r} is not one of {', '.join(PRECISIONS)}")
        names = [st.name for st in self.stages]
        for i, st in enumerate(self.stages):
            if st.steps < 1:
                fail(f"stages.{i}.steps", f"must be positive, got {st.steps}")
            for key in ("resolution", "batch_size"):
                if getattr(st, key) is not None and getattr(st, key) < 1:
                    fail(f"stages.{i}.{key}", f"must be positive, got {getattr(st, key)}")
            if st.attn_nonlinearity not in (None, "softmax", "relu"):
                fail(f"stages.{i}.attn_nonlinearity",
                     f"{st.attn_nonlinearity!r} is not one of softmax, relu")
            if names.count(st.name) > 1:
                fail(f"stages.{i}.name", f"{st.name!r} is used by more than one stage")
        if self.stages and self.steps != sum(st.steps for st in self.stages):
            fail("steps", f"{self.steps} is not the sum of the stages' steps "
                          f"({sum(st.steps for st in self.stages)}); with stages, leave `steps` "
                          "out or change the stages' own steps (stages.N.steps)")
        if self.accumulate < 1:
            fail("accumulate", f"must be positive, got {self.accumulate}")
        for st in self.plan():
            where = f"stages ({st.name}).batch_size" if self.stages else "batch_size"
            if st.batch_size % self.workers:
                fail(where, f"{st.batch_size} does not split over {self.workers} workers")
            if st.batch_size // self.workers % self.accumulate:
                fail(where, f"{st.batch_size} over {self.workers} worker(s) is "
                            f"{st.batch_size // self.workers} per worker, which does not split "
                            f"into accumulate: {self.accumulate} equal micro-batches")

    def changed(self, data: dict, changes: dict[str, Any]) -> dict:
        if data["stages"] and "steps" not in changes:  # stage lengths changed: a new total
            data.pop("steps")
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "Recipe":
        if isinstance(data, dict) and data.get("stages") and "steps" not in data:
            data = {**data, "steps": sum(int(st.get("steps", 0)) for st in data["stages"]
                                         if isinstance(st, dict))}
        return super().from_dict(data, source)


def load_recipe(path_or_name: str | Path) -> Recipe:
    """A recipe file, or the name of one in trials/ (`cpu_quick` -> trials/cpu_quick.yaml)."""
    path = config.named_file(path_or_name, TRIALS)
    data = config.load_yaml(path, error=RecipeError)
    return Recipe.from_dict(data, source=str(path))
