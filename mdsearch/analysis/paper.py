"""The paper's Table 1 next to our measurement of the same architectures."""

from __future__ import annotations

import yaml

from ..arch import presets
from ..arch.cost import cost
from ..paths import ANALYSIS

TABLE1_PRESETS = ("sd15", "sdxl", "md", "md-lite")
NOTE_THRESHOLD = 0.05  # rows differing from the paper by more than this say why


def paper_table1() -> list[dict]:
    path = ANALYSIS / "paper_table1.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the paper's Table 1 reference data is missing "
                                "(mdsearch expects to run from a source checkout)")
    return yaml.safe_load(path.read_text())["rows"]


def _rel(ours: float, paper: float | None) -> float | None:
    return None if paper is None else ours / paper - 1


def table1(resolution: int = 512) -> list[dict]:
    """One row per preset: our params and GMACs, the paper's figures and the relative difference."""
    paper = {row["preset"]: row for row in paper_table1() if row["preset"]}
    rows = []
    for name in TABLE1_PRESETS:
        c = cost(presets.get(name), resolution)
        ref = paper.get(name, {})
        row = {
            "name": name, "channels": c.channels, "conv_blocks": c.conv_blocks,
            "sa_layers": c.sa_layers, "ca_layers": c.ca_layers,
            "params_m": c.params / 1e6, "gmacs": c.gmacs,
            "paper_model": ref.get("model"),
            "paper_conv_blocks": ref.get("conv_blocks"),
            "paper_sa_layers": ref.get("sa_layers"), "paper_ca_layers": ref.get("ca_layers"),
            "paper_params_m": ref.get("params_m"), "paper_gmacs": ref.get("gflops"),
        }
        row["params_rel_diff"] = _rel(row["params_m"], row["paper_params_m"])
        row["gmacs_rel_diff"] = _rel(row["gmacs"], row["paper_gmacs"])
        row["note"] = ref.get("note")
        rows.append(row)
    return rows


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def _num(x, fmt="{:,.1f}") -> str:
    return "—" if x is None else fmt.format(x)


def table1_markdown(rows: list[dict], resolution: int = 512) -> str:
    lines = [
        f"Table 1 reproduced (one UNet evaluation at {resolution}x{resolution}; GMACs = "
        "multiply-adds, every matmul counted; paper figures from MobileDiffusion Table 1)",
        "",
        "| model | channels | conv blocks (paper) | SA+CA (paper) | params M | paper M | Δ "
        "| GMACs | paper GFLOPs | Δ |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for r in rows:
        attn = f"{r['sa_layers']}+{r['ca_layers']}"
        if r["paper_sa_layers"] is not None:
            attn += f" ({r['paper_sa_layers']}+{r['paper_ca_layers']})"
        conv = f"{r['conv_blocks']}" + (f" ({r['paper_conv_blocks']})"
                                        if r["paper_conv_blocks"] is not None else "")
        lines.append(
            f"| {r['name']} | {tuple(r['channels'])} | {conv} | {attn} | {r['params_m']:,.1f} "
            f"| {_num(r['paper_params_m'])} | {_pct(r['params_rel_diff'])} | {r['gmacs']:,.1f} "
            f"| {_num(r['paper_gmacs'])} | {_pct(r['gmacs_rel_diff'])} |")
        worst = max(abs(d) for d in (r["params_rel_diff"], r["gmacs_rel_diff"], 0) if d is not None)
        if worst > NOTE_THRESHOLD:
            notes.append(f"- **{r['name']}** differs from the paper by more than "
                         f"{NOTE_THRESHOLD:.0%}: " + (r["note"] or "no explanation recorded."))
        if r["paper_params_m"] is None:
            notes.append(f"- **{r['name']}** is not in the paper's Table 1 (Table 6 describes it).")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"
