"""Plots of a sweep's results (PNG, and SVG beside it): quality against full-size GMACs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..quality import difference_band, has_own_seeds, seed_tied
from ..rundir import COMPLETED, FAILED, FILTERED_STATUS, PLOT, STOPPED, front

REFERENCES = ("md", "md-lite", "sd15")  # costed presets, drawn as vertical lines


X_AXES = {"gmacs": ("full-size GMACs at 512x512 (multiply-accumulates)", "{:g} GMACs", 1.0),
          "params": ("full-size parameters (millions)", "{:g}M params", 1e-6)}


def pareto_plot(table: pd.DataFrame, metric: str, out: str | Path, mode: str = "min",
                budget: float | None = None, title: str = "",
                references: dict[str, float] | None = None, x: str = "gmacs",
                noise: float | None = None, xlabel: str | None = None) -> Path:
    """Every trained trial at (full-size cost `x`, `metric`), the front of the completed ones
    drawn and labelled, stopped-early trials hollow, failed ones as crosses on the top edge, the
    budget and the reference models' costs as vertical lines (all in `x`'s units: GMACs, or
    parameters, plotted in millions). `noise` (the metric's noise floor, one std) draws error
    bars on the completed trials and shades the band within which a trial cannot be told from
    the best (1.96 * sqrt 2 * noise). `xlabel` names a cost other than a UNet's (an
    autoencoder's). Writes `out` (.png) and .svg."""
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
        for _, row in best.iterrows():
            ax.annotate(str(row["trial_id"])[:8], (row["gmacs"], row[metric]),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    top = ax.get_ylim()[1]
    if len(failed):
        ax.scatter(failed["gmacs"], [top] * len(failed), marker="x", color="tab:red",
                   label="failed (no metric)", zorder=3, clip_on=False)
    if budget is not None:
        ax.axvline(budget, color="black", linestyle="--", linewidth=1,
                   label="budget " + budget_label.format(budget))
    right = 1.25 * max([budget or 0, *table["gmacs"].dropna()])
    for name, gmacs in (references or {}).items():
        if gmacs > right:  # e.g. sd15 (400 GMACs) beside a 175-GMAC budget: off the chart
            continue
        ax.axvline(gmacs, color="grey", linestyle=":", linewidth=1)
        ax.text(gmacs, top, f" {name}", rotation=90, va="top", fontsize=7, color="grey")
    filtered = int((table["status"] == FILTERED_STATUS).sum())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{metric} ({'lower' if mode == 'min' else 'higher'} is better; proxy training)")
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
    when nothing reported the metric. Also sets `result.plot`."""
    table, metric = result.table, space.quality.metric
    if "gmacs" not in table or metric not in table:
        return None
    result.plot = pareto_plot(
        table, metric, result.path / PLOT, space.quality.mode, space.budget.max_gmacs,
        title=f"sweep {result.path.name} ({space.name}, recipe {result.recipe})",
        references=reference_costs()["gmacs"],
        noise=result.floors.get(metric, {}).get("floor"))
    return result.plot
