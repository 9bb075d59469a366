"""`mdsearch` command line: parses arguments and calls the library; nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys

from .arch import presets
from .arch.cost import cost
from .arch.spec import ArchSpec, SpecError, parse_set
from .config import ConfigError
from .data.errors import DataError


def _add_spec_args(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default=None, choices=sorted(presets.PRESETS),
                        help="a named architecture (default: md)")
    source.add_argument("--spec", metavar="FILE", help="an ArchSpec YAML or JSON file")
    parser.add_argument("--set", dest="overrides", action="append", metavar="FIELD=VALUE",
                        help="override a field, e.g. ffn_expansion=4 or levels.2.channels=896 "
                             "(repeatable)")


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
    c = cost(_load_spec(args), args.resolution)
    if args.json:
        print(json.dumps(c.to_dict()))
        return
    kinds = ", ".join(f"{k} {v:.1f}" for k, v in c.gmacs_by_kind.items())
    print(f"{c.name} at {c.resolution}x{c.resolution} (latent {c.latent_size}x{c.latent_size}): "
          f"{c.params:,} parameters ({c.params / 1e6:.1f}M), {c.gmacs:.1f} GMACs ({kinds})\n"
          f"channels {tuple(c.channels)}, {c.conv_blocks} conv blocks, "
          f"{c.sa_layers} SA + {c.ca_layers} CA layers")


def cmd_table1(args) -> None:
    from .analysis.paper import table1, table1_markdown

    rows = table1(args.resolution)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table1_markdown(rows, args.resolution), end="")


def cmd_train(args) -> None:
    from .train.recipe import load_recipe
    from .train.trainer import train_trial

    recipe = load_recipe(args.trial)
    if args.seed is not None:
        recipe = recipe.override({"seed": args.seed}, source="--seed")
    spec = _load_spec(args)
    tracker = None
    if not args.no_mlflow:
        from .track import MLflowTracker

        tracker = MLflowTracker(experiment=args.experiment, run_name=spec.name)
    log = (lambda msg: print(f"[{spec.name}] {msg}", file=sys.stderr, flush=True))
    result = train_trial(spec, recipe, args.out, steps=args.steps, progress=log, tracker=tracker)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"{result.status}{': ' + result.reason if result.reason else ''} after "
              f"{result.steps} steps in {result.seconds:.0f}s; metrics: "
              + ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items()))
    if result.status != "ok":
        raise SystemExit(1)


def cmd_sweep(args) -> None:
    from .search import keep_ray_on_loopback

    if args.address is None:
        keep_ray_on_loopback()  # before Ray is imported: a laptop sweep opens no network port
    from .search.runner import run_sweep, summary
    from .search.space import load_space

    space = load_space(args.space)
    result = run_sweep(space, args.trial, name=args.name, storage=args.storage,
                       address=args.address, resume=args.resume, num_samples=args.num_samples,
                       mlflow=not args.no_mlflow)
    print(summary(result, space))


def cmd_report(args) -> None:
    from .analysis.report import build_report
    from .search.runner import SweepError

    if (args.run_dir is None) == (args.mlflow is None):
        raise SweepError("give a sweep directory or --mlflow EXPERIMENT (one of them)")
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


def cmd_export(args) -> None:
    from .arch.cost import latent_size
    from .export.onnx import export_unet, load_checkpoint, random_model

    if args.checkpoint:
        spec, model = load_checkpoint(args.checkpoint)
    else:
        spec = _load_spec(args)
        model = random_model(spec)
    if args.latent_size:
        latent = args.latent_size
    elif args.checkpoint and spec.latent_channels == 3:  # a pixel-space proxy (cpu_quick)
        latent = args.resolution
    else:
        latent = latent_size(spec, args.resolution)
    log = (lambda msg: print(f"[export] {msg}", file=sys.stderr, flush=True))
    result = export_unet(spec, model, args.out, latent, fp16=args.fp16, progress=log)
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(f"{result.path}: {result.size_bytes / 1e6:.1f} MB, max abs error vs PyTorch "
              f"{result.max_abs_err:.3g} (relative {result.rel_err:.3g}), ONNX Runtime CPU "
              f"latency {result.latency_ms:.1f} ms per UNet call")
    if not result.within_tolerance:
        raise SystemExit(f"parity check failed: relative error {result.rel_err:.3g} > 1e-4")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mdsearch",
        description="Architecture search and ablations for MobileDiffusion-family UNets.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("spec", help="print an architecture spec (YAML, or JSON with --json)")
    _add_spec_args(p)
    p.add_argument("--json", action="store_true", help="JSON instead of YAML")
    p.set_defaults(func=cmd_spec)

    p = sub.add_parser("cost", help="parameters, GMACs and Table 1 columns of a spec")
    _add_spec_args(p)
    p.add_argument("--resolution", type=int, default=512, help="image resolution (latent = /8)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_cost)

    p = sub.add_parser("table1", help="the paper's Table 1, reproduced beside our measurement")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="markdown table (the default)")
    fmt.add_argument("--json", action="store_true", help="a JSON list of rows")
    p.add_argument("--resolution", type=int, default=512)
    p.set_defaults(func=cmd_table1)

    p = sub.add_parser("train", help="train one candidate's proxy and evaluate it")
    _add_spec_args(p)
    p.add_argument("--trial", default="cpu_quick",
                   help="a trial recipe file, or a name in trials/ (default: cpu_quick)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, samples, spec)")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's steps")
    p.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    p.add_argument("--experiment", default="mdsearch", help="MLflow experiment name")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.add_argument("--json", action="store_true", help="last stdout line: the result as JSON")
    p.set_defaults(func=cmd_train)

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
    p.add_argument("--num-samples", type=int, default=None,
                   help="trained trials (default: the space's search.num_samples)")
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
    p.add_argument("--short-step", type=int, default=None,
                   help="take the short budget from SHORT's trial histories at this step")
    p.add_argument("--metric", default="fid_proxy")
    p.add_argument("--out", default=None, help="write fidelity.csv and fidelity.png here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("export", help="export a UNet to ONNX and check it in ONNX Runtime")
    _add_spec_args(p)
    p.add_argument("--checkpoint", default=None,
                   help="a trained trial directory (or its checkpoint.pt): exports its EMA "
                        "weights; otherwise --preset/--spec with random weights")
    p.add_argument("--format", default="onnx", choices=["onnx"],
                   help="onnx (Core ML is not implemented yet)")
    p.add_argument("--fp16", action="store_true", help="export in half precision")
    p.add_argument("--resolution", type=int, default=512, help="image resolution")
    p.add_argument("--latent-size", type=int, default=None,
                   help="latent size (default: resolution/8; a pixel-space checkpoint: "
                        "the resolution)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--json", action="store_true", help="last stdout line: the result as JSON")
    p.set_defaults(func=cmd_export)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (SpecError, ConfigError, DataError) as err:
        print(f"mdsearch {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
