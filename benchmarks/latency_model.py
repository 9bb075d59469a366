"""The latency predictor against whole-model latency, measured in the same run.

    python benchmarks/latency_model.py [--space md_search] [--specs 30] [--resolution 256]
                                       [--threads 2] [--fit 4] [--seed 0] [--out DIR]

1. Draws `--specs` random configurations of the space (seeded; distinct) and adds the sd15, md
   and md-lite presets: the evaluated specs. The terms outside the units are fitted on `--fit`
   *other* configurations of the space (the cheapest, the largest, random ones), never on an
   evaluated spec; sd15 is not in md_search at all, so it also checks the table generalises
   across block types (full convs, four levels, an SD mid block).
2. Times every unit those specs contain (the latency table, `mdsearch latency table`'s code),
   then the fit models, then every evaluated spec exported whole, in ONNX Runtime with the
   same thread count.
3. Prints each spec's measured and predicted ms and, over the evaluated specs, the median and
   90th-percentile absolute error (%), Spearman rho of predicted vs measured, and GMACs'
   Spearman rho with measured latency beside it (what ranking by GMACs would get), plus the
   same errors for the bare sum of entries (no fitted terms) and the whole-model measurements'
   own spread (half their p10-p90 range, %).

The default measures at 256x256 (latent 32): whole md exports and times in ~25 s there, which
keeps 37 whole models and ~110 units within about 20 minutes on a 2-core CPU; at 512 the same
run takes about twice as long. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from mdsearch.arch import latency, presets
from mdsearch.arch.cost import cost
from mdsearch.export import latency as measure
from mdsearch.search.space import load_space


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--space", default="md_search")
    parser.add_argument("--specs", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fit", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="keep the table (TABLE.csv) here")
    args = parser.parse_args()
    started = time.time()

    space = load_space(args.space)
    candidates = measure.space_specs(space)
    rng = random.Random(args.seed)
    evaluated = rng.sample(candidates, min(args.specs, len(candidates)))
    evaluated += [presets.get(name) for name in ("sd15", "md", "md-lite")]
    keys = {_units_key(s, args.resolution) for s in evaluated}
    rest = [s for s in candidates if _units_key(s, args.resolution) not in keys]
    fitting = measure.fit_specs(rest, args.fit, seed=args.seed)

    out = Path(args.out or tempfile.mkdtemp(prefix="mdsearch-latency-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    table = out / "table.csv"
    work = Path(tempfile.mkdtemp(prefix="mdsearch-latency-work-"))
    say = lambda m: print(m, flush=True)  # noqa: E731
    try:
        units = latency.distinct(latency.units(s, args.resolution) for s in evaluated + fitting)
        rows = measure.measure_table(units, table, args.threads, args.repeats, say, work)
        fit_models = measure.measure_models(fitting, args.resolution, rows, args.threads,
                                            progress=say, workdir=work)
        fitted = latency.fit(fit_models, args.resolution, measure.where(args.threads))
        latency.fit_path(table).write_text(fitted.to_json())
        say(f"terms fitted on {len(fitting)} models: {fitted.terms}")
        models = measure.measure_models(evaluated, args.resolution, rows, args.threads,
                                        progress=say, workdir=work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    predictor = latency.Table(table)
    measured = np.array([m.measured_ms for m in models])
    predicted = np.array([predictor.predict(s, args.resolution).total_ms for s in evaluated])
    bare = np.array([m.entries_ms for m in models])
    gmacs = np.array([cost(s, args.resolution).gmacs for s in evaluated])
    errors = 100 * np.abs(predicted - measured) / measured
    bare_errors = 100 * np.abs(bare - measured) / measured
    spread = [50 * (m.p90_ms - m.p10_ms) / m.measured_ms for m in models]

    print(f"\n{'spec':<86}{'GMACs':>8}{'measured':>10}{'predicted':>11}{'error':>8}")
    for s, g, m, p, e in zip(evaluated, gmacs, measured, predicted, errors):
        print(f"{s.name:<86}{g:>8.1f}{m:>10.1f}{p:>11.1f}{e:>7.1f}%")
    result = {
        "space": space.name, "resolution": args.resolution, "threads": args.threads,
        "specs": len(evaluated), "fit_models": len(fitting), "units": len(units),
        "median_abs_error_pct": round(float(np.median(errors)), 2),
        "p90_abs_error_pct": round(float(np.percentile(errors, 90)), 2),
        "max_abs_error_pct": round(float(errors.max()), 2),
        "spearman_rho": round(float(spearmanr(predicted, measured)[0]), 4),
        "gmacs_spearman_rho": round(float(spearmanr(gmacs, measured)[0]), 4),
        "bare_sum_median_abs_error_pct": round(float(np.median(bare_errors)), 2),
        "bare_sum_p90_abs_error_pct": round(float(np.percentile(bare_errors, 90)), 2),
        "measurement_half_spread_pct": round(statistics.median(spread), 2),
        "terms": {k: round(v, 4) for k, v in fitted.terms.items()},
        "device": measure.device(), "runtime": " ".join(measure.runtime()),
        "minutes": round((time.time() - started) / 60, 1),
    }
    print(f"\nover {len(evaluated)} specs at {args.resolution}x{args.resolution}: median abs "
          f"error {result['median_abs_error_pct']}%, p90 {result['p90_abs_error_pct']}% "
          f"(goal <= 5% / <= 10%); Spearman rho {result['spearman_rho']} (goal >= 0.95), "
          f"GMACs' rho {result['gmacs_spearman_rho']}; the bare sum of entries: median "
          f"{result['bare_sum_median_abs_error_pct']}%, p90 "
          f"{result['bare_sum_p90_abs_error_pct']}%; a whole-model measurement's own half "
          f"p10-p90 spread {result['measurement_half_spread_pct']}%")
    print(json.dumps(result))


def _units_key(spec, resolution) -> tuple:
    return tuple(u.key for u in latency.units(spec, resolution))


if __name__ == "__main__":
    main()
