"""Proxy fidelity: do two budgets rank the same configurations the same way?

`mdsearch fidelity SHORT_RUN LONG_RUN` matches the completed trials of two sweeps by their
configuration (the varied fields and the seed), and reports Kendall's tau-b between the two
rankings of the quality metric, with a scatter plot of the ranks. tau = 1: the short proxy
orders candidates exactly as the long one; 0: no better than chance.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..errors import did_you_mean
from ..quality import DEFAULT_QUALITY
from ..rundir import COMPLETED, RESULTS, SPACE, TUNE_HISTORY, RunDirError, numeric_column, \
    read_results
from .reliability import kendall_tau_b


def _completed(run_dir: str | Path, metric: str) -> pd.DataFrame:
    t = read_results(run_dir)
    if metric not in t:
        raise RunDirError(f"{Path(run_dir) / RESULTS}: no column {metric!r}"
                          f"{did_you_mean(metric, t.columns)}")
    t = t.assign(**{metric: numeric_column(t, metric, Path(run_dir) / RESULTS)})
    return t[(t["status"] == COMPLETED) & t[metric].notna()]


def at_step(run_dir: str | Path, step: int, metric: str = DEFAULT_QUALITY) -> pd.DataFrame:
    """A sweep's completed trials as they were at evaluation `step`, from each trial's reported
    history (Tune's line-per-report file). With a constant learning rate after warm-up, this is
    what a sweep with `step` training steps would have measured."""
    rows = []
    for _, row in _completed(run_dir, metric).iterrows():
        history = Path(str(row.get("path", ""))) / TUNE_HISTORY
        if not history.is_file():
            continue
        for line in history.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a killed driver: skip it
                continue
            if isinstance(record, dict) and record.get("step") == step and metric in record:
                rows.append({**row.to_dict(), metric: record[metric], "steps": step})
    if not rows:
        raise RunDirError(f"{run_dir}: no completed trial reported {metric} at step {step}")
    return pd.DataFrame(rows)


def fidelity(short_dir: str | Path, long_dir: str | Path, metric: str | None = None,
             out: str | Path | None = None, short_step: int | None = None) -> dict:
    """Rank agreement between a short and a long budget. With `short_step`, the short budget is
    the long sweep's own trials at that evaluation step (short_dir may equal long_dir). The
    metric defaults to the long sweep's quality objective, else DEFAULT_QUALITY."""
    if short_step is None and Path(short_dir).resolve() == Path(long_dir).resolve():
        raise RunDirError(f"{short_dir}: a sweep compared with itself (tau 1 by construction): "
                          "give the longer sweep as LONG_SWEEP, or --short-step STEP to rank "
                          "its own trials at an earlier evaluation")
    if metric is None:
        from ..search.space import load_space

        space_file = Path(long_dir) / SPACE
        metric = load_space(space_file).quality.metric if space_file.is_file() \
            else DEFAULT_QUALITY
    long = _completed(long_dir, metric)
    short = (at_step(short_dir, short_step, metric) if short_step is not None
             else _completed(short_dir, metric))
    keys = [c for c in _config_columns(short) if c in long.columns]
    merged = short.merge(long, on=keys, suffixes=("_short", "_long"))
    if len(merged) < 2:
        raise RunDirError(f"{short_dir} and {long_dir}: {len(merged)} completed configuration(s) "
                          f"in both, matched on {', '.join(keys) or 'nothing'}; rank agreement "
                          "needs at least 2")
    tau = kendall_tau_b(merged[f"{metric}_short"], merged[f"{metric}_long"])
    result = {"pairs": len(merged), "kendall_tau_b": tau, "metric": metric, "keys": keys,
              "steps_short": int(short["steps"].max()) if len(short) else 0,
              "steps_long": int(long["steps"].max()) if len(long) else 0}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        merged.to_csv(out / "fidelity.csv", index=False)
        result["plot"] = str(_plot(merged, metric, tau, result, out / "fidelity.png"))
    return result


def _config_columns(table: pd.DataFrame) -> list[str]:
    """The varied fields and the seed: results.csv puts them between stop_reason and params."""
    cols = list(table.columns)
    start = cols.index("stop_reason") + 1 if "stop_reason" in cols else 0
    end = cols.index("params") if "params" in cols else len(cols)
    return cols[start:end]


def _plot(merged: pd.DataFrame, metric: str, tau: float, result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    rs = merged[f"{metric}_short"].rank(method="average")
    rl = merged[f"{metric}_long"].rank(method="average")
    ax.scatter(rs, rl, s=40)
    n = len(merged)
    ax.plot([1, max(n, 1)], [1, max(n, 1)], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel(f"rank by {metric} after {result['steps_short']} steps (1 = best)")
    ax.set_ylabel(f"rank by {metric} after {result['steps_long']} steps")
    ax.set_title(f"proxy fidelity: Kendall tau-b = {tau:.2f} over {n} configurations",
                 fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
