"""Proxy fidelity study: which quality metric ranks architectures, at which proxy budget.

    python benchmarks/proxy_fidelity.py [--configs FILE] [--space quickstart] [--out DIR]
                                        [--seeds 0,1,2,3] [--multiples 1,2,4] [--jobs 2]
                                        [--set KEY=VALUE ...] [--redraws 3]
                                        [--eval-every N]

Trains every configuration of FILE (default benchmarks/fidelity_configs.yaml: 10 points of the
quickstart space, md and md-lite among them) with each seed, with the space's recipe (its trial
and trial_overrides; `--set` changes it further), to every budget: `--multiples` of the
space's step count (1 = the quickstart budget, 4 = four times it). With a constant learning rate
one run per (configuration, seed) to the longest budget is evaluated at every budget (training
is deterministic by seed, so its first N steps are exactly an N-step run); a recipe that anneals
its learning rate gets one run per budget, annealed at its own end. Then it re-evaluates the
seed-0 runs under `--redraws` redrawn evaluation noise (bank and sampler): the final weights of
the longest run when budgets share runs (the evaluation noise of a metric barely depends on
the budget), else of the shortest budget's runs.

Printed per metric: Kendall tau-b of the ranking (mean over seeds) at each shorter budget
against the longest budget's; the same between one seed's shortest-budget ranking and the other
seed's longest-budget ranking (xseed: what a one-seed sweep can predict, without the luck a run
shares with its own continuation); the training-seed std over the std across configurations
(seed_ratio) and the seed-vs-seed tau, at the shortest budget; the evaluation std over the std
across configurations (eval_ratio); and which configuration each metric picks at each budget.
Goals (the proxy-fidelity issue): tau >= 0.6, seed_ratio <= 1/3, eval_ratio <= 1/10. A second
table gives, per budget, the seed std, the configurations' true spread (the spread of their
means with the seed noise taken out; needs >= 2 seeds, better 4) and how many seeds per
configuration a ranking needs for a seed std <= 1/3 of that spread.

Resumable: every run keeps its checkpoint under OUT/runs, a finished run is read back, not
retrained; rerun the same command after an interrupt. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TAILED = ["val_loss", "val_loss_mid", "text_gain", "teacher_gap"]
METRICS = ["val_loss", "val_loss_low", "val_loss_mid", "val_loss_high", "text_gain",
           "teacher_gap", "fid_proxy", "kid_proxy", "align", *[f"{m}_tail" for m in TAILED]]
"""`teacher_gap`: the teacher-relative arm, with `--set teacher.run=RUN_DIR` (and
`teacher.weight=W` to distil toward it; mdsearch/train/teacher.py)."""
"""`<metric>_tail`: the trajectory-average arm, the mean of the metric over a run's evaluations
in the last half of the budget (steps >= budget / 2), from the run's own history."""


def tail_average(history: list[dict], metric: str, budget: int) -> float | None:
    """The mean of `metric` over the evaluations at steps budget/2 .. budget."""
    values = [r[metric] for r in history
              if metric in r and budget / 2 <= r["step"] <= budget and "event" not in r]
    return sum(values) / len(values) if values else None
GOALS = {"tau": 0.6, "seed_ratio": 1 / 3, "eval_ratio": 0.1}


def load_configs(path: Path, space) -> list[dict]:
    """[{name, spec (full size, as a dict)}] from a config list file."""
    import yaml

    from mdsearch.arch import presets

    items = yaml.safe_load(path.read_text())
    if not isinstance(items, list) or not items:
        sys.exit(f"{path}: expected a non-empty list of configurations")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "name" not in item:
            sys.exit(f"{path}: item {i}: needs a `name` and a `preset` or a `point`")
        if "point" in item:
            spec = space.spec_for(item["point"])
        elif "preset" in item:
            spec = presets.get(item["preset"], item.get("set") or {})
        else:
            sys.exit(f"{path}: item {i} ({item['name']}): needs a `preset` or a `point`")
        out.append({"name": str(item["name"]), "spec": spec.to_dict()})
    return out


def train_one(name: str, spec: dict, recipe: dict, seed: int, out_dir: str) -> dict:
    """One (configuration, seed, budget) run in a worker process (one thread)."""
    import torch

    torch.set_num_threads(1)
    from mdsearch.arch.spec import ArchSpec
    from mdsearch.train.recipe import Recipe
    from mdsearch.train.trainer import train_trial

    started = time.time()
    result = train_trial(ArchSpec.from_dict(spec), Recipe.from_dict(recipe), out_dir, seed=seed)
    return {"config": name, "seed": seed, "steps": result.steps, "status": result.status,
            "seconds": time.time() - started, "history": result.history, **result.metrics}


def redraw_one(name: str, run_dir: str, redraws: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from mdsearch.train.noise import evaluation_noise

    return {"config": name, "noise": evaluation_noise(run_dir, redraws)}


def analyse(rows: list[dict], noise: list[dict], budgets: list[int]) -> dict:
    import pandas as pd

    from mdsearch.analysis.reliability import kendall_tau_b, noise_table
    from mdsearch.quality import rms
    from mdsearch.quality import direction

    runs = pd.DataFrame([r for r in rows if r["status"] == "ok"])
    short, longest = budgets[0], budgets[-1]
    metrics = [m for m in METRICS if m in runs]
    out: dict = {"budgets": budgets, "metrics": {}}
    # evaluation noise: the redraw std within each config, pooled over the configurations
    eval_std = {m: rms(n["noise"][m]["std"] for n in noise if m in n["noise"])
                for m in metrics if any(m in n["noise"] for n in noise)}
    table = noise_table(runs[runs["budget"] == short], metrics, eval_std)
    means = runs.groupby(["budget", "config"])[metrics].mean()
    for _, row in table.iterrows():
        m = row["metric"]
        entry = {k: (None if pd.isna(v) else v) for k, v in row.items() if k != "metric"}
        long_means = means.loc[longest][m]
        entry["tau"] = {str(b): kendall_tau_b(means.loc[b][m].reindex(long_means.index),
                                              long_means)
                        for b in budgets[:-1]}
        # the quickstart's question: does one seed's short ranking predict another seed's long
        # ranking? (the same seed's long run shares its luck, which inflates `tau`)
        seeds = sorted(runs["seed"].unique())
        cross = []
        for a in seeds:
            for b in seeds:
                if a != b:
                    x = runs[(runs["budget"] == short) & (runs["seed"] == a)].set_index("config")[m]
                    y = runs[(runs["budget"] == longest) & (runs["seed"] == b)].set_index("config")[m]
                    cross.append(kendall_tau_b(x, y.reindex(x.index)))
        entry["cross_seed_tau"] = sum(cross) / len(cross) if cross else None
        pick = {}
        for b in budgets:
            s = means.loc[b][m].dropna()  # empty: a sampled metric not sampled at b
            pick[str(b)] = ("-" if s.empty else
                            str(s.idxmin() if direction(m) == "min" else s.idxmax()))
        entry["pick"] = pick
        entry["meets"] = bool(
            entry["tau"] and min(entry["tau"].values()) >= GOALS["tau"]
            and (entry["seed_ratio"] or 9) <= GOALS["seed_ratio"]
            and (entry.get("eval_ratio") or 9) <= GOALS["eval_ratio"])
        out["metrics"][m] = entry
    long_table = noise_table(runs[runs["budget"] == longest], metrics)
    out["longest"] = {r["metric"]: {"seed_ratio": r["seed_ratio"], "seed_tau": r.get("seed_tau")}
                      for _, r in long_table.iterrows()}
    # what averaging seeds buys, at every budget (the true spread: seed noise taken out)
    for b in budgets:
        for _, r in noise_table(runs[runs["budget"] == b], metrics).iterrows():
            if r["metric"] in out["metrics"]:
                out["metrics"][r["metric"]].setdefault("by_budget", {})[str(b)] = {
                    k: r[k] for k in ("seed_std", "config_std_true", "seeds_needed")}
    return out


def noise_floors(rows: list[dict], noise: list[dict], budgets: list[int], recipe,
                 args) -> list[dict]:
    """Entries for analysis/noise_floors.yaml: per budget, the recipe it holds for and each
    metric's training-seed std and evaluation std (the latter measured once, see above)."""
    import pandas as pd

    from mdsearch.quality import RECIPE_KEYS, rms, seed_std

    runs = pd.DataFrame([r for r in rows if r["status"] == "ok"])
    out = []
    for b in budgets:
        at = runs[runs["budget"] == b]
        r = recipe.override({"steps": b}, source=f"budget {b}").to_dict()
        metrics = {}
        for m in METRICS:
            if m not in at:
                continue
            s, dof = seed_std(at, m)
            stds = [n["noise"][m]["std"] for n in noise if m in n["noise"]]
            metrics[m] = {"seed_std": float(f"{s:.4g}"), "seed_dof": dof,
                          "eval_std": float(f"{rms(stds):.4g}") if stds else None}
        out.append({"source": f"benchmarks/proxy_fidelity.py --multiples {args.multiples} "
                              f"--seeds {args.seeds} ({len(set(at['config']))} configurations)",
                    "recipe": {k: r[k] for k in RECIPE_KEYS}, "metrics": metrics})
    return out


def show(result: dict) -> str:
    b = result["budgets"]
    head = (f"{'metric':<14} {'dir':<4} " + " ".join(f"tau@{x:<5}" for x in b[:-1])
            + f" {'xseed':>7}"
            + f" {'seed/cfg':>8} {'seedtau':>7} {'eval/cfg':>8} {'seed/cfg@' + str(b[-1]):>13}"
            + "  picks (" + " -> ".join(map(str, b)) + ")")
    lines = [head, "-" * len(head)]
    for m, e in result["metrics"].items():
        f = lambda v: "   -   " if v is None else f"{v:7.2f}"  # noqa: E731
        lines.append(f"{m:<14} {e['direction']:<4} "
                     + " ".join(f"{f(e['tau'][str(x)]):>9}" for x in b[:-1])
                     + f" {f(e['cross_seed_tau']):>7}"
                     + f" {f(e['seed_ratio']):>8} {f(e.get('seed_tau')):>7}"
                     f" {f(e.get('eval_ratio')):>8} {f(result['longest'][m]['seed_ratio']):>13}"
                     f"  {' -> '.join(e['pick'][str(x)] for x in b)}"
                     + ("   MEETS GOALS" if e["meets"] else ""))
    head = (f"{'metric':<14} " + " ".join(f"{'seed@' + str(x):>10} {'cfg@' + str(x):>10} "
                                           f"{'k@' + str(x):>6}" for x in b))
    lines += ["", "Seeds per configuration for a seed std <= 1/3 of the configurations' true "
                  "spread (k; seed: the pooled seed std, cfg: the spread of the means with "
                  "the seed noise taken out):", head, "-" * len(head)]
    for m, e in result["metrics"].items():
        cells = []
        for x in map(str, b):
            at = e.get("by_budget", {}).get(x)
            if at is None:
                cells.append(f"{'-':>10} {'-':>10} {'-':>6}")
                continue
            k = at["seeds_needed"]
            k = "-" if k != k else ("inf" if k == float("inf") else str(int(k)))
            cells.append(f"{at['seed_std']:10.4g} {at['config_std_true']:10.4g} {k:>6}")
        lines.append(f"{m:<14} " + " ".join(cells))
    return "\n".join(lines)


def main() -> None:
    here = Path(__file__).resolve().parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", type=Path, default=here / "fidelity_configs.yaml")
    ap.add_argument("--space", default="quickstart")
    ap.add_argument("--out", type=Path, default=Path("runs/fidelity"))
    ap.add_argument("--seeds", default="0,1,2,3")  # 4: the seed noise can be taken out
    ap.add_argument("--multiples", default="1,2,4")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--redraws", type=int, default=3)
    ap.add_argument("--eval-every", type=int, default=None,
                    help="evaluate every N steps (default: the budgets' common divisor); the "
                         "trajectory-average arm (<metric>_tail) needs several evaluations in "
                         "each budget's last half")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe change (YAML value), after the space's trial_overrides")
    args = ap.parse_args()

    import yaml

    from mdsearch.search.space import sweep_recipe
    from mdsearch.search.space import load_space

    space = load_space(args.space)
    recipe = sweep_recipe(space)
    changes = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    if changes:
        recipe = recipe.override(changes, source="--set")
    configs = load_configs(args.configs, space)
    seeds = [int(s) for s in args.seeds.split(",")]
    budgets = [int(round(float(m) * recipe.steps)) for m in args.multiples.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    print(f"proxy fidelity: {len(configs)} configurations x seeds {seeds} x budgets {budgets} "
          f"steps, recipe {recipe.name} ({args.jobs} jobs)", flush=True)

    # Without an annealed learning rate, a run trained to the longest budget passes through
    # every shorter one exactly as a run of that length would (training is deterministic by
    # seed): one run per (configuration, seed), evaluated at every budget. With annealing, each
    # budget is its own run.
    shared = recipe.optimizer.anneal == 0
    gcd = functools.reduce(math.gcd, budgets)
    jobs = []
    for budget in ([budgets[-1]] if shared else budgets):
        every = gcd if shared else budget
        if args.eval_every:
            every = math.gcd(every, args.eval_every)
        r = recipe.override({"steps": budget, "eval.every": every, "checkpoint_every": every},
                            source=f"budget {budget}")
        for seed in seeds:  # seed-major: an interrupted study still has whole seeds
            for c in configs:
                run_dir = args.out / "runs" / f"b{budget}" / f"{c['name']}_s{seed}"
                jobs.append((budget, c["name"], c["spec"], r.to_dict(), seed, str(run_dir)))
    # Fill the text-embedding cache once here, or every worker would encode the captions.
    from mdsearch.data.pipeline import DataPipeline

    DataPipeline(recipe.data, recipe.text_encoder, recipe.autoencoder, recipe.resolution,
                 recipe.eval.prompts, recipe.eval.bank)
    rows, started = [], time.time()
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {pool.submit(train_one, name, spec, rec, seed, d): (budget, d)
                   for budget, name, spec, rec, seed, d in jobs}
        for i, fut in enumerate(as_completed(futures), 1):
            run = fut.result()
            budget, run_dir = futures[fut]
            for record in run["history"]:
                if record["step"] in budgets and (shared or record["step"] == budget):
                    tails = {f"{m}_tail": tail_average(run["history"], m, record["step"])
                             for m in TAILED}
                    rows.append({**record, **tails, "config": run["config"], "seed": run["seed"],
                                 "status": run["status"], "budget": record["step"],
                                 "run_dir": run_dir})
            print(f"[{time.time() - started:6.0f}s] {i}/{len(jobs)} {run['config']} seed "
                  f"{run['seed']} {run['steps']} steps: {run['status']}  val_loss_mid "
                  f"{run.get('val_loss_mid', float('nan')):.5f}  text_gain "
                  f"{run.get('text_gain', float('nan')):.5f}  fid_proxy "
                  f"{run.get('fid_proxy', float('nan')):.1f}  ({run['seconds']:.0f}s)", flush=True)
        noise_file = args.out / "evaluation_noise.json"
        noise = json.loads(noise_file.read_text()) if noise_file.is_file() else []
        if len(noise) < len(configs) and args.redraws >= 2:
            print(f"evaluation noise: {args.redraws} redraws of the seed-"
                  f"{seeds[0]} runs ({budgets[-1] if shared else budgets[0]} steps)", flush=True)
            futs = [pool.submit(redraw_one, c["name"],
                                str(args.out / "runs" / f"b{budgets[-1] if shared else budgets[0]}"
                                    / f"{c['name']}_s{seeds[0]}"), args.redraws)
                    for c in configs]
            noise = [f.result() for f in futs]
            noise_file.write_text(json.dumps(noise))
    with open(args.out / "runs.jsonl", "w") as f:
        f.writelines(json.dumps({k: v for k, v in r.items() if k != "history"}) + "\n"
                     for r in rows)
    result = analyse(rows, noise, budgets)
    floors = noise_floors(rows, noise, budgets, recipe, args)
    (args.out / "noise_floors.yaml").write_text(yaml.safe_dump(floors, sort_keys=False))
    text = show(result)
    (args.out / "fidelity.txt").write_text(text + "\n")
    print(text)
    best = [m for m, e in result["metrics"].items() if e["meets"]]
    print(json.dumps({"benchmark": "proxy_fidelity", "configs": len(configs), "seeds": seeds,
                      "budgets": budgets, "recipe": recipe.name, "meets_goals": best,
                      "wall_s": round(time.time() - started, 1),
                      "metrics": result["metrics"]}, default=float))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
