"""Latency tables (arch.latency, export.latency): keys, the predictor, bad tables, resume, the
phone-table round trip, and latency as a space's budget and objective."""

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from mdsearch.arch import latency, presets
from mdsearch.arch.latency import LatencyError, Measurement, Row, Table
from mdsearch.arch.unet import Block, build
from mdsearch.search.space import CostCache, SpaceError, load_space, parse_space

from helpers import WHERE, fake_table, tiny

RES = 64  # tiny specs: latent 8 -> 8, 4, 2
TINY_SET = {"levels.0.channels": 32, "levels.1.channels": 64, "levels.2.channels": 64,
            "head_dim": 16, "norm_groups": 8, "context_dim": 32, "context_len": 8,
            "time_freq_dim": 32, "time_embed_dim": 64}


def run(*args, env=None):
    return subprocess.run([sys.executable, "-m", "mdsearch.cli", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})


# ---- keys and units ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["md", "md-lite", "sd15"])
def test_units_cover_every_block_and_keys_are_deterministic(name):
    spec = presets.get(name)
    first, again = latency.units(spec, 256), latency.units(presets.get(name), 256)
    assert [u.key for u in first] == [u.key for u in again]
    model_blocks = [m for m in build(tiny(name)).modules() if isinstance(m, Block)]
    tiny_units = latency.units(tiny(name), RES)
    assert sum(u.kind == "block" for u in tiny_units) == len(model_blocks)
    mid_convs = 2 if spec.mid == "sd" else 0  # (counted in the mid unit)
    assert sum(u.kind == "block" for u in first) == spec.counts()["conv_blocks"] - mid_convs
    assert sum(u.kind == "downsample" for u in first) == len(spec.levels) - 1
    assert sum(u.kind == "upsample" for u in first) == len(spec.levels) - 1
    assert sum(u.kind == "mid" for u in first) == (spec.mid == "sd")
    # every parameter of the UNet is in a unit except the stem and the head (the fitted terms)
    model = build(tiny(name))
    outside = sum(p.numel() for m in (model.time_mlp, model.conv_in, model.norm_out,
                                      model.conv_out) for p in m.parameters())
    inside = sum(latency.unit_cost(u)[0] for u in tiny_units)
    assert inside + outside == sum(p.numel() for p in model.parameters())


def test_a_key_changes_with_what_the_block_reads_and_not_with_the_name():
    md = latency.units(presets.get("md"), 256)
    renamed = presets.get("md")
    renamed.name = "other"
    assert [u.key for u in latency.units(renamed, 256)] == [u.key for u in md]
    wider = latency.units(presets.get("md", {"ffn_expansion": 4}), 256)
    transformer_keys = {u.key for u in md if u.kind == "block" and u.args[2].layers}
    assert transformer_keys.isdisjoint(u.key for u in wider)
    assert {u.key for u in latency.units(presets.get("md"), 512)}.isdisjoint(u.key for u in md)


# ---- the predictor ----------------------------------------------------------------------------
def test_prediction_is_the_sum_of_entries_plus_the_fitted_terms(tmp_path):
    spec = tiny("md")
    path = fake_table(tmp_path / "t.csv", [spec],
                      {"graph_ms": 2.5, "per_unit_ms": -0.25, "scale": 0.1})
    table = Table(path)
    predicted = table.predict(spec)
    us = latency.units(spec, RES)
    entries = sum(table.rows[u.key].median_ms for u in us)
    assert predicted.entries_ms == pytest.approx(entries)
    assert predicted.total_ms == pytest.approx(entries + 2.5 - 0.25 * len(us) + 0.1 * entries)
    rows = predicted.breakdown()
    assert sum(r["ms"] for r in rows) == pytest.approx(predicted.total_ms)
    assert sum(r["units"] for r in rows) == len(us)


def test_fit_recovers_terms_and_leaves_what_it_cannot_tell_at_zero():
    ms = [Measurement(f"m{i}", 100 + 1.5 * i + 3.0, 100 + 1.5 * i, 15) for i in range(4)]
    fitted = latency.fit(ms, RES, WHERE)
    assert fitted.terms["graph_ms"] == pytest.approx(3.0)
    assert fitted.terms["per_unit_ms"] == 0 and fitted.terms["scale"] == 0  # counts never vary
    ms = [Measurement(f"m{i}", 1.1 * e + 2.0 + 0.5 * n, e, n)
          for i, (e, n) in enumerate([(100, 15), (150, 15), (200, 27), (300, 27), (120, 20),
                                      (260, 20)])]
    fitted = latency.fit(ms, RES, WHERE)
    assert fitted.terms == pytest.approx({"graph_ms": 2.0, "per_unit_ms": 0.5, "scale": 0.1})


@pytest.mark.slow
def test_a_spec_with_a_block_missing_from_the_table_is_one_line_exit_2(tmp_path):
    spec = tiny("md")
    path = fake_table(tmp_path / "t.csv", [spec])
    (tmp_path / "wider.yaml").write_text(tiny("md", **{"levels.2.channels": 96}).to_yaml())
    out = run("cost", "--spec", str(tmp_path / "wider.yaml"), "--latency", str(path))
    assert out.returncode == 2, out.stderr
    line, = out.stderr.strip().splitlines()
    assert "no entry for" in line and "L2 down 0: separable 64->96" in line and "t.csv" in line
    (tmp_path / "tiny.yaml").write_text(spec.to_yaml())
    out = run("cost", "--spec", str(tmp_path / "tiny.yaml"), "--latency", str(path),
              "--breakdown", "--plot", str(tmp_path / "where.png"), "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["latency_ms"] == pytest.approx(Table(path).predict(spec).total_ms)
    assert data["resolution"] == RES  # the table's resolution, unless --resolution says otherwise
    assert {r["type"] for r in data["latency_breakdown"]} >= {"conv", "conv + transformer"}
    assert (tmp_path / "where.png").stat().st_size > 0


# ---- bad tables ------------------------------------------------------------------------------
def _rewrite(path, edit):
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("edit, expected", [
    (lambda ls: ls.__setitem__(0, "trial_id,status,params"), "not a mdsearch latency table"),
    (lambda ls: ls.__setitem__(2, ls[2].replace(ls[2].split(",")[0], "zz")), "line 3: column key"),
    (lambda ls: ls.append(ls[1]), "appears twice"),
    (lambda ls: ls.__setitem__(3, ",".join(ls[3].split(",")[:4] + ["nan"]
                                           + ls[3].split(",")[5:])), "line 4: column median_ms"),
    (lambda ls: ls.__setitem__(2, ls[2].rsplit(",", 1)[0]), "line 3: 10 fields"),
    (lambda ls: ls.__setitem__(4, ls[4].rsplit(",", 1)[0] + ",4"), "line 5: measured on"),
])
def test_a_damaged_or_foreign_table_is_refused_naming_the_row(tmp_path, edit, expected):
    path = fake_table(tmp_path / "t.csv", [tiny("md")])
    _rewrite(path, edit)
    with pytest.raises(LatencyError, match=expected):
        Table(path)
    (tmp_path / "tiny.yaml").write_text(tiny("md").to_yaml())
    out = run("cost", "--spec", str(tmp_path / "tiny.yaml"), "--latency", str(path))
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_a_missing_or_foreign_fit_is_refused(tmp_path):
    path = fake_table(tmp_path / "t.csv", [tiny("md")])
    fit = latency.fit_path(path)
    data = json.loads(fit.read_text())
    fit.write_text(json.dumps({**data, "threads": 8}))
    with pytest.raises(LatencyError, match="fitted on"):
        Table(path)
    fit.unlink()
    with pytest.raises(LatencyError, match="t.fit.json: missing"):
        Table(path)


# ---- measuring: resume after a kill, and the phone round trip ---------------------------------
def _tiny_space(tmp_path, **extra):
    space = {"name": "tiny", "base": "md", "set": TINY_SET, "trial": "cpu_quick",
             "dimensions": {"inner": {"field": "levels.2.channels", "values": [64]}},
             "constraints": {"resolution": RES}, "objectives": [{"text_gain": "max"}], **extra}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.mark.chaos
def test_a_killed_table_run_resumes_without_retiming_finished_blocks(tmp_path):
    space, table = _tiny_space(tmp_path), tmp_path / "table.csv"
    args = ("latency", "table", "--space", str(space), "--threads", "1", "--repeats", "2",
            "--fit", "1", "--out", str(table))
    killed = run(*args, env={"MDSEARCH_FAULT_KILL": "latency-row:3"})
    assert killed.returncode == -9, killed.stderr
    text = table.read_text()
    assert not text.endswith("\n")  # killed in the middle of its third row
    kept = text.splitlines()[1:3]
    assert len(kept) == 2
    resumed = run(*args)
    assert resumed.returncode == 0, resumed.stderr
    assert "2 already timed" in resumed.stderr
    lines = table.read_text().splitlines()
    assert lines[1:3] == kept  # the finished rows were not timed again
    n_units = len(latency.distinct([latency.units(load_space(space).spec_for({"inner": 64}),
                                                  RES)]))
    assert len(lines) == 1 + n_units
    t = Table(table)
    assert t.fit.measurements[0].units == 15
    spec = load_space(space).spec_for({"inner": 64})
    m = t.fit.measurements[0]
    assert t.predict(spec).total_ms == pytest.approx(m.measured_ms, rel=1e-6)  # one model: exact
    busy = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, time\nh = open(%r, 'a+')\nfcntl.flock(h, fcntl.LOCK_EX)\n"
        "print('in', flush=True)\ntime.sleep(60)") % f"{table}.lock"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert busy.stdout.readline().strip() == "in"
        second = run(*args)
        assert second.returncode == 2 and "another `mdsearch latency table`" in second.stderr
    finally:
        busy.kill()
        busy.wait()


@pytest.mark.slow
def test_a_probe_and_its_device_rows_import_as_a_table(tmp_path):
    space = _tiny_space(tmp_path)
    probe = tmp_path / "probe"
    out = run("latency", "probe", "--space", str(space), "--fit", "1", "--out", str(probe))
    assert out.returncode == 0, out.stderr
    manifest = json.loads((probe / "manifest.json").read_text())
    for entry in manifest["units"] + manifest["models"]:
        assert (probe / entry["graph"]).is_file()
    measured = tmp_path / "measured.csv"

    def write(rows):
        with open(measured, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(manifest["measured_columns"])
            w.writerows(rows)

    rows = [[e["key"], 2.0, 1.9, 2.2, "coreml", "8.0", "iPhone 15 Pro", 6]
            for e in manifest["units"] + manifest["models"]]
    rows[-1][1:4] = [40.0, 39.0, 41.0]  # the whole model
    write(rows)
    table = tmp_path / "phone.csv"
    out = run("latency", "table", "--import", str(measured), "--manifest", str(probe),
              "--out", str(table))
    assert out.returncode == 0, out.stderr
    t = Table(table)
    spec = load_space(space).spec_for({"inner": 64})
    assert t.predict(spec).total_ms == pytest.approx(40.0)
    assert next(iter(t.rows.values())).device == "iPhone 15 Pro"
    for broken, expected in [(rows[:-2] + rows[-1:], "not measured"),
                             (rows + [["0123456789abcdef", *rows[0][1:]]], "not a graph of"),
                             (rows[:1] + rows, "appears twice")]:
        write(broken)
        out = run("latency", "table", "--import", str(measured), "--manifest", str(probe),
                  "--out", str(tmp_path / "bad.csv"))
        assert out.returncode == 2 and expected in out.stderr, out.stderr
    write(rows)
    good = (probe / "manifest.json").read_text()
    for edit, expected in [(lambda m: m["models"][0]["units"].append("feedfeedfeedfeed"),
                            "field models[0].units: 'feedfeedfeedfeed'"),
                           (lambda m: m.pop("resolution"), "field resolution"),
                           (lambda m: m.__setitem__("units", {}), "field units: a list")]:
        broken = json.loads(good)
        edit(broken)
        (probe / "manifest.json").write_text(json.dumps(broken))
        out = run("latency", "table", "--import", str(measured), "--manifest", str(probe),
                  "--out", str(tmp_path / "bad.csv"))
        assert out.returncode == 2 and expected in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


# ---- latency in a search space ----------------------------------------------------------------
def test_a_space_filters_by_latency_and_refuses_latency_without_a_table(tmp_path):
    base = tiny("md")
    table = fake_table(tmp_path / "t.csv", [base.override({"levels.2.channels": c})
                                            for c in (64, 96)], {"graph_ms": 1.0})
    space_file = _tiny_space(tmp_path, latency={"table": "t.csv"},
                             dimensions={"inner": {"field": "levels.2.channels",
                                                   "values": [64, 96]}})
    space = load_space(space_file)
    cache = CostCache(space.load_latency())
    costs = {c: space.screen({"inner": c}, cache)[0]["latency_ms"] for c in (64, 96)}
    assert costs[64] == pytest.approx(Table(table).predict(space.spec_for({"inner": 64})).total_ms,
                                      abs=1e-3)  # (rounded as GMACs are)
    data = yaml.safe_load(space_file.read_text())
    data["constraints"]["max_latency_ms"] = (costs[64] + costs[96]) / 2
    cheap, dear = sorted(costs, key=costs.get)
    space = parse_space(data, str(space_file), base_dir=tmp_path)
    cache = CostCache(space.load_latency())
    assert space.screen({"inner": cheap}, cache)[1] is None
    assert "latency" in space.screen({"inner": dear}, cache)[1]
    data["constraints"]["max_latency_ms"] = min(costs.values()) / 2
    space = parse_space(data, str(space_file), base_dir=tmp_path)
    with pytest.raises(SpaceError, match="latency <= .* ms.*ms"):
        space.check_feasible(CostCache(space.load_latency()))
    data.pop("latency")
    with pytest.raises(SpaceError, match="constraints.max_latency_ms: needs `latency"):
        parse_space(data, str(space_file), base_dir=tmp_path)
    data["constraints"].pop("max_latency_ms")
    data["objectives"] = [{"text_gain": "max"}, {"latency_ms": "min"}]
    with pytest.raises(SpaceError, match="objectives: latency_ms: needs `latency"):
        parse_space(data, str(space_file), base_dir=tmp_path)
    data["latency"] = {"table": "t.csv"}
    data["constraints"]["resolution"] = 128
    with pytest.raises(SpaceError, match="measured at 64x64"):
        parse_space(data, str(space_file), base_dir=tmp_path).load_latency()
