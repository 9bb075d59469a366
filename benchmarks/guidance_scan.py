"""Classifier-free guidance, chosen by measurement: a trained run's final EMA weights sampled
(DDIM, the recipe's steps) at several guidance scales, each under several noise draws, scored by
the attribute classifier (`align` and each attribute) and the classifier-feature FID
(`fid_proxy`). Prints a table of mean +- std over the draws and ends with one JSON line.

    python benchmarks/guidance_scan.py runs/laptop --guidance 1 1.5 2 3 4 --redraws 3

The draws are the same noise for every scale (seeds SAMPLE... + 1000 k), so the scales are
compared on paired samples; std is over the draws (the evaluation noise of one scale).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdsearch.train.heldout import BANK_SEED  # noqa: E402
from mdsearch.train.noise import load_run  # noqa: E402
from mdsearch.train.trainer import evaluate, make_evaluator  # noqa: E402

SHOWN = ("align", "align_shape", "align_colour", "align_size", "align_position", "align_count",
         "align_background", "fid_proxy")


def scan(run_dir: str, scales: list[float], redraws: int) -> dict:
    run = load_run(run_dir)
    data = run.pipeline(run.plan[-1].resolution)
    evaluator = make_evaluator(run.recipe, data)
    model = run.ema.model.unet(run.training_seeds()[0])
    out = {}
    for g in scales:
        recipe = dataclasses.replace(run.recipe, eval=dataclasses.replace(run.recipe.eval,
                                                                          guidance=g))
        values: dict[str, list[float]] = {m: [] for m in SHOWN}
        for k in range(redraws):
            metrics = evaluate(model, data, run.schedule, recipe, evaluator,
                               sample_seed=BANK_SEED + 1000 * (k + 1))
            for m in SHOWN:
                values[m].append(float(metrics[m]))
        out[g] = {m: {"mean": statistics.fmean(v), "std": statistics.stdev(v)}
                  for m, v in values.items()}
        print(f"guidance {g:g}: align {out[g]['align']['mean']:.3f} +- "
              f"{out[g]['align']['std']:.3f}, fid_proxy {out[g]['fid_proxy']['mean']:.1f} +- "
              f"{out[g]['fid_proxy']['std']:.1f}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0])
    parser.add_argument("--redraws", type=int, default=3)
    args = parser.parse_args()
    if args.redraws < 2:
        parser.error("--redraws: at least 2 (the spread needs two draws)")
    started = time.time()
    result = scan(args.run_dir, args.guidance, args.redraws)
    print("| guidance | " + " | ".join(SHOWN) + " |")
    print("|---:|" + "---:|" * len(SHOWN))
    for g, metrics in result.items():
        print(f"| {g:g} | " + " | ".join(
            f"{metrics[m]['mean']:.3f} ± {metrics[m]['std']:.3f}" if m != "fid_proxy"
            else f"{metrics[m]['mean']:.0f} ± {metrics[m]['std']:.0f}" for m in SHOWN) + " |")
    print(json.dumps({"run": args.run_dir, "redraws": args.redraws,
                      "seconds": round(time.time() - started, 1),
                      "guidance": {str(g): {m: v["mean"] for m, v in r.items()}
                                   for g, r in result.items()},
                      "std": {str(g): {m: v["std"] for m, v in r.items()}
                              for g, r in result.items()}}))


if __name__ == "__main__":
    main()
