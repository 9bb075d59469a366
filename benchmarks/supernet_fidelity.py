"""Supernet fidelity: do configurations scored on a trained supernet's shared weights rank as the
same configurations trained alone do?

    python benchmarks/supernet_fidelity.py --supernet runs/qs-supernet \\
        --reference ../shared/evidence/proxy_noise_6configs.jsonl --reference-steps 480 \\
        [--configs benchmarks/supernet_configs.yaml] [--space DIR/space.yaml]
        [--finetune N --out DIR] [--also SUPERNET_B]

The configurations of `--configs` (names, each a preset or a point of the space) are scored with
their slices of the supernet's EMA weights on the held-out bank (`mdsearch supernet score`'s
numbers); configurations the supernet cannot hold are listed and left out. `--reference` is a
JSON-lines file of stand-alone runs (one line per configuration, seed and step budget: `config`,
`seed`, `steps`, and the metrics), as the proxy-fidelity study writes them; their mean over seeds
at `--reference-steps` is the stand-alone ranking. Printed per metric: Kendall tau-b between the
supernet's scores and the stand-alone means, each side's pick, and the number of configurations
and seeds behind it; then the compute of each side (configuration-steps trained, and seconds
where known). Ends with one JSON line.

Beside it, the noise figures that bound what any tau can show: the tau a perfect ranking is
expected to reach against these K-seed means (from the share of their spread that is not seed
noise), the reference's own split-half tau (the means of half its seeds against the other
half's), and with `--also` (the same space's supernet trained with another
seed) the tau between the two supernets' scores. `--finetune N` fine-tunes each configuration's
slice N steps (the supernet's recipe, warm-up at most N/10) before scoring it, in OUT/finetune
(resumable), and counts those steps in the supernet's compute.

With few configurations tau-b is coarse (6 configurations: one swapped pair moves it by 0.13),
and the stand-alone means carry their own seed noise: docs/supernet.md says how to read it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy_fidelity import load_configs  # noqa: E402

METRICS = {"text_gain": "max", "val_loss_mid": "min", "val_loss": "min"}


def reference_rows(path: Path, steps: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # (the shared evidence names a run's budget `steps`; proxy_fidelity.py's runs.jsonl `budget`,
    # one row per evaluation `step`)
    rows = [r for r in rows if r.get("budget", r.get("steps")) == steps
            and r.get("step", steps) == steps]
    if not rows:
        sys.exit(f"{path}: no runs at {steps} steps")
    return rows


def split_half_tau(rows: list[dict], names: list[str], metric: str) -> float | None:
    """Kendall tau-b between the configurations' means over the lower half of the seeds and
    over the upper half (None with fewer than 2 seeds each)."""
    from mdsearch.analysis.reliability import kendall_tau_b

    seeds = sorted({r["seed"] for r in rows})
    if len(seeds) < 2:
        return None
    halves = seeds[:len(seeds) // 2], seeds[len(seeds) // 2:]
    means = [[statistics.fmean(r[metric] for r in rows if r["config"] == n and r["seed"] in h)
              for n in names] for h in halves]
    return kendall_tau_b(*means)


def truth_tau(rows: list[dict], names: list[str], metric: str) -> float | None:
    """The Kendall tau a perfect ranking (the configurations' true means) is expected to reach
    against the reference's K-seed means: (2/pi) asin(sqrt(reliability)), the reliability being
    the share of the means' variance across configurations that is not seed noise (for normal
    noise; None without two seeds per configuration)."""
    groups = [[r[metric] for r in rows if r["config"] == n] for n in names]
    if min(len(g) for g in groups) < 2:
        return None
    k = statistics.fmean(len(g) for g in groups)
    seed_var = statistics.fmean(statistics.variance(g) for g in groups)
    means_var = statistics.variance([statistics.fmean(g) for g in groups])
    reliability = max(0.0, means_var - seed_var / k) / means_var
    return 2 / math.pi * math.asin(math.sqrt(reliability))


def reference_means(rows: list[dict]) -> dict[str, dict]:
    """config -> {metric: mean over seeds, "seeds": n, "train_seconds": sum}."""
    out = {}
    for name in sorted({r["config"] for r in rows}):
        mine = [r for r in rows if r["config"] == name]
        out[name] = {m: statistics.fmean(r[m] for r in mine) for m in METRICS}
        out[name]["seeds"] = len(mine)
        out[name]["train_seconds"] = sum(r.get("train_seconds", r.get("seconds", 0.0))
                                         for r in mine)
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
    ap.add_argument("--configs", type=Path, default=here / "supernet_configs.yaml")
    ap.add_argument("--space", default=None, help="default: SUPERNET/space.yaml")
    ap.add_argument("--finetune", type=int, default=0,
                    help="fine-tune each slice this many steps before scoring it")
    ap.add_argument("--out", type=Path, default=Path("runs/supernet-fidelity"),
                    help="with --finetune: where the fine-tunes are kept (resumable)")
    ap.add_argument("--also", type=Path, default=None,
                    help="the same space's supernet trained with another seed")
    args = ap.parse_args()

    space = load_space(args.space or args.supernet / SPACE)
    run = open_supernet(args.supernet, space)
    rows = reference_rows(args.reference, args.reference_steps)
    reference = reference_means(rows)
    held, skipped = [], []
    for c in load_configs(args.configs, space):
        if c["name"] not in reference:
            continue
        try:
            subnet_weights(run.ema.model, run.proxy(ArchSpec.from_dict(c["spec"])))
            held.append(c)
        except SupernetError as err:
            skipped.append(f"{c['name']} ({str(err)[:80]})")
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    labelled = [({"config": c["name"]}, ArchSpec.from_dict(c["spec"])) for c in held]
    if args.finetune:
        scores = finetuned(run, labelled, args.finetune, args.out, say)
    else:
        scores = {r["config"]: r for r in run.score(labelled, progress=say)}
    other = None
    if args.also is not None:
        other = {r["config"]: r for r in open_supernet(args.also, space).score(labelled,
                                                                               progress=say)}
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
        mine = [r for r in rows if r["config"] in names]
        ceiling = split_half_tau(mine, names, metric)
        perfect = truth_tau(mine, names, metric)
        between = (kendall_tau_b(ours, [other[n][metric] for n in names])
                   if other is not None else None)
        result["metrics"][metric] = {"kendall_tau_b": tau, "supernet_pick": pick_ours,
                                     "standalone_pick": pick_theirs,
                                     "reference_split_half_tau": ceiling,
                                     "perfect_ranking_tau": perfect,
                                     "supernet_seed_tau": between,
                                     "supernet": dict(zip(names, ours)),
                                     "standalone": dict(zip(names, theirs))}
        print(f"{metric:14} {tau:6.2f}  {pick_ours} -> {pick_theirs}   (a perfect ranking: "
              f"{perfect if perfect is None else round(perfect, 2)}; reference split-half "
              f"tau {ceiling if ceiling is None else round(ceiling, 2)}"
              + (f", supernet seed-vs-seed tau {between:.2f})" if between is not None else ")"))
    per_step = run.per_step
    batch = run.recipe.batch_size
    result["compute"] = {
        "supernet_configuration_steps": run.step * per_step + args.finetune * len(names),
        "finetune_steps_each": args.finetune,
        "supernet_batch": batch, "supernet_seconds": round(run.seconds, 1),
        "standalone_configuration_steps": sum(reference[n]["seeds"] for n in names)
        * args.reference_steps,
        # (None: the reference file does not say)
        "standalone_seconds": round(sum(reference[n]["train_seconds"] for n in names), 1) or None,
        "supernet_configurations_scored": len(run.specs)}
    c = result["compute"]
    print(f"compute: supernet {c['supernet_configuration_steps']} configuration-steps "
          f"({run.step} steps x {per_step}"
          + (f" + {args.finetune} x {len(names)} fine-tune" if args.finetune else "")
          + f", batch {batch}; {c['supernet_seconds']} s) for all "
          f"{len(run.specs)} configurations; stand-alone "
          f"{c['standalone_configuration_steps']} configuration-steps "
          f"({c['standalone_seconds']} s) for these {len(names)}")
    c["ratio"] = c["supernet_configuration_steps"] / c["standalone_configuration_steps"]
    print(f"compute ratio (configuration-steps): {c['ratio']:.3f}")
    print(json.dumps(result, default=float))


def finetuned(run, labelled, steps: int, out: Path, say) -> dict[str, dict]:
    """Each configuration's slice fine-tuned `steps` steps, then its held-out metrics."""
    import time

    from mdsearch.train.supernet import finetune_recipe
    from mdsearch.train.trainer import train_trial

    recipe = finetune_recipe(run.recipe, steps)
    scores = {}
    for label, spec in labelled:
        started = time.time()
        result = train_trial(spec, recipe, out / "finetune" / label["config"],
                             start=run.slice_of(spec).state_dict())
        scores[label["config"]] = {**label, **result.metrics}
        say(f"{label['config']}: fine-tuned {steps} steps, text_gain "
            f"{result.metrics['text_gain']:.4g} ({time.time() - started:.0f} s)")
    return scores


if __name__ == "__main__":
    main()
