"""Train-step throughput: our builder against diffusers' UNet2DConditionModel, same config.

    python benchmarks/train_step.py [--steps 5] [--batch 8]

Both models have SD-1.5's topology at a CPU-sized width (channels 64,128,256,256), the same
parameter count (checked), the same inputs (32x32x4 latents, 16x384 context), the same loss and
AdamW. They run interleaved in one process so machine load affects both alike; the script prints
the median seconds per step of each and the ratio (goal: ours >= 1.2x as fast).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mdsearch.arch import presets
from mdsearch.arch.unet import build

CHANNELS = (64, 128, 256, 256)


def ours_model(context_dim: int):
    spec = presets.get("sd15", {**{f"levels.{i}.channels": c for i, c in enumerate(CHANNELS)},
                                "context_dim": context_dim, "time_freq_dim": CHANNELS[0],
                                "time_embed_dim": 4 * CHANNELS[0]})
    return build(spec)


def diffusers_model(context_dim: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(block_out_channels=CHANNELS, cross_attention_dim=context_dim,
                                attention_head_dim=8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--context", type=int, nargs=2, default=(16, 384), metavar=("LEN", "DIM"))
    args = parser.parse_args()
    length, dim = args.context

    torch.manual_seed(0)
    models = {"ours": ours_model(dim), "diffusers": diffusers_model(dim)}
    counts = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items()}
    assert counts["ours"] == counts["diffusers"], counts
    x = torch.randn(args.batch, 4, args.latent, args.latent)
    t = torch.randint(0, 1000, (args.batch,))
    ctx = torch.randn(args.batch, length, dim)
    target = torch.randn_like(x)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}

    def step(name):
        model = models[name]
        out = model(x, t, ctx)
        out = out.sample if hasattr(out, "sample") else out
        loss = torch.nn.functional.mse_loss(out, target)
        opts[name].zero_grad(set_to_none=True)
        loss.backward()
        opts[name].step()

    times = {k: [] for k in models}
    for i in range(args.steps + 1):  # the first round is warm-up
        for name in models:
            start = time.perf_counter()
            step(name)
            if i:
                times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"SD-1.5 topology, channels {CHANNELS}, {counts['ours'] / 1e6:.1f}M params, batch "
          f"{args.batch}, latents {args.latent}x{args.latent}x4, context {length}x{dim}, "
          f"{torch.get_num_threads()} threads, {args.steps} timed steps each")
    for name, s in med.items():
        print(f"  {name:9s}: {s:.3f} s/step")
    print(f"  speed-up (diffusers / ours): {med['diffusers'] / med['ours']:.2f}x")


if __name__ == "__main__":
    main()
