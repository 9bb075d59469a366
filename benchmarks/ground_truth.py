"""The stored ground truth: every evaluation of 14 configurations x 8 training seeds x 960 steps.

    python benchmarks/ground_truth.py [--hours 1] [--jobs 2] [--seeds 0-7] [--steps 960]
                                      [--out runs/ground_truth] [--data benchmarks/data/ground_truth]

Trains the configurations of benchmarks/fidelity_configs.yaml and benchmarks/supernet_configs.yaml
(union by name: 14) with each seed on the quickstart's recipe (`cpu_quick` with the quickstart's
overrides, constant learning rate) to `--steps`, evaluating every 60 steps (the DDIM-sampled
metrics every 240), and appends every evaluation of every finished run to DATA.jsonl, one row per
(config, seed, step). DATA.json holds the command, the recipe, the configurations' specs, the
versions and the machine. Later work (racing, searchers, supernets, new scores) is judged by
replaying these rows: benchmarks/noisy_search.py, docs/fidelity.md.

Runs in chunks: no new run starts after `--hours` (minus one run's expected length), so a chunk
ends within about an hour; rerun the same command to go on. A run already in DATA.jsonl is
skipped; a run interrupted mid-way resumes from its checkpoint under OUT/runs. Seed-major, so an
unfinished study holds whole seeds. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

HERE = Path(__file__).resolve().parent
CONFIG_FILES = [HERE / "fidelity_configs.yaml", HERE / "supernet_configs.yaml"]


def union_configs(space) -> list[dict]:
    """The configurations of CONFIG_FILES, each name once (a name in two files must be the same
    spec in both)."""
    from proxy_fidelity import load_configs

    out: dict[str, dict] = {}
    for path in CONFIG_FILES:
        for c in load_configs(path, space):
            if c["name"] in out and out[c["name"]]["spec"] != c["spec"]:
                sys.exit(f"{path}: {c['name']}: a different spec under the same name")
            out.setdefault(c["name"], c)
    return list(out.values())


def done_runs(rows_file: Path) -> set[tuple[str, int]]:
    if not rows_file.is_file():
        return set()
    return {(r["config"], r["seed"]) for r in map(json.loads, rows_file.read_text().splitlines())
            if r.get("final")}


def evaluation_rows(run: dict) -> list[dict]:
    """One row per evaluation of a finished run; the last one marked final."""
    evals = [r for r in run["history"] if "event" not in r]
    rows = []
    for i, record in enumerate(evals):
        row = {"config": run["config"], "seed": run["seed"], "step": record["step"]}
        row.update({k: (float(f"{v:.7g}") if isinstance(v, float) else v)
                    for k, v in record.items() if k != "step"})
        row["final"] = i == len(evals) - 1
        rows.append(row)
    return rows


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                .splitlines() if line.startswith("model name")), platform.processor())
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "commit": commit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--seeds", default="0-7")
    ap.add_argument("--steps", type=int, default=960)
    ap.add_argument("--out", type=Path, default=Path("runs/ground_truth"))
    ap.add_argument("--data", type=Path, default=HERE / "data" / "ground_truth")
    args = ap.parse_args()

    from mdsearch.search.space import load_space, sweep_recipe
    from proxy_fidelity import train_one

    space = load_space("quickstart")
    recipe = sweep_recipe(space).override(
        {"steps": args.steps, "eval.every": 60, "checkpoint_every": 60}, source="ground truth")
    configs = union_configs(space)
    lo, _, hi = args.seeds.partition("-")
    seeds = list(range(int(lo), int(hi or lo) + 1))
    rows_file = args.data.with_suffix(".jsonl")
    meta_file = args.data.with_suffix(".json")
    args.data.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python benchmarks/ground_truth.py " + " ".join(sys.argv[1:]),
            "what": "every evaluation of each (config, seed) run, one row per step; "
                    "`final` marks a run's last evaluation",
            "seeds": seeds, "steps": args.steps, "recipe": recipe.to_dict(),
            "configs": configs, "machine": machine()}
    if meta_file.is_file():
        old = json.loads(meta_file.read_text())
        if old["recipe"] != meta["recipe"] or old["configs"] != meta["configs"]:
            sys.exit(f"{meta_file}: recipe or configurations differ from this command's: "
                     "a ground truth is one study (move the old one aside)")
        meta["chunks"] = old.get("chunks", [])
    else:
        meta["chunks"] = []

    meta_file.write_text(json.dumps(meta, indent=1) + "\n")
    done = done_runs(rows_file)
    todo = [(c, s) for s in seeds for c in configs if (c["name"], s) not in done]
    print(f"ground truth: {len(configs)} configurations x seeds {seeds[0]}-{seeds[-1]} x "
          f"{args.steps} steps; {len(done)} runs stored, {len(todo)} to go "
          f"({args.jobs} jobs, at most {args.hours} h)", flush=True)

    from mdsearch.data.pipeline import DataPipeline

    DataPipeline(recipe.data, recipe.text_encoder, recipe.autoencoder, recipe.resolution,
                 recipe.eval.prompts, recipe.eval.bank)  # fill the text cache once
    started, finished, run_seconds = time.time(), 0, []
    deadline = started + args.hours * 3600
    with ProcessPoolExecutor(args.jobs) as pool:
        running: dict = {}
        while todo or running:
            expected = (sum(run_seconds) / len(run_seconds)) if run_seconds else 300.0
            while todo and len(running) < args.jobs and time.time() + expected < deadline:
                c, seed = todo.pop(0)
                run_dir = args.out / "runs" / f"{c['name']}_s{seed}"
                fut = pool.submit(train_one, c["name"], c["spec"], recipe.to_dict(), seed,
                                  str(run_dir))
                running[fut] = (c["name"], seed)
            if not running:
                break
            for fut in wait(running, return_when=FIRST_COMPLETED).done:
                name, seed = running.pop(fut)
                run = fut.result()
                if run["status"] != "ok":
                    print(f"{name} seed {seed}: {run['status']} (not stored)", flush=True)
                    continue
                with open(rows_file, "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in evaluation_rows(run))
                finished += 1
                run_seconds.append(run["seconds"])
                print(f"[{time.time() - started:6.0f}s] {name} seed {seed}: {run['steps']} steps "
                      f"in {run['seconds']:.0f}s  text_gain {run.get('text_gain', float('nan')):.4f}"
                      f"  val_loss {run.get('val_loss', float('nan')):.5f}  "
                      f"({len(done) + finished}/{len(configs) * len(seeds)} stored)", flush=True)
    meta["chunks"].append({"runs": finished, "wall_s": round(time.time() - started),
                           "jobs": args.jobs, "commit": meta["machine"]["commit"],
                           "date": time.strftime("%Y-%m-%d")})
    meta_file.write_text(json.dumps(meta, indent=1) + "\n")
    total = len(done_runs(rows_file))
    print(json.dumps({"benchmark": "ground_truth", "runs_stored": total,
                      "runs_total": len(configs) * len(seeds), "this_chunk": finished,
                      "wall_s": round(time.time() - started, 1)}))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
