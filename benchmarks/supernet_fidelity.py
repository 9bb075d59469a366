"""Supernet fidelity: do configurations scored on a trained supernet's shared weights rank as the
same configurations trained alone do?

    python benchmarks/supernet_fidelity.py --supernet runs/qs-supernet \\
        --reference ../shared/evidence/proxy_noise_6configs.jsonl --reference-steps 480 \\
        [--configs benchmarks/fidelity_configs.yaml] [--space DIR/space.yaml]

The configurations of `--configs` (names, each a preset or a point of the space) are scored with
their slices of the supernet's EMA weights on the held-out bank (`mdsearch supernet score`'s
numbers); configurations the supernet cannot hold are listed and left out. `--reference` is a
JSON-lines file of stand-alone runs (one line per configuration, seed and step budget: `config`,
`seed`, `steps`, and the metrics), as the proxy-fidelity study writes them; their mean over seeds
at `--reference-steps` is the stand-alone ranking. Printed per metric: Kendall tau-b between the
supernet's scores and the stand-alone means, each side's pick, and the number of configurations
and seeds behind it; then the compute of each side (configuration-steps trained, and seconds
where known). Ends with one JSON line.

With few configurations tau-b is coarse (6 configurations: one swapped pair moves it by 0.13),
and the stand-alone means carry their own seed noise: docs/supernet.md says how to read it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_fidelity import load_configs  # noqa: E402

METRICS = {"text_gain": "max", "val_loss_mid": "min", "val_loss": "min"}


def reference_means(path: Path, steps: int) -> dict[str, dict]:
    """config -> {metric: mean over seeds, "seeds": n, "train_seconds": sum} at `steps`."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("steps") == steps]
    if not rows:
        sys.exit(f"{path}: no runs at {steps} steps")
    out = {}
    for name in sorted({r["config"] for r in rows}):
        mine = [r for r in rows if r["config"] == name]
        out[name] = {m: statistics.fmean(r[m] for r in mine) for m in METRICS}
        out[name]["seeds"] = len(mine)
        out[name]["train_seconds"] = sum(r.get("train_seconds", 0.0) for r in mine)
    return out


def main() -> None:
    from mdsearch.arch.spec import ArchSpec
    from mdsearch.arch.supernet import SupernetError, subnet_weights
    from mdsearch.analysis.reliability import kendall_tau_b
    from mdsearch.rundir import SPACE
    from mdsearch.search.space import load_space
    from mdsearch.train.supernet import open_supernet

    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--supernet", type=Path, required=True)
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--reference-steps", type=int, default=480)
    ap.add_argument("--configs", type=Path, default=here / "fidelity_configs.yaml")
    ap.add_argument("--space", default=None, help="default: SUPERNET/space.yaml")
    args = ap.parse_args()

    space = load_space(args.space or args.supernet / SPACE)
    run = open_supernet(args.supernet, space)
    reference = reference_means(args.reference, args.reference_steps)
    held, skipped = [], []
    for c in load_configs(args.configs, space):
        if c["name"] not in reference:
            continue
        try:
            subnet_weights(run.ema.model, run.proxy(ArchSpec.from_dict(c["spec"])))
            held.append(c)
        except SupernetError as err:
            skipped.append(f"{c['name']} ({str(err)[:80]})")
    scores = {r["config"]: r for r in run.score(
        [({"config": c["name"]}, ArchSpec.from_dict(c["spec"])) for c in held],
        progress=lambda m: print(m, file=sys.stderr, flush=True))}
    names = sorted(scores)
    result = {"supernet": str(args.supernet), "supernet_step": run.step,
              "configurations": names, "left_out": skipped,
              "reference": str(args.reference), "reference_steps": args.reference_steps,
              "reference_seeds": sorted({reference[n]["seeds"] for n in names}), "metrics": {}}
    print(f"{len(names)} configurations held by the supernet (step {run.step}) and run "
          f"stand-alone at {args.reference_steps} steps; left out: {skipped or 'none'}")
    print(f"{'metric':14} {'tau-b':>6}  supernet pick -> stand-alone pick")
    for metric, mode in METRICS.items():
        ours = [scores[n][metric] for n in names]
        theirs = [reference[n][metric] for n in names]
        tau = kendall_tau_b(ours, theirs)
        best = max if mode == "max" else min
        pick_ours = best(names, key=lambda n: scores[n][metric])
        pick_theirs = best(names, key=lambda n: reference[n][metric])
        result["metrics"][metric] = {"kendall_tau_b": tau, "supernet_pick": pick_ours,
                                     "standalone_pick": pick_theirs,
                                     "supernet": dict(zip(names, ours)),
                                     "standalone": dict(zip(names, theirs))}
        print(f"{metric:14} {tau:6.2f}  {pick_ours} -> {pick_theirs}")
    per_step = 2 + run.random
    batch = run.recipe.batch_size
    result["compute"] = {
        "supernet_configuration_steps": run.step * per_step,
        "supernet_batch": batch, "supernet_seconds": round(run.seconds, 1),
        "standalone_configuration_steps": sum(reference[n]["seeds"] for n in names)
        * args.reference_steps,
        "standalone_seconds": round(sum(reference[n]["train_seconds"] for n in names), 1),
        "supernet_configurations_scored": len(run.specs)}
    c = result["compute"]
    print(f"compute: supernet {c['supernet_configuration_steps']} configuration-steps "
          f"({run.step} steps x {per_step}, batch {batch}; {c['supernet_seconds']} s) for all "
          f"{len(run.specs)} configurations; stand-alone "
          f"{c['standalone_configuration_steps']} configuration-steps "
          f"({c['standalone_seconds']} s) for these {len(names)}")
    print(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
