"""How well an arm of the fidelity study ranks, against a reference ranking from another study.

    python benchmarks/fidelity_against.py STUDY REFERENCE [--budget B] [--ref-budget R]

STUDY and REFERENCE are `--out` folders of benchmarks/proxy_fidelity.py (their `runs.jsonl`), on
the same configurations. The reference ranking of a metric is the mean over REFERENCE's seeds at
its longest budget (or R) of the metric itself, or of its base metric for an arm's own scores
(`<metric>_tail` -> `<metric>`; `teacher_gap` -> `val_loss`: both ask which candidate models
the data best). Printed per metric, at STUDY's budget B (default its shortest):

    tau_mean    Kendall tau-b of STUDY's seed-mean ranking against the reference
    tau_seed    the same for one seed's ranking (mean over STUDY's seeds)
    ref_noise   the reference's own seed std of its mean over its true spread (the issue's
                condition on a reference: at most 1/3), from its seeds
    k           seeds per candidate STUDY's arm needs for a seed std <= 1/3 of its true spread

Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BASE = {"teacher_gap": "val_loss"}


def base_metric(metric: str) -> str:
    metric = metric.removesuffix("_tail")
    return BASE.get(metric, metric)


def load(folder: Path):
    import pandas as pd

    rows = [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines()]
    runs = pd.DataFrame([r for r in rows if r.get("status") == "ok"])
    if runs.empty:
        sys.exit(f"{folder / 'runs.jsonl'}: no finished runs")
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("study", type=Path)
    ap.add_argument("reference", type=Path)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--ref-budget", type=int, default=None)
    args = ap.parse_args()

    from mdsearch.analysis.reliability import kendall_tau_b, noise_table
    from proxy_fidelity import METRICS

    study, ref = load(args.study), load(args.reference)
    budget = args.budget or int(study["budget"].min())
    ref_budget = args.ref_budget or int(ref["budget"].max())
    study, ref = study[study["budget"] == budget], ref[ref["budget"] == ref_budget]
    ref_seeds = ref.groupby("config").size().min()
    metrics = [m for m in METRICS if m in study and base_metric(m) in ref]
    ref_table = noise_table(ref, sorted({base_metric(m) for m in metrics})).set_index("metric")
    arm_table = noise_table(study, metrics).set_index("metric")
    out = {}
    print(f"{args.study} at {budget} steps against {args.reference} at {ref_budget} steps "
          f"({ref_seeds} seeds)")
    print(f"{'metric':<20} {'reference':<14} {'tau_mean':>8} {'tau_seed':>8} {'ref_noise':>9} "
          f"{'k':>6}")
    for m in metrics:
        b = base_metric(m)
        reference = ref.groupby("config")[b].mean()
        means = study.groupby("config")[m].mean().reindex(reference.index)
        one_seed = [kendall_tau_b(s.set_index("config")[m].reindex(reference.index), reference)
                    for _, s in study.groupby("seed")]
        r = ref_table.loc[b]
        ref_noise = (r["seed_std"] / math.sqrt(ref_seeds) / r["config_std_true"]
                     if r["config_std_true"] > 0 else math.inf)
        entry = {"reference_metric": b, "tau_mean": kendall_tau_b(means, reference),
                 "tau_seed": sum(one_seed) / len(one_seed), "reference_noise": ref_noise,
                 "seeds_needed": float(arm_table.loc[m]["seeds_needed"])}
        out[m] = entry
        print(f"{m:<20} {b:<14} {entry['tau_mean']:8.2f} {entry['tau_seed']:8.2f} "
              f"{ref_noise:9.2f} {entry['seeds_needed']:6.0f}")
    print(json.dumps({"benchmark": "fidelity_against", "study": str(args.study),
                      "reference": str(args.reference), "budget": budget,
                      "reference_budget": ref_budget, "reference_seeds": int(ref_seeds),
                      "metrics": out}))


if __name__ == "__main__":
    main()
