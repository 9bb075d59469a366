"""Early stopping against running every trial to its full budget, on the same candidates.

    python benchmarks/early_stopping.py [--space quickstart] [--num-samples 8]

Both sweeps use the space's recipe and budget and a random sampler with the same seed, so they
propose the same configurations in the same order; one runs the space's stopping rule (the
paper's, for quickstart), the other runs every trial to the end. Reported: trained trial-steps,
wall time, and the winner of each (best completed trial by the quality objective). Goal: the same
winner, or one within the metric's noise floor of it, for at most a third of the trial-steps
(half at most). Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdsearch.quality import difference_band  # noqa: E402
from mdsearch.raylocal import keep_ray_on_loopback  # noqa: E402

keep_ray_on_loopback()


def run(space_name: str, num_samples: int, stopping: bool, storage: Path) -> dict:
    import ray

    from mdsearch.search.sweep import run_sweep
    from mdsearch.search.space import load_space

    space = load_space(space_name)
    space.algorithm, space.num_samples = "random", num_samples
    if not stopping:
        space.scheduler = {"kind": "none"}
    kind = space.scheduler["kind"]
    started = time.time()
    result = run_sweep(space, name=f"{'stop' if stopping else 'full'}", storage=storage,
                       mlflow=False)
    wall = time.time() - started
    ray.shutdown()
    t = result.table
    trained = t[t["status"] != "filtered"]
    dims = [d.name for d in space.dimensions]
    best = result.best.iloc[0] if len(result.best) else None
    ranked = trained[trained["status"] == "completed"].sort_values(
        space.quality.metric, ascending=space.quality.mode == "min")
    return {"scheduler": kind, "trials": len(trained), "filtered": result.filtered,
            "ranking": [({d: _plain(r[d]) for d in dims}, float(r[space.quality.metric]))
                        for _, r in ranked.iterrows()],
            "stopped": int((trained["status"] == "stopped").sum()),
            "trial_steps": int(trained["steps"].sum()), "wall_s": wall,
            "winner": None if best is None else {d: _plain(best[d]) for d in dims},
            "winner_metric": None if best is None else float(best[space.quality.metric]),
            "metric": space.quality.metric, "results": str(result.results_csv),
            "floor": result.floors.get(space.quality.metric, {}).get("floor")}


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="quickstart")
    parser.add_argument("--num-samples", type=int, default=8)
    parser.add_argument("--storage", default=None, help="where both sweeps go (default: a temp dir)")
    args = parser.parse_args()
    storage = Path(args.storage or tempfile.mkdtemp(prefix="mdsearch-es-"))
    full = run(args.space, args.num_samples, stopping=False, storage=storage)
    stop = run(args.space, args.num_samples, stopping=True, storage=storage)
    print(f"\n{'sweep':<22}{'trials':>7}{'stopped':>8}{'trial-steps':>12}{'wall s':>8}  winner")
    for name, r in (("every trial to the end", full), (f"{stop['scheduler']} stopping rule", stop)):
        print(f"{name:<22}{r['trials']:>7}{r['stopped']:>8}{r['trial_steps']:>12}"
              f"{r['wall_s']:>8.0f}  {r['winner']} ({r['metric']} {r['winner_metric']:.4g})")
    ratio = stop["trial_steps"] / max(1, full["trial_steps"])
    same = stop["winner"] == full["winner"]
    print(f"\ntrial-steps with early stopping / without: {ratio:.2f} (goal <= 0.33); "
          f"same winner: {same}")
    configs = [c for c, _ in full["ranking"]]
    if stop["winner"] in configs:
        rank = configs.index(stop["winner"])
        print(f"the early-stopping winner ranks {rank + 1} of {len(configs)} in the full-budget "
              f"sweep ({full['metric']} {full['ranking'][rank][1]:.4g} vs the best "
              f"{full['ranking'][0][1]:.4g})")
    print("full-budget ranking: " + "; ".join(f"{c} {v:.4g}" for c, v in full["ranking"]))
    print(f"results: {full['results']}, {stop['results']}")
    floor = full["floor"]
    within = None
    if stop["winner"] in configs and floor is not None and math.isfinite(floor):
        gap = abs(full["ranking"][configs.index(stop["winner"])][1] - full["ranking"][0][1])
        band = difference_band(floor)
        within = gap <= band
        print(f"the early-stopping winner is {gap:.3g} from the full-budget best: "
              f"{'within' if within else 'outside'} the noise of a difference "
              f"({band:.3g}; {full['metric']} noise floor {floor:.3g})")
    print(json.dumps({"benchmark": "early_stopping", "space": args.space,
                      "metric": full["metric"], "trial_steps_ratio": round(ratio, 3),
                      "same_winner": same, "winner_within_noise": within, "noise_floor": floor,
                      "stopped": stop["stopped"], "trials": stop["trials"]}))


if __name__ == "__main__":
    main()
