"""Train-step throughput: our builder against diffusers' UNet2DConditionModel, eager and compiled.

    python benchmarks/train_step.py [--steps 5] [--batch 8] [--no-compile]

Two models, run interleaved in one process so machine load affects all modes alike:
- SD-1.5's topology at a CPU-sized width (channels 64,128,256,256; 32x32x4 latents, 16x384
  context, batch 8): ours and diffusers' (same parameter count, checked), same loss and AdamW;
- the md proxy the quickstart trains (md at width 1/16, 12x12x3 pixels, batch 32): ours.
Each in eager mode and under torch.compile (compilation is warm-up, not timed). Reported:
median seconds per step, steps/s, achieved GFLOP/s (the cost model's forward MACs x 2 FLOPs x 3
for forward + backward) and its fraction of this machine's fp32 matmul peak, measured in the
same run. Ends with one JSON line: ratio_vs_diffusers_eager and ratio_vs_diffusers_compiled
(ours in its best mode over diffusers in that mode; null where diffusers did not compile),
fraction_of_peak (the md proxy's best mode), and every mode's numbers.

Every case uses the optimiser the trainer uses (AdamW, fused), so the ratio is the models' own.
One more eager step of each SD-1.5 model runs under the profiler, to say where its time goes:
`shared_kernel_fraction` is the part of our step spent in the kernels both models call with the
same shapes (SDPA, convolutions, matmuls, each forward and backward), and
`ceiling_vs_diffusers_eager` the ratio ours would reach if everything else in its step cost
nothing: the most any change that keeps the model's math can give.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mdsearch.arch import presets
from mdsearch.arch.cost import cost
from mdsearch.arch.proxy import proxy_spec
from mdsearch.arch.unet import build

CHANNELS = (64, 128, 256, 256)


def sd15_spec(context_dim: int):
    return presets.get("sd15", {**{f"levels.{i}.channels": c for i, c in enumerate(CHANNELS)},
                                "context_dim": context_dim, "time_freq_dim": CHANNELS[0],
                                "time_embed_dim": 4 * CHANNELS[0]})


def diffusers_model(context_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=CHANNELS, cross_attention_dim=context_dim,
                                attention_head_dim=8)


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """This machine's fp32 matmul rate (GFLOP/s), the best of `repeats`."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size ** 3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class Case:
    """One model in one mode: its step, and the inputs it trains on."""

    def __init__(self, name, model, inputs, flops_per_step, compiled):
        self.name, self.model, self.flops = name, model, flops_per_step
        self.x, self.t, self.ctx = inputs
        self.target = torch.randn_like(self.x)
        # static shapes: each model compiles for its own (compiled after SD-1.5 in the same
        # process, the md proxy's automatic dynamic-shape recompile failed in torch 2.13)
        self.forward = torch.compile(model, dynamic=False) if compiled else model
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer
        self.times: list[float] = []
        self.error: str | None = None

    def step(self):
        out = self.forward(self.x, self.t, self.ctx)
        out = out.sample if hasattr(out, "sample") else out
        loss = torch.nn.functional.mse_loss(out, self.target)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


SHARED_KERNELS = ("scaled_dot_product", "convolution", "aten::mm", "aten::addmm", "aten::bmm")


def kernel_seconds(case) -> tuple[float, float]:
    """(seconds in SHARED_KERNELS, seconds of the whole step) of one profiled step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        case.step()
    events = prof.key_averages()
    shared = sum(e.self_cpu_time_total for e in events
                 if any(k in e.key for k in SHARED_KERNELS)) / 1e6
    return shared, sum(e.self_cpu_time_total for e in events) / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--no-compile", action="store_true", help="eager modes only")
    args = parser.parse_args()
    torch.manual_seed(0)
    dim, length = 384, 16

    sd = sd15_spec(dim)
    sd_inputs = (torch.randn(args.batch, 4, 32, 32), torch.randint(0, 1000, (args.batch,)),
                 torch.randn(args.batch, length, dim))
    sd_flops = 6 * cost(sd, 256).gmacs * 1e9 * args.batch  # 32x32 latents = 256 px
    proxy = proxy_spec(presets.get("md"), 0.0625, latent_channels=3, context_dim=dim,
                       context_len=length)
    proxy_inputs = (torch.randn(32, 3, 12, 12), torch.randint(0, 1000, (32,)),
                    torch.randn(32, length, dim))
    proxy_flops = 6 * cost(proxy, 96).gmacs * 1e9 * 32  # 12x12 latents = 96 px at f=8

    modes = [False] if args.no_compile else [False, True]
    cases = []
    for compiled in modes:
        mode = "compiled" if compiled else "eager"
        ours = build(sd)
        theirs = diffusers_model(dim)
        counts = [sum(p.numel() for p in m.parameters()) for m in (ours, theirs)]
        assert counts[0] == counts[1], counts
        cases += [Case(f"sd15 ours {mode}", ours, sd_inputs, sd_flops, compiled),
                  Case(f"sd15 diffusers {mode}", theirs, sd_inputs, sd_flops, compiled),
                  Case(f"md proxy ours {mode}", build(proxy), proxy_inputs, proxy_flops,
                       compiled)]
    for case in cases:  # warm-up: compiles the compiled modes
        start = time.perf_counter()
        try:
            case.step()
            case.step()
        except Exception as err:  # e.g. a model torch.compile cannot handle
            case.error = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        print(f"  warm-up {case.name}: {time.perf_counter() - start:.1f} s"
              + (f" (FAILED: {case.error})" if case.error else ""), flush=True)
    for _ in range(args.steps):
        for case in cases:
            if case.error is None:
                case.times.append(_timed(case.step))
    peak = matmul_peak()
    shared, total = kernel_seconds(next(c for c in cases if c.name == "sd15 ours eager"))

    rows = {}
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, fp32 matmul peak "
          f"{peak:.0f} GFLOP/s; SD-1.5 topology at channels {CHANNELS}, batch {args.batch}; md "
          f"proxy batch 32; median of {args.steps} steps")
    for case in cases:
        if case.error:
            rows[case.name] = {"error": case.error}
            print(f"  {case.name:24s} failed: {case.error}")
            continue
        s = statistics.median(case.times)
        gflops = case.flops / s / 1e9
        rows[case.name] = {"s_per_step": round(s, 4), "steps_per_s": round(1 / s, 3),
                           "gflops": round(gflops, 2), "fraction_of_peak": round(gflops / peak, 4)}
        print(f"  {case.name:24s} {s:7.3f} s/step  {1 / s:7.2f} steps/s  {gflops:7.1f} GFLOP/s "
              f"({gflops / peak:.1%} of peak)")

    def speed(name):
        return rows.get(name, {}).get("steps_per_s")

    ours_best = max(filter(None, (speed("sd15 ours eager"), speed("sd15 ours compiled"))))
    eager_ratio = ours_best / speed("sd15 diffusers eager")
    compiled_ratio = (ours_best / speed("sd15 diffusers compiled")
                      if speed("sd15 diffusers compiled") else None)
    proxy_best = max((rows[n] for n in rows if n.startswith("md proxy") and "error" not in rows[n]),
                     key=lambda r: r["steps_per_s"])
    ceiling = rows["sd15 diffusers eager"]["s_per_step"] / shared
    print(f"  ours (best mode) vs diffusers eager: {eager_ratio:.2f}x; vs diffusers compiled: "
          + (f"{compiled_ratio:.2f}x" if compiled_ratio else "n/a"))
    print(f"  ours eager spends {shared / total:.0%} of its step in kernels diffusers calls with "
          f"the same shapes (SDPA, conv, matmul); with the rest free: {ceiling:.2f}x diffusers "
          "eager")
    print(json.dumps({"ratio_vs_diffusers_eager": round(eager_ratio, 3),
                      "ratio_vs_diffusers_compiled": (round(compiled_ratio, 3)
                                                      if compiled_ratio else None),
                      "fraction_of_peak": proxy_best["fraction_of_peak"],
                      "shared_kernel_fraction": round(shared / total, 3),
                      "ceiling_vs_diffusers_eager": round(ceiling, 3),
                      "peak_gflops": round(peak, 1), "threads": torch.get_num_threads(),
                      "modes": rows}))


if __name__ == "__main__":
    main()
