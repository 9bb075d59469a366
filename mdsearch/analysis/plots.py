"""Plots of a sweep's results (PNG, and SVG beside it): quality against full-size GMACs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..quality import difference_band, has_own_seeds, seed_tied
from ..rundir import (COMPLETED, FAILED, FILTERED_STATUS, LATENCY_PLOT, PLOT, STOPPED,
                      SWEEP_SUPERNET, front)

REFERENCES = ("md", "md-lite", "sd15")  # costed presets, drawn as vertical lines


X_AXES = {"gmacs": ("full-size GMACs at 512x512 (multiply-accumulates)", "{:g} GMACs", 1.0),
          "params": ("full-size parameters (millions)", "{:g}M params", 1e-6),
          "latency_ms": ("predicted latency (ms per UNet call, from the space's latency table)",
                         "{:g} ms", 1.0)}


def pareto_plot(table: pd.DataFrame, metric: str, out: str | Path, mode: str = "min",
                budget: float | None = None, title: str = "",
                references: dict[str, float] | None = None, x: str = "gmacs",
                noise: float | None = None, xlabel: str | None = None,
                scored_by: str = "proxy training", chance: str | None = None) -> Path:
    """Every trained trial at (full-size cost `x`, `metric`), the front of the completed ones
    drawn and labelled, stopped-early trials hollow, failed ones as crosses on the top edge, the
    budget and the reference models' costs as vertical lines (all in `x`'s units: GMACs, or
    parameters, plotted in millions). `noise` (the metric's noise floor, one std) draws error
    bars on the completed trials and shades the band within which a trial cannot be told from
    the best (1.96 * sqrt 2 * noise). `xlabel` names a cost other than a UNet's (an
    autoencoder's). `chance` ("best", "on front"): label each trial with results.csv's p_front,
    its probability of being the best / on the front. Writes `out` (.png) and .svg."""
    default_label, budget_label, scale = X_AXES[x]
    xlabel = xlabel or default_label
    table = table.assign(gmacs=table[x] * scale)  # the plotted x, whatever the cost
    budget = budget * scale if budget is not None else None
    references = {k: v * scale for k, v in (references or {}).items()}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    fig, ax = plt.subplots(figsize=(8, 6.2), dpi=120)
    has = table[metric].notna() if metric in table else pd.Series(False, index=table.index)
    done = table[(table["status"] == COMPLETED) & has]
    stopped = table[(table["status"] == STOPPED) & has]
    failed = table[table["status"] == FAILED]
    if len(done):
        ax.scatter(done["gmacs"], done[metric], s=40, color="tab:blue", label="completed",
                   zorder=3)
        own = f"{metric}_se"
        if has_own_seeds(done, metric):  # each trial's own seeds: its own error bar
            k = int(done["seeds_measured"].min()) if "seeds_measured" in done else 0
            ax.errorbar(done["gmacs"], done[metric], yerr=done[own], fmt="none",
                        ecolor="tab:blue", alpha=0.6, capsize=2,
                        label=f"±1 standard error of each trial's {k}-seed mean")
            ordered, bands = seed_tied(done, metric)
            tied = ordered[(ordered[metric] - ordered.iloc[0][metric]).abs() <= bands]
            ax.scatter(tied["gmacs"], tied[metric], s=140, facecolors="none",
                       edgecolors="tab:green", linewidths=1.5, zorder=2,
                       label="indistinguishable from the best (95%, own seeds)")
        elif noise is not None and np.isfinite(noise):
            ax.errorbar(done["gmacs"], done[metric], yerr=noise, fmt="none", ecolor="tab:blue",
                        alpha=0.5, capsize=2, label=f"noise floor ±{noise:.2g} (1 std)")
            best = done[metric].min() if mode == "min" else done[metric].max()
            band = difference_band(noise)
            ax.axhspan(best, best + band if mode == "min" else best - band, color="tab:green",
                       alpha=0.12, label="indistinguishable from the best (95%)")
    if len(stopped):
        ax.scatter(stopped["gmacs"], stopped[metric], s=40, facecolors="none",
                   edgecolors="tab:orange", label="stopped early (metric at its last evaluation)",
                   zorder=3)
    if len(done):
        best = front(done, [("gmacs", "min"), (metric, mode)])
        ax.step(best["gmacs"], best[metric], where="post", color="tab:blue", alpha=0.6,
                label="Pareto front (completed)")
    for _, row in pd.concat([done, stopped]).iterrows():  # every point named, as in results.csv
        label = str(row["trial_id"])[:8]
        if chance and pd.notna(row.get("p_front")):  # results.csv's p_front
            label += f" (P {chance} {row['p_front']:.2f})"
        ax.annotate(label, (row["gmacs"], row[metric]),
                    textcoords="offset points", xytext=(4, 4), fontsize=6)
    top = ax.get_ylim()[1]
    if len(failed):
        ax.scatter(failed["gmacs"], [top] * len(failed), marker="x", color="tab:red",
                   label="failed (no metric)", zorder=3, clip_on=False)
    if budget is not None:
        ax.axvline(budget, color="black", linestyle="--", linewidth=1,
                   label="budget " + budget_label.format(budget))
    right = 1.25 * max([budget or 0, *table["gmacs"].dropna()])
    styles = iter([":", "-.", (0, (1, 3)), (0, (5, 2))])
    for name, gmacs in (references or {}).items():
        if gmacs > right:  # e.g. sd15 (400 GMACs) beside a 175-GMAC budget: off the chart
            continue
        ax.axvline(gmacs, color="grey", linestyle=next(styles, ":"), linewidth=1,
                   label=f"{name} (reference) at " + budget_label.format(round(gmacs, 1)))
    filtered = int((table["status"] == FILTERED_STATUS).sum())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} ({'lower' if mode == 'min' else 'higher'} is better; {scored_by})")
    ax.set_title(title + (f"  [{filtered} over-budget configurations not trained]"
                          if filtered else ""), fontsize=9)
    ax.grid(alpha=0.3)
    # below the axes: inside, it covered points wherever they fell (the band spans the width)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    fig.savefig(out.with_suffix(".svg"))
    plt.close(fig)
    return out


def reference_costs(resolution: int = 512) -> dict[str, dict[str, float]]:
    """{"gmacs": {"md": 185.5, ...}, "params": {"md": 390.4e6, ...}} for the REFERENCES."""
    from ..arch import presets
    from ..arch.cost import cost

    costs = {name: cost(presets.get(name), resolution) for name in REFERENCES}
    return {"gmacs": {n: c.gmacs for n, c in costs.items()},
            "params": {n: float(c.params) for n, c in costs.items()}}


def sweep_plot(result, space) -> Path | None:
    """The Pareto plot a sweep ends with (SWEEP/pareto.png): its quality metric against
    full-size GMACs, with the noise floor, the budget and the paper's reference models; None
    when nothing reported the metric. Also sets `result.plot`. A space with a latency table
    also gets the same plot against predicted latency (SWEEP/pareto_latency.png)."""
    table, metric = result.table, space.quality.metric
    if "gmacs" not in table or metric not in table:
        return None
    title = f"sweep {result.path.name} ({space.name}, recipe {result.recipe})"
    scored_by = "proxy training"
    if (result.path / SWEEP_SUPERNET).is_file():
        title, scored_by = title.replace("recipe", "supernet of"), "a supernet's slices: a screen"
    noise = result.floors.get(metric, {}).get("floor")
    chance = "best" if len(space.objectives) == 1 else "on front"  # how p_front reads
    result.plot = pareto_plot(
        table, metric, result.path / PLOT, space.quality.mode, space.budget.max_gmacs,
        title=title, references=reference_costs()["gmacs"], noise=noise, scored_by=scored_by,
        chance=chance)
    if "latency_ms" in table and table["latency_ms"].notna().any():
        pareto_plot(table, metric, result.path / LATENCY_PLOT, space.quality.mode,
                    space.budget.max_latency_ms, title=title, x="latency_ms", noise=noise,
                    references=latency_references(space.latency), scored_by=scored_by)
    return result.plot


def latency_references(table) -> dict[str, float]:
    """The reference models' predicted latency, for those whose units the table holds."""
    from ..arch import presets
    from ..arch.latency import LatencyError

    out = {}
    for name in REFERENCES if table is not None else ():
        try:
            out[name] = table.predict(presets.get(name)).total_ms
        except LatencyError:
            continue  # a table of another space: this reference's blocks were never timed
    return out


def latency_breakdown_plot(rows: list[dict], out: str | Path, title: str) -> Path:
    """Where a spec's time goes (arch.latency.Latency.breakdown): per level, side and unit
    type, its share of the predicted latency beside its share of the GMACs and of the
    parameters, so that the groups whose time exceeds their MACs stand out. Writes `out` (.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    units = [r for r in rows if r["level"] is not None]
    labels = [breakdown_label(r) for r in rows]
    total_gmacs = sum(r["gmacs"] for r in units) or 1.0
    total_params = sum(r["params"] for r in units) or 1
    series = [("latency (table + fitted terms)", [100 * r["share"] for r in rows], "tab:red"),
              ("GMACs", [100 * (r["gmacs"] or 0) / total_gmacs for r in rows], "tab:blue"),
              ("parameters", [100 * (r["params"] or 0) / total_params for r in rows], "tab:grey")]
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(rows) + 1.6), dpi=120)
    y = np.arange(len(rows))
    height = 0.27
    for n, (name, values, color) in enumerate(series):
        ax.barh(y + (n - 1) * height, values, height, label=name, color=color, alpha=0.85)
    for i, r in enumerate(rows):
        ax.text(100 * r["share"] + 0.5, i - height, f"{r['ms']:.1f} ms", va="center", fontsize=7)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()  # the forward pass reads top to bottom
    ax.set_xlabel("share of the whole model (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def breakdown_label(row: dict) -> str:
    if row["level"] is None:
        return row["type"]
    return f"L{row['level']} {row['side']}: {row['type']}"
