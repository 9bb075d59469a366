"""The run directory: what a trial and a sweep leave on disk, and how it is written and read.

A trial directory (one `mdsearch train --out DIR`, or one trial of a sweep) holds

    checkpoint.pt      weights, optimiser, EMA, history; and the spec, proxy spec and recipe
    spec.yaml          the full-size ArchSpec (a readable copy of the checkpoint's)
    proxy_spec.yaml    the spec that is trained (width-scaled; a readable copy)
    recipe.yaml        the trial recipe as run (a readable copy)
    samples_*.png      one sample grid per sampled evaluation (`samples_file`)
    trial_result.json  the run's TrialResult (status, metrics, history); in a sweep's trial
                       Ray Tune also keeps its own result.json (one line per report)

A sweep directory (`runs/sweeps/NAME`) holds the trial directories and

    results.csv        one row per trial, filtered configurations included
    pareto.png         quality against GMACs
    space.yaml         the search space as given; recipe.yaml: the recipe its trials ran
    filtered.jsonl     configurations costed and refused before training
    stop_rule.jsonl    the paper stop rule's judgements, one line each (its state and reasons)
    reliability.json   `mdsearch reliability`'s noise measurements

This module is the bottom layer: it imports nothing else of mdsearch (but its error base class),
so reading results never loads Ray, torch or the model code.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from .errors import MdsearchError

# trial files
CHECKPOINT = "checkpoint.pt"
SPEC = "spec.yaml"
PROXY_SPEC = "proxy_spec.yaml"
RECIPE = "recipe.yaml"
VAE_RECIPE = "vae.yaml"  # an autoencoder run's recipe (mdsearch.train.vae)
DIFFUSERS_CONFIG = "config.json"  # a diffusers model folder: an autoencoder run directory is one
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
UFOGEN_RECIPE = "ufogen.yaml"  # a one-step (UFOGen) run's own recipe; recipe.yaml: its start's
RESULT = "trial_result.json"
TUNE_HISTORY = "result.json"  # Ray Tune's own file in a sweep's trial: one JSON line per report


def samples_file(step: int, event: str = "") -> str:
    """The sample grid of the evaluation at `step` (`event`: e.g. "switch", its own grid)."""
    return f"samples_{step:06d}{'_' + event if event else ''}.png"


# sweep files
RESULTS = "results.csv"
SWEEP_INIT = "init.txt"  # a UFOGen sweep: the run directory every trial fine-tunes
SWEEP_SUPERNET = "supernet.json"  # a supernet-scored sweep: {"supernet": folder, "finetune": N}
PLOT = "pareto.png"
LATENCY_PLOT = "pareto_latency.png"  # quality against predicted latency (a space's latency table)
LATENCY_TABLE = "latency.csv"  # a sweep's copy of its space's latency table (+ latency.fit.json)
LATEST = "latest"  # STORAGE/latest: a link to the sweep started last
SPACE = "space.yaml"
FILTERED = "filtered.jsonl"
# not *.json: on --resume Ray Tune copies every top-level *.json and *.pkl file of the sweep
# directory into its own staging folder, and uploads that copy over the original at every
# snapshot, so a .json file mdsearch updates during a resumed sweep goes back to its old contents
STOP_STATE = "stop_rule.jsonl"
STOP_STATE_V1 = "stop_rule.json"  # the same state as one JSON object, before 2026-11-27
RACE_LOG = "seed_race.jsonl"  # seed racing: every decision after a trial's seed group
# trial files
RACE_STATE = "race.json"  # in a racing trial's checkpoint: its seed groups' per-seed metrics
RELIABILITY = "reliability.json"
LOCK = ".lock"  # held by the process writing a trial or sweep directory (see `locked`)

# trial status vocabulary (results.csv's `status` column)
COMPLETED = "completed"  # trained its full budget
STOPPED = "stopped"  # stopped early by the scheduler; metrics are its last evaluation's
FAILED = "failed"  # raised, or diverged; stop_reason says why
NOT_RUN = "not_run"  # never reported (the sweep was interrupted first)
FILTERED_STATUS = "filtered"  # over budget: costed, never trained
REQUIRED_COLUMNS = ("trial_id", "status")


class RunDirError(MdsearchError):
    """A run or sweep directory that is missing, incomplete or malformed."""


class RunDirBusy(RunDirError):
    """Another process is writing this run or sweep directory."""


def check_out_dir(directory: str | Path, flag: str = "--out") -> Path:
    """A directory a run may write to: not empty text, not an existing file."""
    if not str(directory).strip():
        raise RunDirError(f"{flag} is empty: give the directory to write into")
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise RunDirError(f"{directory}: exists and is not a directory; give a directory")
    existing = directory.absolute()
    while not existing.exists():  # the folder, or the nearest one above it that exists
        existing = existing.parent
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"{directory}: cannot be written ({existing} is not writable by this "
                          "user, or on a read-only file system); give another " + flag)
    return directory


@contextmanager
def locked(directory: str | Path, what: str) -> Iterator[Path]:
    """Hold DIRECTORY/.lock for the block (an exclusive, non-blocking flock; the kernel drops it
    when the process dies, so a killed run never leaves a stale lock). A second process on the
    same directory fails at once with RunDirBusy naming the holder. Re-entrant within a process
    (a sweep's trial may lock its own directory inside the sweep's). A directory it created and
    in which nothing was written is removed again."""
    import fcntl

    directory = check_out_dir(directory, "directory")
    path = directory / LOCK
    key = str(path.resolve())
    if key in _HELD:
        yield path
        return
    created = not directory.exists()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+")
    except OSError as err:
        raise RunDirError(f"{directory}: cannot write here ({err.strerror or err})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirBusy(f"{directory} is in use by {holder}; wait for it to end, or choose "
                         "another directory (--name / --out)") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()} ({what}, since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {' '.join(sys.argv)[:200]})\n")
    handle.flush()
    _HELD.add(key)
    try:
        yield path
    finally:
        _HELD.discard(key)
        if created and [p.name for p in directory.iterdir()] == [LOCK]:
            path.unlink()  # nothing was written: leave no empty directory behind
            directory.rmdir()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


_HELD: set[str] = set()


def trial_status(steps: int, steps_total: int, failed: bool) -> str:
    """The status of a trained trial from how far it got."""
    if failed:
        return FAILED
    if steps >= steps_total:
        return COMPLETED
    return STOPPED if steps else NOT_RUN


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write to; it replaces `path` only if the block ends without an
    exception, so a reader (or a killed writer) never sees a half-written file. The temporary
    file lives in the system's temp folder when that is on the same filesystem (a rename stays
    atomic), else beside `path`: never inside a sweep's trial folder where it can be, since Ray
    Tune copies those folders while trials write and fails on a file that vanishes mid-copy."""
    path = Path(path)
    tmp = _temp_folder(path.parent) / f".{path.name}.{os.getpid()}.{next(_TEMP_IDS)}.tmp"
    try:
        yield tmp
        fault_point(path.name)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


FAULT_ENV = "MDSEARCH_FAULT_KILL"
_FAULT_COUNTS: dict[str, int] = {}


def link_duplicate_checkpoints(sweep_dir: str | Path) -> int:
    """Each trial keeps its checkpoint as TRIAL/checkpoint.pt (what export, promote and the
    reports read) and Ray Tune keeps the same bytes in TRIAL/checkpoint_N/ (what it resumes a
    trial from). Where the two are identical, Tune's copy becomes a hard link to the trial's
    file: one copy on disk, both paths intact. Returns the bytes saved."""
    import filecmp

    saved = 0
    for ours in Path(sweep_dir).glob(f"*/{CHECKPOINT}"):
        for theirs in ours.parent.glob(f"checkpoint_*/{CHECKPOINT}"):
            try:
                if theirs.samefile(ours) or not filecmp.cmp(ours, theirs, shallow=False):
                    continue
                tmp = theirs.with_name(f".{CHECKPOINT}.link")
                tmp.unlink(missing_ok=True)
                os.link(ours, tmp)
                os.replace(tmp, theirs)
                saved += ours.stat().st_size
            except OSError:
                continue  # a file system without hard links: both copies stay
    return saved


def fault_point(name: str) -> None:
    """Fault injection for the reliability tests: with MDSEARCH_FAULT_KILL=NAME:N this process
    kills itself (SIGKILL) at the Nth write of NAME, after the new content is written to its
    temporary file and before it replaces the old one: the worst moment."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or not name.startswith(spec.split(":")[0]):
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(spec.split(":")[1] if ":" in spec else 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


_TEMP_IDS = itertools.count()


def _temp_folder(folder: Path) -> Path:
    system = Path(tempfile.gettempdir())
    try:
        if os.stat(system).st_dev == os.stat(folder).st_dev and os.access(system, os.W_OK):
            return system
    except OSError:
        pass
    return folder


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` (text or bytes) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data)
    return Path(path)


_RESUMING: list[Path] = []  # the sweep folder a --resume is restoring, while it does


@contextmanager
def resuming(sweep_dir: str | Path) -> Iterator[Path]:
    """While a sweep is resumed from `sweep_dir`, the objects Ray Tune unpickles from it
    (searcher, scheduler, callbacks: they pickled the folder they were made in) take this folder
    instead (`in_resumed`): a sweep folder copied or moved resumes in place and writes only
    inside itself."""
    _RESUMING.append(Path(sweep_dir))
    try:
        yield Path(sweep_dir)
    finally:
        _RESUMING.pop()


def in_resumed(path: str | Path, folder: bool = False) -> str:
    """`path`, a sweep folder (`folder`) or a file directly in one, as it was pickled; inside a
    `resuming` block, the same name in the folder being resumed."""
    if not _RESUMING:
        return str(path)
    return str(_RESUMING[-1] if folder else _RESUMING[-1] / Path(path).name)


def append_jsonl(path: str | Path, record: dict) -> None:
    """Add `record` to a JSON-lines file as one line (a kill can tear only that line)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file ([] when there is none). A torn last line (a process
    killed while appending) is dropped; a damaged line before it is a RunDirError."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):
                break
            raise RunDirError(f"{path}: line {number} is not JSON; restore the file from a "
                              "copy, or delete the line") from None
        if not isinstance(record, dict):
            raise RunDirError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records


def write_results(table: pd.DataFrame, sweep_dir: str | Path) -> Path:
    """The sweep's results.csv, atomically. It never loses a row: rows of the file on disk whose
    trial is not in `table` (a driver that did not see them) are kept, after `table`'s."""
    path = Path(sweep_dir) / RESULTS
    if path.is_file():
        try:
            before = read_results(sweep_dir)
        except RunDirError:
            before = None  # unreadable: replaced (the trial folders still hold every trial)
        if before is not None and "trial_id" in table:
            kept = before[~before["trial_id"].isin(table["trial_id"].astype(str))]
            if len(kept):
                table = pd.concat([table, kept], ignore_index=True)
    if "path" in table:  # stored relative to the folder: a moved or shared sweep still holds
        table = table.assign(path=[trial_folder_name(v) for v in table["path"]])
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False)
    return path


def read_results(sweep_dir: str | Path, required: tuple[str, ...] = ()) -> pd.DataFrame:
    """A sweep's results.csv as a table (trial ids as strings: "6038e956" is not 6038 x
    10^956), checked to be one: a missing, unreadable or foreign file, or one without the
    `required` columns (besides trial_id and status), is a RunDirError."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / RESULTS
    if not path.is_file():
        raise RunDirError(f"{sweep_dir}: no {RESULTS} here; give the directory of a sweep "
                          "(runs/sweeps/NAME)")
    try:
        table = pd.read_csv(path, dtype={"trial_id": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunDirError(f"{path}: not a readable CSV table ({reason})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table]
    if missing:
        raise RunDirError(f"{path}: not a sweep's results table (no {', '.join(missing)} "
                          "column)")
    _check_rows(path, table)
    missing = [c for c in required if c not in table]
    if missing and not table["status"].isin([COMPLETED, STOPPED]).any():
        failed = table[table["status"] == FAILED]
        first = (f"; the first: {failed['stop_reason'].iloc[0]}"
                 if len(failed) and "stop_reason" in table else "")
        raise RunDirError(f"{path}: no trial of this sweep finished ({len(failed)} failed, "
                          f"{len(table) - len(failed)} other{first}), so there is nothing to "
                          "rank; fix the cause and run the sweep again")
    if missing:
        raise RunDirError(f"{path}: lacks the column(s) {', '.join(missing)} (written by "
                          "mdsearch sweep for every trial)")
    if "path" in table:  # each trial's folder, always inside this sweep folder
        names = [trial_folder_name(v) for v in table["path"]]
        table["path"] = [str(sweep_dir.resolve() / n) if isinstance(n, str) and n else None
                         for n in names]
    return table


def _check_rows(path: Path, table: pd.DataFrame) -> None:
    """Rows a reader would miscount: one cut short (a file truncated mid-row), a trial twice, a
    cost that is not a finite number. Line numbers are the file's (the header is line 1)."""
    import csv

    with open(path, newline="") as f:
        widths = [len(row) for row in csv.reader(f)]
    for number, width in enumerate(widths[1:], 2):
        if width != widths[0]:
            raise RunDirError(f"{path}: line {number} has {width} fields, the header "
                              f"{widths[0]} (cut short or edited?); restore the file, or "
                              "rebuild it by resuming the sweep")
    ids = table["trial_id"].dropna()
    twice = ids[ids.duplicated()]
    if len(twice):
        lines = [i + 2 for i in table.index[table["trial_id"] == twice.iloc[0]]]
        raise RunDirError(f"{path}: trial {twice.iloc[0]} appears twice (lines "
                          f"{', '.join(map(str, lines))}); one row per trial")
    for column in ("params", "gmacs", "steps"):
        if column not in table:
            continue
        values = pd.to_numeric(table[column], errors="coerce")
        bad = table.index[table[column].notna() & ~np.isfinite(values.fillna(np.inf))]
        if len(bad):
            raise RunDirError(f"{path}: line {bad[0] + 2}: {column} "
                              f"{table[column].iloc[bad[0]]} is not a finite number")


def trial_folder_name(path) -> object:
    """results.csv's `path` of a trial: its folder's name (trial folders are the sweep folder's
    direct children). An older table's absolute path, or one crafted to leave the folder, keeps
    only its last component."""
    if pd.isna(path):
        return path
    name = str(path).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return "" if name in ("", ".", "..") else name


def numeric_column(table: pd.DataFrame, metric: str, source: str | Path = RESULTS) -> pd.Series:
    """A metric column as numbers; text in it is a RunDirError naming the first bad row."""
    values = pd.to_numeric(table[metric], errors="coerce")
    bad = values.isna() & table[metric].notna()
    if bad.any():
        row = table[bad].iloc[0]
        raise RunDirError(f"{source}: column {metric!r} holds {row[metric]!r} (trial "
                          f"{row.get('trial_id', '?')}), not a number")
    return values


def pareto_mask(values) -> np.ndarray:
    """Boolean mask of the non-dominated rows of an (n, k) array (minimise every column).

    A row is on the front when no other row is at most as large in every column and strictly
    smaller in one. Duplicates dominate neither each other, so both stay; rows with a missing
    (NaN) value are never on it."""
    v = np.asarray(values, dtype=float)
    if v.ndim != 2:
        raise ValueError(f"expected an (n, k) array, got shape {v.shape}")
    valid = ~np.isnan(v).any(axis=1)
    mask = valid.copy()
    for i in np.flatnonzero(valid):
        others = v[valid]
        dominated = np.any(np.all(others <= v[i], axis=1) & np.any(others < v[i], axis=1))
        mask[i] = not dominated
    return mask


def front_probability(means, errors, draws: int = 4000, seed: int = 0) -> np.ndarray:
    """Each row's probability of being on the Pareto front (pareto_mask: minimise every column)
    when its values are only known as means with standard errors: the share of `draws` joint
    normal draws (independent rows and columns) in which the row is non-dominated. A column with
    error 0 (a cost) is exact. Rows with a missing mean get 0; a missing error counts as 0."""
    m = np.asarray(means, dtype=float)
    e = np.nan_to_num(np.asarray(errors, dtype=float), nan=0.0)
    if m.ndim != 2 or e.shape != m.shape:
        raise ValueError(f"expected two (n, k) arrays of one shape, got {m.shape} and {e.shape}")
    valid = ~np.isnan(m).any(axis=1)
    out = np.zeros(len(m))
    v = m[valid]
    if len(v) == 0:
        return out
    rng = np.random.default_rng(seed)
    counts = np.zeros(len(v))
    for start in range(0, draws, 500):  # (chunk, n, n, k) booleans at a time
        n = min(500, draws - start)
        x = v + rng.standard_normal((n, *v.shape)) * e[valid]
        le = np.all(x[:, None, :, :] <= x[:, :, None, :], axis=3)  # [d, i, j]: j <= i everywhere
        lt = np.any(x[:, None, :, :] < x[:, :, None, :], axis=3)  # j < i somewhere
        counts += (~np.any(le & lt, axis=2)).sum(axis=0)
    out[valid] = counts / draws
    return out


def front(table: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """The completed trials on the Pareto front of `objectives` ((column, "min"|"max") pairs),
    sorted by the first; trials missing any objective are left out."""
    cols = [c for c, _ in objectives]
    done = table[(table["status"] == COMPLETED)]
    if done.empty or any(c not in done for c in cols):
        return done.iloc[0:0]
    done = done.dropna(subset=cols)
    signs = np.array([1.0 if mode == "min" else -1.0 for _, mode in objectives])
    values = done[cols].to_numpy(dtype=float) * signs
    return done[pareto_mask(values)].sort_values(cols[0], ascending=signs[0] > 0)
