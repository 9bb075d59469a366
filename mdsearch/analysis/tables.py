"""Tables from sweep results: ablation tables (variant vs baseline, mean +- std over seeds), the
paper's Table 5 from UFOGen trials and its section 3.5 latent-channel study from autoencoder
trials, rendered to Markdown, LaTeX and CSV by pandas.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ..quality import DEFAULT_QUALITY

MEASURED = ("completed",)  # trials whose metrics are at the full proxy budget


def _mean_std(values: pd.Series) -> tuple[float, float, int]:
    values = values.dropna().astype(float)
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    return values.mean(), (values.std(ddof=1) if n > 1 else math.nan), n


def _cell(mean: float, std: float, digits: int = 3, signed: bool = False) -> str:
    if math.isnan(mean):
        return "-"
    fmt = f"{{:{'+' if signed else ''}.{digits}g}}"
    text = fmt.format(mean)
    return text if math.isnan(std) else f"{text} ± {std:.2g}"


def ablation_table(table: pd.DataFrame, variant: str = "variant", baseline: str = "baseline",
                   quality: str = DEFAULT_QUALITY, alignment: str = "align",
                   floors: dict[str, dict] | None = None,
                   extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """One row per variant: its metrics and their change against `baseline`, mean and standard
    deviation over the seeds that completed (n), the 95% interval of the change (simultaneous
    over the table's variants, per metric: Bonferroni) and its verdict
    (better / worse / no detectable difference / not enough seeds to tell; see
    `reliability.paired_delta`), and the full-size cost change.

    A delta is computed per seed (variant seed s minus baseline seed s) where both completed,
    so the spread is that of paired differences. The interval uses that spread pooled over all
    variants (`reliability.pooled_std`: one degree of freedom per variant and extra seed, where
    a 2-seed difference alone has one); with single seeds everywhere, the metric's known
    training-seed noise (`floors`, from `reliability.noise_floors`); without pairs the delta
    falls back to the difference of means (no interval, no verdict)."""
    from ..quality import pooled_std
    from .reliability import paired_delta

    done = table[table["status"].isin(MEASURED)]
    if variant not in done or baseline not in set(done[variant]):
        raise ValueError(f"no completed '{baseline}' trial in column '{variant}': an ablation "
                         "table needs the baseline measured")
    base = done[done[variant] == baseline]
    base_cost = base[["params", "gmacs"]].iloc[0]
    rows = []
    order = [baseline] + [v for v in dict.fromkeys(table[variant]) if v != baseline]
    metrics = [m for m in dict.fromkeys((quality, alignment, *extra)) if m in done]

    def paired(runs: pd.DataFrame, metric: str) -> pd.DataFrame:
        return runs.merge(base, on="seed", suffixes=("", "_base"))[
            [metric, f"{metric}_base"]].dropna()

    pools = {}
    for metric in metrics:
        diffs = []
        for name in order[1:]:
            p = paired(done[done[variant] == name], metric)
            diffs.append(p[metric] - p[f"{metric}_base"])
        pools[metric] = pooled_std(diffs)
    for name in order:
        runs = done[done[variant] == name]
        all_runs = table[table[variant] == name]
        row = {"variant": name, "n": len(runs),
               "not_completed": int((all_runs["status"] != "completed").sum())}
        for metric in metrics:
            m, s, _ = _mean_std(runs[metric])
            row[metric], row[f"{metric}_std"] = m, s
            pairs = paired(runs, metric)
            if len(pairs):
                floor = (floors or {}).get(metric, {}).get("seed_std")
                d = paired_delta(pairs[metric], pairs[f"{metric}_base"], metric, floor=floor,
                                 pooled=pools[metric], comparisons=len(order) - 1)
                row[f"d_{metric}"], row[f"d_{metric}_std"] = d["delta"], d["delta_std"]
                if name != baseline:
                    row[f"d_{metric}_low"], row[f"d_{metric}_high"] = d["low"], d["high"]
                    row[f"verdict_{metric}"] = d["verdict"]
            else:
                row[f"d_{metric}"] = m - _mean_std(base[metric])[0]
                row[f"d_{metric}_std"] = math.nan
                row[f"verdict_{metric}"] = "not enough seeds to tell"
        cost = all_runs[["params", "gmacs"]].dropna()
        if len(cost):
            row["params_m"] = cost["params"].iloc[0] / 1e6
            row["gmacs"] = cost["gmacs"].iloc[0]
            row["d_params_pct"] = 100 * (cost["params"].iloc[0] / base_cost["params"] - 1)
            row["d_gmacs_pct"] = 100 * (cost["gmacs"].iloc[0] / base_cost["gmacs"] - 1)
        rows.append(row)
    return pd.DataFrame(rows)


def ablation_display(ab: pd.DataFrame, quality: str = DEFAULT_QUALITY,
                     alignment: str = "align", extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """The ablation table with mean ± std cells, intervals and verdicts, for Markdown and
    LaTeX."""
    out = pd.DataFrame({"variant": ab["variant"], "seeds": ab["n"]})
    for metric in dict.fromkeys((quality, alignment, *extra)):
        if metric in ab:
            out[metric] = [_cell(m, s) for m, s in zip(ab[metric], ab[f"{metric}_std"])]
            low = ab.get(f"d_{metric}_low", pd.Series(math.nan, index=ab.index))
            high = ab.get(f"d_{metric}_high", pd.Series(math.nan, index=ab.index))
            out[f"Δ {metric} [95% CI]"] = [
                f"{d:+.3g}" + ("" if math.isnan(lo) else f" [{lo:+.2g}, {hi:+.2g}]")
                for d, lo, hi in zip(ab[f"d_{metric}"], low, high)]
            if f"verdict_{metric}" in ab:
                out[f"{metric} verdict"] = ab[f"verdict_{metric}"].fillna("")
    if "params_m" in ab:
        out["params"] = [f"{p:.1f}M" for p in ab["params_m"]]
        out["Δ params"] = [f"{d:+.1f}%" for d in ab["d_params_pct"]]
        out["GMACs"] = [f"{g:.1f}" for g in ab["gmacs"]]
        out["Δ GMACs"] = [f"{d:+.1f}%" for d in ab["d_gmacs_pct"]]
    return out


RECONSTRUCTIONS = ("diffusion", "distill", "ema_distill")  # Table 5's rows, the paper's order
ADAPTERS = ("full", "lora")  # its columns
PAPER_ROWS = {"diffusion": "Diffusion loss", "distill": "Distill loss",
              "ema_distill": "EMA distill loss"}


def paper_table5() -> dict[tuple[str, str], float]:
    """The paper's Table 5 FIDs by (reconstruction, adapter), from analysis/paper_tables.yaml."""
    import yaml

    from ..paths import ANALYSIS

    rows = yaml.safe_load((ANALYSIS / "paper_tables.yaml").read_text())["table5"]["rows"]
    by_name = {row[0]: row for row in rows}
    return {(r, a): by_name[PAPER_ROWS[r]][1 + i]
            for r in RECONSTRUCTIONS for i, a in enumerate(ADAPTERS)}


def ufogen_table(table: pd.DataFrame, quality: str = "fid_proxy",
                 extra: tuple[str, ...] = ("kid_proxy", "align")) -> tuple[pd.DataFrame,
                                                                           pd.DataFrame]:
    """The paper's Table 5 from UFOGen trials (columns `reconstruction`, `adapter`, `seed`):
    (display, raw). Per (reconstruction, adapter): mean ± std over the seeds that completed,
    the paper's FID beside it under its own name, and the change of `quality` against the
    paper's choice (diffusion loss, full fine-tuning) paired by seed, with a 95% interval
    simultaneous over the 5 comparisons (its spread pooled over them) and a verdict."""
    from ..quality import pooled_std
    from .reliability import paired_delta, verdict_text

    done = table[table["status"].isin(MEASURED)]
    cell = {(r, a): done[(done["reconstruction"] == r) & (done["adapter"] == a)]
            .set_index("seed") for r in RECONSTRUCTIONS for a in ADAPTERS}
    base = cell[("diffusion", "full")]
    others = [key for key in cell if key != ("diffusion", "full")]
    pooled = pooled_std([cell[k][quality] - base[quality] for k in others if len(cell[k])])
    paper = paper_table5()
    raw, shown = [], []
    for (r, a), runs in cell.items():
        row = {"reconstruction": r, "adapter": a, "n": len(runs), "paper_fid": paper[(r, a)]}
        for metric in (quality, *extra):
            if metric in runs:
                row[metric], row[f"{metric}_std"], _ = _mean_std(runs[metric])
        verdict = "reference (the paper's choice)"
        if (r, a) != ("diffusion", "full"):
            if len(runs) and len(base):
                d = paired_delta(runs[quality], base[quality], quality, pooled=pooled,
                                 comparisons=len(others))
                row.update({f"d_{quality}": d["delta"], f"d_{quality}_low": d["low"],
                            f"d_{quality}_high": d["high"], "verdict": d["verdict"]})
                verdict = verdict_text(d)
            else:
                verdict = "no completed trial"
        raw.append(row)
        shown.append({"reconstruction loss": PAPER_ROWS[r],
                      "fine-tuning": "full" if a == "full" else "LoRA", "seeds": len(runs),
                      f"{quality} (ours)": _cell(row.get(quality, math.nan),
                                                 row.get(f"{quality}_std", math.nan)),
                      "FID (paper, COCO 30K)": row["paper_fid"],
                      **{m: _cell(row.get(m, math.nan), row.get(f"{m}_std", math.nan))
                         for m in extra if m in done},
                      f"Δ {quality} vs diffusion + full": verdict})
    return pd.DataFrame(shown), pd.DataFrame(raw)


def lora_vs_full(table: pd.DataFrame, quality: str = "fid_proxy") -> dict:
    """The paper's first Table 5 claim, tested directly: LoRA minus full fine-tuning of
    `quality`, paired by (reconstruction, seed) over every reconstruction term (a
    `reliability.paired_delta` dict: delta, 95% interval, verdict, n pairs)."""
    from .reliability import paired_delta

    done = table[table["status"].isin(MEASURED)].set_index(["reconstruction", "seed"])
    return paired_delta(done[done["adapter"] == "lora"][quality],
                        done[done["adapter"] == "full"][quality], quality)


def table5_markdown(shown: pd.DataFrame, lora: dict, quality: str = "fid_proxy") -> str:
    """Table 5 (`ufogen_table`'s display frame) in Markdown, with the LoRA-against-full test
    (`lora_vs_full`) and how its intervals are built."""
    from .reliability import verdict_text

    return (shown.to_markdown(index=False) + "\n\nLoRA against full fine-tuning, paired by "
            f"reconstruction term and seed ({lora['n']} pairs): Δ {quality} "
            f"{lora['delta']:+.4g}, {verdict_text(lora)}.\n\nIntervals: 95%, simultaneous over "
            "the 5 comparisons (Bonferroni), the paired spread pooled over them.")


AUTOENCODER_METRICS = ("psnr", "ssim", "rfid_proxy", "kl")
PAPER_CHANNELS = 8  # the paper's choice of latent channels (section 3.5)


def autoencoder_table(table: pd.DataFrame, dimension: str = "latent_channels",
                      quality: str = "psnr") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The latent-channel study from autoencoder trials (a `dimension` column, `seed`):
    (display, raw). Per value: mean ± std over the seeds that completed of the reconstruction
    metrics, the encoder's and decoder's cost, and the change of `quality` from each value to the
    next larger one, paired by seed, with a 95% interval simultaneous over those steps (its
    spread pooled over them) and a verdict: the paper's claim (more channels reconstruct
    better) is one "better" per step."""
    from ..quality import pooled_std
    from .reliability import paired_delta, verdict_text

    done = table[table["status"].isin(MEASURED)]
    values = sorted(done[dimension].dropna().unique())
    runs = {v: done[done[dimension] == v].set_index("seed") for v in values}
    steps = list(zip(values, values[1:]))
    pooled = pooled_std([runs[b][quality] - runs[a][quality] for a, b in steps])
    raw, shown = [], []
    for i, v in enumerate(values):
        r = runs[v]
        row = {dimension: v, "n": len(r)}
        for metric in (*AUTOENCODER_METRICS, "encoder_params", "decoder_params",
                       "encoder_gmacs", "decoder_gmacs"):
            if metric in r:
                row[metric], row[f"{metric}_std"], _ = _mean_std(r[metric])
        step = "-"
        if i > 0:
            d = paired_delta(r[quality], runs[values[i - 1]][quality], quality, pooled=pooled,
                             comparisons=len(steps))
            row.update({f"d_{quality}": d["delta"], f"d_{quality}_low": d["low"],
                        f"d_{quality}_high": d["high"], "verdict": d["verdict"]})
            step = verdict_text(d)
        raw.append(row)
        shown.append({
            "c": f"{v:g}" + (" (paper)" if v == PAPER_CHANNELS else ""), "seeds": len(r),
            **{m: _cell(row.get(m, math.nan), row.get(f"{m}_std", math.nan), 4)
               for m in AUTOENCODER_METRICS if m in done},
            "encoder / decoder params": f"{row.get('encoder_params', math.nan) / 1e6:.2f}M / "
                                        f"{row.get('decoder_params', math.nan) / 1e6:.2f}M",
            "decoder GMACs (512 px)": f"{row.get('decoder_gmacs', math.nan):.1f}",
            f"Δ {quality} vs the c before": step})
    return pd.DataFrame(shown), pd.DataFrame(raw)


def write_table(df: pd.DataFrame, stem: str | Path, raw: pd.DataFrame | None = None,
                caption: str = "") -> dict[str, Path]:
    """STEM.md, STEM.tex (from the display frame) and STEM.csv (from `raw`, full precision)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = {"md": stem.with_suffix(".md"), "tex": stem.with_suffix(".tex"),
             "csv": stem.with_suffix(".csv")}
    index = df.index.name is not None
    paths["md"].write_text(df.to_markdown(index=index) + "\n")
    latex = df.to_latex(index=index, caption=caption or None, escape=True)
    paths["tex"].write_text(latex)
    (raw if raw is not None else df).to_csv(paths["csv"], index=index)
    return paths
