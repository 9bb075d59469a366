"""Measuring latency in ONNX Runtime: a unit's graph or a whole UNet, timed on the CPU with a
fixed thread count; the latency table of a space built from those timings (resumable, with
progress), and the whole-model measurements its terms are fitted on.

The table format, its keys and the predictor are `mdsearch.arch.latency`; this module only
measures. Each graph is exported by the same exporter as `mdsearch export` (torch's dynamo
exporter, opset 18), its weights beside it, and timed after a warm-up: the median and the 10th /
90th percentiles of repeated runs.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..arch import latency
from ..arch.latency import LatencyError, Measurement, Row, Unit
from ..arch.cost import latent_size
from ..arch.spec import ArchSpec
from ..progress import quiet
from ..rundir import RunDirBusy, atomic_write
from .onnx import OPSET, random_model, unet_inputs, write_graph

WARMUP = 3
MIN_SECONDS = 0.5  # small graphs are run at least this long (and at least `repeats` times)
MAX_RUNS = 400
STEADY = 0.2  # a timing whose p10-p90 range exceeds this fraction of its median is retaken
ATTEMPTS = 3


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int


def runtime() -> tuple[str, str]:
    import onnxruntime as ort

    return "onnxruntime-cpu", ort.__version__


def device() -> str:
    """The CPU, as /proc/cpuinfo names it, with its core count (what a table was measured on)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores, {platform.system()})"


def where(threads: int) -> tuple[str, str, str, int]:
    return (*runtime(), device(), threads)


def session(path: str | Path, threads: int):
    """An ONNX Runtime CPU session with `threads` intra-op threads, sequential execution and
    every graph optimisation on (what a deployment would use)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # ORT's constant-folding notes about CastLike are not errors
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_session(sess, feed: dict, repeats: int, warmup: int = WARMUP) -> Timing:
    """Warm up, then run at least `repeats` times and at least MIN_SECONDS (small graphs), at
    most MAX_RUNS times: the median and 10th / 90th percentiles in ms. A timing that is not
    steady (p10-p90 wider than STEADY of its median: another process took a core) is retaken,
    ATTEMPTS times at most, and the attempt with the lowest median is kept (interference only
    ever adds time)."""
    attempts = []
    for _ in range(ATTEMPTS):
        attempts.append(_time_once(sess, feed, repeats, warmup))
        t = attempts[-1]
        if t.p90_ms - t.p10_ms <= STEADY * t.median_ms:
            break
    return min(attempts, key=lambda t: t.median_ms)


def _time_once(sess, feed: dict, repeats: int, warmup: int) -> Timing:
    for _ in range(warmup):
        sess.run(None, feed)
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < MAX_RUNS and (len(times) < repeats
                                     or time.perf_counter() - started < MIN_SECONDS):
        tick = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - tick) * 1000)
    p10, p90 = np.percentile(times, [10, 90])
    return Timing(statistics.median(times), float(p10), float(p90), len(times))


def export_graph(module: torch.nn.Module, inputs: tuple, path: Path, input_names: list[str]) -> None:
    """`module` on `inputs` as an ONNX graph at `path`, its weights in `path`.data (fast to
    write and never near protobuf's 2 GB limit)."""
    write_graph(module, inputs, path, input_names, ["output"], OPSET, large=True, check=False)


def time_module(module: torch.nn.Module, inputs: tuple, input_names: list[str], threads: int,
                repeats: int, workdir: Path, warmup: int = WARMUP) -> Timing:
    """Export `module`, time it in ONNX Runtime, delete the graph."""
    folder = Path(tempfile.mkdtemp(dir=workdir))
    try:
        path = folder / "graph.onnx"
        export_graph(module, inputs, path, input_names)
        sess = session(path, threads)
        feed = {name: t.numpy() for name, t in zip(input_names, inputs)}
        timing = time_session(sess, feed, repeats, warmup)
        del sess
        return timing
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def time_unit(unit: Unit, threads: int, repeats: int, workdir: Path) -> Timing:
    torch.manual_seed(0)
    with torch.no_grad():
        return time_module(unit.module(), unit.example_inputs(), unit.input_names, threads,
                           repeats, workdir)


def time_spec(spec: ArchSpec, resolution: int, threads: int, repeats: int,
              workdir: Path) -> Timing:
    """A whole UNet (random weights) at an image `resolution`, timed as one graph."""
    inputs = unet_inputs(spec, latent_size(spec, resolution))
    model = random_model(spec)
    with torch.no_grad():  # a whole model runs long enough that 2 warm-up runs settle it
        return time_module(model, inputs, ["latents", "timesteps", "context"], threads,
                           repeats, workdir, warmup=2)


# ---- building a table ----------------------------------------------------------------------
def space_specs(space) -> list[ArchSpec]:
    """Every valid configuration of a search space as a spec (a space's grid)."""
    return [spec for _, spec in space.valid_points()]


def measure_table(unit_list: list[Unit], out: str | Path, threads: int, repeats: int = 10,
                  progress=None, workdir: str | Path | None = None) -> dict[str, Row]:
    """Time every unit not yet in the table at `out` and append its row at once. An existing
    table is resumed (a row a killed run was writing is dropped) if it was measured on this
    runtime, device and thread count; otherwise it is refused, naming what differs."""
    say = progress or quiet
    out = Path(out)
    here = where(threads)
    rows = latency.read_rows(out, partial_last=True) if out.exists() else {}
    if rows:
        first = next(iter(rows.values()))
        if first.where != here:
            raise LatencyError(f"{out}: measured on {first.where}, this run would measure on "
                               f"{here}; write a new table (another --out)")
    out.parent.mkdir(parents=True, exist_ok=True)
    latency.write_rows(out, rows.values())  # drops a half-written last line; a new table's header
    todo = [u for u in unit_list if u.key not in rows]
    say(f"latency table {out}: {len(unit_list)} units, {len(rows)} already timed, "
        f"{len(todo)} to time ({threads} threads, {here[0]} {here[1]})")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mdsearch-latency-"))
    started = time.time()
    for n, unit in enumerate(todo, start=1):
        timing = time_unit(unit, threads, repeats, workdir)
        row = Row(key=unit.key, kind=unit.kind, label=unit.label,
                  inputs=latency.shapes_text(unit.inputs), median_ms=timing.median_ms,
                  p10_ms=timing.p10_ms, p90_ms=timing.p90_ms, runtime=here[0],
                  runtime_version=here[1], device=here[2], threads=threads)
        latency.append_row(out, row)
        rows[unit.key] = row
        left = (time.time() - started) / n * (len(todo) - n)
        say(f"[{n}/{len(todo)}] {unit.label} {latency.shapes_text(unit.inputs[:1])}: "
            f"{timing.median_ms:.2f} ms (p10-p90 {timing.p10_ms:.2f}-{timing.p90_ms:.2f}); "
            f"about {left / 60:.1f} min left")
    return latency.read_rows(out)  # as stored (6 significant digits): what predictions read


def measure_models(specs: list[ArchSpec], resolution: int, rows: dict[str, Row], threads: int,
                   repeats: int = 5, progress=None,
                   workdir: str | Path | None = None) -> list[Measurement]:
    """Whole models timed as one graph each, beside the sum of their units' table entries."""
    say = progress or quiet
    workdir = Path(workdir or tempfile.mkdtemp(prefix="mdsearch-latency-"))
    out = []
    for n, spec in enumerate(specs, start=1):
        us = latency.units(spec, resolution)
        missing = [u.label for u in us if u.key not in rows]
        if missing:
            raise LatencyError(f"{spec.name}: units missing from the table: {missing[0]}")
        timing = time_spec(spec, resolution, threads, repeats, workdir)
        entries = sum(rows[u.key].median_ms for u in us)
        out.append(Measurement(spec.name, timing.median_ms, entries, len(us), timing.p10_ms,
                               timing.p90_ms))
        say(f"[whole {n}/{len(specs)}] {spec.name}: {timing.median_ms:.1f} ms measured, "
            f"{entries:.1f} ms in its {len(us)} units' entries")
    return out


def fit_specs(specs: list[ArchSpec], count: int, seed: int = 0) -> list[ArchSpec]:
    """The whole models a table's terms are fitted on: the cheapest and the largest
    configurations by unit count and width, and random others, `count` in all."""
    if len(specs) <= count:
        return list(specs)
    by_size = sorted(specs, key=lambda s: (sum(s.channels), s.counts()["sa_layers"]
                                           + s.counts()["ca_layers"]))
    chosen = [by_size[0], by_size[-1]]
    rest = [s for s in specs if s not in chosen]
    chosen += random.Random(seed).sample(rest, max(count - 2, 0))
    return chosen[:count]


def build_table(specs: list[ArchSpec], resolution: int, out: str | Path, threads: int,
                fit_count: int = 4, repeats: int = 10, progress=None) -> latency.Fit:
    """The latency table of `specs` at `out` (resumed if it exists) and its fitted terms
    (fitted on `fit_count` whole models of them), written beside it."""
    say = progress or quiet
    unit_list = latency.distinct(latency.units(s, resolution) for s in specs)
    workdir = Path(tempfile.mkdtemp(prefix="mdsearch-latency-"))
    try:
        with _table_lock(out):
            rows = measure_table(unit_list, out, threads, repeats, say, workdir)
            chosen = fit_specs(specs, fit_count)
            say(f"fitting the terms outside the units on {len(chosen)} whole models")
            measured = measure_models(chosen, resolution, rows, threads, progress=say,
                                      workdir=workdir)
            fitted = latency.fit(measured, resolution, where(threads))
            atomic_write(latency.fit_path(out), fitted.to_json())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return fitted


@contextmanager
def _table_lock(out: Path):
    """One process per table (TABLE.csv.lock, flock: released when the process dies)."""
    import fcntl

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{out}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunDirBusy(f"{out} is being written by another `mdsearch latency table`; "
                             f"wait for it to end, or give another --out") from None
        yield


# ---- phone tables: graphs out, measured rows in ----------------------------------------------
PROBE_FORMAT = "mdsearch-latency-probe/1"
MANIFEST = "manifest.json"
MODEL_KEY = "model:"  # a measured row of a whole model: model:NAME


def write_probe(specs: list[ArchSpec], resolution: int, out: str | Path, fit_count: int = 4,
                progress=None) -> Path:
    """A folder a phone-side runner can time: units/KEY.onnx for every distinct unit of `specs`,
    models/NAME.onnx for `fit_count` whole models (for the fitted terms), and manifest.json
    naming each graph, its inputs and (for models) the units they are made of."""
    say = progress or quiet
    out = Path(out)
    unit_list = latency.distinct(latency.units(s, resolution) for s in specs)
    chosen = fit_specs(specs, fit_count)
    (out / "units").mkdir(parents=True, exist_ok=True)
    (out / "models").mkdir(exist_ok=True)
    entries = []
    for n, unit in enumerate(unit_list, start=1):
        graph = Path("units") / f"{unit.key}.onnx"
        if not (out / graph).exists():
            torch.manual_seed(0)
            with torch.no_grad():
                export_graph(unit.module(), unit.example_inputs(), out / graph, unit.input_names)
        entries.append({"key": unit.key, "kind": unit.kind, "label": unit.label,
                        "graph": str(graph), "inputs": dict(zip(unit.input_names,
                                                                map(list, unit.inputs)))})
        say(f"[{n}/{len(unit_list)}] {unit.label}: {graph}")
    models = []
    for n, spec in enumerate(chosen):
        graph = Path("models") / f"m{n}.onnx"
        inputs = unet_inputs(spec, latent_size(spec, resolution))
        if not (out / graph).exists():
            with torch.no_grad():
                export_graph(random_model(spec), inputs, out / graph,
                             ["latents", "timesteps", "context"])
        models.append({"key": f"{MODEL_KEY}m{n}", "spec": spec.to_dict(), "graph": str(graph),
                       "inputs": dict(zip(["latents", "timesteps", "context"],
                                          [list(t.shape) for t in inputs])),
                       "units": [u.key for u in latency.units(spec, resolution)]})
        say(f"[whole {n + 1}/{len(chosen)}] {spec.name}: {graph}")
    manifest = {"format": PROBE_FORMAT, "resolution": resolution, "units": entries,
                "models": models,
                "measured_columns": ["key", "median_ms", "p10_ms", "p90_ms", "runtime",
                                     "runtime_version", "device", "threads"]}
    return atomic_write(out / MANIFEST, json.dumps(manifest, indent=1))


def read_manifest(probe: str | Path) -> dict:
    path = Path(probe) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise LatencyError(f"{path}: missing: --manifest names the folder `mdsearch latency "
                           f"probe` wrote") from None
    except (OSError, ValueError) as err:
        raise LatencyError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != PROBE_FORMAT:
        raise LatencyError(f"{path}: field format: not a {PROBE_FORMAT} manifest")
    _check_manifest(data, path)
    return data


def _check_manifest(data: dict, path: Path) -> None:
    """Every field `import_table` reads, of the type it reads it as: a hand-edited or foreign
    manifest is one line naming the field, not a KeyError."""
    def fail(where, reason):
        raise LatencyError(f"{path}: field {where}: {reason}")

    if not isinstance(data.get("resolution"), int) or data["resolution"] < 8:
        fail("resolution", "an image size in pixels")
    if data.get("measured_columns") != ["key", "median_ms", "p10_ms", "p90_ms", "runtime",
                                        "runtime_version", "device", "threads"]:
        fail("measured_columns", "not the columns this mdsearch reads")
    units, models = data.get("units"), data.get("models")
    if not isinstance(units, list) or not isinstance(models, list):
        fail("units" if not isinstance(units, list) else "models", "a list")
    for i, unit in enumerate(units):
        if not isinstance(unit, dict) or not isinstance(unit.get("inputs"), dict) or not all(
                isinstance(unit.get(k), str) for k in ("key", "kind", "label")):
            fail(f"units[{i}]", "needs key, kind, label (text) and inputs (a mapping)")
    keys = {unit["key"] for unit in units}
    for i, model in enumerate(models):
        if not isinstance(model, dict) or not isinstance(model.get("key"), str) or not \
                isinstance(model.get("spec"), dict) or not isinstance(model.get("units"), list):
            fail(f"models[{i}]", "needs key (text), spec (a mapping) and units (a list)")
        unknown = [k for k in model["units"] if k not in keys]
        if unknown:
            fail(f"models[{i}].units", f"{unknown[0]!r} is not a key of the manifest's units")


def import_table(measured: str | Path, probe: str | Path | None,
                 out: str | Path) -> tuple[dict[str, Row], latency.Fit]:
    """A device's measurements of a probe's graphs (MEASURED.csv: key, median_ms, p10_ms,
    p90_ms, runtime, runtime_version, device, threads) checked against the probe's manifest
    (every graph measured once, nothing else, one device) and written as a latency table at
    `out` with its terms fitted on the whole-model rows."""
    if probe is None:
        raise LatencyError("--import needs --manifest PROBE_DIR (the folder `mdsearch latency "
                           "probe` wrote), to check the rows against")
    manifest = read_manifest(probe)
    units = {u["key"]: u for u in manifest["units"]}
    models = {m["key"]: m for m in manifest["models"]}
    path = Path(measured)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise LatencyError(f"{path}: cannot read ({err})") from None
    columns = manifest["measured_columns"]
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None or [h.strip() for h in header] != columns:
        raise LatencyError(f"{path}: header must be {','.join(columns)} (the manifest's "
                           f"measured_columns)")
    rows: dict[str, Row] = {}
    timed: dict[str, Row] = {}
    first = None
    for number, values in enumerate(reader, start=2):
        where_ = f"{path} line {number}"
        if len(values) != len(columns):
            raise LatencyError(f"{where_}: {len(values)} fields, the header has {len(columns)}")
        raw = dict(zip(columns, (v.strip() for v in values)))
        key = raw["key"]
        if key in rows or key in timed:
            raise LatencyError(f"{where_}: key {key} appears twice")
        entry = units.get(key) or models.get(key)
        if entry is None:
            raise LatencyError(f"{where_}: key {key} is not a graph of {probe}'s manifest")
        kind = entry.get("kind", "block")
        row = latency.parse_row({**raw, "key": key if key in units else "0" * latency.KEY_CHARS,
                                 "kind": kind, "label": entry.get("label", key),
                                 "inputs": latency.shapes_text(entry["inputs"].values())},
                                where_)
        if first is not None and row.where != first.where:
            raise LatencyError(f"{where_}: measured on {row.where}, line 2 on {first.where}; "
                               f"one table holds one device")
        first = first or row
        if key in units:
            rows[key] = row
        else:
            timed[key] = row
    missing = [u["label"] for k, u in units.items() if k not in rows]
    missing += [k for k in models if k not in timed]
    if missing:
        raise LatencyError(f"{path}: {len(missing)} graphs of the manifest not measured, the "
                           f"first: {missing[0]}")
    measurements = [Measurement(str(models[k]["spec"].get("name", k)), r.median_ms,
                                sum(rows[u].median_ms for u in models[k]["units"]),
                                len(models[k]["units"]), r.p10_ms, r.p90_ms)
                    for k, r in timed.items()]
    fitted = latency.fit(measurements, int(manifest["resolution"]), first.where)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    latency.write_rows(out, rows.values())
    atomic_write(latency.fit_path(out), fitted.to_json())
    return rows, fitted
