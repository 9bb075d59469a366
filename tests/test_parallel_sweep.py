"""Data-parallel sweep trials (a recipe's `workers: N`): each trial trains on N processes placed
together, across the nodes of a Ray cluster, and its rows equal one process's training of the
same configuration and seed; a killed driver resumes to every trial exactly once."""

import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mdsearch.arch.spec import ArchSpec
from mdsearch.rundir import read_results
from mdsearch.search.space import load_space
from mdsearch.search.sweep import run_sweep
from mdsearch.train.recipe import Recipe
from mdsearch.train.trainer import train_trial

from helpers import SWEEP_RECIPE, SWEEP_SPACE, sweep_cmd, trained, write


def one_process(row: pd.Series, out: Path):
    """The trial's configuration and seed (its folder's spec.yaml and recipe.yaml), trained in
    one process."""
    folder = Path(row["path"])
    assert row["workers"] == 2  # it did train on two processes
    spec = ArchSpec.from_file(folder / "spec.yaml")
    recipe = Recipe.from_dict(yaml.safe_load((folder / "recipe.yaml").read_text()), "trial")
    assert recipe.workers == 2
    return train_trial(spec, recipe.override({"workers": 1}), out)


def assert_equal_to_one_process(row: pd.Series, one) -> None:
    """Within the tolerance of the two-worker `mdsearch train` test (tests/test_full.py)."""
    last = one.history[-1]
    assert row["steps"] == one.steps
    assert row["loss"] == pytest.approx(last["loss"], rel=1e-5)
    assert row["val_loss"] == pytest.approx(last["val_loss"], rel=1e-4)
    assert row["fid_proxy"] == pytest.approx(last["fid_proxy"], rel=1e-3)


@pytest.mark.ray
@pytest.mark.chaos
def test_two_worker_trials_on_a_two_node_cluster_equal_one_process_and_survive_a_kill(tmp_path):
    """3 trials x 2 workers on a head and a worker node of one CPU each, so that every trial's
    two workers sit on different nodes; the driver is SIGKILLed during the second trial."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        space_file = write(tmp_path / "space.yaml", {**SWEEP_SPACE, "search": {
            "algorithm": "random", "num_samples": 3, "seed": 0}})
        recipe_file = write(tmp_path / "recipe.yaml", {
            **SWEEP_RECIPE, "steps": 30, "checkpoint_every": 10, "workers": 2,
            "eval": {**SWEEP_RECIPE["eval"], "every": 10}})
        cmd = sweep_cmd(space_file, recipe_file, tmp_path, "--address", cluster.address)
        log = tmp_path / "first.log"
        with open(log, "w") as err:
            driver = subprocess.Popen(cmd, stderr=err, stdout=subprocess.DEVNULL)
        deadline = time.time() + 420
        while " start (2/3)" not in log.read_text():
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the second trial did not start in time"
            time.sleep(0.5)
        time.sleep(8)  # into the second trial's training
        assert driver.poll() is None, "the sweep ended before it could be killed"
        driver.send_signal(signal.SIGKILL)
        driver.wait()
        first = log.read_text()
        finished_before = {line.split()[2] for line in first.splitlines()
                           if line.endswith("finished")}
        assert finished_before  # the kill came after a whole trial

        resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=900)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        started_again = {line.split()[2] for line in resumed.stderr.splitlines()
                         if " start (" in line}
        assert not finished_before & started_again
        table = read_results(tmp_path / "killed")
        done = trained(table)
        assert len(done) == 3 and done["trial_id"].is_unique, table
        assert (done["status"] == "completed").all() and (done["steps"] == 30).all()
    finally:
        cluster.shutdown()
    for _, row in done.iterrows():  # each row: one process's training of its point and seed
        assert_equal_to_one_process(row, one_process(row, tmp_path / "one" / row["trial_id"]))


@pytest.mark.ray
def test_seeds_stacked_inside_a_two_worker_trial_equal_one_process(tmp_path):
    """seeds_per_trial with workers: every worker trains its slice of each seed's batch."""
    write(tmp_path / "recipe.yaml", {**SWEEP_RECIPE, "workers": 2})
    write(tmp_path / "space.yaml", {**SWEEP_SPACE, "objectives": [{"val_loss": "min"}],
                                    "seeds_per_trial": 2,
                                    "search": {"algorithm": "random", "num_samples": 1,
                                               "seed": 0}})
    run_sweep(load_space(tmp_path / "space.yaml"), tmp_path / "recipe.yaml", name="seeds",
              storage=tmp_path, mlflow=False)
    row = trained(read_results(tmp_path / "seeds")).iloc[0]
    assert row["status"] == "completed" and row["seeds_measured"] == 2
    one = one_process(row, tmp_path / "one")
    assert one.seeds == [0, 1]
    assert_equal_to_one_process(row, one)
    for k in range(2):
        assert row[f"val_loss_s{k}"] == pytest.approx(one.history[-1][f"val_loss_s{k}"],
                                                      rel=1e-4)


def test_a_dimension_may_not_change_how_trials_are_laid_out(tmp_path):
    """Tune reserves one trial shape for the whole sweep: workers and resources are refused as
    dimensions, in one line naming the space file and the dimension."""
    from mdsearch.search.space import SpaceError, check_recipe_fields

    write(tmp_path / "space.yaml", {**SWEEP_SPACE, "dimensions": {
        "w": {"field": "recipe.workers", "values": [1, 2]}}})
    recipe = Recipe.from_dict({**SWEEP_RECIPE, "name": "r"}, "r")
    with pytest.raises(SpaceError, match=r"space\.yaml: dimensions\.w: recipe\.workers is how a "
                                         "trial is laid out"):
        check_recipe_fields(load_space(tmp_path / "space.yaml"), recipe)


@pytest.mark.ray
@pytest.mark.chaos
def test_a_worker_that_dies_fails_its_trial_naming_it_instead_of_hanging(tmp_path):
    """Rank 1 is SIGKILLed right after joining the process group: rank 0's first collective
    fails, the trial ends as failed with the dead rank named, and the sweep finishes. (A sweep
    process of its own: its Ray's workers must see the fault switch, which a Ray left running by
    an earlier test in this process would not.)"""
    import os

    space_file = write(tmp_path / "space.yaml", {**SWEEP_SPACE, "search": {
        "algorithm": "random", "num_samples": 1, "seed": 0}})
    recipe_file = write(tmp_path / "recipe.yaml", {**SWEEP_RECIPE, "workers": 2})
    env = {**os.environ, "MDSEARCH_FAULT_KILL": "data-parallel-rank-1"}
    done = subprocess.run(sweep_cmd(space_file, recipe_file, tmp_path), env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    row = trained(read_results(tmp_path / "killed")).iloc[0]
    assert row["status"] == "failed", row
    assert "data-parallel rank 1 of 2 failed" in row["stop_reason"], row["stop_reason"]
