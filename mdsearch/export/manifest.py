"""A bundle's manifest: what an app needs, besides the graphs, to turn a caption into an image.

    write_manifest("out/md", manifest)        # out/md/manifest.json, atomically
    manifest = read_manifest("out/md")        # validated; ExportError naming file and field
    manifest.path("unet")                     # out/md/unet.onnx

`mdsearch export --checkpoint RUN` writes OUT/manifest.json beside the graphs (see
docs/export.md for every field): the files (relative to the bundle folder, so it can be moved),
the sizes, the autoencoder, the noise schedule the UNet was trained on, the sampler and
guidance the run was evaluated with, the x0 clipping, and the text encoder. `mdsearch generate`
runs a bundle from it alone (mdsearch.export.pipeline).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .. import config
from ..rundir import atomic_write
from ..train.diffusion import SCHEDULES
from .onnx import ExportError

MANIFEST = "manifest.json"
FORMAT = "mdsearch-bundle"
VERSION = 1
SAMPLERS = ("ddim", "one-step")
AUTOENCODERS = ("identity", "diffusers")


@dataclass
class BundleFiles:
    """Bundle files, relative to the bundle folder."""

    unet: str
    text_encoder: str
    tokenizer: str  # a folder (the tokenizer's save_pretrained)
    decoder: str | None  # None: pixel space, the latents are the image


@dataclass
class AutoencoderInfo:
    kind: str  # identity (pixel space) | diffusers
    scaling_factor: float  # latents = the VAE's latents times this; the decoder divides by it
    factor: int  # image side / latent side
    model: str | None = None  # the VAE's class, e.g. AutoencoderKL (None in pixel space)


@dataclass
class ScheduleInfo:
    kind: str  # scaled_linear | linear (mdsearch.train.diffusion.NoiseSchedule)
    prediction: str  # epsilon | v
    train_steps: int  # the timesteps the UNet was trained over (1000)


@dataclass
class SamplerInfo:
    kind: str  # ddim (eta 0, classifier-free guidance) | one-step (a UFOGen generator)
    steps: int
    guidance: float  # 1: no guidance, one UNet call a step; else two (caption and null caption)


@dataclass
class TextEncoderInfo:
    name: str  # minilm | clip
    max_length: int  # the captions' padded length, the UNet's context_len
    dim: int  # the context width, the UNet's context_dim
    null_caption: str = ""  # the unconditional branch of guidance encodes this caption


@dataclass
class Manifest:
    spec: str  # the UNet's spec name
    source: str  # the checkpoint it was exported from
    resolution: int  # image side, pixels
    latent_size: int  # latent side
    latent_channels: int
    fp16: bool  # the graphs are half precision (inputs and outputs too)
    clip_x0: float | None  # the sampler clamps its x0 estimate to +-this (None: not at all)
    files: BundleFiles
    autoencoder: AutoencoderInfo
    noise_schedule: ScheduleInfo
    sampler: SamplerInfo
    text_encoder: TextEncoderInfo
    format: str = FORMAT
    version: int = VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    def __post_init__(self):
        self.folder: Path | None = None  # set by read_manifest

    def path(self, name: str) -> Path | None:
        """A listed file's path (`unet`, `text_encoder`, `tokenizer`, `decoder`): in the folder
        the manifest was read from, else relative."""
        relative = getattr(self.files, name)
        if relative is None:
            return None
        return self.folder / relative if self.folder is not None else Path(relative)


def write_manifest(out_dir: str | Path, manifest: Manifest) -> Path:
    """OUT_DIR/manifest.json, atomically (an app never reads half of one)."""
    return atomic_write(Path(out_dir) / MANIFEST, json.dumps(manifest.to_dict(), indent=2) + "\n")


def read_manifest(bundle: str | Path) -> Manifest:
    """The manifest of the bundle folder BUNDLE, checked: every field of the right type and
    value, every listed file there. Otherwise an ExportError naming the file and the field."""
    folder = Path(bundle)
    file = folder / MANIFEST
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such bundle folder (write one with mdsearch export "
                          f"--checkpoint RUN --out {folder})")
    if not file.is_file():
        raise ExportError(f"{file}: missing, so {folder} is not a bundle (mdsearch export "
                          f"--checkpoint RUN writes one; exports without a trained run's recipe "
                          f"have none)")
    try:
        data = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ExportError(f"{file}: not valid JSON ({err})") from None
    manifest = config.from_dict(Manifest, data, str(file), error=ExportError)

    def fail(field: str, why: str):
        raise ExportError(f"{file}: field {field}: {why}")

    if manifest.format != FORMAT or manifest.version != VERSION:
        fail("format", f"expected {FORMAT} version {VERSION}, got {manifest.format} version "
                       f"{manifest.version}")
    for field, value in (("resolution", manifest.resolution),
                         ("latent_size", manifest.latent_size),
                         ("latent_channels", manifest.latent_channels),
                         ("autoencoder.factor", manifest.autoencoder.factor),
                         ("noise_schedule.train_steps", manifest.noise_schedule.train_steps),
                         ("sampler.steps", manifest.sampler.steps),
                         ("text_encoder.max_length", manifest.text_encoder.max_length),
                         ("text_encoder.dim", manifest.text_encoder.dim)):
        if value < 1:
            fail(field, f"must be at least 1, got {value}")
    if manifest.latent_size * manifest.autoencoder.factor != manifest.resolution:
        fail("latent_size", f"{manifest.latent_size} x autoencoder.factor "
                            f"{manifest.autoencoder.factor} is not the resolution "
                            f"{manifest.resolution}")
    for field, value, options in (
            ("autoencoder.kind", manifest.autoencoder.kind, AUTOENCODERS),
            ("noise_schedule.kind", manifest.noise_schedule.kind, SCHEDULES),
            ("noise_schedule.prediction", manifest.noise_schedule.prediction, ("epsilon", "v")),
            ("sampler.kind", manifest.sampler.kind, SAMPLERS)):
        if value not in options:
            fail(field, f"{value!r} is not one of {', '.join(options)}")
    if manifest.sampler.steps > manifest.noise_schedule.train_steps:
        fail("sampler.steps", f"{manifest.sampler.steps} is more than the "
                              f"{manifest.noise_schedule.train_steps} training timesteps")
    for field, value in (("sampler.guidance", manifest.sampler.guidance),
                         ("autoencoder.scaling_factor", manifest.autoencoder.scaling_factor)):
        if not (math.isfinite(value) and value > 0):
            fail(field, f"must be a positive finite number, got {value}")
    if manifest.clip_x0 is not None and not (math.isfinite(manifest.clip_x0)
                                             and manifest.clip_x0 > 0):
        fail("clip_x0", f"must be positive or null, got {manifest.clip_x0}")
    pixel_space = manifest.autoencoder.kind == "identity"
    if pixel_space != (manifest.files.decoder is None):
        fail("files.decoder", "null exactly when autoencoder.kind is identity (pixel space), "
                              f"got {manifest.files.decoder!r} with kind "
                              f"{manifest.autoencoder.kind!r}")
    if not pixel_space and manifest.clip_x0 is not None:
        fail("clip_x0", f"null in a latent-space bundle (a VAE's latents have the VAE's range, "
                        f"not [-1, 1]), got {manifest.clip_x0}")
    if pixel_space and manifest.latent_channels != 3:
        fail("latent_channels", f"pixel space has 3 channels, got {manifest.latent_channels}")
    manifest.folder = folder
    inside = folder.resolve()
    for name in ("unet", "text_encoder", "tokenizer", "decoder"):
        path = manifest.path(name)
        if path is None:
            continue
        relative = getattr(manifest.files, name)
        # a bundle names its own files only: no absolute path, nothing outside the folder
        # (also through a link), so a shared bundle can never make generate open another file
        if Path(relative).is_absolute() or not path.resolve().is_relative_to(inside):
            fail(f"files.{name}", f"{relative!r} is not a path inside the bundle folder")
        if not path.exists():
            fail(f"files.{name}", f"{path} is missing")
    return manifest
