"""Latency as a cost, beside params and MACs: a spec's timed units, the latency table, the predictor.

A UNet's forward pass is cut into *units*, each timed on its own as an ONNX graph (by
`mdsearch.export.latency`) and stored as one row of a latency table (CSV):

    block       a level's conv block and its transformer stage (unet.Block), keyed exactly as the
                cost model's block cache keys its MACs: everything the block's construction reads
                plus its input shapes
    downsample  a level's stride-2 conv;  upsample  nearest x2 + conv;  mid  SD's mid block

What lies outside the units (the stem and time embedding, the output head, the skip
concatenations, one graph's launch overhead, and the difference between a unit timed alone and
inside the whole graph) is not timed per unit: it is a few *fitted terms*, fitted by least squares
on whole-model measurements and stored beside the table (TABLE.fit.json). A spec's predicted
latency is the sum of its units' entries plus those terms:

    predicted_ms = sum(entries) + graph_ms + per_unit_ms * units + scale * sum(entries)

(a term is 0 when the fit's measurements could not tell it apart: see `fit`). This is how
SnapFusion budgets its UNet (a per-block lookup table measured on the phone) and how nn-Meter
predicts model latency from kernels.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..config import ConfigError
from ..rundir import atomic_write, fault_point
from .blocks import Downsample, Upsample
from .cost import _block_key, _fields, example_inputs, latent_size
from .spec import ArchSpec
from .unet import Block, MidBlock, UNet

KINDS = ("block", "downsample", "upsample", "mid")
COLUMNS = ("key", "kind", "label", "inputs", "median_ms", "p10_ms", "p90_ms", "runtime",
           "runtime_version", "device", "threads")
TERMS = ("graph_ms", "per_unit_ms", "scale")
KEY_CHARS = 16
SCALE_MIN_MEASUREMENTS = 6


class LatencyError(ConfigError):
    """A latency table that cannot be used as asked: names the file, the row and the reason."""


@dataclass
class Unit:
    """One timed piece of a forward pass: what it is, its table key and how to build it."""

    kind: str
    key: str  # sha256 of `text`, KEY_CHARS hex digits
    text: str  # everything that determines the unit's graph and input shapes
    label: str  # for people: "L2 down 1: separable 1024->1024 + 3 x SA+CA"
    level: int
    side: str  # "down", "up" or "mid"
    inputs: tuple[tuple[int, ...], ...]
    args: tuple = field(repr=False, default=())  # the module's constructor arguments

    def module(self) -> nn.Module:
        """The unit as a module with PyTorch's default initialisation (time does not depend on
        the weights' values)."""
        make = {"block": Block, "downsample": Downsample, "upsample": Upsample,
                "mid": MidBlock}[self.kind]
        return make(*self.args).eval()

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        g = torch.Generator().manual_seed(0)
        return tuple(torch.randn(shape, generator=g) for shape in self.inputs)

    @property
    def input_names(self) -> list[str]:
        return ["x", "temb", "context"][:len(self.inputs)]


def shapes_text(shapes) -> str:
    return ";".join("x".join(map(str, s)) for s in shapes)


def _unit(kind, text, label, level, side, inputs, args) -> Unit:
    text = f"{kind}|{text}|{shapes_text(inputs)}"
    return Unit(kind, hashlib.sha256(text.encode()).hexdigest()[:KEY_CHARS], text, label, level,
                side, tuple(inputs), args)


def _transformer_label(path) -> str:
    if not path.layers:
        return ""
    kinds = "+".join(k for k, on in (("SA", path.self_attn), ("CA", path.cross_attn)) if on)
    return f" + {path.layers} x {kinds or 'FFN'}"


def units(spec: ArchSpec, resolution: int) -> list[Unit]:
    """The units of one forward pass (batch 1) at an image `resolution`, in execution order,
    one entry per execution (two identical blocks appear twice, with one key).

    The UNet is built on the meta device with a stand-in for its blocks, so nothing is
    allocated and nothing computed; the stand-in records each block as the forward pass
    reaches it, and hooks record the resamplers and the mid block."""
    latent = latent_size(spec, resolution)
    spec_fields = _fields(spec, ("name", "levels"))
    found: list[Unit] = []
    position: Counter = Counter()

    class Recorder(nn.Module):
        def __init__(self, spec_, level, path, cin, cout):
            super().__init__()
            self.index = next(i for i, lv in enumerate(spec.levels) if lv is level)
            self.side = "down" if path is level.down else "up"
            self.j = position[(self.index, self.side)]
            position[(self.index, self.side)] += 1
            self.args, self.cout = (spec_, level, path, cin, cout), cout
            self.text = _block_key(spec_fields, level, path, cin, cout)
            self.label = (f"L{self.index} {self.side} {self.j}: {level.conv} {cin}->{cout}"
                          f"{_transformer_label(path)}")

        def forward(self, x, temb, context):
            shapes = [tuple(t.shape) for t in (x, temb, context)]
            found.append(_unit("block", self.text, self.label, self.index, self.side, shapes,
                               self.args))
            return x.new_empty((x.shape[0], self.cout, *x.shape[2:]))

    with torch.device("meta"):
        model = UNet(spec, block=Recorder)
        args, kwargs = example_inputs(spec, latent, device="meta")

    def hook(kind, index, side, text, label, make_args):
        def record(module, inputs):
            shapes = [tuple(t.shape) for t in inputs if isinstance(t, torch.Tensor)]
            found.append(_unit(kind, text, label, index, side, shapes, make_args))
        return record

    last = len(spec.levels) - 1
    for i, (down, up) in enumerate(zip(model.down, reversed(model.up))):
        c = spec.levels[i].channels
        if down.resample is not None:
            down.resample.register_forward_pre_hook(
                hook("downsample", i, "down", str(c), f"L{i} downsample {c}", (c,)))
        if up.resample is not None:
            up.resample.register_forward_pre_hook(
                hook("upsample", i, "up", str(c), f"L{i} upsample {c}", (c,)))
    if model.mid is not None:
        text = spec_fields + "|" + _fields(spec.levels[-1], ("down", "up"))
        model.mid.register_forward_pre_hook(
            hook("mid", last, "mid", text, f"mid: {spec.levels[-1].channels} + "
                 f"{spec.mid_layers} x SA+CA", (spec,)))
    with torch.no_grad():
        model(*args, **kwargs)
    return found


def distinct(unit_lists) -> list[Unit]:
    """The units of several forward passes, each key once, in first-seen order."""
    seen: dict[str, Unit] = {}
    for us in unit_lists:
        for u in us:
            seen.setdefault(u.key, u)
    return list(seen.values())


# ---- the table -------------------------------------------------------------------------------
@dataclass
class Row:
    key: str
    kind: str
    label: str
    inputs: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    runtime: str
    runtime_version: str
    device: str
    threads: int

    def to_csv(self) -> dict:
        data = asdict(self)
        for k in ("median_ms", "p10_ms", "p90_ms"):
            data[k] = f"{data[k]:.6g}"
        return data

    @property
    def where(self) -> tuple[str, str, str, int]:
        """What a row was measured on: rows of one table must agree on it."""
        return self.runtime, self.runtime_version, self.device, self.threads


def parse_row(raw: dict, where: str) -> Row:
    def fail(column, reason):
        raise LatencyError(f"{where}: column {column}: {reason}")

    if not re.fullmatch(f"[0-9a-f]{{{KEY_CHARS}}}", raw["key"] or ""):
        fail("key", f"{raw['key']!r} is not a {KEY_CHARS}-digit hex key")
    if raw["kind"] not in KINDS:
        fail("kind", f"{raw['kind']!r}; known: {', '.join(KINDS)}")
    values = {}
    for column in ("median_ms", "p10_ms", "p90_ms"):
        try:
            values[column] = float(raw[column])
        except (TypeError, ValueError):
            fail(column, f"{raw[column]!r} is not a number")
        if not math.isfinite(values[column]) or values[column] <= 0:
            fail(column, f"{raw[column]} is not a positive time in ms")
    if not values["p10_ms"] <= values["median_ms"] <= values["p90_ms"]:
        fail("median_ms", f"p10 {values['p10_ms']} <= median {values['median_ms']} <= p90 "
             f"{values['p90_ms']} does not hold")
    try:
        threads = int(raw["threads"])
    except (TypeError, ValueError):
        threads = 0
    if threads < 1:
        fail("threads", f"{raw['threads']!r} is not a positive thread count")
    for column in ("runtime", "runtime_version", "device", "inputs"):
        if not raw[column]:
            fail(column, "empty")
    return Row(key=raw["key"], kind=raw["kind"], label=raw["label"], inputs=raw["inputs"],
               runtime=raw["runtime"], runtime_version=raw["runtime_version"],
               device=raw["device"], threads=threads, **values)


def read_rows(path: str | Path, partial_last: bool = False) -> dict[str, Row]:
    """The rows of a latency table by key, every row checked: the header (a foreign CSV is
    refused), each field, no key twice, one runtime / device / thread count throughout.
    `partial_last`: a last line without its newline (a run killed while writing it) is dropped
    instead of refused (what resuming a table run needs)."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise LatencyError(f"{path}: cannot read the latency table ({err})") from None
    if partial_last and text and not text.endswith("\n"):
        text = text[:text.rfind("\n") + 1]
    lines = text.splitlines()
    if not lines or tuple(next(csv.reader(lines[:1]))) != COLUMNS:
        raise LatencyError(f"{path}: not a mdsearch latency table (its header must be "
                           f"{','.join(COLUMNS)}; made by `mdsearch latency table`)")
    rows: dict[str, Row] = {}
    first = None
    for number, values in enumerate(csv.reader(lines[1:]), start=2):
        where = f"{path} line {number}"
        if len(values) != len(COLUMNS):
            raise LatencyError(f"{where}: {len(values)} fields, the header has {len(COLUMNS)}")
        row = parse_row(dict(zip(COLUMNS, values)), where)
        if row.key in rows:
            raise LatencyError(f"{where}: key {row.key} appears twice")
        if first is None:
            first = row
        elif row.where != first.where:
            raise LatencyError(f"{where}: measured on {row.where}, the table's first row on "
                               f"{first.where}; one table holds one runtime, device and "
                               f"thread count")
        rows[row.key] = row
    return rows


def write_rows(path: str | Path, rows) -> None:
    """A whole table (the header and `rows`), written atomically (rundir.atomic_write)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS)
    writer.writeheader()
    writer.writerows(row.to_csv() for row in rows)
    atomic_write(path, buffer.getvalue())


def append_row(path: str | Path, row: Row) -> None:
    """One row, appended and flushed at once: a killed run keeps every finished row, and a row
    it was writing is a last line without its newline (dropped on resume)."""
    buffer = io.StringIO()
    csv.DictWriter(buffer, COLUMNS).writerow(row.to_csv())
    line = buffer.getvalue()
    with open(path, "a", newline="") as f:
        f.write(line[:len(line) // 2])
        f.flush()
        fault_point("latency-row")  # (tests: a kill in the middle of a row)
        f.write(line[len(line) // 2:])
        f.flush()


# ---- fitted terms ------------------------------------------------------------------------------
@dataclass
class Measurement:
    """A whole model timed in the table's runtime: what the terms are fitted on."""

    spec: str
    measured_ms: float
    entries_ms: float  # the sum of its units' table entries
    units: int
    p10_ms: float = 0.0
    p90_ms: float = 0.0


@dataclass
class Fit:
    terms: dict[str, float]
    measurements: list[Measurement]
    resolution: int
    where: tuple

    def extra_ms(self, entries_ms: float, n_units: int) -> float:
        t = self.terms
        return t["graph_ms"] + t["per_unit_ms"] * n_units + t["scale"] * entries_ms

    def to_json(self) -> str:
        return json.dumps({"terms": self.terms, "resolution": self.resolution,
                           "runtime": self.where[0], "runtime_version": self.where[1],
                           "device": self.where[2], "threads": self.where[3],
                           "measurements": [asdict(m) for m in self.measurements]}, indent=2)


def fit(measurements: list[Measurement], resolution: int, where: tuple) -> Fit:
    """Least-squares terms for `measured - entries` over the measurements. The intercept
    (graph_ms) is always fitted; per_unit_ms only when the unit counts vary; scale only from
    SCALE_MIN_MEASUREMENTS models whose entries' sums vary by more than 20% (with fewer, a
    slope fits the timing noise of a few models, not a trend). A term the data cannot tell
    apart stays 0."""
    if not measurements:
        raise LatencyError("no whole-model measurements to fit the latency terms on")
    y = np.array([m.measured_ms - m.entries_ms for m in measurements])
    sums = np.array([m.entries_ms for m in measurements])
    counts = np.array([m.units for m in measurements], dtype=float)
    columns, names = [np.ones_like(y)], ["graph_ms"]
    if len(set(counts)) > 1:
        columns.append(counts)
        names.append("per_unit_ms")
    if sums.max() > 1.2 * sums.min() and len(measurements) >= SCALE_MIN_MEASUREMENTS:
        columns.append(sums)
        names.append("scale")
    solution = np.linalg.lstsq(np.stack(columns, axis=1), y, rcond=None)[0]
    terms = {name: 0.0 for name in TERMS}
    terms.update({n: float(v) for n, v in zip(names, solution)})
    return Fit(terms, measurements, resolution, where)


def fit_path(table: str | Path) -> Path:
    table = Path(table)
    return table.with_name(table.stem + ".fit.json")


def copy_table(table: str | Path, to: str | Path) -> None:
    """A table and its fitted terms, copied (to TO and TO's .fit.json)."""
    import shutil

    shutil.copy2(table, to)
    shutil.copy2(fit_path(table), fit_path(to))


def read_fit(table: str | Path, rows: dict[str, Row]) -> Fit:
    path = fit_path(table)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LatencyError(f"{path}: missing: the terms fitted on whole-model measurements sit "
                           f"beside the table (`mdsearch latency table` writes them; for an "
                           f"imported table, `--import` with the probe's whole-model rows)") \
            from None
    except (OSError, ValueError) as err:
        raise LatencyError(f"{path}: not readable as JSON ({err})") from None
    try:
        terms = {name: float(data["terms"][name]) for name in TERMS}
        where = (data["runtime"], data["runtime_version"], data["device"], int(data["threads"]))
        measurements = [Measurement(**m) for m in data["measurements"]]
        resolution = int(data["resolution"])
    except (KeyError, TypeError, ValueError) as err:
        raise LatencyError(f"{path}: not a latency fit ({type(err).__name__}: {err})") from None
    if not all(math.isfinite(v) for v in terms.values()):
        raise LatencyError(f"{path}: field terms: not finite")
    first = next(iter(rows.values()), None)
    if first is not None and first.where != where:
        raise LatencyError(f"{path}: fitted on {where}, the table measured on {first.where}")
    return Fit(terms, measurements, resolution, where)


# ---- the predictor -------------------------------------------------------------------------------
@dataclass
class Latency:
    """A spec's predicted latency and where it goes."""

    spec: str
    resolution: int
    total_ms: float
    entries_ms: float
    terms_ms: float
    units: list[tuple[Unit, float]]  # each executed unit and its table entry

    def breakdown(self) -> list[dict]:
        """Where the time goes, per level, side and unit type (SnapFusion's per-block
        analysis): each group's table milliseconds, its share of the predicted total, and its
        params and GMACs (counted on the meta device, as the cost model counts them). The fitted
        terms are one more row ("outside the units")."""
        groups: dict[tuple, dict] = {}
        for unit, ms in self.units:
            kind = unit.kind
            if kind == "block":
                kind = "conv + transformer" if unit.args[2].layers else "conv"
            group = groups.setdefault((unit.level, unit.side, kind),
                                      {"ms": 0.0, "units": 0, "params": 0, "gmacs": 0.0})
            params, gmacs = unit_cost(unit)
            group["ms"] += ms
            group["units"] += 1
            group["params"] += params
            group["gmacs"] += gmacs
        rows = [{"level": lv, "side": side, "type": kind, **g, "share": g["ms"] / self.total_ms}
                for (lv, side, kind), g in sorted(groups.items(), key=_order)]
        rows.append({"level": None, "side": "", "type": "outside the units (fitted)",
                     "ms": self.terms_ms, "units": 0, "params": None, "gmacs": None,
                     "share": self.terms_ms / self.total_ms})
        return rows


_SIDE_ORDER = {"down": 0, "mid": 1, "up": 2}


def _order(item) -> tuple:
    """Down levels outermost first, the mid block, then up levels innermost first: the order
    a forward pass runs them."""
    (level, side, kind), _ = item
    return (_SIDE_ORDER[side], level if side != "up" else -level, kind)


_UNIT_COSTS: dict[str, tuple[int, float]] = {}


def unit_cost(unit: Unit) -> tuple[int, float]:
    """A unit's parameters and GMACs (batch 1), built and run on the meta device."""
    from .cost import MacCounter

    if unit.key not in _UNIT_COSTS:
        counter = MacCounter()
        with torch.device("meta"):
            module = unit.module()
            inputs = tuple(torch.empty(shape) for shape in unit.inputs)
        with torch.no_grad(), counter:
            module(*inputs)
        _UNIT_COSTS[unit.key] = (sum(p.numel() for p in module.parameters()),
                                 sum(counter.macs.values()) / 1e9)
    return _UNIT_COSTS[unit.key]


class Table:
    """A latency table and its fitted terms, read and checked once."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows = read_rows(self.path)
        self.fit = read_fit(self.path, self.rows)

    @property
    def resolution(self) -> int:
        return self.fit.resolution

    def predict(self, spec: ArchSpec, resolution: int | None = None) -> Latency:
        """Sum of the spec's units' entries plus the fitted terms; a unit missing from the
        table is a LatencyError naming it."""
        resolution = resolution or self.resolution
        timed = []
        for unit in units(spec, resolution):
            row = self.rows.get(unit.key)
            if row is None:
                raise LatencyError(
                    f"{self.path}: no entry for {spec.name}'s unit {unit.label!r} (key "
                    f"{unit.key}, inputs {shapes_text(unit.inputs)}) at resolution "
                    f"{resolution}: build the table for a space that contains this spec "
                    f"(mdsearch latency table --space ... --resolution {resolution})")
            timed.append((unit, row.median_ms))
        entries = sum(ms for _, ms in timed)
        extra = self.fit.extra_ms(entries, len(timed))
        return Latency(spec.name, resolution, entries + extra, entries, extra, timed)
