"""What several test modules share: tiny recipes and spaces, a cheap evaluator, small readers.
Test modules import from here, never from each other."""

import sys
from pathlib import Path

import torch
import yaml

from mdsearch.arch import presets
from mdsearch.rundir import CHECKPOINT
from mdsearch.train.recipe import Recipe

TINY_FIELDS = {"head_dim": 16, "norm_groups": 8, "context_dim": 32, "context_len": 8,
               "time_freq_dim": 32, "time_embed_dim": 64}


def tiny(name: str, **overrides):
    """A preset's topology at a width small enough to run real tensors on 2 CPU cores."""
    widths = {"sd15": (32, 64, 64, 64), "sdxl": (32, 64, 64)}.get(name, (32, 64, 64))
    fields = {**TINY_FIELDS, **{f"levels.{i}.channels": c for i, c in enumerate(widths)}}
    if name == "sdxl":
        fields.update(micro_cond_dim=8, pooled_dim=16, **{"levels.2.down.layers": 2,
                                                          "levels.2.up.layers": 2,
                                                          "mid_layers": 2})
    if name == "sd15":
        fields.update(num_heads=4, head_dim=None)
    fields.update(overrides)
    return presets.get(name, fields)


# a recipe that trains a real md proxy in a second or two
TINY = {
    "name": "test", "data": {"kind": "synthetic", "size": 64, "eval_size": 32, "seed": 0},
    "text_encoder": {"name": "minilm", "max_length": 8}, "resolution": 16, "width": 0.0625,
    "batch_size": 4, "steps": 6, "ema_decay": 0.9, "checkpoint_every": 3, "log_every": 1,
    "eval": {"every": 3, "sample_steps": 2, "prompts": 8, "reference_images": 32},
    "optimizer": {"lr": 1e-3, "warmup_steps": 2},
}
# a stack of seeds matches each seed alone to float rounding (the stacked convolutions sum in
# another order)
RTOL, ATOL = 2e-4, 1e-6


def tiny_recipe(**overrides) -> Recipe:
    recipe = Recipe.from_dict(TINY, "tiny")
    return recipe.override(overrides) if overrides else recipe


class ImageStats:
    """A cheap stand-in for the quality evaluator, for tests of the loop itself: it reports
    statistics of the sampled images, so the history still depends on the trained weights."""

    def evaluate(self, images, captions, labels):
        return {"sample_mean": images.mean().item(), "sample_std": images.std().item()}


def weights(out_dir):
    return torch.load(Path(out_dir) / CHECKPOINT, weights_only=True)["model"]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# a sweep's trial recipe and a two-dimension space around md for it
SWEEP_RECIPE = {
    "name": "tiny", "data": {"kind": "synthetic", "size": 64, "eval_size": 32, "seed": 0},
    "text_encoder": {"name": "minilm", "max_length": 8}, "resolution": 16, "width": 0.0625,
    "batch_size": 4, "steps": 6, "ema_decay": 0.9, "checkpoint_every": 3, "log_every": 3,
    "eval": {"every": 3, "sample_steps": 2, "prompts": 8, "reference_images": 32},
    "optimizer": {"lr": 1e-3, "warmup_steps": 2}, "resources": {"cpu": 1, "gpu": 0},
}
SWEEP_SPACE = {
    "name": "tiny_space", "base": "md",
    "dimensions": {
        "inner_channels": {"field": "levels.2.channels", "values": [512, 640, 1280]},
        "inner_layers": {"fields": ["levels.2.down.layers", "levels.2.up.layers"],
                         "values": [1, 2]},
    },
    # 1280 channels (310M and up) is over this budget; 512 and 640 at 1, 2 or 3 layers fit
    "constraints": {"resolution": 512, "max_params": "210M"},
    "objectives": [{"fid_proxy": "min"}],
    "search": {"algorithm": "tpe", "num_samples": 2, "seed": 0, "max_concurrent": 2},
}


def trained(table):
    """A results table's trained rows (the filtered configurations left out)."""
    return table[table["status"] != "filtered"]


def sweep_cmd(space_file, recipe_file, storage, *extra, name="killed"):
    """`mdsearch sweep` as a command line, for the tests that kill or resume its process."""
    return [sys.executable, "-m", "mdsearch.cli", "sweep", str(space_file), "--trial",
            str(recipe_file), "--name", name, "--storage", str(storage), "--no-mlflow", *extra]


# a UFOGen fine-tune of the tiny md run, a few steps
UFO = {"name": "ufo-test", "steps": 4, "batch_size": 4, "eval": {"every": 2, "prompts": 8},
       "checkpoint_every": 2, "log_every": 1, "lr_g": 1e-3, "lr_d": 1e-3,
       "timesteps": [999, 500]}


def ufogen_recipe(**changes):
    from mdsearch.train.ufogen import UFOGenRecipe

    return UFOGenRecipe.from_dict({**UFO, **changes}, "test")


# a tiny autoencoder recipe
VAE_TINY = {"name": "vae-test", "data": {"kind": "synthetic", "size": 200, "eval_size": 40},
        "resolution": 32,
        "arch": {"latent_channels": 4, "widths": [8, 8, 16, 16], "layers": 1, "norm_groups": 4},
        "steps": 4, "batch_size": 4, "lr": 1e-3, "lr_d": 1e-3,
        "loss": {"kl_weight": 1e-4, "adv_weight": 0.5, "adv_start": 2},
        "discriminator": {"width": 8, "layers": 2}, "eval": {"every": 2, "images": 8, "grid": 4},
        "checkpoint_every": 2, "log_every": 1}


class VaeStats:
    """A cheap stand-in for the classifier-based sample metrics."""

    def evaluate(self, images, captions):
        return {"fid_proxy": float(images.mean()), "align": 0.5}


def vae_recipe(**changes):
    from mdsearch.train.vae import VAERecipe

    return VAERecipe.from_dict({**VAE_TINY, **changes}, "test")


# where a made-up latency table says it was timed
WHERE = ("onnxruntime-cpu", "0.0-test", "test cpu", 1)


def fake_table(path, specs, terms=None, resolution=64, ms=lambda u: 1.0 + int(u.key[:2], 16) / 64):
    """A latency table for `specs` with made-up entries (no timing) and given fitted terms."""
    from mdsearch.arch import latency
    from mdsearch.arch.latency import Measurement, Row

    rows = []
    for unit in latency.distinct(latency.units(s, resolution) for s in specs):
        value = ms(unit)
        rows.append(Row(unit.key, unit.kind, unit.label, latency.shapes_text(unit.inputs), value,
                        0.9 * value, 1.1 * value, *WHERE))
    latency.write_rows(path, rows)
    fitted = latency.Fit({"graph_ms": 0.0, "per_unit_ms": 0.0, "scale": 0.0, **(terms or {})},
                         [Measurement("m", 1.0, 1.0, 1)], resolution, WHERE)
    latency.fit_path(path).write_text(fitted.to_json())
    return path
