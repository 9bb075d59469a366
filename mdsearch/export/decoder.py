"""Export the autoencoder's decoder as its own ONNX graph, checked against PyTorch in ONNX Runtime.

    autoencoder = make_autoencoder(recipe.autoencoder)           # a diffusers VAE of the run
    result = export_decoder(autoencoder, "out/md", latent_size=64)   # out/md/decoder.onnx
    result.max_abs_err, result.latency_ms, result.path

The graph maps the latents the UNet denoises, scaled as training scaled them, (1, c, h, w) to
the image (1, 3, h * factor, w * factor) in [-1, 1]: exactly what the autoencoder's `decode`
computes (divide by the scaling factor, the VAE's decoder, clamp to [-1, 1]), so a sampler's
output goes into it as it is. Batch 1 and the sizes are fixed, as for the UNet.

A pixel-space run (autoencoder kind `identity`, the CPU proxies) has no decoder to export: its
latents are the image, and an app clamps them to [-1, 1]. `export_decoder` refuses it.

Parity is measured as for the UNet: random latents (fixed seed) through `decode` in PyTorch and
the graph in ONNX Runtime (CPU); `max_abs_err` is the largest absolute difference, `rel_err` that
difference relative to the largest output magnitude (fp32 passes at <= 1e-4). `--fp16` exports a
half-precision copy and reports its error against the fp32 PyTorch decoder.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..progress import quiet
from ..train.vae import decoder_modules
from .onnx import (OPSET, ExportError, GraphResult, check_opset, needs_external_data, onnx_size,
                   ort_parity, write_graph)


@dataclass(kw_only=True)
class DecoderExportResult(GraphResult):
    """One exported decoder (fields as the UNet's `ExportResult`, plus what an app needs to feed
    it: the autoencoder's kind and model class, latent channels and size, the image size, the
    down-sampling `factor` and the `scaling_factor` the graph divides by)."""

    autoencoder: str
    model: str
    params: int
    latent_channels: int
    latent_size: int
    image_size: int
    factor: int
    scaling_factor: float


def has_decoder(autoencoder) -> bool:
    """Whether the autoencoder has a network to decode with (not pixel space)."""
    return getattr(autoencoder, "vae", None) is not None


class DecoderGraph(torch.nn.Module):
    """The exported computation: scaled latents -> image in [-1, 1], by the autoencoder's own
    `decode` (its VAE is registered here, so that `.half()` converts it)."""

    def __init__(self, autoencoder):
        super().__init__()
        self.vae = autoencoder.vae
        self.autoencoder = autoencoder

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latents)


def decoder_inputs(autoencoder, latent_size: int) -> torch.Tensor:
    """Random scaled latents (1, c, n, n) for a parity check (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, autoencoder.channels, latent_size, latent_size, generator=g)


def export_decoder(autoencoder, out_dir: str | Path, latent_size: int, fp16: bool = False,
                   opset: int = OPSET, latency_runs: int = 5,
                   progress=None) -> DecoderExportResult:
    """Export the decoder of `autoencoder` (a `DiffusersAutoencoder`) to OUT_DIR/decoder.onnx
    (decoder_fp16.onnx), check it in ONNX Runtime."""
    if not has_decoder(autoencoder):
        raise ExportError(f"autoencoder kind {autoencoder.name!r}: pixel space, so there is no "
                          f"decoder to export (the latents are the image)")
    check_opset(opset)
    say = progress or quiet
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("decoder_fp16.onnx" if fp16 else "decoder.onnx")
    graph = DecoderGraph(autoencoder).eval()
    latents = decoder_inputs(autoencoder, latent_size)
    reference = graph(latents).float().numpy()
    params = sum(p.numel() for m in decoder_modules(autoencoder.vae) for p in m.parameters())

    exported = copy.deepcopy(graph).half() if fp16 else graph  # the caller's model stays fp32
    inputs = (latents.half(),) if fp16 else (latents,)
    large = needs_external_data(params, fp16)
    image_size = reference.shape[-1]
    say(f"exporting {type(autoencoder.vae).__name__} decoder ({params / 1e6:.1f}M params) from "
        f"latent {autoencoder.channels}x{latent_size}x{latent_size} to {image_size}x{image_size} "
        f"images to {path}")
    export_seconds = write_graph(exported, inputs, path, ["latents"], ["image"], opset, large)
    del exported

    say("checking the decoder's parity in ONNX Runtime")
    result = DecoderExportResult(
        path=str(path), format="onnx", autoencoder=autoencoder.name,
        model=type(autoencoder.vae).__name__, params=params,
        latent_channels=autoencoder.channels, latent_size=latent_size, image_size=image_size,
        factor=autoencoder.factor, scaling_factor=float(autoencoder.scale), opset=opset, fp16=fp16,
        size_bytes=onnx_size(path), external_data=large, export_seconds=export_seconds,
        **ort_parity(path, [{"latents": inputs[0].numpy()}], [reference], fp16, latency_runs))
    (out / (path.stem + ".json")).write_text(json.dumps(result.to_dict(), indent=2))
    return result
