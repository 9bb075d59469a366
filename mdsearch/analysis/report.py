"""`mdsearch report RUN_DIR`: what a sweep found, as files a person opens.

    pareto.png/.svg        quality against full-size GMACs (front, budget, references)
    pareto_params.png/.svg quality against full-size parameters
    quality_vs_align.png   quality against alignment (the paper's FID-vs-CLIP view)
    pareto.csv             the front (quality x GMACs) with trial_id and the spec fields
    ablation.md/.tex/.csv  when the sweep is an ablation (a `variant` dimension with a baseline)
    summary.md             counts, best trials, stop reasons, the paper beside the measurement
    report.html            all of the above in one self-contained page (figures inline)
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..quality import DEFAULT_QUALITY, direction
from ..quality import is_quality, noise_floors, winner_statement
from ..rundir import (COMPLETED, FAILED, FILTERED_STATUS, LATENCY_PLOT, LATENCY_TABLE, NOT_RUN,
                      RECIPE, SPACE, STOPPED,
                      PLOT, RESULTS, RunDirError, front, numeric_column, read_results,
                      trial_status)
from ..search.space import AUTOENCODER_BASE
from ..search.racing import racing_line
from .plots import latency_references

ABLATION_METRICS = ("val_loss_mid", "text_gain", "align", "kid_proxy")
"""Metrics an ablation table shows beside the sweep's own quality metric, where measured."""


@dataclass
class Report:
    out: Path
    files: dict[str, Path] = field(default_factory=dict)


def _load(run_dir: Path):
    from ..search.space import load_space

    table = read_results(run_dir, required=("params", "gmacs", "steps"))
    for column in [c for c in table.columns if is_quality(c)]:
        table[column] = numeric_column(table, column, run_dir / RESULTS)
    space = load_space(run_dir / SPACE) if (run_dir / SPACE).is_file() else None
    if space is not None and (run_dir / LATENCY_TABLE).is_file():
        space.latency_table = run_dir / LATENCY_TABLE  # the sweep's own copy
        space.load_latency()
    recipe = None
    if (run_dir / RECIPE).is_file():
        import yaml

        recipe = yaml.safe_load((run_dir / RECIPE).read_text())
    return table, space, recipe


def _load_mlflow(experiment: str, tracking_uri: str | None = None):
    """The same (table, space, recipe) from a sweep's MLflow experiment: one run per trained
    trial (params: the configuration; metrics: the last reported values; tags: status, reason)
    and the space and recipe the runner stored as experiment tags. Filtered configurations are
    not runs; only their count is kept (tag mdsearch.filtered)."""
    import tempfile

    import yaml
    from mlflow.tracking import MlflowClient

    from ..search.space import load_space
    from ..track import check_reachable, default_tracking_uri

    tracking_uri = tracking_uri or default_tracking_uri()
    check_reachable(tracking_uri)  # one line within seconds, not minutes of MLflow's retries
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise RunDirError(f"MLflow experiment {experiment!r} not found at {client.tracking_uri}")
    rows = []
    for run in client.search_runs([exp.experiment_id], max_results=50000):
        tags, metrics = run.data.tags, run.data.metrics
        row = {"trial_id": tags.get("trial_id", run.info.run_name)}
        failed = tags.get("status") == "failed"
        status = trial_status(metrics.get("step", 0), metrics.get("steps_total", math.inf), failed)
        if status == STOPPED and tags.get("status") != "finished":
            status = NOT_RUN  # still running, or its driver died: not stopped by a rule
        row["status"] = status
        row["stop_reason"] = (tags.get("reason", "") if failed else "" if status == COMPLETED
                              else f"stopped at step {metrics.get('step', 0):g}")
        row.update({k: yaml.safe_load(v) for k, v in run.data.params.items()
                    if k not in ("recipe", "base")})
        row.update(metrics)
        row["steps"] = metrics.get("step", 0)
        rows.append(row)
    filtered = int(exp.tags.get("mdsearch.filtered", 0))
    rows += [{"trial_id": f"filtered_{i + 1:04d}", "status": FILTERED_STATUS, "steps": 0}
             for i in range(filtered)]
    table = pd.DataFrame(rows)
    space = None
    if "mdsearch.space" in exp.tags:
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            f.write(exp.tags["mdsearch.space"])
        space = load_space(f.name)
    recipe = yaml.safe_load(exp.tags["mdsearch.recipe"]) if "mdsearch.recipe" in exp.tags else None
    return table, space, recipe


def front_table(table: pd.DataFrame, metric: str, mode: str, cost: str = "gmacs") -> pd.DataFrame:
    """The completed trials on the front of (metric, cost), cheapest first."""
    return front(table, [(cost, "min"), (metric, mode)])


def scatter(table: pd.DataFrame, x: str, y: str, out: Path, title: str, xlabel: str,
            ylabel: str, xnoise: float | None = None, ynoise: float | None = None,
            xchance: float | None = None) -> Path:
    """A plain scatter of completed (filled) and stopped (hollow) trials, labelled by trial;
    `xnoise`/`ynoise` (each metric's noise floor, one std) draw error bars on the completed;
    `xchance` draws x's chance level (align's: guessing every attribute)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for status, style in ((COMPLETED, dict(color="tab:blue")),
                          (STOPPED, dict(facecolors="none", edgecolors="tab:orange"))):
        rows = table[(table["status"] == status) & table[x].notna() & table[y].notna()]
        if rows.empty:
            continue
        ax.scatter(rows[x], rows[y], s=40, label=status, zorder=3, **style)
        for _, r in rows.iterrows():
            ax.annotate(str(r["trial_id"])[:8], (r[x], r[y]), textcoords="offset points",
                        xytext=(3, 3), fontsize=6)
        if status == COMPLETED and (xnoise or ynoise):
            ax.errorbar(rows[x], rows[y], xerr=xnoise, yerr=ynoise, fmt="none",
                        ecolor="tab:blue", alpha=0.4, capsize=2,
                        label="noise floor (1 std): " + ", ".join(
                            f"{name} ±{v:.2g}" for name, v in ((x, xnoise), (y, ynoise)) if v))
    if xchance is not None and math.isfinite(xchance):
        ax.axvline(xchance, color="tab:red", linestyle=":", linewidth=1,
                   label=f"chance ({x} {xchance:.3f})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out)
    fig.savefig(out.with_suffix(".svg"))
    plt.close(fig)
    return out


def build_report(run_dir: str | Path | None = None, out: str | Path | None = None,
                 mlflow_experiment: str | None = None,
                 tracking_uri: str | None = None) -> Report:
    """A report of the sweep in `run_dir`, or of the sweep logged to `mlflow_experiment`."""
    from .plots import pareto_plot, reference_costs
    from .tables import ablation_display, ablation_table

    if mlflow_experiment is not None:
        table, space, recipe = _load_mlflow(mlflow_experiment, tracking_uri)
        report = Report(Path(out or f"runs/reports/{mlflow_experiment}"))
    else:
        run_dir = Path(run_dir)
        table, space, recipe = _load(run_dir)
        report = Report(Path(out) if out else run_dir / "report")
    report.out.mkdir(parents=True, exist_ok=True)
    metric = space.quality.metric if space else DEFAULT_QUALITY
    mode = space.quality.mode if space else direction(metric)
    dims = [d.name for d in space.dimensions] if space else []
    name = mlflow_experiment or Path(run_dir).resolve().name  # (latest: the sweep it links to)
    budget = space.budget if space else None

    floors = noise_floors(table, dims, recipe, run_dir)
    noise = floors.get(metric, {}).get("floor")
    if metric in table:
        refs = reference_costs()
        labels = {"gmacs": None, "params": None}
        if space is not None and space.base_name == AUTOENCODER_BASE:  # not UNets: no references
            refs = {"gmacs": None, "params": None}
            labels = {"gmacs": "decoder GMACs at 512x512 (multiply-accumulates)",
                      "params": "encoder + decoder parameters (millions)"}
        report.files["pareto"] = pareto_plot(
            table, metric, report.out / PLOT, mode,
            budget.max_gmacs if budget else None, title=f"{name}: {metric} vs GMACs",
            references=refs["gmacs"], noise=noise, xlabel=labels["gmacs"])
        report.files["pareto_params"] = pareto_plot(
            table, metric, report.out / "pareto_params.png", mode,
            budget.max_params if budget else None, title=f"{name}: {metric} vs parameters",
            references=refs["params"], x="params", noise=noise, xlabel=labels["params"])
        if "latency_ms" in table and table["latency_ms"].notna().any():
            report.files["pareto_latency"] = pareto_plot(
                table, metric, report.out / LATENCY_PLOT, mode,
                budget.max_latency_ms if budget else None, x="latency_ms", noise=noise,
                title=f"{name}: {metric} vs predicted latency",
                references=latency_references(space.latency if space else None))
        if "align" in table:
            report.files["quality_vs_align"] = scatter(
                table, "align", metric, report.out / "quality_vs_align.png",
                f"{name}: {metric} vs alignment (the paper's FID-vs-CLIP view)",
                "align (attribute accuracy; higher is better)",
                f"{metric} ({'lower' if mode == 'min' else 'higher'} is better)",
                xnoise=floors.get("align", {}).get("floor"), ynoise=noise,
                xchance=(float(table["align_chance"].median()) if "align_chance" in table
                         else None))
        front = front_table(table, metric, mode)
        keep = ["trial_id", *dims, "seed", "params", "gmacs", metric, "align", "steps"]
        front = front.reindex(columns=[c for c in keep if c in front.columns])
        front.to_csv(report.out / "pareto.csv", index=False)
        report.files["pareto_csv"] = report.out / "pareto.csv"

    ablation = None
    if "variant" in table and "baseline" in set(table["variant"].dropna()):
        extra = tuple(m for m in ABLATION_METRICS if m in table and m != metric)
        ab = ablation_table(table, quality=metric, floors=floors, extra=extra)
        ablation = ablation_display(ab, quality=metric, extra=extra)
        _table_files(report, "ablation", ablation, ab,
                     f"Ablations against md ({name}); mean ± std over seeds, 95% interval of "
                     "the paired change (simultaneous over the variants) and its verdict")

    table5 = None
    if {"reconstruction", "adapter"} <= set(table.columns) and metric in table:
        from .tables import ufogen_table

        table5, raw5 = ufogen_table(table, quality=metric)
        _table_files(report, "table5", table5, raw5,
                     f"The paper's Table 5 on the proxy ({name}); mean ± std over seeds, the "
                     "paper's FID beside ours, the paired change against diffusion loss + full "
                     "fine-tuning")

    channels = None
    if "latent_channels" in table and "psnr" in table:
        from .tables import autoencoder_table

        channels, raw_c = autoencoder_table(table)
        _table_files(report, "latent_channels", channels, raw_c,
                     f"Latent channels of an f=8 autoencoder ({name}); mean ± std over seeds; "
                     "the change of PSNR from the c before, paired by seed")
        report.files.update(_reconstruction_grids(table, report.out))

    summary = _summary(table, space, recipe, name, metric, mode, report, ablation, floors)
    if metric in table and space is not None and space.latency is not None:
        summary += _latency_section(table, space, metric, mode, report, noise)
    if table5 is not None:
        from .tables import lora_vs_full, table5_markdown

        summary += ("\n## The paper's Table 5 (UFOGen reconstruction term x fine-tuning)\n\n"
                    + table5_markdown(table5, lora_vs_full(table, metric), metric)
                    + " The paper's FIDs are COCO FID-30K of the full model; ours are "
                    f"{metric} of the proxy: compare directions, never values.\n")
    if channels is not None:
        grids = [k for k in report.files if k.startswith("reconstructions_c")]
        summary += ("\n## Latent channels (the paper's section 3.5)\n\n" + channels.to_markdown(
            index=False) + "\n\nΔ: the 95% interval of the paired change of PSNR from the "
            "c before, simultaneous over the steps; the paper's claim (more channels reconstruct "
            "better, at more cost) holds where every step says better. rfid_proxy is FID on the "
            "attribute classifier's features, not Inception FID.\n\n"
            + "".join(f"![{k}]({report.files[k].name})\n" for k in grids))
    (report.out / "summary.md").write_text(summary)
    report.files["summary"] = report.out / "summary.md"
    report.files["html"] = _html(summary, report)
    return report


def _table_files(report: Report, stem: str, shown: pd.DataFrame, raw: pd.DataFrame,
                 caption: str) -> None:
    """STEM.md/.tex/.csv in the report (`tables.write_table`), listed as report.files STEM_md,
    STEM_tex, STEM_csv."""
    from .tables import write_table

    paths = write_table(shown, report.out / stem, raw=raw, caption=caption)
    report.files.update({f"{stem}_{k}": v for k, v in paths.items()})


def _reconstruction_grids(table: pd.DataFrame, out: Path) -> dict[str, Path]:
    """For each latent-channel count, the last reconstruction grid (originals over
    reconstructions) of its first completed seed, copied into the report."""
    import shutil

    grids = {}
    done = table[table["status"] == COMPLETED].sort_values("seed")
    for c, rows in done.groupby("latent_channels"):
        found = sorted(Path(rows["path"].iloc[0]).glob("samples_*.png")) if "path" in rows else []
        if found:
            target = out / f"reconstructions_c{int(c)}.png"
            shutil.copyfile(found[-1], target)  # samples_STEP.png, zero-padded: the last
            grids[f"reconstructions_c{int(c)}"] = target
    return grids


def _summary(table, space, recipe, name, metric, mode, report, ablation, floors) -> str:
    counts = table["status"].value_counts()
    trained = table[table["status"] != FILTERED_STATUS]
    lines = [f"# Sweep report: {name}", ""]
    if space is not None:
        r = recipe or {}
        detail = (f"{r.get('steps', '?')} steps of UFOGen one-step fine-tuning"
                  if r.get("kind") == "ufogen" else
                  f"{r.get('steps', '?')} steps of autoencoder training at "
                  f"{r.get('resolution', '?')}px" if r.get("kind") == "vae" else
                  f"{r.get('steps', '?')} steps, {r.get('resolution', '?')}px, width "
                  f"{r.get('width', '?')}")
        lines += [f"Space `{space.name}`: {space.description or ''}", "",
                  f"Budget: {space.budget.describe()}. Searcher: {space.algorithm}. "
                  f"Stopping: {space.scheduler['kind']}. Recipe: `{r.get('name', '?')}` "
                  f"({detail}).", ""]
    lines += ["## Counts", "",
              f"- trained: {len(trained)} (" + ", ".join(
                  f"{counts.get(s, 0)} {s}" for s in (COMPLETED, STOPPED, FAILED)) + ")",
              f"- filtered before training (over budget or invalid): "
              f"{int(counts.get('filtered', 0))}",
              f"- trial-steps trained: {int(trained['steps'].fillna(0).sum())}", ""]
    if space is not None and "steps_total" in table and \
            (raced := racing_line(table, space.race, int(table["steps_total"].max()))):
        lines[-1:] = [f"- {raced}", ""]
    if metric in table:
        best = table[table["status"] == COMPLETED].sort_values(metric, ascending=mode == "min")
        cols = ["trial_id", *([d.name for d in space.dimensions] if space else []), "seed",
                "params", "gmacs", "latency_ms", metric, "p_front", "align", "steps"]
        best = best.reindex(columns=[c for c in cols if c in best.columns]).head(5)
        if "params" in best:
            best = best.assign(params=(best["params"] / 1e6).round(1).astype(str) + "M")
        lines += [f"## Best completed trials (by {mode} {metric})", "",
                  best.to_markdown(index=False, floatfmt=".4g") if len(best) else "none", "",
                  winner_statement(table, metric, floors.get(metric)), ""]
        if "p_front" in best:
            lines += ["`p_front`: the trial's probability of being the best (one objective) or "
                      "on the Pareto front (several), from its mean and its noise (its own "
                      "seeds' standard error, else the noise floor below).", ""]
    lines += _noise_section(floors, table)
    reasons = trained[trained["status"].isin([STOPPED, FAILED])]
    if len(reasons):
        lines += ["## Stopped and failed trials", "",
                  reasons[["trial_id", "status", "steps", "stop_reason"]].to_markdown(
                      index=False), ""]
    if ablation is not None:
        tests = max(0, len(ablation) - 1)
        lines += ["## Ablations (against md; mean ± std over seeds, Δ paired by seed)", "",
                  ablation.to_markdown(index=False), "",
                  f"Intervals: t-intervals of the paired Δ, its spread pooled over the "
                  f"variants, simultaneous over the {tests} comparisons of each metric "
                  f"(Bonferroni: each at {100 - 5 / max(tests, 1):.2f}%), so when nothing "
                  f"differs a metric's column shows a spurious better or worse with "
                  f"probability 5% at most.",
                  "",
                  "Files: [ablation.md](ablation.md), [ablation.tex](ablation.tex), "
                  "[ablation.csv](ablation.csv)", ""]
    figures = [k for k in ("pareto", "pareto_params", "pareto_latency", "quality_vs_align")
               if k in report.files]
    if figures:
        lines += ["## Figures", ""] + [f"![{k}]({report.files[k].name})" for k in figures] + [
            "", "The front's rows: [pareto.csv](pareto.csv)", ""]
    lines += _paper_section(metric)
    return "\n".join(lines) + "\n"


def _latency_section(table, space, metric: str, mode: str, report: Report,
                     noise: float | None) -> str:
    """Where the best completed trial's predicted time goes (per level and block type, beside
    its params and GMACs): a table and LATENCY_BREAKDOWN.png (SnapFusion's per-block view)."""
    from .plots import breakdown_label, latency_breakdown_plot

    done = table[(table["status"] == COMPLETED) & table[metric].notna()]
    if done.empty:
        return ""
    best = done.sort_values(metric, ascending=mode == "min").iloc[0]
    point = {d.name: next((v for v in d.values if v == best[d.name]), best[d.name])
             for d in space.dimensions if d.name in best and pd.notna(best[d.name])}
    spec = space.spec_for(point)  # (a results column's 1024.0 is the dimension's 1024)
    predicted = space.latency.predict(spec)
    rows = predicted.breakdown()
    report.files["latency_breakdown"] = latency_breakdown_plot(
        rows, report.out / "latency_breakdown.png",
        f"trial {best['trial_id']} ({metric} {best[metric]:.4g}): "
        f"{predicted.total_ms:.0f} ms predicted at {predicted.resolution}px")
    shown = pd.DataFrame([{"where": breakdown_label(r), "ms": round(r["ms"], 1),
                           "share": f"{100 * r['share']:.1f}%",
                           "params": "-" if r["params"] is None else f"{r['params'] / 1e6:.1f}M",
                           "GMACs": "-" if r["gmacs"] is None else round(r["gmacs"], 2)}
                          for r in rows])
    first = next(iter(space.latency.rows.values()))
    floor = (f"noise floor ±{noise:.2g}" if noise is not None and math.isfinite(noise)
             else "noise floor unknown")
    return "\n".join([
        f"## Where the time goes (trial {best['trial_id']}, the top {metric})", "",
        f"The trial with the {'lowest' if mode == 'min' else 'highest'} {metric} "
        f"({best[metric]:.4g}; {floor}): whether it is ahead of the others is the winner "
        f"statement's call above, not this section's.", "",
        f"Predicted {predicted.total_ms:.1f} ms per UNet call at {predicted.resolution}x"
        f"{predicted.resolution} from the space's latency table ({first.runtime} "
        f"{first.runtime_version}, {first.threads} threads, {first.device}): each group's "
        f"table entries; the fitted terms cover the stem, the head and the graph overhead.", "",
        shown.to_markdown(index=False), "", "![latency_breakdown](latency_breakdown.png)", ""])


def _noise_section(floors: dict, table: pd.DataFrame) -> list[str]:
    shown = {m: f for m, f in floors.items() if m in table}
    if not shown:
        return ["## Noise floors", "", "No noise floor is known for this recipe's metrics: "
                "every difference above may be noise (`mdsearch reliability RUN_DIR`).", ""]
    lines = ["## Noise floors", "",
             "The std of one trial's value around its configuration's true value: training seed "
             "and evaluation draw. Two trials differ detectably when they differ by more than "
             "1.96 x sqrt 2 x floor.", "",
             "| metric | direction | seed std | evaluation std | floor | source |",
             "|---|---|---:|---:|---:|---|"]
    for m, f in shown.items():
        lines.append(f"| {m} | {direction(m)} | {_g(f.get('seed_std'))} | "
                     f"{_g(f.get('eval_std'))} | {_g(f.get('floor'))} | {f.get('source', '')} |")
    return lines + [""]


def _g(value) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3g}"


def _paper_section(metric: str) -> list[str]:
    from .paper import table1

    rows = [r for r in table1(512) if r["name"] in ("md", "md-lite", "sd15")]
    lines = ["## The paper beside the measurement", "",
             "Full-size cost of the reference presets (paper Table 1; mdsearch's cost model):", "",
             "| preset | paper params | measured params | paper GFLOPs | measured GMACs |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {_fmt(r['paper_params_m'], 'M')} | "
                     f"{_fmt(r['params_m'], 'M')} | {_fmt(r['paper_gmacs'])} | "
                     f"{_fmt(r['gmacs'])} |")
    lines += ["", f"Quality: the paper reports FID-30K on MS-COCO with Inception features (MD: "
              f"8.65 with 50 DDIM steps, Table 2) after full training. This report's `{metric}` "
              "comes from a short proxy training on this sweep's recipe and data and, unless "
              "the name is `fid`, from the platform's offline feature extractor: compare "
              "trials with each other, never with the paper's FID.", ""]
    return lines


def _fmt(value, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.1f}{unit}"


def _html(summary_md: str, report: Report) -> Path:
    """summary.md as one self-contained HTML page: PNGs inlined as data URIs."""
    import markdown_it

    body = markdown_it.MarkdownIt("commonmark").enable("table").render(summary_md)
    for key in ("pareto", "pareto_params", "quality_vs_align"):
        path = report.files.get(key)
        if path is None:
            continue
        data = base64.b64encode(path.read_bytes()).decode()
        body = body.replace(f'src="{path.name}"', f'src="data:image/png;base64,{data}"')
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>"
            + html.escape(report.out.parent.name) + "</title><style>"
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
            "padding:3px 6px;text-align:right}img{max-width:100%;border:1px solid #eee}"
            "</style></head><body>" + body + "</body></html>")
    path = report.out / "report.html"
    path.write_text(page)
    return path
