"""Autoencoders between images and the latents the UNet denoises.

The platform targets latent diffusion (the paper: a VAE with f=8, c=8). Two kinds:

    identity   pixel space: latents are the images themselves (3 channels, factor 1). The honest
               choice for tiny CPU proxies, where no trained VAE of the right size exists.
    diffusers  a local diffusers `AutoencoderKL` folder (`path`), e.g. SD's VAE: latents are
               the posterior mean times the model's scaling factor. Never downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import did_you_mean
from ..rundir import DIFFUSERS_CONFIG
from .errors import DataError


class IdentityAutoencoder:
    name, channels, factor = "identity", 3, 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class DiffusersAutoencoder:
    """A local diffusers autoencoder folder, frozen: an `AutoencoderKL` (SD's VAE, or a run of
    `mdsearch vae train`) or an `AsymmetricAutoencoderKL` (a lightweight-decoder run)."""

    name = "diffusers"
    CLASSES = ("AutoencoderKL", "AsymmetricAutoencoderKL")

    def __init__(self, path: str | Path):
        path = Path(path)
        config_file = path / DIFFUSERS_CONFIG
        if not config_file.is_file():
            raise DataError(f"autoencoder path {path}: no diffusers autoencoder there (expected "
                            "config.json and weights: an `mdsearch vae train` run directory, or "
                            "the vae/ folder of an SD checkpoint)")
        try:
            kind = json.loads(config_file.read_text()).get("_class_name", "AutoencoderKL")
        except (ValueError, AttributeError) as err:
            raise DataError(f"autoencoder {config_file}: not a JSON object ({err})") from None
        if kind not in self.CLASSES:
            raise DataError(f"autoencoder {config_file}: field _class_name: {kind!r} is not one "
                            f"of {', '.join(self.CLASSES)}")
        import diffusers

        verbosity = diffusers.utils.logging.get_verbosity()
        # (AsymmetricAutoencoderKL records two fields it then warns about on every load)
        diffusers.utils.logging.set_verbosity_error()
        try:
            self.vae = getattr(diffusers, kind).from_pretrained(path, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - damaged weights or config: name the folder
            reason = " ".join(str(err).split())[:300]
            raise DataError(f"autoencoder path {path}: cannot load it as a diffusers {kind} "
                            f"({type(err).__name__}: {reason})") from None
        finally:
            diffusers.utils.logging.set_verbosity(verbosity)
        self.vae.eval().requires_grad_(False)
        cfg = self.vae.config
        self.channels = cfg.latent_channels
        # the encoder's widths and resnet blocks per level, under either class's names
        self.encoder_widths = list(cfg.get("down_block_out_channels") or cfg.block_out_channels)
        self.encoder_layers = cfg.get("layers_per_down_block") or cfg.layers_per_block
        self.factor = 2 ** (len(self.encoder_widths) - 1)
        self.scale = cfg.scaling_factor
        self.path = path

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mean * self.scale

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scale).sample.clamp(-1, 1)


def make_autoencoder(cfg: dict):
    kind = cfg.get("kind", "identity")
    if kind == "identity":
        return IdentityAutoencoder()
    if kind == "diffusers":
        if "path" not in cfg:
            raise DataError("autoencoder kind 'diffusers' needs a 'path' to a local folder")
        return DiffusersAutoencoder(cfg["path"])
    raise DataError(f"autoencoder kind {kind!r}: unknown{did_you_mean(kind, ['identity', 'diffusers'])}")


def check_latent_channels(autoencoder, channels: int, what: str) -> None:
    """DataError unless a UNet taking `channels`-channel latents (`what` names it) can denoise
    the latents of `autoencoder`."""
    if autoencoder.channels != channels:
        where = getattr(autoencoder, "path", autoencoder.name)
        raise DataError(f"{what}: field latent_channels: the UNet takes {channels}-channel "
                        f"latents but autoencoder {where} encodes {autoencoder.channels} "
                        f"channels; train the UNet in this latent space (a new run) or use "
                        f"the autoencoder it was trained with")
