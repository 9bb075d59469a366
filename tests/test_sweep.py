"""Sweeps through a real Ray (local, and a two-node cluster on 127.0.0.1), with real Optuna,
a real MLflow store, and a real SIGKILL of the driver followed by --resume."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mdsearch.rundir import RESULT, TUNE_HISTORY, read_results
from mdsearch.search.sweep import run_sweep
from mdsearch.search.space import load_space

from helpers import SWEEP_RECIPE, SWEEP_SPACE, sweep_cmd, trained, write

def files(tmp_path, recipe=None, **space_changes):
    recipe_file = write(tmp_path / "recipe.yaml", {**SWEEP_RECIPE, **(recipe or {})})
    space_file = write(tmp_path / "space.yaml", {**SWEEP_SPACE, **space_changes})
    return load_space(space_file), recipe_file


@pytest.mark.ray
def test_grid_sweep_filters_before_training_and_writes_results(tmp_path):
    space, recipe = files(tmp_path, search={"algorithm": "grid"},
                          dimensions={"inner_channels": SWEEP_SPACE["dimensions"]["inner_channels"]})
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_sweep(space, recipe, name="grid", storage=tmp_path / "sweeps",
                       tracking_uri=uri)
    table = read_results(tmp_path / "sweeps" / "grid")  # trial paths resolved in the folder
    assert len(table) == 3 and result.filtered == 1
    filtered = table[table["status"] == "filtered"].iloc[0]
    assert filtered["inner_channels"] == 1280 and filtered["steps"] == 0
    assert filtered["stop_reason"].startswith("over budget: params 558.8M > 210.0M")
    done = trained(table)
    assert sorted(done["inner_channels"]) == [512, 640]
    assert (done["status"] == "completed").all() and (done["steps"] == 6).all()
    assert (done["params"] <= 210e6).all()  # nothing over budget trained
    for column in ("trial_id", "stop_reason", "gmacs", "fid_proxy", "align", "seconds", "seed"):
        assert column in table.columns
    assert done["fid_proxy"].notna().all() and (done["seconds"] > 0).all()
    # the trainer's result and Tune's line-per-report history live side by side, both readable
    for trial in done["path"]:
        assert json.loads((Path(trial) / RESULT).read_text())["status"] == "ok"
        reports = [json.loads(line) for line in (Path(trial) / TUNE_HISTORY).read_text().splitlines()]
        assert [r["step"] for r in reports] == [3, 6]
    from mdsearch.analysis.fidelity import fidelity

    agreement = fidelity(tmp_path / "sweeps" / "grid", tmp_path / "sweeps" / "grid", "fid_proxy",
                         short_step=3)  # documented: --short-step N on a sweep
    assert agreement["pairs"] == 2 and agreement["steps_short"] == 3

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("grid")  # one experiment per sweep
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(done["trial_id"])
    assert all("fid_proxy" in r.data.metrics and r.info.status == "FINISHED" for r in runs)

    # the same sweep, reported from its MLflow experiment alone
    from mdsearch.analysis.report import build_report

    report = build_report(mlflow_experiment="grid", tracking_uri=uri, out=tmp_path / "rep")
    summary = report.files["summary"].read_text()
    assert "trained: 2 (2 completed" in summary and "over budget or invalid): 1" in summary
    front = pd.read_csv(report.files["pareto_csv"], dtype={"trial_id": str})
    assert set(front["trial_id"]) <= set(done["trial_id"]) and len(front) >= 1

    # promote the winner under the md-lite budget, train it through staged full training (a low
    # resolution, a higher one, the relu fine-tune), and export it for phones
    from mdsearch.cli import main

    full = write(tmp_path / "full.yaml", {**SWEEP_RECIPE, "steps": 5, "eval": {
        **SWEEP_RECIPE["eval"], "every": 100}, "stages": [
        {"name": "low", "steps": 2, "resolution": 8}, {"name": "high", "steps": 2},
        {"name": "relu", "steps": 1, "attn_nonlinearity": "relu"}]})
    out = tmp_path / "promoted"
    assert main(["promote", str(tmp_path / "sweeps" / "grid"), "--budget", "md-lite",
                 "--trial", str(full), "--out", str(out), "--no-mlflow", "--json"]) == 0
    promotion = json.loads((out / "promotion.json").read_text())
    best = done.sort_values("fid_proxy").iloc[0]
    chosen = done.set_index("trial_id").loc[promotion["trial_id"]]
    assert promotion["budget"] == "md-lite"
    if promotion["top_by_metric"] is None:
        assert promotion["trial_id"] == best["trial_id"]
    else:  # the best is inside the noise of a cheaper one: that one is promoted
        assert promotion["top_by_metric"] == best["trial_id"]
        assert best["trial_id"] in promotion["within_noise"]
        assert chosen["gmacs"] <= best["gmacs"]
    result = json.loads((out / RESULT).read_text())
    assert result["status"] == "ok" and result["steps"] == 5
    assert [(r["stage"], r.get("event")) for r in result["history"]] == [
        ("low", None), ("high", None), ("relu", "switch"), ("relu", None)]
    assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "export"),
                 "--json"]) == 0
    exported = json.loads((tmp_path / "export" / "unet.json").read_text())
    assert exported["within_tolerance"] and exported["max_abs_err"] is not None
    assert exported["latent_size"] == 16  # the resolution it was trained at, not 512
    assert (tmp_path / "export" / "text_encoder.onnx").is_file()


@pytest.mark.ray
def test_optuna_sweep_records_a_failed_trial_and_goes_on(tmp_path):
    # lr 1e30 drives every trial to a non-finite loss: each is recorded as failed, with its
    # reason, and the sweep still ends normally with its results
    space, recipe = files(tmp_path, recipe={"optimizer": {"lr": 1e30, "warmup_steps": 0}})
    result = run_sweep(space, recipe, name="nan", storage=tmp_path, mlflow=False)
    done = trained(result.table)
    assert len(done) == 2 and (done["status"] == "failed").all()
    assert done["stop_reason"].str.contains("non-finite loss").all()
    assert done[["inner_channels", "inner_layers"]].drop_duplicates().shape[0] == 2


def test_existing_sweep_needs_resume_and_resume_needs_a_sweep(tmp_path):
    from mdsearch.search.sweep import SweepError

    space, recipe = files(tmp_path)
    with pytest.raises(SweepError, match="no sweep to resume"):
        run_sweep(space, recipe, name="x", storage=tmp_path / "s", resume=True)
    (tmp_path / "s" / "x").mkdir(parents=True)
    (tmp_path / "s" / "x" / "results.csv").write_text("kept\n")
    with pytest.raises(SweepError, match="already holds a sweep; pass --resume"):
        run_sweep(space, recipe, name="x", storage=tmp_path / "s")
    assert (tmp_path / "s" / "x" / "results.csv").read_text() == "kept\n"


@pytest.mark.parametrize("algorithm", ["nsga2", "tpe", "random"])
def test_every_optuna_searcher_survives_the_pickle_tune_makes_of_it(tmp_path, algorithm):
    """Ray Tune pickles its searcher when the Tuner is made (and into tuner.pkl). Optuna 5.1's
    NSGA-II sampler holds a threading.Lock and cannot be pickled: the searcher must pickle
    without its sampler and study, and go on suggesting from the journal after it."""
    import pickle

    from mdsearch.search.searchers import make_inner_searcher

    space, _ = files(tmp_path, objectives=[{"fid_proxy": "min"}, {"gmacs": "min"}],
                     search={"algorithm": algorithm, "num_samples": 4, "seed": 0})
    searcher = make_inner_searcher(space, ["fid_proxy", "gmacs"], ["min", "min"], tmp_path)
    first = searcher.suggest("a")
    searcher.on_trial_complete("a", {"fid_proxy": 1.0, "gmacs": 2.0})
    copy = pickle.loads(pickle.dumps(searcher))
    assert set(copy.suggest("b")) == set(first)
    assert len(copy.study.trials) == 2  # the journal's first trial, and the new one


@pytest.mark.ray
def test_two_node_loopback_cluster_runs_a_sweep(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    ray.shutdown()  # the local Ray an earlier test left up: this sweep joins the cluster
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        # the two-objective path too: NSGA-II over (fid_proxy, gmacs), with ASHA stopping
        space, recipe = files(tmp_path, objectives=[{"fid_proxy": "min"}, {"gmacs": "min"}],
                              search={"algorithm": "nsga2", "num_samples": 2, "seed": 0},
                              scheduler={"kind": "asha", "reduction_factor": 2})
        result = run_sweep(space, recipe, name="cluster", storage=tmp_path,
                           address=cluster.address, mlflow=False)
        done = trained(result.table)
        assert len(done) == 2 and done["status"].isin(["completed", "stopped"]).all()
        assert done["fid_proxy"].notna().all() and (done["steps"] >= 3).all()
        assert done["node_id"].nunique() == 2  # one trial per 1-CPU node, run concurrently
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.ray
@pytest.mark.chaos
def test_sigkill_then_resume_completes_every_trial_exactly_once(tmp_path):
    space_file = write(tmp_path / "space.yaml", {**SWEEP_SPACE, "search": {
        "algorithm": "random", "num_samples": 4, "seed": 0, "max_concurrent": 2}})
    recipe_file = write(tmp_path / "recipe.yaml", {
        **SWEEP_RECIPE, "steps": 40, "checkpoint_every": 10,
        "eval": {**SWEEP_RECIPE["eval"], "every": 10}})
    log = tmp_path / "first.log"
    with open(log, "w") as err:
        driver = subprocess.Popen(sweep_cmd(space_file, recipe_file, tmp_path), stderr=err,
                                  stdout=subprocess.DEVNULL)
    deadline = time.time() + 240
    while "finished" not in log.read_text():
        assert driver.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, "no trial finished in time"
        time.sleep(0.5)
    # a second sweep on the same directory fails at once, naming the first
    second = subprocess.run(sweep_cmd(space_file, recipe_file, tmp_path, "--resume"),
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and f"in use by pid {driver.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    time.sleep(5)  # the experiment state is snapshotted every 2 s
    assert driver.poll() is None, "the sweep ended before it could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    first = log.read_text()
    finished_before = {line.split()[2] for line in first.splitlines() if line.endswith("finished")}
    # results.csv is written as each trial ends: the killed sweep already has its finished rows
    partial = pd.read_csv(tmp_path / "killed" / "results.csv", dtype={"trial_id": str})
    assert finished_before <= set(partial[partial["status"] == "completed"]["trial_id"])

    resumed = subprocess.run(sweep_cmd(space_file, recipe_file, tmp_path, "--resume"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    table = pd.read_csv(tmp_path / "killed" / "results.csv", dtype={"trial_id": str})
    done = trained(table)
    assert len(done) == 4 and done["trial_id"].is_unique
    assert (done["status"] == "completed").all() and (done["steps"] == 40).all()
    assert done[["inner_channels", "inner_layers"]].drop_duplicates().shape[0] == 4
    started_again = {line.split()[2] for line in resumed.stderr.splitlines() if " start (" in line}
    assert finished_before and not finished_before & started_again
    assert "results:" in resumed.stdout

    # a damaged searcher state stops a resume with one clear line, and touches nothing
    sweep = tmp_path / "killed"
    before = {p.name: p.read_bytes() for p in sweep.iterdir() if p.is_file()}
    state = sorted(sweep.glob("searcher-state-*.pkl"))[-1]
    assert json.loads(state.read_text())["format"].startswith("mdsearch")  # data, not a pickle
    assert (sweep / "optuna_journal.log").is_file()  # the Optuna study, in Optuna's own format
    state.write_bytes(state.read_bytes()[:40])
    before[state.name] = state.read_bytes()
    again = subprocess.run(sweep_cmd(space_file, recipe_file, tmp_path, "--resume"),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert f"{state}: the sweep's searcher state is damaged" in again.stderr
    after = {p.name: p.read_bytes() for p in sweep.iterdir() if p.is_file() and p.name != ".lock"}
    assert after == {k: v for k, v in before.items() if k != ".lock"}
    # a crafted pickle in a shared storage is refused, never run
    import pickle

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    state.write_bytes(pickle.dumps(Payload()))
    again = subprocess.run(sweep_cmd(space_file, recipe_file, tmp_path, "--resume"),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "damaged" in again.stderr
    assert not (tmp_path / "pwned").exists()


def test_cli_reports_a_bad_space_in_one_line(tmp_path, capsys):
    from mdsearch.cli import main

    bad = write(tmp_path / "bad.yaml", {**SWEEP_SPACE, "constraints": {"max_params": "1M"}})
    assert main(["sweep", str(bad), "--storage", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: constraints: no configuration of this space satisfies params <= 1M" in err
    assert not (tmp_path / "tiny_space").exists()  # nothing started, nothing written


def test_unnamed_sweeps_are_timestamped_and_resume_takes_the_latest(tmp_path):
    from mdsearch.search.sweep import SweepError, default_name

    space, _ = files(tmp_path)
    assert re.fullmatch(r"tiny_space-\d{8}-\d{6}", default_name(space, tmp_path, resume=False))
    with pytest.raises(SweepError, match="no earlier sweep of tiny_space to resume"):
        default_name(space, tmp_path, resume=True)
    for stamp in ("20261124-090000", "20261125-080000"):
        (tmp_path / f"tiny_space-{stamp}").mkdir()
    assert default_name(space, tmp_path, resume=True) == "tiny_space-20261125-080000"


@pytest.mark.ray
@pytest.mark.chaos
def test_a_driver_killed_at_any_point_resumes_to_every_trial_exactly_once(tmp_path):
    """Fault injection: the driver is killed six times, at the worst moments of its writes
    (mid results.csv, mid searcher state, mid copy of the searcher state into the sweep folder)
    and at arbitrary times, and resumed each time."""
    import os

    space_file = write(tmp_path / "space.yaml", {**SWEEP_SPACE, "search": {
        "algorithm": "random", "num_samples": 4, "seed": 1, "max_concurrent": 2}})
    recipe_file = write(tmp_path / "recipe.yaml", {
        **SWEEP_RECIPE, "steps": 30, "checkpoint_every": 10, "eval": {**SWEEP_RECIPE["eval"], "every": 10}})
    kills = [("fault", "results.csv:1"), ("fault", "searcher-state:3"),
             ("fault", "results.csv:1"), ("fault", "storage-copy-searcher-state:2"),
             ("after", 12.0), ("after", 6.0)]
    started, seen = False, []
    for how, what in kills:
        env = dict(os.environ)
        if how == "fault":
            env["MDSEARCH_FAULT_KILL"] = what
        cmd = sweep_cmd(space_file, recipe_file, tmp_path, *(["--resume"] if started else []))
        driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
        try:
            driver.wait(timeout=what if how == "after" else 300)
        except subprocess.TimeoutExpired:
            driver.kill()
            driver.wait()
        err = driver.stderr.read()
        assert driver.returncode in (0, -signal.SIGKILL), err[-3000:]
        seen.append(driver.returncode)
        started = started or (tmp_path / "killed" / "tuner.pkl").is_file()
        if driver.returncode == 0:
            break
    assert seen[:4] == [-signal.SIGKILL] * 4, seen  # the four faults did fire
    final = subprocess.run(sweep_cmd(space_file, recipe_file, tmp_path, "--resume"),
                           capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    table = pd.read_csv(tmp_path / "killed" / "results.csv", dtype={"trial_id": str})
    done = trained(table)
    assert len(done) == 4 and done["trial_id"].is_unique, table
    assert (done["status"] == "completed").all() and (done["steps"] == 30).all()
    assert not list((tmp_path / "killed").rglob("*.mdsearch-partial"))  # a killed copy's temp


@pytest.mark.ray
def test_a_sweep_without_address_never_joins_a_ray_already_running_here(tmp_path):
    """`ray.init()` alone joins the cluster Ray last recorded on this machine; mdsearch starts a
    private local Ray instead (address="local")."""
    import os

    ray_cli = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    # --block: this `ray start` owns the Ray it starts and stops exactly that Ray when it is
    # terminated (a test never runs `ray stop`, which would kill every Ray on the machine)
    other = subprocess.Popen([str(ray_cli), "start", "--head", "--block", "--port", "0",
                              "--num-cpus", "1", "--node-ip-address", "127.0.0.1",
                              "--include-dashboard", "false", "--disable-usage-stats"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in other.stdout:
            seen.append(line)
            if "Ray runtime started" in line:
                break
        assert other.poll() is None, "".join(seen)[-2000:]
        code = ("import ray\nfrom mdsearch.raylocal import start_ray\nstart_ray(None)\n"
                "print(ray.get_runtime_context().gcs_address)\n"
                "print(ray.util.get_node_ip_address())")
        ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=120)
        theirs = subprocess.run([sys.executable, "-c", "import ray\nray.init()\n"
                                 "print(ray.get_runtime_context().gcs_address)"],
                                env=env, capture_output=True, text=True, timeout=120)
        assert ours.returncode == 0 and theirs.returncode == 0, ours.stderr[-2000:]
        gcs, ip = ours.stdout.split()[-2:]
        assert gcs != theirs.stdout.split()[-1]  # a Ray of its own, not the running one
        assert ip == "127.0.0.1"
    finally:
        other.terminate()  # `ray start --block` stops the processes it started
        try:
            other.wait(timeout=60)
        except subprocess.TimeoutExpired:
            other.kill()
            other.wait()


def test_a_recipe_asking_for_more_than_a_worker_uses_is_refused():
    """A trial's worker trains on one device: several GPUs per worker would be reserved, unused
    (several per trial: workers: N)."""
    from mdsearch.search.sweep import SweepError, check_trial_resources
    from mdsearch.train.recipe import Recipe

    with pytest.raises(SweepError, match="recipe r: field resources.gpu: 8: each of a trial's "
                                         "workers trains on one GPU"):
        check_trial_resources(Recipe.from_dict({**SWEEP_RECIPE, "name": "r",
                                                "resources": {"cpu": 8, "gpu": 8}}, "r"))
    for ok in ({"resources": {"gpu": 1}}, {"workers": 2, "resources": {"gpu": 1}}):
        check_trial_resources(Recipe.from_dict({**SWEEP_RECIPE, "name": "r", **ok}, "r"))


@pytest.mark.ray
def test_a_tpe_sweep_with_seeds_per_trial_ranks_by_seed_means(tmp_path):
    """seeds_per_trial: 3 makes every trial a stack of 3 seeds: results.csv keeps each seed's
    value, their mean, std and standard error; TPE is told the mean; the winner statement uses
    the trials' own standard errors."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from mdsearch.quality import winner_statement

    space, recipe = files(tmp_path, objectives=[{"val_loss": "min"}], seeds_per_trial=3,
                          search={"algorithm": "tpe", "num_samples": 2, "seed": 0,
                                  "max_concurrent": 2})
    assert space.seeds_per_trial == 3
    result = run_sweep(space, recipe, name="seeds", storage=tmp_path, mlflow=False)
    done = trained(result.table)
    assert len(done) == 2 and (done["status"] == "completed").all()
    for _, row in done.iterrows():
        seeds = [row[f"val_loss_s{k}"] for k in range(3)]
        assert row["val_loss"] == pytest.approx(sum(seeds) / 3)
        assert row["val_loss_se"] == pytest.approx(pd.Series(seeds).std() / 3 ** 0.5)
        assert row["seeds_measured"] == 3
    csv = pd.read_csv(tmp_path / "seeds" / "results.csv")
    assert {"val_loss_s0", "val_loss_s1", "val_loss_s2", "val_loss_se"} <= set(csv.columns)
    study = optuna.load_study(study_name="sweep", storage=JournalStorage(
        JournalFileBackend(str(tmp_path / "seeds" / "optuna_journal.log"))))
    told = sorted(t.value for t in study.trials if t.value is not None)
    assert told == pytest.approx(sorted(done["val_loss"]))
    assert "seed means, from each trial's own seeds" in winner_statement(
        result.table, "val_loss", None)


@pytest.mark.ray
def test_a_racing_sweep_gives_seeds_only_while_the_race_is_open(tmp_path):
    """seeds_per_trial: {min: 1, max: 3, group: 1}: every trial starts with one seed and gets
    another only while the rule says its interval overlaps a trial at no more cost. Every
    decision is in the race log and equals the rule replayed on the logged values; each seed a
    trial raced is exactly that seed trained alone; results.csv says how many seeds each trial
    used and why it stopped."""
    from mdsearch.rundir import RACE_LOG, read_jsonl
    from mdsearch.search.racing import Entrant
    from mdsearch.train.recipe import load_recipe
    from mdsearch.train.trainer import train_trial

    space, recipe = files(tmp_path, objectives=[{"val_loss": "min"}, {"gmacs": "min"}],
                          seeds_per_trial={"min": 1, "max": 3, "group": 1},
                          search={"algorithm": "grid", "max_concurrent": 1},
                          dimensions={"inner_channels": {"field": "levels.2.channels",
                                                         "values": [512, 640]},
                                      "inner_layers": SWEEP_SPACE["dimensions"]["inner_layers"]})
    assert space.race.max_seeds == 3 and space.race.cost == "gmacs"
    result = run_sweep(space, recipe, name="race", storage=tmp_path, mlflow=False)
    done = trained(result.table)
    assert len(done) == 4 and (done["status"] == "completed").all()
    log = read_jsonl(tmp_path / "race" / RACE_LOG)
    entrants = {}
    for record in log:  # the decisions replay from the log alone
        trial = Entrant(record["trial"], {int(k): v for k, v in record["seeds"].items()},
                        record["cost"])
        entrants[trial.trial_id] = trial
        again = space.race.decide(trial, list(entrants.values()))
        assert (again.action, again.reason) == (record["action"], record["reason"])
    for _, row in done.iterrows():
        n = int(row["seeds_measured"])
        mine = [r for r in log if r["trial"] == row["trial_id"]]
        assert len(mine) == n and mine[-1]["action"] == "stop"  # one decision per group
        assert all(r["action"] == "more" for r in mine[:-1])
        assert row["seeds_reason"] == mine[-1]["reason"]
        if n > 1:
            assert row["val_loss"] == pytest.approx(sum(row[f"val_loss_s{k}"]
                                                        for k in range(n)) / n)
    raced = done[done["seeds_measured"] > 1]
    assert len(raced) >= 1, "nothing raced: the test proves nothing"
    row = raced.iloc[0]  # its last seed, trained alone, is what the race recorded
    k = int(row["seeds_measured"]) - 1
    alone = train_trial(space.spec_for({"inner_channels": int(row["inner_channels"]),
                                        "inner_layers": int(row["inner_layers"])}),
                        load_recipe(recipe), tmp_path / "alone", seed=k)
    assert alone.metrics["val_loss"] == pytest.approx(row[f"val_loss_s{k}"], rel=1e-5)
    from mdsearch.search.results import summary

    assert "seed racing (1 to 3 seeds on val_loss" in summary(result, space)


@pytest.mark.chaos
@pytest.mark.ray
def test_racing_decisions_survive_a_driver_killed_right_after_logging_one(tmp_path):
    """The driver is SIGKILLed just after it logs its second racing decision (the first
    trial's stop at max seeds), before Tune acts on it; --resume finishes the sweep with the
    same decisions, per configuration, as a sweep that was never killed."""
    import os

    from mdsearch.rundir import RACE_LOG, read_jsonl

    space = {**SWEEP_SPACE, "objectives": [{"val_loss": "min"}, {"gmacs": "min"}],
             "seeds_per_trial": {"min": 1, "max": 2, "group": 1},
             "dimensions": {**SWEEP_SPACE["dimensions"],
                            "inner_channels": {"field": "levels.2.channels", "values": [512]}},
             "search": {"algorithm": "grid", "max_concurrent": 1}}
    space_file = write(tmp_path / "space.yaml", space)
    recipe_file = write(tmp_path / "recipe.yaml", SWEEP_RECIPE)

    def decisions(name):  # per configuration (trial ids differ between sweeps)
        table = pd.read_csv(tmp_path / name / "results.csv", dtype={"trial_id": str})
        label = {r["trial_id"]: f"c{int(r['inner_channels'])}_l{int(r['inner_layers'])}"
                 for _, r in table.iterrows()}
        out = []
        for r in read_jsonl(tmp_path / name / RACE_LOG):
            reason = r["reason"]
            for trial, config in label.items():
                reason = reason.replace(trial, config)
            out.append((label[r["trial"]], len(r["seeds"]), r["action"], reason))
        return sorted(out)

    whole = subprocess.run(sweep_cmd(space_file, recipe_file, tmp_path, name="whole"),
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-3000:]
    env = {**os.environ, "MDSEARCH_FAULT_KILL": "seed-race:2"}
    killed = subprocess.run(sweep_cmd(space_file, recipe_file, tmp_path), env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert len(read_jsonl(tmp_path / "killed" / RACE_LOG)) == 2
    resumed = subprocess.run(sweep_cmd(space_file, recipe_file, tmp_path, "--resume"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert decisions("killed") == decisions("whole")
    table = trained(pd.read_csv(tmp_path / "killed" / "results.csv"))
    assert len(table) == 2 and (table["status"] == "completed").all()
    assert (table["seeds_measured"] == 2).all()  # the stop that was logged was not re-raced


@pytest.mark.ray
def test_num_samples_takes_the_first_points_of_a_grid(tmp_path):
    space, recipe = files(tmp_path, search={"algorithm": "grid"},
                          dimensions={"inner_channels": SWEEP_SPACE["dimensions"]["inner_channels"]})
    run_sweep(space, recipe, name="one", storage=tmp_path / "s", num_samples=1, mlflow=False)
    done = trained(read_results(tmp_path / "s" / "one"))
    assert list(done["inner_channels"]) == [512]  # the grid's first point, not all three


def test_seeds_per_trial_is_checked_when_the_space_is_read(tmp_path):
    from mdsearch.search.space import SpaceError

    for bad, why in ((0, "must be an integer in 1..64"), ("3", "must be an integer"),
                     (True, "must be an integer")):
        with pytest.raises(SpaceError, match=f"field seeds_per_trial: {why}|seeds_per_trial: {why}"):
            files(tmp_path, seeds_per_trial=bad)
    with pytest.raises(SpaceError, match="either seeds .* or seeds_per_trial"):
        files(tmp_path, seeds_per_trial=2, seeds=[0, 1],
              search={"algorithm": "grid", "num_samples": 1})
    # seed racing: {min, max, group, tie_margin}, on a metric every seed of a stack reports
    for bad, why in (({"min": 3, "max": 3}, "seeds_per_trial.max: must be more than min"),
                     ({"min": 2, "max": 99}, "seeds_per_trial.max: must be an integer in"),
                     ({"max": 4, "grup": 1}, "seeds_per_trial.grup: unknown.*group"),
                     ({"tie_margin": float("nan")}, "seeds_per_trial.tie_margin: must be a"),
                     ({"tie_margin": -0.1}, "seeds_per_trial.tie_margin: must be a")):
        with pytest.raises(SpaceError, match=why):
            files(tmp_path, seeds_per_trial=bad, objectives=[{"val_loss": "min"}])
    with pytest.raises(SpaceError, match="seed racing compares every seed's fid_proxy"):
        files(tmp_path, seeds_per_trial={"min": 2, "max": 4})  # SWEEP_SPACE ranks fid_proxy
    space, _ = files(tmp_path, seeds_per_trial={"min": 2, "max": 6, "tie_margin": 0.002},
                     objectives=[{"text_gain": "max"}, {"params": "min"}])
    assert (space.seeds_per_trial, space.race.group, space.race.cost) == (2, 2, "params")
    assert (space.race.metric, space.race.mode, space.race.tie_margin) == ("text_gain", "max",
                                                                           0.002)


@pytest.mark.parametrize("name", ["../../escaped", "/abs/path", "a/b", "..", ""])
def test_a_sweep_name_is_one_folder_inside_the_storage(tmp_path, name):
    from mdsearch.search.sweep import SweepError

    space, recipe = files(tmp_path)
    (tmp_path / "s").mkdir()
    with pytest.raises(SweepError, match="give one folder name, created inside --storage"):
        run_sweep(space, recipe, name=name, storage=tmp_path / "s", mlflow=False)
    assert list((tmp_path / "s").iterdir()) == [] and not Path("/abs/path").exists()
    assert not (tmp_path.parent / "escaped").exists()


def test_an_address_nothing_answers_at_is_one_line_within_seconds(tmp_path, capsys):
    from mdsearch.cli import main

    space_file = write(tmp_path / "space.yaml", SWEEP_SPACE)
    recipe_file = write(tmp_path / "recipe.yaml", SWEEP_RECIPE)
    started = time.monotonic()
    code = main(["sweep", str(space_file), "--trial", str(recipe_file), "--name", "addr",
                 "--storage", str(tmp_path / "s"), "--address", "127.0.0.1:1", "--no-mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and time.monotonic() - started < 30
    assert "--address 127.0.0.1:1: no Ray cluster answers there" in err and "Traceback" not in err
    assert not (tmp_path / "s" / "addr").exists()


def test_a_damaged_optuna_journal_is_refused_naming_the_line(tmp_path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    from mdsearch.search.sweep import SweepError, check_journal

    journal = tmp_path / "optuna_journal.log"
    study = optuna.create_study(storage=JournalStorage(JournalFileBackend(str(journal))))
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    good = journal.read_bytes()
    check_journal(journal)
    journal.write_bytes(good + b'{"op_code": 4, "worker_id"')  # a torn last line: Optuna skips it
    check_journal(journal)
    lines = good.splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:2] + [b"not json\n"] + lines[2:]))
    with pytest.raises(SweepError, match=f"{journal}: line 3 is not an Optuna journal record"):
        check_journal(journal)


@pytest.mark.ray
def test_a_moved_or_copied_sweep_folder_resumes_in_place(tmp_path):
    """Tune pickles the searcher, stop rule and callbacks with the folder they were made in;
    resumed from a moved folder they must use that folder (the original is gone), and a copy
    resumed must never write into the original."""
    import shutil

    space, recipe = files(tmp_path, scheduler={"kind": "paper", "metrics": {"fid_proxy": "min"}})
    import ray

    run_sweep(space, recipe, name="a", storage=tmp_path / "s", mlflow=False)
    ray.shutdown()  # each command its own Ray, as on the command line
    shutil.move(tmp_path / "s" / "a", tmp_path / "s" / "b")  # moved: the original is gone
    moved = run_sweep(space, recipe, name="b", storage=tmp_path / "s", mlflow=False, resume=True)
    assert len(trained(moved.table)) == 2 and not (tmp_path / "s" / "a").exists()
    ray.shutdown()
    shutil.copytree(tmp_path / "s" / "b", tmp_path / "s" / "c")  # copied: the original stays
    before = {p: p.read_bytes() for p in (tmp_path / "s" / "b").rglob("*") if p.is_file()}
    copied = run_sweep(space, recipe, name="c", storage=tmp_path / "s", mlflow=False, resume=True)
    assert len(trained(copied.table)) == 2
    after = {p: p.read_bytes() for p in (tmp_path / "s" / "b").rglob("*") if p.is_file()}
    assert after.keys() == before.keys()
    assert [p for p in before if p.name != ".lock" and before[p] != after[p]] == []


@pytest.mark.ray
@pytest.mark.chaos
def test_a_crafted_pickle_in_a_sweep_folder_is_refused_and_runs_nothing(tmp_path):
    """Ray Tune unpickles tuner.pkl, experiment_state-*.json, search_gen_state-*.json and failed
    trials' error.pkl on --resume. mdsearch signs each as it is written, with a key outside the
    folder; a file swapped for a crafted pickle (or left unsigned) stops the resume in one line,
    before Ray loads anything, and --trust-state is the explicit way to vouch for a folder."""
    import pickle

    from mdsearch.search import signing

    space_file = write(tmp_path / "space.yaml", SWEEP_SPACE)
    recipe_file = write(tmp_path / "recipe.yaml", SWEEP_RECIPE)
    storage = tmp_path / "s"
    first = subprocess.run(sweep_cmd(space_file, recipe_file, storage), capture_output=True,
                           text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    sweep = storage / "killed"
    pickled = signing.pickled_files(sweep)
    names = {p.name.split("-")[0] for p in pickled}
    assert {"tuner.pkl", "experiment_state", "search_gen_state"} <= names
    assert all(p.with_name(p.name + ".sig").is_file() for p in pickled)
    signing.check(sweep)  # what mdsearch wrote passes
    table = pd.read_csv(sweep / "results.csv", dtype={"trial_id": str})
    # each trial's folder is named relative to the sweep (never Ray's session folder in /tmp)
    assert all("/" not in p for p in trained(table)["path"])

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    trial = next(p for p in sweep.iterdir() if p.is_dir() and p.name.startswith("run_trial"))
    (trial / "error.pkl").write_bytes(b"")  # a failed trial's error, as Tune places it ...
    signing.sign(trial / "error.pkl")  # ... and mdsearch signs it (SignErrors)
    targets = [sweep / "tuner.pkl", *sweep.glob("search_gen_state-*.json"),
               *sweep.glob("experiment_state-*.json"), trial / "error.pkl"]
    for target in targets:
        original = target.read_bytes()
        target.write_bytes(pickle.dumps(Payload()))
        before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file() and p.name != ".lock"}
        again = subprocess.run(sweep_cmd(space_file, recipe_file, storage, "--resume"),
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 2, again.stderr[-2000:]
        assert "Traceback" not in again.stderr
        assert f"{target}: " in again.stderr and "--trust-state" in again.stderr
        assert not (tmp_path / "pwned").exists()
        after = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file() and p.name != ".lock"}
        assert after == before
        target.write_bytes(original)
    (trial / "error.pkl").unlink()

    # an unsigned folder (made before signing, or with another key) resumes once the user vouches
    for p in sweep.rglob("*.sig"):
        p.unlink()
    refused = subprocess.run(sweep_cmd(space_file, recipe_file, storage, "--resume"),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "has no signature" in refused.stderr
    trusted = subprocess.run(sweep_cmd(space_file, recipe_file, storage, "--resume",
                                        "--trust-state"), capture_output=True, text=True,
                             timeout=600)
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    signing.check(sweep)
    assert len(trained(pd.read_csv(sweep / "results.csv"))) == 2


def test_a_configuration_filtered_twice_is_one_row_and_trials_count_in_start_order(tmp_path):
    from types import SimpleNamespace

    from mdsearch.rundir import FILTERED
    from mdsearch.search.callbacks import started_number
    from mdsearch.search.searchers import BudgetedSearch

    space = load_space(write(tmp_path / "space.yaml", SWEEP_SPACE))
    over, fits = {"inner_channels": 1280, "inner_layers": 1}, {"inner_channels": 512,
                                                               "inner_layers": 1}

    class Inner:  # a sampler that repeats itself, as Optuna does on small spaces
        queue, failed = [over, over, fits], 0

        def suggest(self, trial_id):
            return dict(self.queue.pop(0))

        def on_trial_complete(self, trial_id, result=None, error=False):
            Inner.failed += error

    lines = []
    search = BudgetedSearch(Inner(), space, tmp_path, "fid_proxy", "min", progress=lines.append)
    assert search.suggest("t1") == {**fits, "seed": 0}
    assert Inner.failed == 2  # the searcher hears of both suggestions
    assert len(search.filtered) == 1 and len((tmp_path / FILTERED).read_text().splitlines()) == 1
    assert sum(line.startswith("filtered") for line in lines) == 1

    # Tune creates trials before they start: two starting together are 1 and 2, not 2 and 2
    trials = [SimpleNamespace(status=s) for s in ("PENDING", "PENDING", "PENDING")]
    assert started_number(trials[0], trials) == 1
    trials[0].status = "RUNNING"
    assert started_number(trials[1], trials) == 2
    trials[1].status, trials[0].status = "RUNNING", "TERMINATED"
    assert started_number(trials[2], trials) == 3


def test_latest_links_to_the_sweep_started_last(tmp_path):
    from mdsearch.search.sweep import link_latest

    for name in ("qs-1", "qs-2"):
        (tmp_path / name).mkdir()
        link_latest(tmp_path, name)
        assert (tmp_path / "latest").resolve() == (tmp_path / name).resolve()
    assert (tmp_path / "latest").readlink().name == "qs-2"  # relative: moves with the folder
    link_latest(tmp_path, "latest")  # a sweep named latest is never replaced by its own link
    assert (tmp_path / "latest").is_symlink()
