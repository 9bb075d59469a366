"""Trial recipes: how one candidate is trained and judged, as data (`trials/*.yaml`).

A recipe names the data, the frozen text encoder, the autoencoder, how the full-size spec is shrunk
for the proxy (a width multiplier; topology unchanged) and at which resolution it trains, the
optimiser and schedule, and how often and how thoroughly the candidate is evaluated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import config
from ..paths import TRIALS
from .diffusion import SCHEDULES


class RecipeError(config.ConfigError):
    """A malformed trial recipe."""


@dataclass
class Optimizer:
    """AdamW, as the paper trains (lr 1e-3, betas 0.9/0.999, weight decay 0.01)."""

    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    warmup_steps: int = 0  # linear warm-up from 0 to lr
    grad_clip: float = 1.0  # max global gradient norm (0 = off)


@dataclass
class Evaluation:
    every: int = 1000  # steps between evaluations (and always at the last step)
    sample_steps: int = 20  # DDIM steps
    guidance: float = 3.0  # classifier-free guidance scale (the paper: ~3)
    prompts: int = 72  # generated images per evaluation (the fixed prompt set, cycled)
    reference_images: int = 512  # real images for the FID reference statistics
    inception_path: str | None = None  # local FID Inception weights -> `fid` (else `fid_proxy`)
    clip_path: str | None = None  # local CLIP for CLIPScore -> `clip_score`


@dataclass
class Recipe:
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
    checkpoint_every: int = 1000
    log_every: int = 50
    seed: int = 0
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})

    def validate(self, source: str) -> None:
        def fail(where, reason):
            raise RecipeError(f"{source}: field {where}: {reason}")

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
        if self.eval.every < 1 or self.eval.prompts < 2 or self.eval.sample_steps < 1:
            fail("eval", "every and sample_steps must be >= 1, prompts >= 2")
        if "kind" not in self.data:
            fail("data.kind", "missing (synthetic, folder or coco)")

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, overrides: dict[str, Any], source: str = "overrides") -> "Recipe":
        data = self.to_dict()
        for key, value in overrides.items():
            config.set_path(data, key, value, source, error=RecipeError)
        return Recipe.from_dict(data, f"{self.name} + {source}")

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "Recipe":
        recipe = config.from_dict(cls, data, source, error=RecipeError)
        recipe.validate(source)
        return recipe


def load_recipe(path_or_name: str | Path) -> Recipe:
    """A recipe file, or the name of one in trials/ (`cpu_quick` -> trials/cpu_quick.yaml)."""
    path = config.named_file(path_or_name, TRIALS)
    data = config.load_yaml(path, error=RecipeError)
    return Recipe.from_dict(data, source=str(path))
