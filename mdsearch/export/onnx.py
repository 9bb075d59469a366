"""Export a UNet for phones: an ONNX graph, checked against PyTorch in ONNX Runtime.

    result = export_unet(spec, model, "out/md", latent_size=64)
    result.max_abs_err, result.latency_ms, result.path

The graph takes (latents, timesteps, context) with a fixed batch of 1 and fixed sizes (what
mobile runtimes want), opset 18, through torch's export-based ONNX exporter. Models over 2 GB
(the protobuf limit) are written with external data beside the .onnx file. Parity is measured on
random inputs: the maximum absolute difference between ONNX Runtime (CPU) and PyTorch, and that
difference relative to the largest output magnitude. `--fp16` exports a half-precision copy
(weights and activations) and reports its error against the fp32 PyTorch model.

Nothing here unpickles anything: checkpoints load with torch.load(weights_only=True).
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..arch.cost import example_inputs
from ..arch.spec import ArchSpec
from ..arch.unet import build
from ..config import ConfigError

OPSET = 18
FP32_REL_TOLERANCE = 1e-4


class ExportError(ConfigError):
    """A model that cannot be exported as asked (bad checkpoint, unsupported spec)."""


@dataclass
class ExportResult:
    path: str
    format: str
    spec: str
    params: int
    latent_size: int
    opset: int
    fp16: bool
    size_bytes: int
    external_data: bool
    max_abs_err: float
    rel_err: float
    within_tolerance: bool
    latency_ms: float
    export_seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def load_checkpoint(path: str | Path) -> tuple[ArchSpec, torch.nn.Module]:
    """A trained trial (its directory or checkpoint.pt): the proxy spec it trained and its EMA
    weights (what sampling uses)."""
    path = Path(path)
    ckpt = path / "checkpoint.pt" if path.is_dir() else path
    spec_file = ckpt.parent / "proxy_spec.yaml"
    if not ckpt.is_file():
        raise ExportError(f"{ckpt}: checkpoint not found")
    if not spec_file.is_file():
        raise ExportError(f"{spec_file}: the spec the checkpoint was trained with is missing")
    spec = ArchSpec.from_file(spec_file)
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise ExportError(f"{ckpt}: not a readable mdsearch checkpoint ({err})") from None
    model = build(spec)
    model.load_state_dict(state.get("ema", state.get("model")))
    return spec, model.eval()


def random_model(spec: ArchSpec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(spec).eval()


def export_unet(spec: ArchSpec, model: torch.nn.Module, out_dir: str | Path, latent_size: int,
                fp16: bool = False, opset: int = OPSET, latency_runs: int = 5,
                progress=None) -> ExportResult:
    """Export `model` to OUT_DIR/unet.onnx (unet_fp16.onnx), check it in ONNX Runtime."""
    import onnx
    import onnxruntime as ort

    if spec.pooled_dim or spec.micro_cond_dim:
        raise ExportError(f"{spec.name}: SD-XL-style extra conditions are not exported yet")
    if opset < 17:
        raise ExportError(f"opset {opset}: mobile targets need >= 17")
    say = progress or (lambda msg: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("unet_fp16.onnx" if fp16 else "unet.onnx")
    model = model.eval()
    (x, t, ctx), _ = example_inputs(spec, latent_size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(x.shape, generator=g)
    ctx = torch.randn(ctx.shape, generator=g)
    with torch.no_grad():
        reference = model(x, t, ctx).numpy()

    exported = model.half() if fp16 else model
    inputs = (x.half(), t.half(), ctx.half()) if fp16 else (x, t, ctx)
    params = sum(p.numel() for p in model.parameters())
    large = params * (2 if fp16 else 4) > 1.8e9  # protobuf's 2 GB limit, with margin
    say(f"exporting {spec.name} ({params / 1e6:.1f}M params) at latent {latent_size}x"
        f"{latent_size} to {path}")
    started = time.time()
    program = torch.onnx.export(exported, inputs, dynamo=True, opset_version=opset,
                                input_names=["latents", "timesteps", "context"],
                                output_names=["prediction"], verbose=False)
    program.save(str(path), external_data=large)
    export_seconds = time.time() - started
    if fp16:
        model.float()
    onnx.checker.check_model(str(path) if large else onnx.load(str(path)))
    size = path.stat().st_size + sum(f.stat().st_size for f in out.glob(path.name + ".data"))

    say("checking parity in ONNX Runtime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {"latents": inputs[0].numpy(), "timesteps": inputs[1].numpy(),
            "context": inputs[2].numpy()}
    output = session.run(None, feed)[0].astype(np.float32)
    max_abs = float(np.abs(output - reference).max())
    rel = max_abs / max(float(np.abs(reference).max()), 1e-12)
    times = []
    for _ in range(latency_runs):
        tick = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - tick) * 1000)
    result = ExportResult(
        path=str(path), format="onnx", spec=spec.name, params=params, latent_size=latent_size,
        opset=opset, fp16=fp16, size_bytes=size, external_data=large, max_abs_err=max_abs,
        rel_err=rel, within_tolerance=fp16 or rel <= FP32_REL_TOLERANCE,
        latency_ms=statistics.median(times), export_seconds=export_seconds)
    (out / (path.stem + ".json")).write_text(json.dumps(result.to_dict(), indent=2))
    return result
