"""Batched training seeds against the same seeds trained one after another.

    python benchmarks/seed_batch.py [--steps 12] [--rounds 2] [--ks 1,2,4,8] [--device cpu]
                                    [--threads N]

The md proxy with the quickstart's recipe (cpu_quick with the quickstart space's overrides: md at
width 1/16, 12x12 pixels, batch 32), trained by the trainer itself (`Training`: data draws, text
embeddings, per-seed clipping, AdamW, EMA; evaluation switched off, since a stack evaluates each
seed as a solo run does). For each K: K seeds as one stack (`seeds: K`) against one solo run,
whose time x K is what the K seeds cost one after another; the two are timed back to back in each
round, so machine load hits both alike, and the median over rounds is kept.

Reported per K: seed-steps per second batched and solo, the speedup (K solo runs' time over the
stack's), and the stack's achieved GFLOP/s (the cost model's forward MACs x 2 x 3 for forward and
backward, x batch x K) as a fraction of this machine's fp32 matmul peak, measured in the same
run. Ends with one JSON line: {"speedup_k8": ..., "fraction_of_peak_k8": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import matmul_peak  # noqa: E402  (one home for the peak measurement)

from mdsearch.arch import presets  # noqa: E402
from mdsearch.arch.cost import cost  # noqa: E402
from mdsearch.search.space import load_space, sweep_recipe  # noqa: E402
from mdsearch.train import trainer  # noqa: E402


def quickstart_recipe(seeds: int, device: str):
    recipe = sweep_recipe(load_space("quickstart"), None)
    return recipe.override({"seeds": seeds, "device": device, "eval.bank": 0,
                            "checkpoint_every": 10 ** 6, "log_every": 10 ** 6})


def seconds_per_step(seeds: int, steps: int, device: str, folder: Path) -> float:
    """Mean seconds per training step of a K-seed stack over `steps` steps (after 3 warm-up
    steps)."""
    run = trainer.Training(presets.get("md"), quickstart_recipe(seeds, device),
                           folder / f"k{seeds}-{time.monotonic_ns()}")
    run.evaluate = lambda *args, **kwargs: {}  # timing the training steps alone
    run.save = lambda *args, **kwargs: None
    run.run(steps=3)
    start = time.perf_counter()
    run.run(steps=3 + steps)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="back-to-back rounds per K")
    parser.add_argument("--ks", default="1,2,4,8", help="stack sizes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's, one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    recipe = quickstart_recipe(1, args.device)
    proxy_gmacs = None
    peak = matmul_peak() if args.device == "cpu" else None
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}"
          + (f", fp32 matmul peak {peak:.0f} GFLOP/s" if peak else "")
          + f"; md proxy, recipe {recipe.name}, batch {recipe.batch_size}", flush=True)
    out: dict = {"device": args.device, "threads": torch.get_num_threads(),
                 "peak_gflops": round(peak, 1) if peak else None, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            solo, batched = [], []
            for _ in range(args.rounds):
                solo.append(seconds_per_step(1, args.steps, args.device, Path(tmp)))
                batched.append(seconds_per_step(k, args.steps, args.device, Path(tmp)))
            s1, sk = statistics.median(solo), statistics.median(batched)
            if proxy_gmacs is None:
                run = trainer.Training(presets.get("md"), recipe, Path(tmp) / "cost")
                proxy_gmacs = cost(run.proxy, recipe.resolution * 8).gmacs  # 12x12 "latents"
            gflops = 6 * proxy_gmacs * recipe.batch_size * k / sk
            row = {"k": k, "s_per_step_solo": round(s1, 4), "s_per_step_stack": round(sk, 4),
                   "seed_steps_per_s_solo": round(1 / s1, 3),
                   "seed_steps_per_s_stack": round(k / sk, 3),
                   "speedup": round(k * s1 / sk, 3), "gflops": round(gflops, 2),
                   "fraction_of_peak": round(gflops / peak, 4) if peak else None}
            out["rows"].append(row)
            print(f"K={k}: stack {sk:.3f} s/step ({k / sk:.2f} seed-steps/s), solo {s1:.3f} "
                  f"s/step ({1 / s1:.2f}); speedup {k * s1 / sk:.2f}x, {gflops:.1f} GFLOP/s"
                  + (f" ({gflops / peak:.1%} of peak)" if peak else ""), flush=True)
    for row in out["rows"]:
        out[f"speedup_k{row['k']}"] = row["speedup"]
        out[f"fraction_of_peak_k{row['k']}"] = row["fraction_of_peak"]
    rows = out.pop("rows")
    print(json.dumps({**out, "rows": rows}))


if __name__ == "__main__":
    main()
