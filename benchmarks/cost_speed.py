"""Cost-model speed: our meta-device count against fvcore on real tensors, same spec, same run.

    python benchmarks/cost_speed.py [--preset md] [--resolution 512] [--repeats 5]

Prints the wall time of each, their ratio, and checks the two counts agree. fvcore has to allocate
the real weights and run a real forward pass; ours allocates nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from mdsearch.arch import presets
from mdsearch.arch.cost import cost, fvcore_count


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
    args = parser.parse_args()
    spec = presets.get(args.preset)
    torch.set_grad_enabled(False)

    cost(spec, args.resolution)  # warm-up (imports, dispatcher caches)
    ours_s, ours = timed(lambda: cost(spec, args.resolution), args.repeats)
    fv_s, fv = timed(lambda: fvcore_count(spec, args.resolution), max(1, args.repeats // 2))
    fv_macs = fv["total"]

    print(f"spec {spec.name} at {args.resolution}x{args.resolution}, "
          f"{torch.get_num_threads()} threads")
    print(f"  mdsearch cost (meta device): {ours_s * 1e3:8.1f} ms  "
          f"{ours.params / 1e6:.1f}M params, {ours.gmacs:.2f} GMACs")
    print(f"  fvcore (real tensors)      : {fv_s * 1e3:8.1f} ms  {fv_macs / 1e9:.2f} GMACs "
          f"(incl. norms/upsampling)")
    print(f"  speed-up: {fv_s / ours_s:.1f}x; counts differ by {ours.gmacs * 1e9 / fv_macs - 1:+.2%}")
    print(f"  screening rate: {1 / ours_s:.1f} configs/s on one process")


if __name__ == "__main__":
    main()
