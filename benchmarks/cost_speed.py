"""Cost-model speed: screening many configurations with the block cache against the plain meta-
device count (and fvcore on real tensors), in one run.

    python benchmarks/cost_speed.py [--space md_search] [--configs 1000] [--repeats 5]

1. One spec (`--preset`): our meta-device count against fvcore on real tensors (wall time, and
   the two counts agree).
2. A screen: `--configs` random configurations of a search space, costed at 512x512 the way a
   sweep's budget filter does (`CostCache`: a configuration seen before is free, a new one
   reuses the blocks it shares with earlier ones), and, on a subset, with the plain uncached
   count; configs/s of each, the rate on distinct specs alone, and the largest relative
   difference of the totals (params and GMACs) on that subset (must be 0).
Ends with one JSON line: configs_per_second, distinct_specs_per_second,
uncached_configs_per_second, max_rel_diff.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from mdsearch.arch import presets
from mdsearch.arch.cost import BlockCosts, cost, fvcore_count
from mdsearch.search.space import CostCache, load_space


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="md")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--space", default="md_search")
    parser.add_argument("--configs", type=int, default=1000)
    parser.add_argument("--check", type=int, default=50, help="configs also costed uncached")
    parser.add_argument("--no-fvcore", action="store_true")
    args = parser.parse_args()
    spec = presets.get(args.preset)
    torch.set_grad_enabled(False)

    cost(spec, args.resolution)  # warm-up (imports, dispatcher caches)
    ours_s, ours = timed(lambda: cost(spec, args.resolution), args.repeats)
    print(f"spec {spec.name} at {args.resolution}x{args.resolution}, "
          f"{torch.get_num_threads()} threads")
    print(f"  mdsearch cost (meta device): {ours_s * 1e3:8.1f} ms  "
          f"{ours.params / 1e6:.1f}M params, {ours.gmacs:.2f} GMACs")
    if not args.no_fvcore:
        fv_s, fv = timed(lambda: fvcore_count(spec, args.resolution), max(1, args.repeats // 2))
        print(f"  fvcore (real tensors)      : {fv_s * 1e3:8.1f} ms  {fv['total'] / 1e9:.2f} "
              f"GMACs (incl. norms/upsampling); speed-up {fv_s / ours_s:.1f}x, counts differ by "
              f"{ours.gmacs * 1e9 / fv['total'] - 1:+.2%}")

    space = load_space(args.space)
    rng = random.Random(0)
    specs = [space.spec_for(space.sample(rng)) for _ in range(args.configs)]
    screen = CostCache()
    start = time.perf_counter()
    screened = [screen.get(s, args.resolution) for s in specs]
    screen_s = time.perf_counter() - start
    distinct_specs = list({json.dumps(s.to_dict(), sort_keys=True): s for s in specs}.values())
    blocks = BlockCosts()
    start = time.perf_counter()
    for s in distinct_specs:
        cost(s, args.resolution, cache=blocks)
    distinct_s = time.perf_counter() - start
    subset = specs[:args.check]
    start = time.perf_counter()
    plain = [cost(s, args.resolution) for s in subset]
    plain_s = time.perf_counter() - start
    # the block-cached totals, warm (the shared cache above) and cold, against the plain count
    warm = [cost(s, args.resolution, cache=blocks) for s in subset]
    cold = [cost(s, args.resolution, cache=BlockCosts()) for s in subset[:5]]
    diff = max(max(abs(a.params - b.params) / b.params, abs(a.gmacs - b.gmacs) / b.gmacs)
               for a, b in [*zip(warm, plain), *zip(cold, plain)])
    assert all(a["params"] == b.params for a, b in zip(screened, plain))
    rate, plain_rate = len(specs) / screen_s, len(subset) / plain_s
    distinct_rate = len(distinct_specs) / distinct_s
    print(f"screen of {len(specs)} random {space.name} configurations ({len(distinct_specs)} "
          f"distinct specs, {len(blocks.params)} distinct blocks):")
    print(f"  as a sweep screens (CostCache): {screen_s:6.1f} s  ({rate:.0f} configs/s)")
    print(f"  the distinct specs alone, block cache: {distinct_s:6.1f} s  "
          f"({distinct_rate:.0f} specs/s)")
    print(f"  uncached (first {len(subset)}): {plain_s:6.1f} s  ({plain_rate:.1f} configs/s); "
          f"speed-up {rate / plain_rate:.0f}x (distinct specs: {distinct_rate / plain_rate:.1f}x)")
    print(f"  largest relative difference of the block-cached totals on those {len(subset)}: "
          f"{diff:.2e}")
    print(json.dumps({"configs_per_second": round(rate, 1),
                      "distinct_specs_per_second": round(distinct_rate, 1),
                      "uncached_configs_per_second": round(plain_rate, 2),
                      "max_rel_diff": diff, "configs": len(specs),
                      "distinct_specs": len(distinct_specs)}))


if __name__ == "__main__":
    main()
