"""Seed strategies replayed on the stored ground truth: what each spends, and how often it finds
the true best.

    python benchmarks/noisy_search.py [--data benchmarks/data/ground_truth] [--metric text_gain]
                                      [--step 960] [--reps 500] [--min 2] [--max 8]
                                      [--tie-margin X] [--seed 0]

A "training" of configuration c with seed k is the stored evaluation of (c, k) at `--step`
(benchmarks/ground_truth.py): no model is trained, hundreds of sweeps replay in seconds. Each
repetition shuffles the stored seeds (one order shared by every configuration, so seed k of two
trials is the same seed, as in a real sweep) and the order in which trials arrive. The truth is
each configuration's mean over all stored seeds.

Strategies:
  uniform K    every configuration K seeds (K in 1, 2, 4, 8)
  racing       mdsearch.search.racing.SeedRace from `--min` to `--max` seeds in groups of
               `--min`, trials arriving one at a time in a random order
The chosen set, for both: the best mean and every trial whose interval against it (paired on
shared seeds) is not wholly worse; with one seed, the best alone.

Reported per strategy: seed-steps spent (seeds x step), P(the chosen set holds the true best and
has at most 3 trials: more counts as no decision), the mean size of the chosen set, and the
racing ratio against the cheapest uniform K that reaches P >= 0.9. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

HERE = Path(__file__).resolve().parent
DECIDED = 3  # a chosen set larger than this is no decision


def load_truth(data: Path, metric: str, step: int) -> tuple[list[str], np.ndarray]:
    """Configuration names and an (n_configs, n_seeds) array of `metric` at `step`; only
    configurations with every seed stored."""
    rows = [json.loads(line) for line in data.with_suffix(".jsonl").read_text().splitlines()]
    values: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["step"] == step and metric in r:
            values.setdefault(r["config"], {})[r["seed"]] = float(r[metric])
    seeds = max((len(v) for v in values.values()), default=0)
    names = sorted(c for c, v in values.items() if len(v) == seeds)
    if len(names) < 2 or seeds < 2:
        sys.exit(f"{data}.jsonl: {len(names)} configurations with {seeds} seeds at step {step}: "
                 "the ground truth is not complete enough to replay (benchmarks/ground_truth.py)")
    return names, np.array([[values[c][k] for k in sorted(values[c])] for c in names])


def chosen_set(entrants, race) -> set[int]:
    """The trials a sweep cannot tell from the best mean: the best, and every trial whose
    interval against it does not lie wholly on the worse side (one seed: the best alone)."""
    sign = 1 if race.mode == "max" else -1
    best = max(entrants, key=lambda e: sign * e.mean)
    return {int(e.trial_id) for e in entrants
            if e is best or (e.n >= 2 and race.compare(e, best, entrants) != "worse")}


def uniform(table: np.ndarray, order: np.ndarray, k: int, race) -> set[int]:
    """The chosen set when every configuration trains the first K seeds of `order`."""
    from mdsearch.search.racing import Entrant

    return chosen_set([Entrant(str(i), {int(s): table[i, s] for s in order[:k]})
                       for i in range(len(table))], race)


def racing(table: np.ndarray, order: np.ndarray, arrival: np.ndarray, race) -> tuple[set[int], int]:
    """Trials arrive one at a time (a sweep with one trial running) and each races until the
    rule stops it, judged against the trials before it; a stopped trial never gets more.
    Returns the chosen set and the seeds spent."""
    from mdsearch.search.racing import MORE, Entrant

    entrants: list[Entrant] = []
    for i in arrival:
        e = Entrant(str(int(i)), {int(s): table[i, s] for s in order[:race.min_seeds]})
        entrants.append(e)
        while race.decide(e, entrants).action == MORE:
            for s in order[e.n:e.n + race.next_seeds(e.n)]:
                e.values[int(s)] = table[i, s]
    return chosen_set(entrants, race), sum(e.n for e in entrants)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=HERE / "data" / "ground_truth")
    ap.add_argument("--metric", default="text_gain")
    ap.add_argument("--step", type=int, default=960)
    ap.add_argument("--reps", type=int, default=500)
    ap.add_argument("--min", type=int, default=2)
    ap.add_argument("--max", type=int, default=None)
    ap.add_argument("--tie-margin", type=float, default=None,
                    help="default: 1.3%% of the best true mean (the 'FID lottery' tie rule)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from mdsearch.quality import direction
    from mdsearch.search.racing import SeedRace

    names, table = load_truth(args.data, args.metric, args.step)
    n, seeds = table.shape
    mode = direction(args.metric)
    truth = table.mean(axis=1)
    best = int(np.argmax(truth) if mode == "max" else np.argmin(truth))
    margin = args.tie_margin if args.tie_margin is not None else 0.013 * abs(truth[best])
    race = SeedRace(args.metric, mode, min_seeds=args.min, max_seeds=args.max or seeds,
                    tie_margin=margin)
    rng = np.random.default_rng(args.seed)
    ks = [k for k in (1, 2, 4, 8) if k <= seeds]
    found = {f"uniform_{k}": [] for k in ks} | {"racing": []}
    sizes = {name: [] for name in found}
    spent = {f"uniform_{k}": k * n for k in ks}
    race_spent = []
    for _ in range(args.reps):
        order, arrival = rng.permutation(seeds), rng.permutation(n)
        for k in ks:
            chosen = uniform(table, order, k, race)
            found[f"uniform_{k}"].append(best in chosen and len(chosen) <= DECIDED)
            sizes[f"uniform_{k}"].append(len(chosen))
        chosen, used = racing(table, order, arrival, race)
        found["racing"].append(best in chosen and len(chosen) <= DECIDED)
        sizes["racing"].append(len(chosen))
        race_spent.append(used)
    spent["racing"] = float(np.mean(race_spent))
    result = {name: {"seed_steps": round(spent[name] * args.step),
                     "p_best_chosen": round(float(np.mean(found[name])), 3),
                     "chosen_size": round(float(np.mean(sizes[name])), 2)} for name in found}
    enough = [spent[f"uniform_{k}"] for k in ks if result[f"uniform_{k}"]["p_best_chosen"] >= 0.9]
    ratio = spent["racing"] / min(enough) if enough else None
    print(f"{n} configurations x {seeds} seeds, {args.metric} at step {args.step}; true best "
          f"{names[best]} ({truth[best]:.4g}); tie margin {margin:.3g}; {args.reps} repetitions")
    print(f"{'strategy':<11} {'seed-steps':>10} {'P(best chosen, <= 3)':>21} {'set size':>9}")
    for name, r in result.items():
        print(f"{name:<11} {r['seed_steps']:>10} {r['p_best_chosen']:>21.3f} "
              f"{r['chosen_size']:>9.2f}")
    print(json.dumps({"benchmark": "noisy_search", "metric": args.metric, "step": args.step,
                      "configs": n, "seeds": seeds, "reps": args.reps, "tie_margin": margin,
                      "strategies": result,
                      "racing_seed_steps_ratio": None if ratio is None else round(ratio, 3),
                      "goal": "racing P >= 0.9 at <= 0.5 of the cheapest uniform K with P >= 0.9"}))


if __name__ == "__main__":
    main()
