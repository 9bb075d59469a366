"""Autoencoders for latent diffusion: the paper's section 3.5 VAE and its lightweight decoder.

    result = vae_train(load_vae_recipe("vae_cpu"), "runs/vae-c8")          # f=8, c=8 KL-VAE
    light = vae_train(load_vae_recipe("vae_light_cpu"), "runs/vae-c8-light",
                      init="runs/vae-c8")                                   # pruned decoder

The architecture is diffusers' `AutoencoderKL`, configured from the recipe's `arch` (latent
channels, block widths, layers per block; f = 2^(levels - 1)). A run directory is also a diffusers
model folder (config.json + weights, `save_pretrained`), so any recipe trains in its latent space
with `autoencoder: {kind: diffusers, path: RUN_DIR}`. Its `scaling_factor` is set, as SD's is, to
1 / std of the latents of training images, so the UNet sees unit-variance latents.

The loss of a batch x (images in [-1, 1]), with z ~ q(z | x) and x' = decoder(z):

    l2            sum over pixels of (x - x')^2, mean over the batch        (the paper's L2)
    kl            KL(q(z | x) || N(0, I)), summed over latent elements, mean over the batch
    perceptual    a user-given network's distance d(x, x') (`loss.perceptual_path`: a
                  `torch.export`ed program, e.g. LPIPS; none ships: nothing is downloaded)
    adversarial   hinge loss of a PatchGAN discriminator on x vs x' (from `loss.adv_start`),
                  weighted adaptively as in latent diffusion's autoencoder: by the ratio of the
                  reconstruction loss's and the adversarial loss's gradient norms at the decoder's
                  last layer, times `loss.adv_weight`
    G loss = l2 + perceptual_weight * perceptual + kl_weight * kl + adaptive * adversarial

The training log prints l2 per pixel and the KL term as the loss sums it (`kl_sum`, per image);
evaluations report `kl` per latent element (kl_sum / latent elements), so the two differ by the
latent's size (4 x 64 x 64 = 16384 at 512 px), not by a bug.

`train: decoder` is the paper's lightweight decoder: the encoder (and its quant conv) of the VAE in
`init` is copied and frozen, and a decoder with the widths and depth of `arch.decoder_widths` and
`arch.decoder_layers` is trained from scratch; the recipe drops the KL term and lowers the
adversarial weight (trials/vae_light_cpu.yaml). Such a run is saved as diffusers'
`AsymmetricAutoencoderKL` (an encoder and a decoder of different sizes). That class's decoder also
holds an image-conditioning encoder for inpainting, which decoding without an image never runs: it
is not trained, not counted in the decoder's cost, and not exported.

Evaluation reconstructs `eval.images` fixed held-out images from the posterior mean and reports
PSNR and SSIM (torchmetrics; images in [0, 1]) with their standard errors over the images,
`rfid_proxy` / `rkid_proxy` (FID / KID of the reconstructions against the originals on the
attribute classifier's features: not Inception FID, see `mdsearch.train.metrics`), `ralign`
(whether a reconstruction keeps the caption's attributes, by that classifier), and `kl` (nats per
latent element), with a grid of originals over reconstructions. Costs (`cost_of`) are counted like
the UNet's (`mdsearch.arch.cost`: MACs of every conv and matmul, on the meta device) at 512x512.

Runs are deterministic by seed on the CPU and resume exactly from their checkpoint (model,
discriminator, both optimisers, history); a non-finite loss ends the run as `failed`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from .. import config
from ..arch.cost import MacCounter
from ..paths import TRIALS
from ..progress import quiet
from ..track import flatten
from ..rundir import (CHECKPOINT, DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS, VAE_RECIPE,
                      atomic_path, atomic_write, check_out_dir, locked, samples_file)
from .gan import AdversarialRun
from .checkpoint import RESUMED, CheckpointError, read_checkpoint
from .recipe import RecipeData, RecipeError, same_recipe
from .trainer import TrialResult, _step_generator, lead_locked, my_slice, pick_device, world

TRAIN_PARTS = ("all", "decoder")
COST_RESOLUTION = 512  # encoder / decoder costs are of one 512x512 image, as the paper's Table 4


@dataclass
class VAEArch:
    latent_channels: int = 8  # c (the paper: 8; SD: 4; EMU: 16)
    widths: list[int] = field(default_factory=lambda: [128, 256, 512, 512])  # per level; f=2^(n-1)
    layers: int = 2  # resnet blocks per level (the decoder has one more, as in diffusers)
    norm_groups: int = 32
    mid_attention: bool = True  # self-attention in the middle block
    decoder_widths: list[int] | None = None  # the lightweight decoder's widths (train: decoder)
    decoder_layers: int | None = None  # and its depth


@dataclass
class Loss:
    kl_weight: float = 1e-6
    adv_weight: float = 0.5  # times the adaptive weight
    adv_start: int = 0  # first step with the adversarial term
    perceptual_weight: float = 0.0
    perceptual_path: str | None = None  # a torch.export'ed program: d(x, x') per image


@dataclass
class PatchGAN:
    width: int = 64  # first conv's channels; doubled per layer up to 8x
    layers: int = 3  # stride-2 convs (the receptive field of one logit grows with it)


@dataclass
class VAEEval:
    every: int = 500  # steps between evaluations (and always at the last step)
    images: int = 256  # fixed held-out images reconstructed per evaluation
    grid: int = 16  # of which shown in the reconstruction grid


@dataclass
class VAERecipe(RecipeData):
    name: str
    kind: str = "vae"
    data: dict[str, Any] = field(default_factory=lambda: {"kind": "synthetic"})
    resolution: int = 64
    arch: VAEArch = field(default_factory=VAEArch)
    train: str = "all"  # all | decoder (the lightweight decoder, the encoder of --init frozen)
    steps: int = 2000
    batch_size: int = 16
    accumulate: int = 1  # micro-batches per step (gradients add up): a large batch in less memory
    lr: float = 1e-4
    lr_d: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    grad_clip: float = 1.0  # max global gradient norm (0 = off)
    loss: Loss = field(default_factory=Loss)
    discriminator: PatchGAN = field(default_factory=PatchGAN)
    eval: VAEEval = field(default_factory=VAEEval)
    checkpoint_every: int = 500
    log_every: int = 50
    seed: int = 0
    device: str = "auto"
    workers: int = 1  # data-parallel workers; each trains on its slice of every batch
    resources: dict[str, float] = field(default_factory=lambda: {"cpu": 1, "gpu": 0})  # a worker's

    @property
    def factor(self) -> int:
        return 2 ** (len(self.arch.widths) - 1)

    def validate(self, source: str) -> None:
        def fail(key, why):
            raise RecipeError(f"{source}: field {key}: {why}")

        a = self.arch
        if self.kind != "vae":
            fail("kind", f"an autoencoder recipe has kind: vae, not {self.kind!r}")
        if self.train not in TRAIN_PARTS:
            fail("train", f"{self.train!r} is not one of {', '.join(TRAIN_PARTS)}")
        for key in ("resolution", "steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, key) < 1:
                fail(key, f"must be positive, got {getattr(self, key)}")
        if a.latent_channels < 1 or a.layers < 1 or not a.widths:
            fail("arch", "latent_channels and layers must be positive, widths non-empty")
        for key, widths in (("arch.widths", a.widths), ("arch.decoder_widths", a.decoder_widths)):
            for i, w in enumerate(widths or []):
                if w < 1 or w % a.norm_groups:
                    fail(f"{key}.{i}", f"{w} is not a positive multiple of arch.norm_groups "
                                       f"({a.norm_groups})")
        if a.decoder_widths is not None and len(a.decoder_widths) != len(a.widths):
            fail("arch.decoder_widths", f"{len(a.decoder_widths)} levels, but the encoder has "
                                        f"{len(a.widths)} (the decoder must undo its factor)")
        if a.decoder_layers is not None and a.decoder_layers < 1:
            fail("arch.decoder_layers", f"must be positive, got {a.decoder_layers}")
        if self.train == "decoder" and not a.mid_attention:
            fail("arch.mid_attention", "diffusers' asymmetric VAE (train: decoder) always has "
                                       "middle attention")
        if self.workers < 1 or self.batch_size % self.workers:
            fail("workers", f"{self.workers} must be positive and split batch_size "
                            f"({self.batch_size}) into equal slices")
        if self.accumulate < 1 or self.batch_size // self.workers % self.accumulate:
            fail("accumulate", f"{self.accumulate} must be positive and split each worker's "
                               f"{self.batch_size // self.workers} images of batch_size "
                               f"({self.batch_size}) into equal micro-batches")
        if self.resolution % self.factor:
            fail("resolution", f"{self.resolution} is not divisible by the factor {self.factor}")
        if self.lr <= 0 or self.lr_d <= 0:
            fail("lr", "lr and lr_d must be positive")
        if len(self.betas) != 2:
            fail("betas", f"expected two values, got {self.betas}")
        for key in ("kl_weight", "adv_weight", "perceptual_weight"):
            value = getattr(self.loss, key)
            if not math.isfinite(value) or value < 0:
                fail(f"loss.{key}", f"must be a non-negative number, got {value}")
        if self.loss.perceptual_weight > 0 and not self.loss.perceptual_path:
            fail("loss.perceptual_path", "perceptual_weight > 0 needs local weights: no "
                                         "perceptual network ships with mdsearch (see train/vae.py)")
        if self.discriminator.width < 1 or self.discriminator.layers < 1:
            fail("discriminator", "width and layers must be positive")
        if self.eval.every < 1 or self.eval.images < 2:
            fail("eval", "every must be >= 1 and images >= 2")
        if self.eval.grid < 1:
            fail("eval.grid", f"must be at least 1 (images shown), got {self.eval.grid}")
        if "kind" not in self.data:
            fail("data.kind", "missing (synthetic, folder or coco)")
        if self.device not in ("auto", "cpu", "cuda"):
            fail("device", f"{self.device!r} is not one of auto, cpu, cuda")


def load_vae_recipe(path_or_name: str | Path) -> VAERecipe:
    """An autoencoder recipe file, or the name of one in trials/ (`vae_cpu`)."""
    path = config.named_file(path_or_name, TRIALS)
    data = config.load_yaml(path, error=RecipeError)
    if isinstance(data, dict) and data.get("kind") != "vae":
        raise RecipeError(f"{path}: field kind: {data.get('kind', 'diffusion')!r}: `mdsearch vae` "
                          "trains autoencoder recipes (kind: vae, e.g. trials/vae_cpu.yaml)")
    return VAERecipe.from_dict(data, str(path))


# --- models ---------------------------------------------------------------------------------------

def build_vae(recipe: VAERecipe, resolution: int | None = None):
    """The recipe's autoencoder, freshly initialised: an AutoencoderKL, or for `train: decoder`
    an AsymmetricAutoencoderKL with the lightweight decoder."""
    from diffusers import AsymmetricAutoencoderKL, AutoencoderKL

    a, n = recipe.arch, len(recipe.arch.widths)
    common = dict(in_channels=3, out_channels=3, latent_channels=a.latent_channels,
                  norm_num_groups=a.norm_groups, sample_size=resolution or recipe.resolution,
                  down_block_types=("DownEncoderBlock2D",) * n)
    if recipe.train == "all":
        return AutoencoderKL(**common, up_block_types=("UpDecoderBlock2D",) * n,
                             block_out_channels=tuple(a.widths), layers_per_block=a.layers,
                             mid_block_add_attention=a.mid_attention)
    return AsymmetricAutoencoderKL(
        **common, up_block_types=("UpDecoderBlock2D",) * n,
        down_block_out_channels=tuple(a.widths), layers_per_down_block=a.layers,
        up_block_out_channels=tuple(a.decoder_widths or a.widths),
        layers_per_up_block=a.decoder_layers or a.layers)


def decoder_modules(vae) -> list[nn.Module]:
    """What decoding runs: post_quant_conv and the decoder (without an asymmetric decoder's
    unused inpainting encoder)."""
    parts = [vae.post_quant_conv]
    for name, module in vae.decoder.named_children():
        if name != "condition_encoder":
            parts.append(module)
    return parts


def encoder_modules(vae) -> list[nn.Module]:
    return [vae.encoder, vae.quant_conv]


class PatchDiscriminator(nn.Module):
    """A PatchGAN: stride-2 4x4 convs, one real/fake logit per image patch."""

    def __init__(self, cfg: PatchGAN):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, cfg.width, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = cfg.width
        for i in range(1, cfg.layers):
            nxt = cfg.width * min(2 ** i, 8)
            layers += [nn.Conv2d(width, nxt, 4, 2, 1), nn.GroupNorm(min(32, nxt // 4), nxt),
                       nn.LeakyReLU(0.2)]
            width = nxt
        layers.append(nn.Conv2d(width, 1, 3, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


@dataclass
class VAECost:
    encoder_params: int
    decoder_params: int
    encoder_gmacs: float  # one 512x512 image
    decoder_gmacs: float
    resolution: int = COST_RESOLUTION

    def to_dict(self) -> dict:
        return asdict(self)


def cost_of(recipe: VAERecipe, resolution: int = COST_RESOLUTION) -> VAECost:
    """Parameters and GMACs of the recipe's encoder and decoder at `resolution`, counted on the
    meta device (no weights allocated) with the UNet's cost conventions."""
    with torch.device("meta"):
        vae = build_vae(recipe, resolution)
    image = torch.empty(1, 3, resolution, resolution, device="meta")
    latent = torch.empty(1, recipe.arch.latent_channels, resolution // recipe.factor,
                         resolution // recipe.factor, device="meta")
    counts = []
    for run, modules in ((lambda: vae.quant_conv(vae.encoder(image)), encoder_modules(vae)),
                         (lambda: vae.decoder(vae.post_quant_conv(latent)), decoder_modules(vae))):
        with MacCounter() as counter:
            run()
        params = sum(p.numel() for m in modules for p in m.parameters())
        counts += [params, sum(counter.macs.values()) / 1e9]
    return VAECost(counts[0], counts[2], counts[1], counts[3], resolution)


def load_perceptual(path: str | Path):
    """A local perceptual distance d(x, x') -> (N,) saved with torch.export (a graph and its
    weights, not a pickle)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"loss.perceptual_path {path}: file not found (give a torch.export'ed "
                          "program of a perceptual distance, e.g. LPIPS, saved locally)")
    import zipfile

    if not zipfile.is_zipfile(path):  # (torch would log its own traceback before failing)
        raise RecipeError(f"loss.perceptual_path {path}: not a torch.export program (not a "
                          "zip archive, which torch.export.save writes)")
    try:
        return torch.export.load(str(path)).module()
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file: say which
        raise RecipeError(f"loss.perceptual_path {path}: not a torch.export program "
                          f"({type(err).__name__}: {err})") from None


# --- the run --------------------------------------------------------------------------------------

class VAETraining(AdversarialRun):
    """The state of one autoencoder run: VAE, discriminator, optimisers, data and history."""

    def __init__(self, recipe: VAERecipe, out_dir: str | Path, *, init: str | Path | None = None,
                 seed: int | None = None, progress=None, tracker=None, evaluator=None,
                 device=None):
        from ..data import make_dataset

        self.out, self.recipe = Path(out_dir), recipe
        self.out.mkdir(parents=True, exist_ok=True)
        rank, workers = world()
        if recipe.batch_size % workers or recipe.batch_size // workers % recipe.accumulate:
            raise RecipeError(f"{recipe.name}: field batch_size: {recipe.batch_size} does not "
                              f"split over {workers} workers x accumulate {recipe.accumulate}")
        self.lead = rank == 0
        self.say = (progress or quiet) if self.lead else quiet
        self.tracker, self.evaluator = tracker if self.lead else None, evaluator
        self.seed = recipe.seed if seed is None else seed
        self.device = pick_device(recipe.device, device)
        self.init = None if init is None else Path(init)
        if recipe.train == "decoder" and self.init is None:
            raise RecipeError(f"{recipe.name}: field train: decoder trains a decoder for the "
                              "encoder of a trained VAE: give it with --init VAE_DIR")
        if recipe.train == "all" and self.init is not None:
            raise RecipeError(f"{recipe.name}: field train: all trains a whole VAE from scratch, "
                              f"so --init {init} would be ignored; use train: decoder to train a "
                              "decoder for its encoder, or drop --init")
        self.train_set = make_dataset(recipe.data, recipe.resolution, "train")
        self.val_set = make_dataset(recipe.data, recipe.resolution, "val")
        torch.manual_seed(self.seed)
        self.vae = build_vae(recipe).to(self.device)
        if recipe.train == "decoder":
            self._freeze_encoder_of(self.init)
        self.disc = PatchDiscriminator(recipe.discriminator).to(self.device)
        self.perceptual = (load_perceptual(recipe.loss.perceptual_path)
                           if recipe.loss.perceptual_weight > 0 else None)
        self.params = [p for m in self.trained_modules() for p in m.parameters()]
        betas = tuple(recipe.betas)
        self.opt = torch.optim.Adam(self.params, lr=recipe.lr, betas=betas)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=recipe.lr_d, betas=betas)
        self.cost = cost_of(recipe)
        self.result = TrialResult("ok", None, 0, 0.0, self.cost.decoder_params,
                                  self.cost.decoder_gmacs, sum(p.numel() for p in self.params),
                                  workers=workers)
        self.step, self.elapsed_before, self.started = 0, 0.0, time.time()
        self.ckpt = self.out / CHECKPOINT
        if self.ckpt.exists():
            self.load()

    def trained_modules(self) -> list[nn.Module]:
        if self.recipe.train == "all":
            return [self.vae]
        return decoder_modules(self.vae)

    def _freeze_encoder_of(self, init: Path) -> None:
        from ..data.autoencoder import DiffusersAutoencoder

        loaded = DiffusersAutoencoder(init)
        start, a = loaded.vae, self.recipe.arch
        have = (loaded.channels, loaded.encoder_widths, loaded.encoder_layers)
        if have != (a.latent_channels, list(a.widths), a.layers):
            raise RecipeError(
                f"{self.recipe.name}: field arch: the encoder of {init} has latent_channels "
                f"{have[0]}, widths {have[1]}, layers {have[2]}; the recipe says "
                f"{a.latent_channels}, {list(a.widths)}, {a.layers} (set them to the VAE's)")
        self.vae.encoder.load_state_dict(start.encoder.state_dict())
        self.vae.quant_conv.load_state_dict(start.quant_conv.state_dict())
        for module in encoder_modules(self.vae) + [self.vae.decoder.condition_encoder]:
            module.requires_grad_(False)

    # -- checkpoints ---------------------------------------------------------------------------

    def load(self) -> None:
        state = read_checkpoint(self.ckpt, RESUMED)
        if not same_recipe(state.get("vae_recipe"), self.recipe):
            raise CheckpointError(f"{self.ckpt}: not a checkpoint of this autoencoder recipe "
                                  "(another recipe, or not an autoencoder run); use a new --out")
        self.vae.load_state_dict(state["model"])
        self.disc.load_state_dict(state["discriminator"])
        self.opt.load_state_dict(state["opt"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.step, self.elapsed_before = state["step"], state["seconds"]
        self.result.history = json.loads(state["history"])
        self.result.steps = self.step
        self.result.metrics = self.last_metrics()
        self.say(f"resumed from {self.ckpt} at step {self.step}")

    def save(self) -> None:
        state = {"model": self.vae.state_dict(), "discriminator": self.disc.state_dict(),
                 "opt": self.opt.state_dict(), "opt_d": self.opt_d.state_dict(),
                 "step": self.step, "seconds": self.elapsed_before + time.time() - self.started,
                 "history": json.dumps(self.result.history),
                 "vae_recipe": json.dumps(self.recipe.to_dict()),
                 "init": str(self.init) if self.init else None}
        with atomic_path(self.ckpt) as tmp:
            torch.save(state, tmp)

    def export_diffusers(self) -> None:
        """The run directory as a diffusers model folder, with SD's latent scaling. The weights
        are replaced before config.json, so a config always names complete weights."""
        self.vae.register_to_config(scaling_factor=self.scaling_factor())
        staging = self.out / ".diffusers"
        shutil.rmtree(staging, ignore_errors=True)
        self.vae.save_pretrained(staging, safe_serialization=True)
        for name in (DIFFUSERS_WEIGHTS, DIFFUSERS_CONFIG):
            os.replace(staging / name, self.out / name)
        shutil.rmtree(staging)

    @torch.no_grad()
    def scaling_factor(self, count: int = 256) -> float:
        images = self.images(self.train_set, range(min(count, len(self.train_set))))
        latents = self.vae.encode(images).latent_dist.mean
        return float(1.0 / latents.float().std())

    # -- data ----------------------------------------------------------------------------------

    def images(self, dataset, indices) -> torch.Tensor:
        return torch.stack([dataset[int(i)]["image"] for i in indices]).to(self.device)

    # -- evaluation ----------------------------------------------------------------------------

    @functools.cached_property
    def held_out(self) -> tuple[torch.Tensor, list[str]]:
        """The fixed held-out images every evaluation reconstructs, and their captions."""
        items = [self.val_set[i] for i in range(min(self.recipe.eval.images, len(self.val_set)))]
        return (torch.stack([it["image"] for it in items]).to(self.device),
                [it["caption"] for it in items])

    @torch.no_grad()
    def evaluate(self) -> dict:
        from torchmetrics.functional.image import (peak_signal_noise_ratio,
                                                   structural_similarity_index_measure)

        originals, captions = self.held_out
        n = len(originals)
        self.vae.eval()
        posterior = self.vae.encode(originals).latent_dist
        recon = self.vae.decode(posterior.mean).sample.clamp(-1, 1)
        self.vae.train()
        a, b = (originals + 1) / 2, (recon + 1) / 2
        psnr = peak_signal_noise_ratio(b, a, data_range=1.0, reduction="none",
                                       dim=(1, 2, 3))
        ssim = structural_similarity_index_measure(b, a, data_range=1.0, reduction="none")
        kl = posterior.kl() / posterior.mean[0].numel()
        record = {"step": self.step, "psnr": float(psnr.mean()),
                  "psnr_se": float(psnr.std() / math.sqrt(n)), "ssim": float(ssim.mean()),
                  "ssim_se": float(ssim.std() / math.sqrt(n)), "kl": float(kl.mean()),
                  "l2": float(F.mse_loss(recon, originals))}
        record.update(self.sample_metrics(originals.cpu(), recon.cpu(), captions))
        from .grid import save_grid

        k = min(self.recipe.eval.grid, n)
        save_grid(torch.cat([originals[:k], recon[:k]]).cpu(),
                  ["original"] * k + ["reconstruction"] * k,
                  self.out / samples_file(self.step), ncols=k)
        self.result.history.append(record)
        self.say("eval " + "  ".join(f"{k} {v:.4g}" for k, v in record.items()))
        return record

    def sample_metrics(self, originals, recon, captions) -> dict:
        """rfid_proxy / rkid_proxy / ralign: the sample metrics of the reconstructions, with the
        originals as the reference set."""
        if self.evaluator is None:
            from .metrics import Evaluator

            self.evaluator = Evaluator(self.recipe.resolution, originals)
        metrics = self.evaluator.evaluate(recon, captions)
        renamed = {"fid_proxy": "rfid_proxy", "kid_proxy": "rkid_proxy", "align": "ralign"}
        return {new: metrics[old] for old, new in renamed.items() if old in metrics}

    def last_metrics(self) -> dict:
        """The last evaluation's metrics and the encoder's and decoder's costs."""
        last = self.result.history[-1] if self.result.history else {}
        costs = {k: v for k, v in self.cost.to_dict().items() if k != "resolution"}
        return {**{k: v for k, v in last.items() if k != "step"}, **costs}

    # -- the loop ------------------------------------------------------------------------------

    def losses(self, x: torch.Tensor, eps: torch.Tensor):
        """The loss of the images `x` (per image: a mean over them), with `eps` the standard
        normal noise of their posterior samples."""
        r = self.recipe
        posterior = self.vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * eps.to(posterior.mean)
        recon = self.vae.decode(z).sample
        size = x.shape[0]
        l2 = (recon - x).pow(2).sum() / size
        nll = l2
        if self.perceptual is not None:
            nll = nll + r.loss.perceptual_weight * self.perceptual(x, recon).sum() / size
        kl = posterior.kl().sum() / size
        loss = nll + r.loss.kl_weight * kl
        adv = torch.zeros(())
        if r.loss.adv_weight > 0 and self.step >= r.loss.adv_start:
            self.disc.requires_grad_(False)
            adv = -self.disc(recon).mean()
            self.disc.requires_grad_(True)
            loss = loss + self.adaptive_weight(nll, adv) * adv
        # the training log's kl_sum is the loss's term (summed over an image's latent elements);
        # the evaluation's kl is per latent element, comparable across latent sizes
        return loss, recon, {"loss": loss.item(), "l2": l2.item() / x[0].numel(),
                             "kl_sum": kl.item(), "adv": adv.item()}

    def adaptive_weight(self, nll: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
        """adv_weight x |grad nll| / |grad adv| at the decoder's last layer (latent diffusion's
        autoencoder): the adversarial term is kept at the reconstruction term's scale."""
        last = self.vae.decoder.conv_out.weight
        g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(adv, last, retain_graph=True)[0]
        weight = g_nll.norm() / (g_adv.norm() + 1e-4)
        return weight.clamp(0, 1e4).detach() * self.recipe.loss.adv_weight

    def run(self, steps: int | None = None, on_eval=None) -> TrialResult:
        r = self.recipe
        total = r.steps if steps is None else min(steps, r.steps)
        if self.lead:
            atomic_write(self.out / VAE_RECIPE, yaml.safe_dump(r.to_dict(), sort_keys=False))
        if self.tracker is not None:
            self.tracker.start_run(r.name, flatten(r.to_dict(), "recipe"), self.cost.to_dict(),
                                   self.out)
        sums: dict[str, float] = {}
        count, last_log = 0, time.time()
        size = r.batch_size
        latent = (r.arch.latent_channels, r.resolution // r.factor, r.resolution // r.factor)
        while self.step < total:
            g = _step_generator(self.seed, self.step)
            idx = torch.randint(len(self.train_set), (size,), generator=g)
            noise = torch.randn((size, *latent), generator=g)  # each image's posterior sample's
            mine = my_slice(size)  # this rank's images (all of them in one process)
            x = self.images(self.train_set, idx[mine].tolist())
            # micro-batches (accumulate): their gradients add up to one step of each network
            chunks, noises = x.chunk(r.accumulate), noise[mine].chunk(r.accumulate)
            self.opt.zero_grad(set_to_none=True)
            fakes, parts = [], {}
            for chunk, eps in zip(chunks, noises):
                loss, recon, stats = self.losses(chunk, eps)
                (loss * (len(chunk) / size)).backward()
                fakes.append(recon.detach())
                for k, v in stats.items():
                    parts[k] = parts.get(k, 0.0) + v * len(chunk) / size
            # the batch's loss, summed over the ranks: all agree on a non-finite one
            if not math.isfinite(loss_total := self.batch_total(parts["loss"])):
                return self.fail(f"non-finite autoencoder loss ({loss_total}) at step "
                                 f"{self.step + 1}")  # (no step is taken)
            self.clipped_step(self.opt, self.params)
            if r.loss.adv_weight > 0 and self.step >= r.loss.adv_start:
                self.opt_d.zero_grad(set_to_none=True)
                d_share = 0.0
                for chunk, fake in zip(chunks, fakes):
                    d_loss = (F.relu(1 - self.disc(chunk)).mean()
                              + F.relu(1 + self.disc(fake)).mean())
                    (d_loss * (len(chunk) / size)).backward()
                    d_share += d_loss.item() * len(chunk) / size
                parts["d_loss"] = self.batch_total(d_share)
                if not math.isfinite(parts["d_loss"]):
                    return self.fail(f"non-finite discriminator loss ({parts['d_loss']}) at "
                                     f"step {self.step + 1}")
                self.clipped_step(self.opt_d, self.disc.parameters())
            del parts["loss"]
            keys = sorted(k for k in parts if k != "d_loss")  # this rank's shares, summed
            shares = self.sum_shares(torch.tensor([parts[k] for k in keys], dtype=torch.float64))
            parts.update(zip(keys, shares.tolist()))
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            count += 1
            self.step += 1
            self.result.steps = self.step
            if self.step % r.log_every == 0 or self.step == total:
                rate = count / max(time.time() - last_log, 1e-9)
                self.say(f"step {self.step}/{total}  " + "  ".join(
                    f"{k} {v / count:.4g}" for k, v in sums.items()) + f"  {rate:.2f} steps/s")
                if self.tracker is not None:
                    self.tracker.log_metrics({k: v / count for k, v in sums.items()}, self.step)
                sums, count, last_log = {}, 0, time.time()
            record = None
            if not self.lead:  # rank 0 evaluates, exports and saves
                continue
            if self.step % r.eval.every == 0 or self.step == total:
                record = self.evaluate()
                if self.tracker is not None:
                    self.tracker.log_metrics({k: v for k, v in record.items() if k != "step"},
                                             self.step)
                self.export_diffusers()
            if record is not None or self.step % r.checkpoint_every == 0:
                self.save()
            if record is not None and on_eval is not None:
                on_eval({**record, **self.last_metrics()})
        self.result.metrics = self.last_metrics()
        return self.finish()


def vae_train(recipe: VAERecipe, out_dir: str | Path, *, init: str | Path | None = None,
              steps: int | None = None, seed: int | None = None,
              progress: Callable[[str], None] | None = None, tracker=None, on_eval=None,
              evaluator=None, device=None) -> TrialResult:
    """Train the recipe's autoencoder (or, `train: decoder`, a lightweight decoder for the
    encoder of the VAE in `init`) in `out_dir`, resuming from its checkpoint if there is one.
    The finished directory is a diffusers model folder. Data parallel when torch.distributed is
    initialised (mdsearch.train.gan); rank 0 holds the directory."""
    check_out_dir(out_dir)
    with lead_locked(out_dir, f"autoencoder training {recipe.name}"):
        run = VAETraining(recipe, out_dir, init=init, seed=seed, progress=progress,
                          tracker=tracker, evaluator=evaluator, device=device)
        return run.run(steps, on_eval)
