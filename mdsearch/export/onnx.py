"""Export a UNet for phones: an ONNX graph, checked against PyTorch in ONNX Runtime.

    result = export_unet(spec, model, "out/md", latent_size=64)
    result.max_abs_err, result.latency_ms, result.path

The graph takes (latents, timesteps, context) with a fixed batch of 1 and fixed sizes (what
mobile runtimes want), opset 18, through torch's export-based ONNX exporter. Models over 2 GB
(the protobuf limit) are written with external data beside the .onnx file. Parity is measured on
random inputs: the maximum absolute difference between ONNX Runtime (CPU) and PyTorch, and that
difference relative to the largest output magnitude. `--fp16` exports a half-precision copy
(weights and activations) and reports its error against the fp32 PyTorch model.

The text encoder is exported as its own graph by `mdsearch.export.text`, Core ML packages are
made by `mdsearch.export.coreml`, and `mdsearch.export.bundle` puts a UNet and its text encoder
side by side in one folder (what `mdsearch export` writes).

Nothing here unpickles anything: checkpoints load with torch.load(weights_only=True).
"""

from __future__ import annotations

import copy
import json
import logging
import statistics
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..progress import quiet
from ..arch.cost import example_inputs
from ..arch.spec import ArchSpec
from ..arch.unet import build
from ..config import ConfigError
from ..train.checkpoint import (CheckpointError, checkpoint_path, described, ema_model,
                                read_checkpoint, run_kind)

OPSET = 18
FP32_REL_TOLERANCE = 1e-4


class ExportError(ConfigError):
    """A model that cannot be exported as asked (bad checkpoint, unsupported spec)."""


PARITY_ORT = "onnxruntime cpu vs pytorch"


@dataclass(kw_only=True)
class GraphResult:
    """What every exported graph reports: where it is, its format, size and export time, and its
    check against PyTorch. For Core ML, `opset` is None and `target` names the deployment
    target; where the model could not be run (`parity` says why), the error, tolerance and
    latency fields are None."""

    path: str
    format: str
    opset: int | None
    fp16: bool
    size_bytes: int
    external_data: bool
    max_abs_err: float | None
    rel_err: float | None
    within_tolerance: bool | None
    latency_ms: float | None
    export_seconds: float
    parity: str = PARITY_ORT
    target: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(kw_only=True)
class ExportResult(GraphResult):
    """One exported UNet."""

    spec: str
    params: int
    latent_size: int


def compare(output: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Maximum absolute difference, and that difference relative to the largest |reference|."""
    max_abs = float(np.abs(output.astype(np.float32) - reference).max())
    return max_abs, max_abs / max(float(np.abs(reference).max()), 1e-12)


def ort_parity(path: Path, feeds: list[dict], references: list[np.ndarray], fp16: bool,
               latency_runs: int) -> dict:
    """The graph at `path` run in ONNX Runtime (CPU) on each feed against its PyTorch output: the
    worst max_abs_err and rel_err, within_tolerance (fp32: rel_err <= FP32_REL_TOLERANCE; fp16
    is not held to it), and latency_ms (median, on the first feed): a GraphResult's fields."""
    session = cpu_session(path)
    errors = [compare(session.run(None, feed)[0], ref) for feed, ref in zip(feeds, references)]
    max_abs, rel = max(e[0] for e in errors), max(e[1] for e in errors)
    return {"max_abs_err": max_abs, "rel_err": rel,
            "within_tolerance": fp16 or rel <= FP32_REL_TOLERANCE,
            "latency_ms": median_ms(lambda: session.run(None, feeds[0]), latency_runs)}


def median_ms(run, runs: int) -> float:
    """Median wall time of `run()` over `runs` calls, in milliseconds."""
    times = []
    for _ in range(max(runs, 1)):
        tick = time.perf_counter()
        run()
        times.append((time.perf_counter() - tick) * 1000)
    return statistics.median(times)


def onnx_size(path: Path) -> int:
    """Bytes of an .onnx file and its external data file, if any."""
    extra = path.parent.glob(path.name + ".data")
    return path.stat().st_size + sum(f.stat().st_size for f in extra)


def check_opset(opset: int) -> None:
    if opset < 17:
        raise ExportError(f"opset {opset}: mobile targets need >= 17")


def needs_external_data(params: int, fp16: bool) -> bool:
    """Whether a model's weights pass protobuf's 2 GB limit (with margin), so that they must be
    written beside the .onnx file."""
    return params * (2 if fp16 else 4) > 1.8e9


def write_graph(module: torch.nn.Module, inputs: tuple, path: Path, input_names: list[str],
                output_names: list[str], opset: int, large: bool, check: bool = True) -> float:
    """Export `module` on `inputs` to `path` through torch's export-based ONNX exporter
    (external data beside it when `large`) and, with `check`, check the file; the export's
    seconds."""
    import onnx

    started = time.time()
    with quiet_exporter():
        program = torch.onnx.export(module, inputs, dynamo=True, opset_version=opset,
                                    input_names=input_names, output_names=output_names,
                                    verbose=False)
        program.save(str(path), external_data=large)
    seconds = time.time() - started
    del program
    if check:
        onnx.checker.check_model(str(path) if large else onnx.load(str(path)))
    return seconds


@contextmanager
def quiet_exporter():
    """torch's exporter and onnxscript's optimiser log at WARNING what is not a problem (a line
    per missing optional package such as torchvision; "Evaluation failed: cannot reshape ..."
    when constant folding skips a node it cannot evaluate, which the graph keeps as it is) and
    raise FutureWarnings about their own internals: none of it reaches the user."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def cpu_session(path: str | Path):
    """An ONNX Runtime session of the graph at `path` on the CPU provider."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def load_checkpoint(path: str | Path) -> tuple[ArchSpec, torch.nn.Module]:
    """A trained trial (its directory or checkpoint.pt): the proxy spec it trained (carried by
    the checkpoint; proxy_spec.yaml beside it for older runs) and its EMA weights (what
    sampling uses)."""
    ckpt = checkpoint_path(path)
    try:
        state = read_checkpoint(ckpt)
        if run_kind(state, described(ckpt, state)) == "vae":
            raise ExportError(f"{ckpt}: an autoencoder run (mdsearch vae train), not a diffusion "
                              "run: export takes a trained UNet, and bundles this autoencoder's "
                              "decoder when the UNet's recipe names it (autoencoder: {kind: "
                              f"diffusers, path: {ckpt.parent}}}; docs/export.md)")
        return ema_model(ckpt, state)
    except CheckpointError as err:
        raise ExportError(str(err)) from None


def random_model(spec: ArchSpec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(spec).eval()


def unet_inputs(spec: ArchSpec, latent_size: int) -> tuple[torch.Tensor, ...]:
    """Random (latents, timesteps, context) of batch 1 for a parity check (fixed seed)."""
    (x, t, ctx), _ = example_inputs(spec, latent_size)
    g = torch.Generator().manual_seed(0)
    return torch.randn(x.shape, generator=g), t, torch.randn(ctx.shape, generator=g)


def unet_reference(spec: ArchSpec, model: torch.nn.Module, latent_size: int):
    """The parity inputs (latents, timesteps, context), PyTorch's output on them, and the
    parameter count: what every UNet export checks against."""
    inputs = unet_inputs(spec, latent_size)
    with torch.no_grad():
        reference = model.eval()(*inputs).numpy()
    return inputs, reference, sum(p.numel() for p in model.parameters())


def check_unet_exportable(spec: ArchSpec) -> None:
    if spec.pooled_dim or spec.micro_cond_dim:
        raise ExportError(f"{spec.name}: SD-XL-style extra conditions are not exported yet")


def export_unet(spec: ArchSpec, model: torch.nn.Module, out_dir: str | Path, latent_size: int,
                fp16: bool = False, opset: int = OPSET, latency_runs: int = 5,
                progress=None) -> ExportResult:
    """Export `model` to OUT_DIR/unet.onnx (unet_fp16.onnx), check it in ONNX Runtime."""
    check_unet_exportable(spec)
    check_opset(opset)
    say = progress or quiet
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("unet_fp16.onnx" if fp16 else "unet.onnx")
    (x, t, ctx), reference, params = unet_reference(spec, model, latent_size)

    exported = copy.deepcopy(model).half() if fp16 else model  # the caller's model stays fp32
    inputs = (x.half(), t.half(), ctx.half()) if fp16 else (x, t, ctx)
    large = needs_external_data(params, fp16)
    say(f"exporting {spec.name} ({params / 1e6:.1f}M params) at latent {latent_size}x"
        f"{latent_size} to {path}")
    export_seconds = write_graph(exported, inputs, path, ["latents", "timesteps", "context"],
                                 ["prediction"], opset, large)
    del exported
    size = onnx_size(path)

    say("checking parity in ONNX Runtime")
    feed = {"latents": inputs[0].numpy(), "timesteps": inputs[1].numpy(),
            "context": inputs[2].numpy()}
    result = ExportResult(
        path=str(path), format="onnx", spec=spec.name, params=params, latent_size=latent_size,
        opset=opset, fp16=fp16, size_bytes=size, external_data=large,
        export_seconds=export_seconds, **ort_parity(path, [feed], [reference], fp16, latency_runs))
    (out / (path.stem + ".json")).write_text(json.dumps(result.to_dict(), indent=2))
    return result
