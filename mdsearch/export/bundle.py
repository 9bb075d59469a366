"""A UNet and the text encoder that conditions it, exported side by side into one folder.

    encoder = pair_text_encoder(spec, trial_dir="runs/md")    # the encoder the trial trained with
    result = export_models(spec, model, "out/md", latent_size=12, encoder=encoder)
    result.unet.path, result.text_encoder.path                  # unet.onnx, text_encoder.onnx

What `mdsearch export` writes: OUT/unet.onnx and OUT/text_encoder.onnx with OUT/tokenizer/ (or
the .mlpackage pair with `format="coreml"`), each with a JSON sidecar of its result.

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
from ..rundir import RECIPE
from ..data.text import ENCODERS, TextEncoder, get_text_encoder
from .onnx import ExportError, ExportResult, check_unet_exportable, export_unet
from .text import TextExportResult, export_text_encoder

FORMATS = ("onnx", "coreml")
ENCODER_BY_WIDTH = {384: "minilm", 768: "clip"}


@dataclass
class Exported:
    unet: ExportResult
    text_encoder: TextExportResult | None

    def to_dict(self) -> dict:
        """The UNet's fields at the top level (as before text encoders were exported), the text
        encoder's under `text_encoder` (None when it was not exported)."""
        return {**self.unet.to_dict(),
                "text_encoder": self.text_encoder.to_dict() if self.text_encoder else None}

    @property
    def failures(self) -> list[str]:
        """'what: relative error X > 1e-4' for each model whose fp32 parity check failed."""
        return [f"{r.path}: relative error {r.rel_err:.3g} > 1e-4"
                for r in (self.unet, self.text_encoder) if r and r.within_tolerance is False]


def trial_recipe_file(trial: str | Path) -> Path | None:
    """The recipe a trial trained with: `recipe.yaml` in the trial directory, else in its parent
    (a sweep directory); None if there is neither. `trial` is the directory or its checkpoint."""
    folder = Path(trial) if Path(trial).is_dir() else Path(trial).parent
    for candidate in (folder / RECIPE, folder.parent / RECIPE):
        if candidate.is_file():
            return candidate
    return None


def trained_resolution(trial: str | Path) -> int | None:
    """The image resolution a trial (or full training) ended at, from its recipe (the last
    stage's); None when the trial has no recipe."""
    from ..train.recipe import load_recipe

    found = trial_recipe_file(trial)
    return load_recipe(found).final_resolution if found is not None else None


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
                  latency_runs: int = 5, progress=None) -> Exported:
    """Export the UNet and, if given, its text encoder into OUT_DIR, each checked against
    PyTorch where the format can run here (ONNX always; Core ML on macOS)."""
    if format not in FORMATS:
        raise ExportError(f"export format {format!r}: expected one of {', '.join(FORMATS)}")
    check_unet_exportable(spec)
    if encoder is not None:
        check_pair(spec, encoder)
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
    return Exported(unet, text)
