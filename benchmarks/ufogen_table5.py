"""The paper's Table 5 on the CPU proxy: UFOGen's reconstruction term x full / LoRA fine-tuning.

    python benchmarks/ufogen_table5.py --init RUN_DIR [--trial ufogen_cpu] [--seeds 0,1]
                                       [--jobs 2] [--redraws 3] [--out runs/ufogen_table5]

Fine-tunes the trained diffusion run RUN_DIR into a one-step generator once per (reconstruction
in {diffusion, distill, ema_distill}) x (adapter in {full, lora}) x seed, with the recipe
`--trial` (mdsearch/train/ufogen.py), then re-samples one run's final generator under
`--redraws` other sampler seeds (the evaluation noise of the one-step metrics). Prints the
Table-5-shaped table: per cell the mean +- std over seeds of fid_proxy (and kid_proxy, align),
the paper's FID beside it under its own name, and each cell's paired difference from the
paper's chosen setting (diffusion loss, full fine-tuning) with its 95% interval and verdict
(better / worse / no detectable difference / not enough seeds to tell). Resumable (finished
runs are read back); ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METRICS = ["fid_proxy", "kid_proxy", "align"]


def fine_tune(init: str, recipe: dict, seed: int, out_dir: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from mdsearch.train.ufogen import UFOGenRecipe, ufogen_trial

    from mdsearch.rundir import RESULT

    done = Path(out_dir) / RESULT
    if done.is_file():  # a finished run is read back, not retrained
        result = json.loads(done.read_text())
        if result["status"] != "ok" or result["steps"] == recipe["steps"]:
            return {"status": result["status"], "reason": result["reason"],
                    "history": result["history"], "seconds": result["seconds"],
                    **result["metrics"]}
    started = time.time()
    result = ufogen_trial(init, UFOGenRecipe.from_dict(recipe, "table5"), out_dir, seed=seed)
    return {"status": result.status, "reason": result.reason, "history": result.history,
            "seconds": time.time() - started, **result.metrics}


def redraw(init: str, recipe: dict, seed: int, run_dir: str, sample_seeds: list[int]) -> dict:
    """The final one-step generator of `run_dir` sampled under other sampler seeds."""
    import torch

    torch.set_num_threads(1)
    from mdsearch.train.trainer import evaluate, make_evaluator
    from mdsearch.train.ufogen import UFOGen, UFOGenRecipe

    run = UFOGen(init, UFOGenRecipe.from_dict(recipe, "table5"), run_dir, seed=seed)
    run.G.eval()
    one_step = run.base.override({"eval.sample_steps": 1, "eval.guidance": 1.0}, "1-step")
    evaluator = make_evaluator(run.base, run.data)
    return {s: evaluate(run.G, run.data, run.schedule, one_step, evaluator, sample_seed=s)
            for s in sample_seeds}


def table(runs, noise: dict) -> tuple[str, dict]:
    import pandas as pd

    from mdsearch.analysis.tables import lora_vs_full, table5_markdown, ufogen_table

    df = pd.DataFrame(runs).assign(status=lambda d: d["status"].replace({"ok": "completed"}))
    shown, raw = ufogen_table(df)
    lora = lora_vs_full(df)
    n = {m: len(noise.get(m, [])) for m in METRICS}
    text = (table5_markdown(shown, lora) + " Evaluation noise (the diffusion + full seed-"
            f"{runs[0]['seed'] if runs else 0} generator under {n['fid_proxy']} other sampler "
            f"seeds): fid_proxy std {_std(noise.get('fid_proxy', [])):.3g}, kid_proxy "
            f"{_std(noise.get('kid_proxy', [])):.3g}, align {_std(noise.get('align', [])):.3g}.")
    cells = {f"{r['reconstruction']}/{r['adapter']}": {k: v for k, v in r.items()
                                                       if k not in ("reconstruction", "adapter")}
             for r in raw.to_dict("records")}
    cells["lora_minus_full"] = lora
    return text, cells


def _std(values) -> float:
    """The sample std of the redraws; nan with fewer than two."""
    values = [float(v) for v in values]
    return statistics.stdev(values) if len(values) > 1 else math.nan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--init", required=True, help="a trained diffusion run directory")
    ap.add_argument("--trial", default="ufogen_cpu")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--redraws", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("runs/ufogen_table5"))
    args = ap.parse_args()

    from mdsearch.analysis.tables import ADAPTERS, RECONSTRUCTIONS
    from mdsearch.train.ufogen import load_ufogen_recipe

    base = load_ufogen_recipe(args.trial)
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(r, a, s) for s in seeds for r in RECONSTRUCTIONS for a in ADAPTERS]
    print(f"UFOGen Table 5: {len(jobs)} fine-tunes of {args.init} ({args.trial}, "
          f"{base.steps} steps each, {args.jobs} jobs)", flush=True)
    runs, started = [], time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {}
        for r, a, s in jobs:
            recipe = base.override({"reconstruction": r, "adapter": a}, f"{r}/{a}").to_dict()
            run_dir = args.out / f"{r}_{a}_s{s}"
            futures[pool.submit(fine_tune, args.init, recipe, s, str(run_dir))] = (r, a, s)
        for i, fut in enumerate(as_completed(futures), 1):
            r, a, s = futures[fut]
            run = {"reconstruction": r, "adapter": a, "seed": s, **fut.result()}
            runs.append(run)
            print(f"[{time.time() - started:6.0f}s] {i}/{len(jobs)} {r}/{a} seed {s}: "
                  f"{run['status']}  fid_proxy {run.get('fid_proxy', math.nan):.1f}  "
                  f"kid_proxy {run.get('kid_proxy', math.nan):.0f}  align "
                  f"{run.get('align', math.nan):.3f}  ({run['seconds']:.0f}s)", flush=True)
        noise_file = args.out / "evaluation_noise.json"
        noise = json.loads(noise_file.read_text()) if noise_file.is_file() else {}
        if not noise and args.redraws >= 2:
            recipe = base.override({"reconstruction": "diffusion", "adapter": "full"}, "d/f")
            draws = pool.submit(redraw, args.init, recipe.to_dict(), seeds[0],
                                str(args.out / f"diffusion_full_s{seeds[0]}"),
                                list(range(1, args.redraws + 1))).result()
            noise = {m: [d[m] for d in draws.values()] for m in METRICS}
            noise_file.write_text(json.dumps(noise))
    start = runs[0]["history"][:2] if runs else []
    text, cells = table(runs, noise)
    before = "\n".join(f"- the starting model, {h['sampler']}: fid_proxy {h['fid_proxy']:.4g}, "
                       f"kid_proxy {h['kid_proxy']:.4g}, align {h['align']:.3f}" for h in start)
    text = before + "\n\n" + text
    (args.out / "table5.md").write_text(text + "\n")
    print(text)
    print(json.dumps({"benchmark": "ufogen_table5", "init": args.init, "trial": args.trial,
                      "seeds": seeds, "wall_s": round(time.time() - started, 1),
                      "cells": cells}, default=float))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
