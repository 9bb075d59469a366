"""Core ML packages of the UNet and its text encoder, through coremltools (an optional extra).

    result = convert_unet(spec, model, "out/md", latent_size=64)   # out/md/unet.mlpackage
    result = convert_text_encoder(encoder, "out/md")                # text_encoder.mlpackage

As apple/ml-stable-diffusion ships them, the UNet and the text encoder are separate models:
ML programs (.mlpackage) for iOS 16 / macOS 13 and later, with the same fixed batch-1 inputs
and names as the ONNX graphs (latents, timesteps, context -> prediction; input_ids[,
attention_mask] -> context, token ids as int32, which is what Core ML takes). Compute precision
is float32, or float16 with `fp16=True` (unet_fp16.mlpackage, text_encoder_fp16.mlpackage;
the weights are stored in half precision too), as Apple's pipeline runs on the Neural Engine.

The models go through torch.export (an ExportedProgram with the core ATen decompositions),
which is the path coremltools 9 supports with torch 2.13; its torch.jit.trace path fails on
our UNet (see docs/export.md). coremltools converts on Linux and macOS, but only macOS can run
Core ML models: there the packages are checked against PyTorch on the same inputs as the ONNX
export (on the CPU compute unit, so fp32 is compared in fp32) and timed; elsewhere the error,
tolerance and latency fields are None and `parity` says why.

coremltools is installed with `pip install -c constraints.txt -e '.[coreml]'`.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from ..progress import quiet
from ..arch.spec import ArchSpec
from ..data.text import TextEncoder
from .onnx import (FP32_REL_TOLERANCE, ExportError, ExportResult, check_unet_exportable, compare,
                   median_ms, unet_reference)
from .text import TextExportResult, prepare, save_tokenizer

INSTALL = "pip install -c constraints.txt -e '.[coreml]'"
TARGET = "iOS16"  # ML programs with these ops run on iOS 16+ and macOS 13+
NO_PREDICTIONS = ("not run: Core ML predictions need macOS (coremltools on Linux converts "
                  "models but cannot run them)")
PARITY_COREML = "coreml cpu vs pytorch"


def coremltools():
    """The coremltools module, or an ExportError saying how to install it. Its import-time
    notices (no prediction library on Linux, untested torch/scikit-learn versions) are muted."""
    log = logging.getLogger("coremltools")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        import coremltools as ct
    except ImportError:
        raise ExportError(f"Core ML export needs coremltools, which is not installed; install "
                          f"the optional extra: {INSTALL}") from None
    finally:
        log.setLevel(level)
    return ct


def can_predict() -> bool:
    """Whether Core ML models can run here (macOS only)."""
    return platform.system() == "Darwin"


def _convert(ct, module: torch.nn.Module, args: tuple, output: str, fp16: bool, path: Path,
             what: str):
    """torch.export -> coremltools ML program saved at `path`. The program keeps PyTorch's
    composite ops (layer/group norm, attention), which Core ML has fused kernels for; if
    coremltools lacks one of them (MiniLM's `new_ones`), it is converted again after the core
    ATen decompositions. Failures become an ExportError naming the stage."""
    try:
        program = torch.export.export(module, args)
    except Exception as err:
        raise ExportError(f"{what}: torch.export failed before the Core ML conversion: "
                          f"{type(err).__name__}: {_first_line(err)}") from None
    options = dict(convert_to="mlprogram", outputs=[ct.TensorType(name=output)],
                   minimum_deployment_target=getattr(ct.target, TARGET),
                   compute_precision=ct.precision.FLOAT16 if fp16 else ct.precision.FLOAT32)
    try:
        mlmodel = _quiet(ct.convert, program.run_decompositions({}), **options)
    except Exception as first:
        try:
            mlmodel = _quiet(ct.convert, program.run_decompositions(), **options)
        except Exception as err:
            raise ExportError(
                f"{what}: coremltools {ct.__version__} could not convert it with torch "
                f"{torch.__version__} (as exported: {type(first).__name__}: "
                f"{_first_line(first)}; after the core ATen decompositions: "
                f"{type(err).__name__}: {_first_line(err)})") from None
    if path.exists():
        shutil.rmtree(path)
    mlmodel.save(str(path))
    return mlmodel


def _quiet(function, *args, **kwargs):
    """Call `function` without coremltools' own warnings (a deprecation per converted op)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="coremltools")
        warnings.filterwarnings("ignore", category=RuntimeWarning, module="coremltools")
        return function(*args, **kwargs)


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _check(ct, path: Path, feeds: list[dict], reference: list[np.ndarray], output: str,
           fp16: bool, latency_runs: int) -> dict:
    """Parity and latency fields: measured on macOS, None elsewhere."""
    if not can_predict():
        return {"max_abs_err": None, "rel_err": None, "within_tolerance": None,
                "latency_ms": None, "parity": NO_PREDICTIONS}
    model = ct.models.MLModel(str(path), compute_units=ct.ComputeUnit.CPU_ONLY)
    errors = [compare(np.asarray(model.predict(feed)[output]), ref)
              for feed, ref in zip(feeds, reference)]
    max_abs, rel = max(e[0] for e in errors), max(e[1] for e in errors)
    return {"max_abs_err": max_abs, "rel_err": rel,
            "within_tolerance": fp16 or rel <= FP32_REL_TOLERANCE,
            "latency_ms": median_ms(lambda: model.predict(feeds[0]), latency_runs),
            "parity": PARITY_COREML}


def convert_unet(spec: ArchSpec, model: torch.nn.Module, out_dir: str | Path, latent_size: int,
                 fp16: bool = False, latency_runs: int = 5, progress=None) -> ExportResult:
    """Convert `model` to OUT_DIR/unet.mlpackage (unet_fp16.mlpackage); on macOS, check it."""
    ct = coremltools()
    check_unet_exportable(spec)
    say = progress or quiet
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("unet_fp16.mlpackage" if fp16 else "unet.mlpackage")
    (x, t, ctx), reference, params = unet_reference(spec, model, latent_size)
    say(f"converting {spec.name} ({params / 1e6:.1f}M params) at latent {latent_size}x"
        f"{latent_size} to Core ML: {path}")
    started = time.time()
    _convert(ct, model, (x, t, ctx), "prediction", fp16, path, f"UNet {spec.name}")
    seconds = time.time() - started
    feed = {"latents": x.numpy(), "timesteps": t.numpy(), "context": ctx.numpy()}
    checked = _check(ct, path, [feed], [reference], "prediction", fp16, latency_runs)
    result = ExportResult(path=str(path), format="coreml", spec=spec.name, params=params,
                          latent_size=latent_size, opset=None, fp16=fp16, size_bytes=_size(path),
                          external_data=False, export_seconds=seconds, target=TARGET, **checked)
    (out / (path.stem + ".json")).write_text(json.dumps(result.to_dict(), indent=2))
    return result


def convert_text_encoder(encoder: TextEncoder, out_dir: str | Path, fp16: bool = False,
                         latency_runs: int = 5, progress=None) -> TextExportResult:
    """Convert `encoder` to OUT_DIR/text_encoder.mlpackage (text_encoder_fp16.mlpackage) with
    its tokenizer; on macOS, check it."""
    ct = coremltools()
    say = progress or quiet
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("text_encoder_fp16.mlpackage" if fp16 else "text_encoder.mlpackage")
    names, graph, inputs, reference, params = prepare(encoder)
    say(f"converting text encoder {encoder.name} ({params / 1e6:.1f}M params) to Core ML: {path}")
    started = time.time()
    args = tuple(tensor.int() for tensor in inputs[0][:len(names)])  # Core ML takes int32
    _convert(ct, graph, args, "context", fp16, path,
             f"text encoder {encoder.name}")
    seconds = time.time() - started
    tokenizer = save_tokenizer(encoder, out)
    feeds = [dict(zip(names, (ids.int().numpy(), mask.int().numpy()))) for ids, mask in inputs]
    checked = _check(ct, path, feeds, reference, "context", fp16, latency_runs)
    result = TextExportResult(
        path=str(path), format="coreml", encoder=encoder.name, params=params,
        max_length=encoder.max_length, dim=encoder.dim, inputs=names, tokenizer=str(tokenizer),
        opset=None, fp16=fp16, size_bytes=_size(path), external_data=False,
        export_seconds=seconds, target=TARGET, **checked)
    (out / (path.stem + ".json")).write_text(json.dumps(result.to_dict(), indent=2))
    return result
