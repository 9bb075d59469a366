"""`mdsearch` command line: parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from pathlib import Path

from .arch import presets
from .arch.cost import cost
from .arch.spec import ArchSpec, parse_set
from .config import ConfigError
from .data.errors import DataError
from .errors import MdsearchError
from .progress import prefixed, say
from .rundir import check_out_dir


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse then reports a bad value in one line)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def seed_int(text: str) -> int:
    """An argparse type: a seed in the range a recipe accepts (0 <= seed < 2**31)."""
    from .train.recipe import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_SEED - 1}, got {value}")
    return value


def guidance_scale(text: str) -> float:
    """An argparse type: a classifier-free guidance scale, a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def at_least_two(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (a spread needs two), got {value}")
    return value


def _add_spec_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, choices=sorted(presets.PRESETS),
                        help="a named architecture (default: md)")
    source.add_argument("--spec", metavar="FILE", help="an ArchSpec YAML or JSON file")
    parser.add_argument("--set", dest="overrides", action="append", metavar="FIELD=VALUE",
                        help="override a field, e.g. ffn_expansion=4 or levels.2.channels=896 "
                             "(repeatable)")


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="data-parallel workers through Ray Train (default: the recipe's)")
    parser.add_argument("--address", default=None,
                        help="train on an existing Ray cluster (default: one process, or a local "
                             "Ray on 127.0.0.1 when --workers > 1)")


def _add_run_args(parser: argparse.ArgumentParser, experiment: str) -> None:
    _add_parallel_args(parser)
    parser.add_argument("--experiment", default=experiment, help="MLflow experiment name")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    parser.add_argument("--json", action="store_true", help="last stdout line: the result as JSON")


def _load_spec(args) -> ArchSpec:
    overrides = parse_set(args.overrides)
    if args.spec:
        spec = ArchSpec.from_file(args.spec)
        return spec.override(overrides, source="--set") if overrides else spec
    return presets.get(args.preset or "md", overrides)


def cmd_spec(args) -> None:
    spec = _load_spec(args)
    print(spec.to_json() if args.json else spec.to_yaml(), end="" if not args.json else "\n")


def cmd_cost(args) -> None:
    spec = _load_spec(args)
    if (args.breakdown or args.plot) and not args.latency:
        raise ConfigError("--breakdown and --plot need --latency TABLE.csv (the latency table "
                          "the breakdown reads)")
    table = latency = rows = None
    if args.latency:
        from .arch.latency import Table

        table = Table(args.latency)
        latency = table.predict(spec, args.resolution or table.resolution)
        rows = latency.breakdown() if args.breakdown or args.plot else None
    c = cost(spec, args.resolution or (table.resolution if table else 512))
    if args.plot:
        from .analysis.plots import latency_breakdown_plot

        path = latency_breakdown_plot(rows, args.plot, f"{spec.name} at {c.resolution}x"
                                      f"{c.resolution}: {latency.total_ms:.0f} ms predicted")
        say(f"wrote {path}")
    if args.json:
        data = c.to_dict()
        if latency:
            data.update(latency_ms=latency.total_ms, latency_table=str(table.path))
        if args.breakdown:
            data["latency_breakdown"] = rows
        print(json.dumps(data))
        return
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in c.gmacs_by_kind.items())
    print(f"{c.name} at {c.resolution}x{c.resolution} (latent {c.latent_size}x{c.latent_size}): "
          f"{c.params:,} parameters ({c.params / 1e6:.1f}M), {c.gmacs:.1f} GMACs ({kinds})\n"
          f"channels {tuple(c.channels)}, {c.conv_blocks} conv blocks, "
          f"{c.sa_layers} SA + {c.ca_layers} CA layers")
    if latency:
        first = next(iter(table.rows.values()))
        print(f"predicted latency {latency.total_ms:.1f} ms per UNet call ({len(latency.units)} "
              f"units' entries {latency.entries_ms:.1f} ms + fitted terms "
              f"{latency.terms_ms:+.1f} ms; {first.runtime} {first.runtime_version}, "
              f"{first.threads} threads, {first.device}; table {table.path})")
    if args.breakdown:
        print(breakdown_text(rows))


def breakdown_text(rows: list[dict]) -> str:
    from .analysis.plots import breakdown_label

    lines = [f"{'where':<34}{'ms':>9}{'share':>8}{'params':>10}{'GMACs':>9}"]
    for r in rows:
        params = f"{r['params'] / 1e6:.1f}M" if r["params"] is not None else "-"
        gmacs = f"{r['gmacs']:.2f}" if r["gmacs"] is not None else "-"
        lines.append(f"{breakdown_label(r):<34}{r['ms']:>9.1f}{100 * r['share']:>7.1f}%"
                     f"{params:>10}{gmacs:>9}")
    return "\n".join(lines)


def cmd_latency_table(args) -> None:
    from .export.latency import build_table, import_table

    if args.imported:
        rows, fitted = import_table(args.imported, args.manifest, args.table)
        print(f"imported {len(rows)} rows into {args.table} (terms fitted on "
              f"{len(fitted.measurements)} whole models: {_terms(fitted)})")
        return
    if not args.space:
        raise ConfigError("latency table: give --space SPACE (or --import MEASURED.csv)")
    specs, resolution = _space_specs(args)
    fitted = build_table(specs, resolution, args.table, args.threads, fit_count=args.fit,
                         repeats=args.repeats, progress=say)
    worst = max(abs(m.measured_ms - m.entries_ms - fitted.extra_ms(m.entries_ms, m.units))
                / m.measured_ms for m in fitted.measurements)
    print(f"wrote {args.table} and {args.table.with_name(args.table.stem + '.fit.json')}: "
          f"terms {_terms(fitted)}; largest error on the fit's own {len(fitted.measurements)} "
          f"models {100 * worst:.1f}% (benchmarks/latency_model.py checks unseen specs)")


def _terms(fitted) -> str:
    return ", ".join(f"{k} {v:+.3g}" for k, v in fitted.terms.items())


def _space_specs(args):
    from .export.latency import space_specs
    from .search.space import load_space

    space = load_space(args.space)
    if space.base is None:
        raise ConfigError(f"{space.source}: base {space.base_name}: a latency table needs a "
                          f"UNet space (a preset or spec base)")
    return space_specs(space), args.resolution or space.budget.resolution


def cmd_latency_probe(args) -> None:
    from .export.latency import write_probe

    specs, resolution = _space_specs(args)
    manifest = write_probe(specs, resolution, args.out, fit_count=args.fit, progress=say)
    print(f"wrote {manifest}: time each graph on the device and import the rows with "
          f"`mdsearch latency table --import MEASURED.csv --manifest {args.out} --out "
          f"TABLE.csv` (docs/latency.md)")


def cmd_table1(args) -> None:
    from .analysis.paper import table1, table1_markdown

    rows = table1(args.resolution)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table1_markdown(rows, args.resolution), end="")


def stage_summary(history: list[dict], keys=("fid_proxy", "fid", "align", "clip_score")) -> str:
    """Quality at the end of each stage, and just after an attention switch (before any
    fine-tuning): the before / after table of the relu fine-tune."""
    rows = []
    for record in history:
        if "stage" not in record:
            continue
        if record.get("event") == "switch":
            rows.append((f"{record['stage']} (switched, not yet fine-tuned)", record))
        else:
            rows = [r for r in rows if r[0] != record["stage"]] + [(record["stage"], record)]
    shown = [k for k in keys if any(k in r for _, r in rows)]
    lines = [" | ".join(["stage", "step", "px"] + shown), " | ".join(["---"] * (3 + len(shown)))]
    for name, r in rows:
        lines.append(" | ".join([name, str(r["step"]), str(r.get("resolution", ""))]
                                + [f"{r[k]:.4g}" if k in r else "" for k in shown]))
    return "\n".join(lines)


def _print_result(result, as_json: bool) -> None:
    """A run's result (with --json: its JSON as the last line); exit status 1 when it failed."""
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        if any("stage" in r for r in result.history):
            print(stage_summary(result.history))
        print(f"{result.status}{': ' + result.reason if result.reason else ''} after "
              f"{result.steps} steps in {result.seconds:.0f}s; metrics: "
              + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
    if result.status != "ok":
        raise SystemExit(1)


def _tracker(args, run_name: str):
    """An MLflowTracker for a single run, None with --no-mlflow."""
    from .track import MLflowTracker

    mlflow = _mlflow(args, run_name)
    return MLflowTracker(**mlflow) if mlflow else None


def _mlflow(args, run_name: str) -> dict | None:
    """MLflowTracker's arguments (an absolute tracking URI: Ray workers have another cwd)."""
    if args.no_mlflow:
        return None
    from .track import default_tracking_uri

    return {"experiment": args.experiment, "run_name": run_name,
            "tracking_uri": default_tracking_uri()}


def cmd_train(args) -> None:
    from .train.ufogen import UFOGenRecipe, load_any_recipe

    recipe = load_any_recipe(args.trial)
    if args.init is not None or isinstance(recipe, UFOGenRecipe):
        return _train_ufogen(args, recipe)
    if args.seed is not None:
        recipe = recipe.override({"seed": args.seed}, source="--seed")
    if args.seeds is not None:
        recipe = recipe.override({"seeds": args.seeds}, source="--seeds")
    spec = _load_spec(args)
    log = prefixed(spec.name)
    result = _distributed(args, spec, recipe, spec.name, log)
    if result is None:
        from .train.trainer import train_trial

        result = train_trial(spec, recipe, args.out, steps=args.steps, progress=log,
                             tracker=_tracker(args, spec.name))
    _print_result(result, args.json)


def _distributed(args, spec, recipe, run_name: str, log, init=None):
    """The run on Ray Train workers when --workers (or the recipe's) is over 1 or --address is
    given (any kind of recipe); None when it is one process's."""
    workers = args.workers or recipe.workers
    if workers == 1 and not args.address:
        return None
    from .train.distributed import train_distributed

    return train_distributed(spec, recipe, args.out, workers=workers, address=args.address,
                             steps=args.steps, mlflow=_mlflow(args, run_name), init=init,
                             progress=log)


def cmd_supernet_train(args) -> None:
    from .rundir import locked
    from .search.space import load_space, sweep_recipe
    from .train.recipe import Recipe
    from .train.supernet import SupernetTraining

    space = load_space(args.space)
    recipe = sweep_recipe(space, args.trial)
    if not isinstance(recipe, Recipe):
        raise ConfigError(f"--trial {recipe.name}: a supernet trains with a diffusion recipe")
    with locked(args.out, "supernet training"):
        run = SupernetTraining(space, recipe, args.out, random=args.random, seed=args.seed,
                               rule=args.rule, progress=prefixed("supernet"),
                               tracker=_tracker(args, f"supernet-{space.name}"))
        result = run.run(args.steps)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['checkpoint']}: {result['configurations']} configurations, step "
              f"{result['steps']}, last loss {result['loss']:.4g}")


def _supernet_space(args):
    """The space of `args.dir`'s supernet: --space, else the copy beside it."""
    from .rundir import SPACE
    from .search.space import load_space

    folder = Path(args.dir)
    if args.space is None and not (folder / SPACE).is_file():
        raise ConfigError(f"{folder}: no {SPACE} beside the supernet; give --space")
    return folder, load_space(args.space or folder / SPACE)


def cmd_supernet_score(args) -> None:
    import pandas as pd

    from .rundir import atomic_path, locked
    from .train.supernet import open_supernet

    folder, space = _supernet_space(args)
    with locked(folder, "supernet scoring"):
        run = open_supernet(folder, space)
        records = run.score(progress=prefixed("score"))
        out = folder / "scores.csv"
        with atomic_path(out) as tmp:
            pd.DataFrame(records).to_csv(tmp, index=False)
    if args.json:
        print(json.dumps({"scores": str(out), "configurations": len(records),
                          "supernet_step": run.step}))
    else:
        print(f"{out}: {len(records)} configurations scored on the held-out bank with the "
              f"supernet's weights at step {run.step}. Their first comparison with stand-alone "
              "training ranked text_gain inverted (docs/supernet.md): treat them as a screen.")


def cmd_supernet_evolve(args) -> None:
    from .arch.latency import Table
    from .rundir import atomic_write, locked
    from .search.evolve import evolve
    from .train.supernet import open_supernet

    folder, space = _supernet_space(args)
    table = Table(args.latency)  # a missing or damaged table: one line, before anything runs
    out = Path(args.out or folder / f"evolved-{args.target_ms:g}ms.yaml")
    with locked(folder, "supernet evolution"):
        run = open_supernet(folder, space)
        result = evolve(run, table, args.target_ms, args.metric, progress=prefixed("evolve"))
    spec = result.pop("spec")
    atomic_write(out, spec.to_yaml())
    history = out.with_suffix(".json")
    atomic_write(history, json.dumps(result, indent=1, default=str))
    metric = result["metric"]
    if args.json:
        print(json.dumps({"spec": str(out), "history": str(history), "point": result["point"],
                          metric: result[metric], "latency_ms": result["latency_ms"],
                          "actions": len(result["actions"]), "scored": result["scored"]}))
    else:
        print(f"{out}: {result['point']}, {metric} {result[metric]:.4g} on the supernet, "
              f"{result['latency_ms']:.1f} ms predicted (target {args.target_ms:g}); "
              f"{len(result['actions'])} actions from the largest "
              f"({result['start']['latency_ms']:.1f} ms), {result['scored']} configurations "
              f"scored; actions in {history}. Train it alone to confirm: mdsearch train --spec "
              f"{out}")


def cmd_supernet_extract(args) -> None:
    from .train.supernet import open_supernet, write_run

    folder, space = _supernet_space(args)
    point = {}
    for item in args.point:
        name, _, value = item.partition("=")
        dim = next((d for d in space.dimensions if d.name == name), None)
        if dim is None:
            raise ConfigError(f"--point {item}: {space.source} has no dimension {name!r} (it has "
                              f"{', '.join(d.name for d in space.dimensions)})")
        match = [v for v in dim.values if str(v) == value]
        if not match:
            raise ConfigError(f"--point {item}: dimension {name} takes "
                              f"{', '.join(map(str, dim.values))}")
        point[name] = match[0]
    missing = [d.name for d in space.dimensions if d.active(point) and d.name not in point]
    if missing:
        raise ConfigError(f"--point: give every dimension of {space.name}; missing "
                          f"{', '.join(missing)}")
    spec = space.spec_for(point)
    path = write_run(open_supernet(folder, space), spec, args.out)
    print(f"{path}: {point} as a run at step 0 with the supernet's weights; export it with "
          f"mdsearch export --checkpoint {args.out} --out BUNDLE")


def _train_ufogen(args, recipe) -> None:
    """`train --init RUN_DIR --trial ufogen_cpu`: one-step fine-tuning of a trained run."""
    from .train.ufogen import UFOGenRecipe, ufogen_trial

    if not isinstance(recipe, UFOGenRecipe):
        raise ConfigError(f"--init fine-tunes a trained run into a one-step generator with a "
                          f"UFOGen recipe (kind: ufogen, e.g. --trial ufogen_cpu); --trial "
                          f"{args.trial} is a diffusion recipe")
    if args.init is None:
        raise ConfigError(f"--trial {args.trial} is a UFOGen recipe (kind: ufogen): it fine-tunes"
                          " a trained run, given with --init RUN_DIR")
    if args.spec or args.preset or args.overrides:
        raise ConfigError("--init takes the spec from the run it starts from: drop --preset, "
                          "--spec and --set")
    if args.seed is not None:
        recipe = recipe.override({"seed": args.seed}, source="--seed")
    name, log = f"{Path(args.init).name}-ufogen", prefixed("ufogen")
    result = _distributed(args, None, recipe, name, log, init=args.init)
    if result is None:
        result = ufogen_trial(args.init, recipe, args.out, steps=args.steps, progress=log,
                              tracker=_tracker(args, name))
    _print_result(result, args.json)


def cmd_vae_train(args) -> None:
    from .train.vae import load_vae_recipe, vae_train

    recipe = load_vae_recipe(args.recipe)
    changes = parse_set(args.overrides)
    if args.seed is not None:
        changes["seed"] = args.seed
    if changes:
        recipe = recipe.override(changes, source="--set")
    log = prefixed(recipe.name)
    result = _distributed(args, None, recipe, recipe.name, log, init=args.init)
    if result is None:
        result = vae_train(recipe, args.out, init=args.init, steps=args.steps, progress=log,
                           tracker=_tracker(args, recipe.name))
    _print_result(result, args.json)


def cmd_vae_cost(args) -> None:
    from .train.vae import cost_of, load_vae_recipe

    recipe = load_vae_recipe(args.recipe)
    c = cost_of(recipe, args.resolution)
    if args.json:
        print(json.dumps(c.to_dict()))
        return
    print(f"{recipe.name}: f={recipe.factor}, c={recipe.arch.latent_channels}, at "
          f"{c.resolution}x{c.resolution}")
    print(f"encoder: {c.encoder_params / 1e6:.2f}M params, {c.encoder_gmacs:.1f} GMACs")
    print(f"decoder: {c.decoder_params / 1e6:.2f}M params, {c.decoder_gmacs:.1f} GMACs")


def cmd_promote(args) -> None:
    from .search.promote import promote

    log = prefixed("promote")
    chosen, result = promote(args.run_dir, args.budget, trial=args.trial, out_dir=args.out,
                             metric=args.metric, workers=args.workers, address=args.address,
                             steps=args.steps, train=not args.no_train, progress=log,
                             max_latency_ms=args.max_latency_ms,
                             mlflow=_mlflow(args, f"promoted-{args.budget}"))
    if result is None:
        print(json.dumps({"promotion": chosen.__dict__}) if args.json else chosen.describe())
        return
    _print_result(result, args.json)


def cmd_sweep(args) -> None:
    from .raylocal import keep_ray_on_loopback

    if args.address is None:
        keep_ray_on_loopback()  # before Ray is imported: a laptop sweep opens no network port
    from .analysis.plots import sweep_plot
    from .search.results import summary
    from .search.space import load_space
    from .search.sweep import run_sweep

    if args.finetune and args.supernet is None:
        raise ConfigError(f"--finetune {args.finetune} fine-tunes slices of a supernet: give "
                          "--supernet DIR")
    space = load_space(args.space)
    result = run_sweep(space, args.trial, name=args.name, storage=args.storage,
                       address=args.address, resume=args.resume, num_samples=args.num_samples,
                       mlflow=not args.no_mlflow, init=args.init, trust_state=args.trust_state,
                       supernet=args.supernet, finetune=args.finetune)
    sweep_plot(result, space)
    print(summary(result, space))


def cmd_report(args) -> None:
    from .analysis.report import build_report
    from .rundir import RunDirError

    if (args.run_dir is None) == (args.mlflow is None):
        raise RunDirError("give a sweep directory or --mlflow EXPERIMENT (one of them)")
    report = build_report(args.run_dir, args.out, mlflow_experiment=args.mlflow,
                          tracking_uri=args.tracking_uri)
    for key, path in report.files.items():
        print(f"{key:<18} {path}")


def cmd_fidelity(args) -> None:
    from .analysis.fidelity import fidelity

    result = fidelity(args.short, args.long or args.short, args.metric, args.out,
                      short_step=args.short_step)
    print(json.dumps(result) if args.json else
          f"Kendall tau-b {result['kendall_tau_b']:.3f} between {result['metric']} after "
          f"{result['steps_short']} and {result['steps_long']} steps, over {result['pairs']} "
          f"configurations matched on {', '.join(result['keys'])}"
          + (f"; plot: {result['plot']}" if result.get("plot") else ""))


def cmd_reliability(args) -> None:
    from .analysis.reliability import measure, show

    result = measure(args.path, redraws=args.redraws, trials=args.trials,
                     sampled=not args.bank_only,
                     progress=say)
    print(json.dumps(result, default=float) if args.json else show(result))


def cmd_export(args) -> None:
    from .arch.cost import latent_size
    from .export.bundle import (export_models, pair_text_encoder, trial_recipe,
                                write_bundle_manifest)
    from .export.onnx import ExportError, check_unet_exportable, load_checkpoint, random_model
    from .train.checkpoint import checkpoint_path

    one_step = False  # a UFOGen generator: one UNet call per image, no guidance
    recipe = autoencoder = None  # a trained run's: its decoder and manifest are exported too
    if args.checkpoint:
        from .train.checkpoint import read_checkpoint

        if args.spec or args.preset or getattr(args, "overrides", None):
            raise ConfigError("--checkpoint exports the spec the run trained: drop --preset, "
                              "--spec and --set (or export a random model of a spec without "
                              "--checkpoint)")
        spec, model = load_checkpoint(args.checkpoint)
        source = str(checkpoint_path(args.checkpoint))
        one_step = bool(read_checkpoint(args.checkpoint).get("one_step"))
        recipe = trial_recipe(args.checkpoint)
    else:
        spec = _load_spec(args)
        model = random_model(spec)
        source = args.spec or f"--preset {args.preset or 'md'}"
    if recipe is not None and not args.no_decoder:
        from .data.autoencoder import make_autoencoder

        try:
            autoencoder = make_autoencoder(recipe.autoencoder)
        except DataError as err:
            raise DataError(f"{err} (--no-decoder exports without the decoder, and without "
                            f"manifest.json)") from None
    resolution = args.resolution
    if resolution is None:  # what the checkpoint was trained at, else the paper's 512
        resolution = (recipe.final_resolution if recipe else None) or 512
    if args.latent_size:
        latent = args.latent_size
    elif autoencoder is not None:  # the run's own: pixel space (cpu_quick) has factor 1
        if resolution % autoencoder.factor:
            raise ExportError(f"--resolution {resolution}: not a multiple of the autoencoder's "
                              f"factor {autoencoder.factor}")
        latent = resolution // autoencoder.factor
    elif args.checkpoint and spec.latent_channels == 3:  # a pixel-space proxy (cpu_quick)
        latent = resolution
    else:
        latent = latent_size(spec, resolution)
    check_unet_exportable(spec)
    encoder = None
    if not args.no_text_encoder:
        try:
            encoder = pair_text_encoder(spec, args.text_encoder, args.text_encoder_path,
                                        trial_dir=args.checkpoint, spec_source=source)
        except (ConfigError, DataError) as err:
            raise type(err)(f"{err} (--text-encoder minilm|clip and --text-encoder-path DIR "
                            f"choose the text encoder; --no-text-encoder exports the UNet "
                            f"alone)") from None
    log = prefixed("export")
    result = export_models(spec, model, args.out, latent, encoder, format=args.format,
                           fp16=args.fp16, progress=log, autoencoder=autoencoder)
    manifest = None
    if autoencoder is not None:
        manifest = write_bundle_manifest(args.out, result, recipe, autoencoder, one_step,
                                         source, progress=log)
    if args.json:
        print(json.dumps({**result.to_dict(), "one_step": one_step,
                          "manifest": str(manifest) if manifest else None}))
    else:
        if one_step:
            print("one-step generator (UFOGen): an image is one UNet call, without guidance")
        for r, call in ((result.unet, "UNet"), (result.text_encoder, "text encoder"),
                        (result.decoder, "decoder")):
            if r is None:
                continue
            if r.max_abs_err is None:
                print(f"{r.path}: {r.size_bytes / 1e6:.1f} MB, converted in "
                      f"{r.export_seconds:.0f} s; parity {r.parity}")
            else:
                runtime = "ONNX Runtime" if r.format == "onnx" else "Core ML"
                print(f"{r.path}: {r.size_bytes / 1e6:.1f} MB, max abs error vs PyTorch "
                      f"{r.max_abs_err:.3g} (relative {r.rel_err:.3g}), {runtime} CPU latency "
                      f"{r.latency_ms:.1f} ms per {call} call")
        if manifest is not None:
            print(f"{manifest}: a bundle for mdsearch generate --bundle {args.out}")
    if result.failures:
        raise SystemExit("parity check failed: " + "; ".join(result.failures))


def cmd_generate(args) -> None:
    from .export.pipeline import (PIXEL_TOLERANCE, generate, generate_grid, latency_table,
                                  read_prompts)

    if args.grid is not None:
        if args.check is not None:
            raise ConfigError("--check compares one image: give it with --prompt, not --grid")
        results = generate_grid(args.bundle, read_prompts(args.grid), args.image, seed=args.seed,
                                steps=args.steps, guidance=args.guidance, columns=args.columns,
                                progress=prefixed("generate"))
        if args.json:
            print(json.dumps({"path": str(args.image), "images": [
                {k: v for k, v in r.to_dict().items() if k != "path"} for r in results]}))
        else:
            print(f"{args.image}: {len(results)} prompts, {results[0].sampler}, "
                  f"{results[0].describe()}")
            print(latency_table(results[:1]))
        return
    result = generate(args.bundle, args.prompt, out=args.image, seed=args.seed, steps=args.steps,
                      guidance=args.guidance, check=args.check, progress=prefixed("generate"))
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        height, width = result.pixels.shape[1:]
        print(f"{result.path}: {width}x{height}, {result.sampler}, {result.describe()}")
        if result.max_abs_diff is not None:
            print(f"max abs pixel difference ONNX Runtime vs PyTorch ({args.check}): "
                  f"{result.max_abs_diff:.3g} (pixels in [-1, 1])")
        print(latency_table([result]))
    if result.within_tolerance is False:
        raise SystemExit(f"check failed: the bundle's image differs from {args.check}'s by "
                         f"{result.max_abs_diff:.3g} > {PIXEL_TOLERANCE:.3g} (one 8-bit "
                         "level): was the bundle exported from that run?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mdsearch",
        description="Architecture search and ablations for MobileDiffusion-family UNets.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("spec", help="print an architecture spec (YAML, or JSON with --json)")
    _add_spec_args(p)
    p.add_argument("--json", action="store_true", help="JSON instead of YAML")
    p.set_defaults(func=cmd_spec)

    p = sub.add_parser("cost", help="parameters, GMACs and Table 1 columns of a spec")
    _add_spec_args(p)
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="image resolution (latent = /8); default 512, or the --latency table's")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--latency", metavar="TABLE.csv", default=None,
                   help="also print the latency predicted from this latency table "
                        "(mdsearch latency table); --resolution defaults to the table's")
    p.add_argument("--breakdown", action="store_true",
                   help="with --latency: latency, params and GMACs per level and block type")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="with --latency: the breakdown as a bar chart")
    p.set_defaults(func=cmd_cost)

    sup = sub.add_parser("supernet", help="one elastic supernet holding every configuration "
                         "of a space (weight sharing; in progress: training)").add_subparsers(
                             dest="supernet_command", required=True)
    p = sup.add_parser("train", help="train a space's supernet by the sandwich rule (largest, "
                       "smallest and random configurations each step; resumable)")
    p.add_argument("--space", required=True, help="a search space file or name (quickstart)")
    p.add_argument("--trial", default=None,
                   help="the diffusion recipe (default: the space's, with its trial_overrides)")
    p.add_argument("--out", required=True, help="the supernet's folder (resumed if it has one)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="stop after this many steps (the schedule is the recipe's)")
    p.add_argument("--random", type=int, default=2,
                   help="random configurations per step beside the largest and smallest (2)")
    p.add_argument("--rule", choices=["sandwich", "uniform"], default="sandwich",
                   help="sandwich: the largest, the smallest and --random others each step; "
                        "uniform: --random configurations drawn uniformly, nothing fixed")
    p.add_argument("--experiment", default="supernet", help="MLflow experiment name")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--seed", type=seed_int, default=None, help="default: the recipe's")
    p.add_argument("--json", action="store_true", help="last stdout line: the result as JSON")
    p.set_defaults(func=cmd_supernet_train)
    p = sup.add_parser("score", help="score every configuration on the held-out bank with its "
                       "slice of a trained supernet (no training): DIR/scores.csv")
    p.add_argument("dir", help="a folder written by mdsearch supernet train")
    p.add_argument("--space", default=None, help="default: DIR/space.yaml (copied at training)")
    p.add_argument("--json", action="store_true", help="last stdout line: the result as JSON")
    p.set_defaults(func=cmd_supernet_score)
    p = sup.add_parser("evolve", help="SnapFusion's evolution: from the largest configuration, "
                       "remove (then add) blocks by quality change per latency change until a "
                       "latency target is met; writes the chosen spec")
    p.add_argument("dir", help="a folder written by mdsearch supernet train")
    p.add_argument("--latency", required=True, metavar="TABLE.csv",
                   help="a latency table of the space (mdsearch latency table)")
    p.add_argument("--target-ms", type=float, required=True,
                   help="predicted milliseconds per UNet call at the table's resolution")
    p.add_argument("--metric", default=None,
                   help="the supernet score to keep (default: the space's quality objective)")
    p.add_argument("--space", default=None, help="default: DIR/space.yaml (copied at training)")
    p.add_argument("--out", default=None, metavar="SPEC.yaml",
                   help="the chosen spec (default DIR/evolved-<target>ms.yaml; its actions "
                        "beside it as .json)")
    p.add_argument("--json", action="store_true", help="last stdout line: the result as JSON")
    p.set_defaults(func=cmd_supernet_evolve)
    p = sup.add_parser("extract", help="write one configuration's slice as a run directory "
                       "(for mdsearch export --checkpoint, or to train on)")
    p.add_argument("dir", help="a folder written by mdsearch supernet train")
    p.add_argument("--point", action="append", required=True, metavar="DIMENSION=VALUE",
                   help="the configuration, one dimension each (repeat)")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--space", default=None, help="default: DIR/space.yaml (copied at training)")
    p.set_defaults(func=cmd_supernet_extract)

    lat = sub.add_parser("latency", help="latency tables measured in ONNX Runtime, per block "
                         "(docs/latency.md)").add_subparsers(dest="latency_command", required=True)
    p = lat.add_parser("table", help="time every block of a space's configurations in ONNX "
                       "Runtime and fit the terms outside the blocks (resumable)")
    p.add_argument("--space", default=None, help="a search space file or name (md_search)")
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="image side (default: the space's constraints.resolution)")
    p.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                   help="ONNX Runtime intra-op threads, fixed for every row (default: the CPU "
                        "count)")
    p.add_argument("--repeats", type=positive_int, default=10,
                   help="timed runs per block at least (small blocks run for 0.5 s at least)")
    p.add_argument("--fit", type=positive_int, default=4, metavar="K",
                   help="whole models timed to fit the terms outside the blocks (default 4)")
    p.add_argument("--import", dest="imported", metavar="MEASURED.csv", default=None,
                   help="rows timed on a device from `mdsearch latency probe`'s graphs")
    p.add_argument("--manifest", metavar="PROBE_DIR", default=None,
                   help="with --import: the probe folder whose manifest the rows must match")
    p.add_argument("--out", dest="table", type=Path, required=True, metavar="TABLE.csv",
                   help="the table (resumed when it exists); its terms go to TABLE.fit.json")
    p.set_defaults(func=cmd_latency_table)
    p = lat.add_parser("probe", help="write a space's block graphs and a manifest for timing "
                       "on a phone (ONNX Runtime Mobile, Core ML)")
    p.add_argument("--space", required=True, help="a search space file or name")
    p.add_argument("--resolution", type=positive_int, default=None)
    p.add_argument("--fit", type=positive_int, default=4, metavar="K",
                   help="whole models to include for fitting the terms (default 4)")
    p.add_argument("--out", required=True, help="the probe folder")
    p.set_defaults(func=cmd_latency_probe)

    p = sub.add_parser("table1", help="the paper's Table 1, reproduced beside our measurement")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="markdown table (the default)")
    fmt.add_argument("--json", action="store_true", help="a JSON list of rows")
    p.add_argument("--resolution", type=positive_int, default=512)
    p.set_defaults(func=cmd_table1)

    p = sub.add_parser("train", help="train one candidate's proxy and evaluate it")
    _add_spec_args(p)
    p.add_argument("--trial", default="cpu_quick",
                   help="a trial recipe file, or a name in trials/ (default: cpu_quick)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, samples, spec)")
    p.add_argument("--steps", type=positive_int, default=None, help="override the recipe's steps")
    p.add_argument("--seed", type=seed_int, default=None, help="override the recipe's seed")
    p.add_argument("--seeds", type=positive_int, default=None, metavar="K",
                   help="train K seeds (seed .. seed + K - 1) together as one stacked model; "
                        "held-out metrics per seed, with their mean and standard error")
    p.add_argument("--init", metavar="RUN_DIR", default=None,
                   help="fine-tune this trained run into a one-step generator (UFOGen; "
                        "with --trial ufogen_cpu or another kind: ufogen recipe)")
    _add_run_args(p, experiment="mdsearch")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("vae", help="autoencoders for latent diffusion (the paper's section 3.5)")
    vae = p.add_subparsers(dest="vae_command", required=True)
    p = vae.add_parser("train", help="train an f=8 KL autoencoder, or (train: decoder) a "
                                     "lightweight decoder for a trained one's frozen encoder")
    p.add_argument("--recipe", default="vae_cpu",
                   help="an autoencoder recipe (kind: vae) file, or a name in trials/ "
                        "(default: vae_cpu)")
    p.add_argument("--out", required=True,
                   help="run directory; also a diffusers model folder, usable as "
                        "`autoencoder: {kind: diffusers, path: DIR}` in any trial recipe")
    p.add_argument("--init", metavar="VAE_DIR", default=None,
                   help="the trained autoencoder whose encoder a `train: decoder` recipe keeps "
                        "frozen (e.g. --recipe vae_light_cpu)")
    p.add_argument("--steps", type=positive_int, default=None, help="stop after this step")
    p.add_argument("--seed", type=seed_int, default=None, help="override the recipe's seed")
    p.add_argument("--set", dest="overrides", action="append", metavar="FIELD=VALUE",
                   help="override a recipe field, e.g. arch.latent_channels=16 (repeatable)")
    _add_parallel_args(p)
    p.add_argument("--experiment", default="mdsearch-vae", help="MLflow experiment name")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--json", action="store_true", help="last stdout line: the result as JSON")
    p.set_defaults(func=cmd_vae_train)

    p = vae.add_parser("cost", help="parameters and GMACs of a recipe's encoder and decoder")
    p.add_argument("--recipe", default="vae_cpu", help="an autoencoder recipe file or name")
    p.add_argument("--resolution", type=positive_int, default=512, help="image side (512)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_vae_cost)

    p = sub.add_parser("promote", help="full training of a sweep's best trial under a budget")
    p.add_argument("run_dir", help="a sweep directory (runs/sweeps/NAME)")
    p.add_argument("--budget", default="md", choices=["md", "md-lite"],
                   help="md: <= 400M params, <= 200 GMACs (the paper's search budget); md-lite: "
                        "<= 300M params, <= 160 GMACs (default: md)")
    p.add_argument("--max-latency-ms", type=positive_float, default=None, metavar="MS",
                   help="also at most this predicted latency (the sweep's latency table)")
    p.add_argument("--trial", default="full",
                   help="full-training recipe, a file or a name in trials/ (default: full, the "
                        "paper's schedule; full_cpu runs the same stages on a CPU)")
    p.add_argument("--out", default=None,
                   help="training directory (default: RUN_DIR/promoted/BUDGET)")
    p.add_argument("--metric", default=None,
                   help="rank trials by this column (default: the sweep's quality objective)")
    p.add_argument("--steps", type=positive_int, default=None, help="stop after this many steps")
    p.add_argument("--no-train", action="store_true",
                   help="only choose the winner and write its spec and promotion.json")
    _add_run_args(p, experiment="mdsearch-full")
    p.set_defaults(func=cmd_promote)

    p = sub.add_parser("sweep", help="run a search space's sweep (Ray Tune + Optuna)")
    p.add_argument("space", help="a search space file, or a name in search_space/ (quickstart)")
    p.add_argument("--trial", default=None,
                   help="trial recipe (file or name in trials/); default: the space's own, "
                        "with its trial_overrides")
    p.add_argument("--name", default=None,
                   help="sweep name (default: SPACE-DATE-TIME; with --resume, the latest sweep "
                        "of this space)")
    p.add_argument("--storage", default="runs/sweeps",
                   help="directory holding sweeps (shared filesystem on a cluster); results go "
                        "to STORAGE/NAME (default: runs/sweeps)")
    p.add_argument("--address", default=None,
                   help="an existing Ray cluster: auto, HOST:PORT or ray://HOST:PORT "
                        "(default: a local Ray on 127.0.0.1)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep (finished trials are kept, unfinished "
                        "ones continue from their last evaluation)")
    p.add_argument("--trust-state", action="store_true",
                   help="with --resume: sign the sweep's Ray Tune state files as they are (a "
                        "sweep made before mdsearch signed them, or with another key); only for "
                        "a folder whose every writer you trust")
    p.add_argument("--num-samples", type=positive_int, default=None,
                   help="trained trials (default: the space's search.num_samples)")
    p.add_argument("--init", metavar="RUN_DIR", default=None,
                   help="a UFOGen space (base: init): the trained run every trial fine-tunes")
    p.add_argument("--supernet", metavar="DIR", default=None,
                   help="score each trial's configuration as a slice of this space's supernet "
                        "(mdsearch supernet train) instead of training it: seconds per trial")
    p.add_argument("--finetune", metavar="N", type=positive_int, default=0,
                   help="with --supernet: fine-tune each slice N steps before scoring it")
    p.add_argument("--no-mlflow", action="store_true", help="do not log trials to MLflow")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("report", help="Pareto plots, tables and an HTML report of a sweep")
    p.add_argument("run_dir", nargs="?", default=None,
                   help="a sweep directory (runs/sweeps/NAME)")
    p.add_argument("--mlflow", metavar="EXPERIMENT", default=None,
                   help="build the report from a sweep's MLflow experiment instead")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or ./mlruns)")
    p.add_argument("--out", default=None,
                   help="output directory (default: RUN_DIR/report, or runs/reports/EXPERIMENT)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("fidelity", help="rank agreement (Kendall tau) of two sweeps' proxies")
    p.add_argument("short", help="sweep directory at the smaller budget")
    p.add_argument("long", nargs="?", default=None,
                   help="sweep directory at the larger budget (same configurations); with "
                        "--short-step it defaults to SHORT itself")
    p.add_argument("--short-step", type=positive_int, default=None,
                   help="take the short budget from SHORT's trial histories at this step")
    p.add_argument("--metric", default=None,
                   help="the quality metric (default: the sweep's objective, else "
                        "mdsearch.quality.DEFAULT_QUALITY)")
    p.add_argument("--out", default=None, help="write fidelity.csv and fidelity.png here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("reliability", help="noise floors of a run's or a sweep's metrics: "
                                           "evaluation redraws and training seeds")
    p.add_argument("path", help="a trained run directory, or a sweep directory (then "
                                "SWEEP/reliability.json is written for `mdsearch report`)")
    p.add_argument("--redraws", type=at_least_two, default=3,
                   help="evaluations of the same weights under redrawn noise (default 3)")
    p.add_argument("--trials", type=positive_int, default=3,
                   help="a sweep's trials to redraw: best, median, worst (default 3)")
    p.add_argument("--bank-only", action="store_true",
                   help="redraw only the held-out bank (val_loss, text_gain): no sampling")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_reliability)

    p = sub.add_parser("export", help="export a UNet and its text encoder to ONNX (or Core ML), "
                                      "checked against PyTorch")
    _add_spec_args(p)
    p.add_argument("--checkpoint", default=None,
                   help="a trained trial directory (or its checkpoint.pt): exports its EMA "
                        "weights; otherwise --preset/--spec with random weights")
    p.add_argument("--format", default="onnx", choices=["onnx", "coreml"],
                   help="onnx (checked in ONNX Runtime), or coreml: .mlpackage through "
                        "coremltools (pip install -c constraints.txt -e '.[coreml]'), checked "
                        "only on macOS")
    p.add_argument("--fp16", action="store_true",
                   help="export in half precision (Core ML: float16 compute precision)")
    p.add_argument("--resolution", type=positive_int, default=None,
                   help="image resolution (default: the checkpoint's last training resolution "
                        "when its recipe.yaml is there, else 512)")
    p.add_argument("--latent-size", type=positive_int, default=None,
                   help="latent size (default: a checkpoint's resolution / its autoencoder's "
                        "factor, which is 1 in pixel space; else resolution/8)")
    p.add_argument("--no-text-encoder", action="store_true", help="export the UNet alone")
    p.add_argument("--no-decoder", action="store_true",
                   help="a latent-space run: export without its autoencoder's decoder (and so "
                        "without manifest.json)")
    p.add_argument("--text-encoder", default=None, choices=["minilm", "clip"],
                   help="the text encoder exported beside the UNet (default: the trial's "
                        "recipe.yaml if there is one, else by the UNet's context_dim: 384 "
                        "minilm, 768 clip)")
    p.add_argument("--text-encoder-path", default=None, metavar="DIR",
                   help="a local CLIP checkpoint folder (default: the recipe's path, else "
                        "$MDSEARCH_CLIP_PATH)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--json", action="store_true",
                   help="last stdout line: the result as JSON (the UNet's fields, the text "
                        "encoder's under text_encoder, the decoder's under decoder, and the "
                        "manifest's path)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="a caption to a PNG through an exported bundle, in ONNX "
                                        "Runtime alone (text encoder, UNet sampler, decoder)")
    p.add_argument("--bundle", required=True, metavar="DIR",
                   help="a folder written by mdsearch export --checkpoint RUN (manifest.json)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the caption")
    what.add_argument("--grid", metavar="PROMPTS.txt",
                      help="one image per caption of this file (one per line, '#' comments), "
                           "written as one PNG grid with each caption above its image")
    p.add_argument("--columns", type=positive_int, default=4,
                   help="with --grid: images per row (default 4)")
    p.add_argument("--out", dest="image", required=True, metavar="PNG",
                   help="the image file to write")
    p.add_argument("--seed", type=seed_int, default=0, help="the starting noise's seed (default 0)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="sampling steps (default: the manifest's, the run's evaluation steps; "
                        "1 for a one-step generator)")
    p.add_argument("--guidance", type=guidance_scale, default=None,
                   help="classifier-free guidance scale; 1: none (default: the manifest's)")
    p.add_argument("--check", metavar="RUN_DIR", default=None,
                   help="also make the image through PyTorch from the run it was exported from "
                        "and report the largest pixel difference")
    p.add_argument("--json", action="store_true",
                   help="last stdout line: the result as JSON (latency in ms per component)")
    p.set_defaults(func=cmd_generate)

    args = parser.parse_args(argv)
    try:
        if getattr(args, "out", None) is not None:  # every command's --out, before any work
            check_out_dir(args.out)
        args.func(args)
    except MdsearchError as err:  # the user's input: one line, exit 2 (--debug: the traceback)
        if args.debug:
            raise
        print(f"mdsearch {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError) as err:
        # a file or folder the user named that cannot be read or written: one line, like bad input
        if args.debug:
            raise
        print(f"mdsearch {args.command}: error: {err.filename}: {err.strerror.lower()} "
              "(check the path and its permissions)", file=sys.stderr)
        return 2
    except OSError as err:
        if args.debug or err.errno not in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"mdsearch {args.command}: error: {err.filename or ''}: {err.strerror.lower()}; "
              "what was written before is kept", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
