"""A UNet and the text encoder that conditions it, exported side by side into one folder.

    encoder = pair_text_encoder(spec, trial_dir="runs/md")    # the encoder the trial trained with
    result = export_models(spec, model, "out/md", latent_size=12, encoder=encoder)
    result.unet.path, result.text_encoder.path                  # unet.onnx, text_encoder.onnx

What `mdsearch export` writes: OUT/unet.onnx and OUT/text_encoder.onnx with OUT/tokenizer/ (or
the .mlpackage pair with `format="coreml"`), each with a JSON sidecar of its result. Given the
autoencoder of a latent-space run, also OUT/decoder.onnx (mdsearch.export.decoder); and for a
trained run, OUT/manifest.json (mdsearch.export.manifest), which makes the folder a bundle that
`mdsearch generate` turns captions into images with (mdsearch.export.pipeline).

Which text encoder: the one named, else the one in the trial's recipe (`recipe.yaml` in the trial
directory, or in the sweep directory above a Ray Tune trial), else the one whose width the UNet's
`context_dim` has (384: minilm, what every recipe defaults to; 768: clip, CLIP ViT-L/14, the
paper's). It is loaded with max_length = the UNet's `context_len`, and its output width must be
the UNet's `context_dim`, or the pair is refused before anything is exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..arch.spec import ArchSpec
from ..config import load_yaml
from ..data.autoencoder import check_latent_channels
from ..rundir import RECIPE
from ..data.text import ENCODERS, TextEncoder, get_text_encoder
from ..progress import quiet
from .decoder import DecoderExportResult, export_decoder, has_decoder
from .manifest import (AutoencoderInfo, BundleFiles, Manifest, SamplerInfo, ScheduleInfo,
                       TextEncoderInfo, write_manifest)
from .onnx import ExportError, ExportResult, check_unet_exportable, export_unet
from .text import TextExportResult, export_text_encoder

FORMATS = ("onnx", "coreml")
ENCODER_BY_WIDTH = {384: "minilm", 768: "clip"}


@dataclass
class Exported:
    unet: ExportResult
    text_encoder: TextExportResult | None
    decoder: DecoderExportResult | None = None  # None: pixel space, or not exported

    def to_dict(self) -> dict:
        """The UNet's fields at the top level (as before text encoders were exported), the text
        encoder's under `text_encoder` and the decoder's under `decoder` (None when it was not
        exported)."""
        return {**self.unet.to_dict(),
                "text_encoder": self.text_encoder.to_dict() if self.text_encoder else None,
                "decoder": self.decoder.to_dict() if self.decoder else None}

    @property
    def failures(self) -> list[str]:
        """'what: relative error X > 1e-4' for each model whose fp32 parity check failed."""
        return [f"{r.path}: relative error {r.rel_err:.3g} > 1e-4"
                for r in (self.unet, self.text_encoder, self.decoder)
                if r and r.within_tolerance is False]


def trial_recipe_file(trial: str | Path) -> Path | None:
    """The recipe a trial trained with: `recipe.yaml` in the trial directory, else in its parent
    (a sweep directory); None if there is neither. `trial` is the directory or its checkpoint."""
    folder = Path(trial) if Path(trial).is_dir() else Path(trial).parent
    for candidate in (folder / RECIPE, folder.parent / RECIPE):
        if candidate.is_file():
            return candidate
    return None


def trial_recipe(trial: str | Path):
    """The diffusion `Recipe` a trial trained with (see trial_recipe_file; a one-step run's
    recipe.yaml is that of the run it started from); None if the trial has none."""
    from ..train.recipe import load_recipe

    found = trial_recipe_file(trial)
    return load_recipe(found) if found is not None else None


def trial_text_encoder(trial: str | Path) -> tuple[dict, Path] | None:
    """The `text_encoder` section of the recipe a trial trained with (see trial_recipe_file) and
    the file it came from; None if the trial has no recipe."""
    found = trial_recipe_file(trial)
    if found is None:
        return None
    recipe = load_yaml(found, error=ExportError)
    section = recipe.get("text_encoder", {}) if isinstance(recipe, dict) else None
    if not isinstance(section, dict):
        raise ExportError(f"{found}: field text_encoder: expected a mapping (name, path, "
                          f"max_length), got {section!r}")
    return {"name": "minilm", **section}, found  # minilm: the recipe default


def pair_text_encoder(spec: ArchSpec, name: str | None = None, path: str | Path | None = None,
                      trial_dir: str | Path | None = None,
                      spec_source: str = "the UNet's spec") -> TextEncoder:
    """Load the text encoder that pairs with `spec` (see the module docstring for which), at
    max_length = spec.context_len, and check its width against spec.context_dim.
    `spec_source` names where the spec came from, for the error messages."""
    chosen_by = "as named"
    if name is None and trial_dir is not None:
        found = trial_text_encoder(trial_dir)
        if found is not None:
            section, recipe_file = found
            name, chosen_by = section["name"], f"from {recipe_file}"
            if path is None and ENCODERS.get(str(name).lower()) != "minilm":
                path = section.get("path")  # minilm takes none; a stray one is not an error
    if name is None:
        name = ENCODER_BY_WIDTH.get(spec.context_dim)
        chosen_by = f"chosen by context_dim {spec.context_dim} of {spec_source}"
        if name is None:
            raise ExportError(
                f"{spec_source}: field context_dim: no known text encoder outputs "
                f"{spec.context_dim}-wide tokens (minilm: 384, clip: 768), so none can be "
                f"exported beside this UNet")
    encoder = get_text_encoder(name, path=path, max_length=spec.context_len)
    check_pair(spec, encoder, spec_source, chosen_by)
    return encoder


def check_pair(spec: ArchSpec, encoder: TextEncoder, spec_source: str = "the UNet's spec",
               chosen_by: str = "as given") -> None:
    """ExportError unless `encoder` outputs what the UNet takes as context (dim and length)."""
    if encoder.dim != spec.context_dim:
        hint = ENCODER_BY_WIDTH.get(spec.context_dim)
        raise ExportError(
            f"{spec_source}: field context_dim: the UNet takes {spec.context_dim}-wide context "
            f"but text encoder {encoder.name!r} ({chosen_by}) outputs {encoder.dim}-wide tokens, "
            f"so the two cannot be paired"
            + (f"; {hint} is the encoder of that width" if hint and hint != encoder.name else ""))
    if encoder.max_length != spec.context_len:
        raise ExportError(
            f"{spec_source}: field context_len: the UNet takes {spec.context_len} context tokens "
            f"but text encoder {encoder.name!r} pads to {encoder.max_length}; load it with "
            f"max_length={spec.context_len}")


def export_models(spec: ArchSpec, model: torch.nn.Module, out_dir: str | Path, latent_size: int,
                  encoder: TextEncoder | None = None, format: str = "onnx", fp16: bool = False,
                  latency_runs: int = 5, progress=None, autoencoder=None) -> Exported:
    """Export the UNet and, if given, its text encoder and the decoder of its autoencoder
    (`mdsearch.data.autoencoder`; pixel space has none) into OUT_DIR, each checked against
    PyTorch where the format can run here (ONNX always; Core ML on macOS). The decoder is
    exported to ONNX only: with format="coreml" it is left out, saying so."""
    if format not in FORMATS:
        raise ExportError(f"export format {format!r}: expected one of {', '.join(FORMATS)}")
    check_unet_exportable(spec)
    if encoder is not None:
        check_pair(spec, encoder)
    if autoencoder is not None:
        check_latent_channels(autoencoder, spec.latent_channels, "the UNet's spec")
    if format == "coreml":
        from .coreml import convert_text_encoder, convert_unet, coremltools

        coremltools()  # fail now, not after the UNet, if it is missing
        export_unet_as, export_encoder_as = convert_unet, convert_text_encoder
    else:
        export_unet_as, export_encoder_as = export_unet, export_text_encoder
    unet = export_unet_as(spec, model, out_dir, latent_size, fp16=fp16,
                          latency_runs=latency_runs, progress=progress)
    text = None
    if encoder is not None:
        text = export_encoder_as(encoder, out_dir, fp16=fp16, latency_runs=latency_runs,
                                 progress=progress)
    decoder = None
    if autoencoder is not None and has_decoder(autoencoder):
        if format == "coreml":
            (progress or quiet)("the decoder is exported to ONNX only (--format onnx); this "
                                "Core ML export has none")
        else:
            decoder = export_decoder(autoencoder, out_dir, latent_size, fp16=fp16,
                                     latency_runs=latency_runs, progress=progress)
    return Exported(unet, text, decoder)


def bundle_manifest(exported: Exported, recipe, autoencoder, one_step: bool = False,
                    source: str = "") -> Manifest | None:
    """The manifest of a trained run's ONNX export (see mdsearch.export.manifest): sizes and
    files from `exported`, the noise schedule, sampler and guidance from the run's `recipe`,
    the x0 clipping training evaluated with, and one step without guidance for a one-step
    (UFOGen) generator. None when the export is not a whole bundle (Core ML, no text encoder,
    or a latent-space run without its decoder)."""
    from ..train.diffusion import NoiseSchedule
    from ..train.trainer import x0_clip

    unet, text, decoder = exported.unet, exported.text_encoder, exported.decoder
    if unet.format != "onnx" or text is None or (has_decoder(autoencoder) and decoder is None):
        return None
    schedule = NoiseSchedule(kind=recipe.noise_schedule, prediction=recipe.prediction)
    sampler = (SamplerInfo("one-step", 1, 1.0) if one_step else
               SamplerInfo("ddim", recipe.eval.sample_steps, recipe.eval.guidance))
    factor = autoencoder.factor
    return Manifest(
        spec=unet.spec, source=source, resolution=unet.latent_size * factor,
        latent_size=unet.latent_size, latent_channels=autoencoder.channels, fp16=unet.fp16,
        clip_x0=x0_clip(autoencoder),
        files=BundleFiles(unet=Path(unet.path).name, text_encoder=Path(text.path).name,
                          tokenizer=Path(text.tokenizer).name,
                          decoder=Path(decoder.path).name if decoder else None),
        autoencoder=AutoencoderInfo(autoencoder.name,
                                    decoder.scaling_factor if decoder else 1.0, factor,
                                    decoder.model if decoder else None),
        noise_schedule=ScheduleInfo(schedule.kind, schedule.prediction, schedule.steps),
        sampler=sampler,
        text_encoder=TextEncoderInfo(text.encoder, text.max_length, text.dim))


def write_bundle_manifest(out_dir: str | Path, exported: Exported, recipe, autoencoder,
                          one_step: bool = False, source: str = "",
                          progress=None) -> Path | None:
    """OUT_DIR/manifest.json for a trained run's export (`bundle_manifest`); None, saying why,
    when the export is not a whole bundle."""
    manifest = bundle_manifest(exported, recipe, autoencoder, one_step, source)
    if manifest is None:
        (progress or quiet)("no manifest.json: a bundle for mdsearch generate needs the ONNX "
                            "UNet, text encoder and (for latents) decoder")
        return None
    return write_manifest(out_dir, manifest)
