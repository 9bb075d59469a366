"""Autoencoders between images and the latents the UNet denoises.

The platform targets latent diffusion (the paper: a VAE with f=8, c=8). Two kinds:

    identity   pixel space: latents are the images themselves (3 channels, factor 1). The honest
               choice for tiny CPU proxies, where no trained VAE of the right size exists.
    diffusers  a local diffusers `AutoencoderKL` folder (`path`), e.g. SD's VAE: latents are
               the posterior mean times the model's scaling factor. Never downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import did_you_mean
from .errors import DataError


class IdentityAutoencoder:
    name, channels, factor = "identity", 3, 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class DiffusersAutoencoder:
    """A local diffusers AutoencoderKL, frozen."""

    name = "diffusers"

    def __init__(self, path: str | Path):
        path = Path(path)
        if not (path / "config.json").is_file():
            raise DataError(f"autoencoder path {path}: no diffusers AutoencoderKL there (expected "
                            "config.json and weights, e.g. the vae/ folder of an SD checkpoint)")
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True).eval()
        self.vae.requires_grad_(False)
        self.channels = self.vae.config.latent_channels
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.scale = self.vae.config.scaling_factor

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
