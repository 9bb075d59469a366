"""GPU check: the CUDA paths run for real on one GPU, printed as one table.

    python benchmarks/gpu_check.py [--out DIR] [--budget 420]

Sections, most important first (each is guarded: a failure prints its reason in the table and
the check goes on; a section that would start after `--budget` seconds is skipped and says so):
  1. `train_trial` of the md proxy through the real trainer (`device: cuda`, the cpu_quick
     recipe: data, EMA, held-out bank, DDIM sampling, metrics, checkpoints), fp32 and bf16;
  2. the training step alone (random inputs, AdamW, the same loss): the md proxy, full-width md
     at 256x256 (32x32 latents), and SD-1.5's full-width topology at 512x512, ours against
     diffusers' UNet2DConditionModel (when diffusers is installed), fp32 / bf16, eager;
  3. a cuda-side export: fp16 ONNX of the md proxy, run by ONNX Runtime's CUDA provider when
     the installed onnxruntime has it (else said);
  4. torch.compile of the proxy's and SD-1.5's steps (last: compiling costs minutes).
Ends with one JSON line (every row); `--out DIR` also gets DIR/gpu_check.json, row by row.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from mdsearch.arch import presets
from mdsearch.arch.cost import cost, example_inputs
from mdsearch.arch.proxy import proxy_spec
from mdsearch.arch.unet import build

ROWS: list[dict] = []
START = time.time()
DEVICE = torch.device("cuda")
OUT: Path | None = None
SECTIONS: list[str] = []
MATCH = ""


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3) if DEVICE.type == "cuda" else 0.0


def reset_peak():
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def row(section: str, what: str, **fields) -> dict:
    entry = {"section": section, "what": what, **fields}
    ROWS.append(entry)
    if OUT:  # written row by row: a run stopped by its time limit keeps what it measured
        (OUT / "gpu_check.json").write_text(json.dumps(ROWS, indent=2))
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                      for k, v in fields.items())
    print(f"[{time.time() - START:6.1f}s] {section:8s} {what:44s} {shown}", flush=True)
    return entry


def guarded(section: str, what: str, budget: float, fn) -> None:
    if section not in SECTIONS or MATCH not in what:
        return
    if time.time() - START > budget:
        row(section, what, status="skipped (time budget)")
        return
    try:
        fn()
    except Exception as err:  # the check reports every failure and goes on
        traceback.print_exc(file=sys.stderr)
        row(section, what, status=f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    finally:
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()


def trainer_run(precision: str, steps: int):
    from mdsearch.train.recipe import load_recipe
    from mdsearch.train.trainer import train_trial

    recipe = load_recipe("cpu_quick").override(
        {"device": DEVICE.type, "precision": precision, "steps": steps, "eval.every": steps,
         "checkpoint_every": steps, "log_every": max(steps // 4, 1)}, source="gpu_check")
    reset_peak()
    with tempfile.TemporaryDirectory() as out:
        result = train_trial(presets.get("md"), recipe, out)
    metrics = {k: round(v, 5) for k, v in result.metrics.items()
               if k in ("val_loss", "text_gain", "fid_proxy", "align")}
    row("trainer", f"md proxy, cpu_quick, {precision}", status=result.status,
        reason=result.reason, steps=result.steps, seconds=round(result.seconds, 1),
        steps_per_s=round(result.steps / result.seconds, 2),
        peak_gib=peak_gib(), **metrics)


def seed_rows(k: int, steps: int):
    """A K-seed stack against one seed alone, through the trainer (benchmarks/seed_batch.py's
    measurement): seed-steps per second of each and the speedup of K stacked seeds over K solo
    runs one after another."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from seed_batch import seconds_per_step

    with tempfile.TemporaryDirectory() as tmp:
        solo = seconds_per_step(1, steps, DEVICE.type, Path(tmp))
        stack = seconds_per_step(k, steps, DEVICE.type, Path(tmp))
    row("seeds", f"md proxy, {k} seeds stacked vs solo", s_per_step_solo=round(solo, 4),
        s_per_step_stack=round(stack, 4), seed_steps_per_s_stack=round(k / stack, 2),
        speedup=round(k * solo / stack, 3), peak_gib=peak_gib())


def diffusers_sd15(context_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(cross_attention_dim=context_dim)  # SD-1.5's defaults


def step_bench(section: str, name: str, make, latent: int, channels: int, batch: int,
               context: tuple[int, int], precision: str, compiled: bool, steps: int,
               macs_per_sample: float | None):
    torch.manual_seed(0)
    dev = DEVICE
    model = make().to(dev)
    forward = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    x = torch.randn(batch, channels, latent, latent, device=dev)
    t = torch.randint(0, 1000, (batch,), device=dev)
    ctx = torch.randn(batch, *context, device=dev)
    target = torch.randn_like(x)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = forward(x, t, ctx)
            out = out.sample if hasattr(out, "sample") else out
            loss = F.mse_loss(out.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    reset_peak()
    warm = time.time()
    for _ in range(3):
        step()
    sync()
    warm = time.time() - warm
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - begin)
    med = statistics.median(times)
    fields = {"batch": batch, "steps_per_s": round(1 / med, 2),
              "peak_gib": peak_gib(),
              "warmup_s": round(warm, 1)}
    if macs_per_sample:  # forward + backward ~ 3x the forward's MACs, 2 FLOPs per MAC
        fields["tflops"] = round(6 * macs_per_sample * batch / med / 1e12, 3)
    row(section, f"{name}, {precision}, {'compiled' if compiled else 'eager'}", **fields)


def export_check(spec):
    import numpy as np
    import onnxruntime as ort

    from mdsearch.export.onnx import OPSET

    model = build(spec).eval()
    (x, t, ctx), _ = example_inputs(spec, 12)
    with tempfile.TemporaryDirectory() as out:
        path = Path(out) / "unet_fp16.onnx"
        program = torch.onnx.export(model.half(), (x.half(), t.half(), ctx.half()), dynamo=True,
                                    opset_version=OPSET, input_names=["latents", "timesteps",
                                                                    "context"])
        program.save(str(path))
        available = ort.get_available_providers()
        provider = ("CUDAExecutionProvider" if "CUDAExecutionProvider" in available
                    else "CPUExecutionProvider")
        session = ort.InferenceSession(str(path), providers=[provider])
        feed = {"latents": x.half().numpy(), "timesteps": t.half().numpy(),
                "context": ctx.half().numpy()}
        got = session.run(None, feed)[0]
    with torch.no_grad():
        ref = build(spec).eval().float()
        ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        want = ref(x, t, ctx).numpy()
    rel = float(np.abs(got.astype(np.float32) - want).max() / (np.abs(want).max() + 1e-12))
    row("export", "md proxy fp16 ONNX in ONNX Runtime", provider=provider,
        cuda_provider=("CUDAExecutionProvider" in available), rel_err_vs_fp32=round(rel, 4),
        ort=ort.__version__)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="also write gpu_check.json here")
    parser.add_argument("--budget", type=float, default=420, help="seconds before skipping")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per step benchmark")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: a dry run of the script itself (tiny, no timings to keep)")
    parser.add_argument("--sections", nargs="+",
                        default=["trainer", "seeds", "step", "export", "compile"],
                        help="run only these sections (default: all)")
    parser.add_argument("--match", default="", help="run only rows whose label contains this")
    args = parser.parse_args()
    global DEVICE, OUT, SECTIONS, MATCH
    DEVICE, OUT, SECTIONS, MATCH = torch.device(args.device), args.out, args.sections, args.match
    if OUT:
        OUT.mkdir(parents=True, exist_ok=True)
    # torch's symbolic-shape reasoning logs thousands of harmless warnings while compiling
    logging.getLogger("torch.utils._sympy.interp").setLevel(logging.ERROR)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA GPU here; nothing to check", file=sys.stderr)
        raise SystemExit(2)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if DEVICE.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        row("env", torch.cuda.get_device_name(0), torch=torch.__version__,
            memory_gib=round(props.total_memory / 2**30, 1), sms=props.multi_processor_count)
    else:
        row("env", "cpu (dry run)", torch=torch.__version__)

    md = presets.get("md")
    context = (md.context_len, md.context_dim)
    quick = proxy_spec(md, 0.0625, latent_channels=3, context_dim=384, context_len=16)
    sd15 = presets.get("sd15")
    try:
        import diffusers  # noqa: F401
        has_diffusers = True
    except ImportError:
        has_diffusers = False
    # (label, builder, latent side, latent channels, batch, context, MACs per sample)
    benches = [
        ("md proxy (quickstart, 12px)", lambda: build(quick), 12, 3, 32, (16, 384),
         cost(quick, 96).gmacs * 1e9),
        ("md full width, 256x256", lambda: build(md), 32, md.latent_channels, 32, context,
         cost(md, 256).gmacs * 1e9),
        ("sd15 full width, 512x512, ours", lambda: build(sd15), 64, 4, 8,
         (sd15.context_len, sd15.context_dim), cost(sd15, 512).gmacs * 1e9),
    ]
    if DEVICE.type == "cpu":  # the dry run checks the script, not the speed: the proxy only
        benches = benches[:1]
    elif has_diffusers:
        benches.append(("sd15 full width, 512x512, diffusers",
                        lambda: diffusers_sd15(sd15.context_dim), 64, 4, 8,
                        (sd15.context_len, sd15.context_dim), cost(sd15, 512).gmacs * 1e9))
    else:
        row("step", "diffusers", status="not installed: ours-vs-diffusers rows skipped")

    for precision in ("fp32", "bf16"):
        guarded("trainer", f"md proxy, cpu_quick, {precision}", args.budget,
                lambda p=precision: trainer_run(p, args.train_steps))
    for k in ((2,) if DEVICE.type == "cpu" else (2, 8)):  # issue 23's goal: >= 6x at K = 8
        guarded("seeds", f"md proxy, {k} seeds stacked vs solo", args.budget,
                lambda k=k: seed_rows(k, 3 if DEVICE.type == "cpu" else 30))
    for label, make, latent, ch, batch, ctx, macs in benches:
        for precision in ("fp32", "bf16"):
            guarded("step", f"{label}, {precision}, eager", args.budget,
                    lambda a=(label, make, latent, ch, batch, ctx, precision, macs): step_bench(
                        "step", a[0], a[1], a[2], a[3], a[4], a[5], a[6], False, args.steps,
                        a[7]))
    guarded("export", "md proxy fp16 ONNX", args.budget, lambda: export_check(quick))
    # compiling full-width md took over 200 s on an H200 (docs/gpu.md): the proxy and SD-1.5
    # (ours against diffusers, the comparison) are compiled, full-width md is not
    for label, make, latent, ch, batch, ctx, macs in (b for b in benches if "md full" not in b[0]):
        guarded("compile", f"{label}, bf16, compiled", args.budget,
                lambda a=(label, make, latent, ch, batch, ctx, macs): step_bench(
                    "compile", a[0], a[1], a[2], a[3], a[4], a[5], "bf16", True, args.steps,
                    a[6]))

    print(json.dumps({"device": ROWS[0]["what"], "seconds": round(time.time() - START),
                      "rows": ROWS}))


if __name__ == "__main__":
    main()
