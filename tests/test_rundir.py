"""The run directory module: one reader and writer of results.csv, atomic writes, the status
vocabulary, the Pareto front, and the lock that keeps two processes off one directory."""

import time

import numpy as np
import pandas as pd
import pytest

from mdsearch.rundir import (COMPLETED, FAILED, NOT_RUN, RESULTS, STOPPED, RunDirBusy, RunDirError,
                             atomic_path, atomic_write, front, locked, numeric_column,
                             pareto_mask, read_results, trial_status, write_results)


def table(rows):
    return pd.DataFrame(rows, columns=["trial_id", "status", "gmacs", "q"])


def test_results_round_trip_keeps_hex_ids_as_strings(tmp_path):
    write_results(table([["6038e956", COMPLETED, 1.0, 0.5]]), tmp_path)
    back = read_results(tmp_path)
    assert back["trial_id"].tolist() == ["6038e956"]  # not 6038 x 10^956


def test_results_never_lose_a_row(tmp_path):
    write_results(table([["a", COMPLETED, 1.0, 0.5], ["b", COMPLETED, 2.0, 0.4]]), tmp_path)
    # a driver that saw only trial c (and a newer value of a) rewrites the table
    write_results(table([["a", STOPPED, 1.0, 0.6], ["c", COMPLETED, 3.0, 0.3]]), tmp_path)
    back = read_results(tmp_path).set_index("trial_id")
    assert sorted(back.index) == ["a", "b", "c"]
    assert back.loc["a", "status"] == STOPPED and back.loc["b", "q"] == 0.4


@pytest.mark.parametrize("content, message", [
    ("", "not a readable CSV table"),
    ("trial_id,status\na,completed\nb,completed,1,2,3\n", "not a readable CSV table"),
    ("a,b\n1,2\n", "no trial_id, status column"),
    (b"\x89PNG\x00\xff\xfe", "not a readable CSV table"),
])
def test_a_malformed_results_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / RESULTS
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(RunDirError, match=message):
        read_results(tmp_path)
    with pytest.raises(RunDirError, match="no results.csv here"):
        read_results(tmp_path / "elsewhere")


@pytest.mark.parametrize("content, message", [
    ("trial_id,status,params,q\na,completed,1e8,0.5\nb,comp", "line 3 has 2 fields, the header 4"),
    ("trial_id,status,params,q\na,completed,1e8,0.5\na,completed,1e8,0.5\n",
     "trial a appears twice \\(lines 2, 3\\)"),
    ("trial_id,status,params,q\na,completed,1e8,0.5\nb,completed,inf,0.4\n",
     "line 3: params inf is not a finite number"),
])
def test_rows_a_reader_would_miscount_are_refused_naming_the_line(tmp_path, content, message):
    """A results.csv cut mid-row, with a trial twice, or an infinite cost made report say
    "trained: 2" of 3 and fidelity count pairs that are not there."""
    (tmp_path / RESULTS).write_text(content)
    with pytest.raises(RunDirError, match=f"{RESULTS}: {message}"):
        read_results(tmp_path)


def test_trial_paths_are_stored_relative_and_read_inside_the_sweep(tmp_path):
    """results.csv names each trial's folder by its name; an absolute path (an older table, a
    moved sweep) or one crafted to leave the folder reads as the folder of that name here."""
    rows = pd.DataFrame({"trial_id": ["a", "b", "c"], "status": [COMPLETED] * 3,
                         "path": ["/old/place/sweep/run_trial_a", "run_trial_b", "../../etc"]})
    write_results(rows, tmp_path)
    assert pd.read_csv(tmp_path / RESULTS)["path"].tolist() == ["run_trial_a", "run_trial_b", "etc"]
    back = read_results(tmp_path)["path"].tolist()
    assert back == [str(tmp_path.resolve() / n) for n in ("run_trial_a", "run_trial_b", "etc")]


def test_a_metric_column_holding_text_is_named():
    t = table([["a", COMPLETED, 1.0, 0.5], ["b", COMPLETED, 2.0, "abc"]])
    with pytest.raises(RunDirError, match="column 'q' holds 'abc' \\(trial b\\)"):
        numeric_column(t, "q")


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "f.txt"
    atomic_write(target, "old")
    with pytest.raises(ZeroDivisionError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            1 / 0
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_status_vocabulary():
    assert trial_status(10, 10, False) == COMPLETED
    assert trial_status(4, 10, False) == STOPPED
    assert trial_status(0, 10, False) == NOT_RUN
    assert trial_status(10, 10, True) == FAILED


def test_front_respects_each_objectives_direction():
    t = table([["a", COMPLETED, 1.0, 0.1], ["b", COMPLETED, 2.0, 0.3], ["c", COMPLETED, 3.0, 0.2],
               ["d", STOPPED, 0.5, 0.9], ["e", COMPLETED, 4.0, np.nan]])
    got = front(t, [("gmacs", "min"), ("q", "max")])
    assert got["trial_id"].tolist() == ["a", "b"]  # c is dominated by b; d not completed
    assert pareto_mask([[1, 1], [1, 1], [2, 2]]).tolist() == [True, True, False]


def test_a_second_process_on_a_locked_directory_fails_naming_the_holder(tmp_path, lock_holder):
    holder = lock_holder(tmp_path, "sweep held")
    with pytest.raises(RunDirBusy, match=f"in use by pid {holder.pid} .*sweep held"):
        with locked(tmp_path, "second"):
            pass
    holder.kill()
    holder.wait()
    deadline = time.time() + 10
    while True:  # the kernel drops a dead process's lock: no stale lock after a kill
        try:
            with locked(tmp_path, "after the holder died"):
                break
        except RunDirBusy:
            assert time.time() < deadline
            time.sleep(0.1)


def test_required_columns_are_named(tmp_path):
    write_results(table([["a", COMPLETED, 1.0, 0.5]]), tmp_path)
    with pytest.raises(RunDirError, match="lacks the column\\(s\\) params, steps"):
        read_results(tmp_path, required=("params", "gmacs", "steps"))


def test_a_sweep_whose_every_trial_failed_says_so(tmp_path):
    """Failed trials report no costs or metrics: the table then lacks those columns, and a
    reader says that nothing finished (and why), not that a column is missing."""
    pd.DataFrame([["a", FAILED, "ValueError: boom"], ["b", FAILED, "non-finite loss"]],
                 columns=["trial_id", "status", "stop_reason"]).to_csv(tmp_path / RESULTS,
                                                                       index=False)
    with pytest.raises(RunDirError, match="no trial of this sweep finished \\(2 failed, 0 other; "
                                          "the first: ValueError: boom\\)"):
        read_results(tmp_path, required=("params", "gmacs"))


def test_temporary_files_stay_out_of_the_folder_being_written(tmp_path):
    """Ray Tune copies a sweep's trial folders while trials write: a temporary file that
    vanishes mid-copy made it fail. atomic_path keeps the temporary file in the system temp
    folder (same filesystem here, so the rename stays atomic)."""
    target = tmp_path / "trial" / "checkpoint.pt"
    target.parent.mkdir()
    with atomic_path(target) as tmp:
        tmp.write_text("new")
        assert tmp.parent != target.parent and list(target.parent.iterdir()) == []
    assert target.read_text() == "new" and not tmp.exists()


def test_tunes_copy_of_a_trials_checkpoint_becomes_a_link_to_it(tmp_path):
    from mdsearch.rundir import CHECKPOINT, link_duplicate_checkpoints

    trial = tmp_path / "run_trial_1"
    (trial / "checkpoint_000003").mkdir(parents=True)
    (trial / CHECKPOINT).write_bytes(b"weights" * 1000)
    (trial / "checkpoint_000003" / CHECKPOINT).write_bytes(b"weights" * 1000)
    other = tmp_path / "run_trial_2"
    (other / "checkpoint_000001").mkdir(parents=True)
    (other / CHECKPOINT).write_bytes(b"newer steps")  # the driver died before reporting them
    (other / "checkpoint_000001" / CHECKPOINT).write_bytes(b"older")
    assert link_duplicate_checkpoints(tmp_path) == 7000
    assert (trial / "checkpoint_000003" / CHECKPOINT).samefile(trial / CHECKPOINT)
    assert (other / "checkpoint_000001" / CHECKPOINT).read_bytes() == b"older"  # kept as it was
    assert link_duplicate_checkpoints(tmp_path) == 0  # already one file
    (trial / CHECKPOINT).unlink()  # either path can go; the other keeps the bytes
    assert (trial / "checkpoint_000003" / CHECKPOINT).read_bytes() == b"weights" * 1000
