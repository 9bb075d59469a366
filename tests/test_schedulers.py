"""The paper's stopping rule, as a decision on reported results (no Ray cluster needed)."""

import json

import pytest
from ray.tune.schedulers import TrialScheduler

from mdsearch.rundir import FILTERED, RESULTS, STOP_STATE, STOP_STATE_V1, RunDirError
from mdsearch.search.schedulers import PaperStopRule

STOP, GO = TrialScheduler.STOP, TrialScheduler.CONTINUE


def test_stops_a_trial_worse_than_the_best_at_the_same_step_by_the_margin():
    rule = PaperStopRule({"fid_proxy": "min"}, margin=0.1)
    assert rule.judge("a", {"step": 60, "fid_proxy": 1000.0}) == GO  # nobody to compare with
    assert rule.judge("b", {"step": 60, "fid_proxy": 1090.0}) == GO  # within 10%
    assert rule.judge("c", {"step": 60, "fid_proxy": 1150.0}) == STOP
    assert "step 60" in rule.reasons["c"] and "fid_proxy 1150 vs best 1000 (a)" in rule.reasons["c"]
    # judged against the same step only: a later, better step of another trial does not count
    assert rule.judge("a", {"step": 120, "fid_proxy": 500.0}) == GO
    assert rule.judge("d", {"step": 60, "fid_proxy": 1050.0}) == GO


def test_every_watched_metric_must_trail_and_modes_are_respected():
    rule = PaperStopRule({"fid_proxy": "min", "align": "max"}, margin=0.1)
    rule.judge("a", {"step": 1, "fid_proxy": 100.0, "align": 0.5})
    assert rule.judge("b", {"step": 1, "fid_proxy": 200.0, "align": 0.6}) == GO  # aligns better
    assert rule.judge("c", {"step": 1, "fid_proxy": 200.0, "align": 0.4}) == STOP


def test_grace_and_min_peers_delay_judgement():
    rule = PaperStopRule({"fid_proxy": "min"}, margin=0.0, grace=2, min_peers=2)
    rule.judge("a", {"step": 1, "fid_proxy": 1.0})
    rule.judge("b", {"step": 1, "fid_proxy": 1.0})
    assert rule.judge("c", {"step": 1, "fid_proxy": 9.0}) == GO  # first evaluation: grace
    rule.judge("a", {"step": 2, "fid_proxy": 1.0})
    assert rule.judge("c", {"step": 2, "fid_proxy": 9.0}) == GO  # one peer at step 2
    rule.judge("b", {"step": 2, "fid_proxy": 1.0})
    assert rule.judge("c", {"step": 2, "fid_proxy": 9.0}) == STOP


def test_missing_or_non_finite_metrics_never_stop():
    rule = PaperStopRule({"fid_proxy": "min"})
    rule.judge("a", {"step": 1, "fid_proxy": 1.0})
    assert rule.judge("b", {"step": 1, "fid_proxy": float("nan")}) == GO
    assert rule.judge("b", {"step": 1}) == GO


def test_state_survives_a_new_scheduler_object(tmp_path):
    state = tmp_path / STOP_STATE
    first = PaperStopRule({"fid_proxy": "min"}, state_file=state)
    first.judge("a", {"step": 1, "fid_proxy": 1.0})
    first.judge("b", {"step": 1, "fid_proxy": 5.0})
    again = PaperStopRule({"fid_proxy": "min"}, state_file=state)  # as after --resume
    assert again.reasons == first.reasons and "b" in again.reasons
    assert again.judge("c", {"step": 1, "fid_proxy": 5.0}) == STOP  # a's value is remembered


def test_a_step_reported_again_after_a_resume_counts_once():
    rule = PaperStopRule({"fid_proxy": "min"}, grace=2)
    rule.judge("a", {"step": 1, "fid_proxy": 1.0})
    rule.judge("b", {"step": 1, "fid_proxy": 9.0})
    # b resumes from a checkpoint before step 1 and reports step 1 again: still its first
    # evaluation, so grace=2 keeps it running
    assert rule.judge("b", {"step": 1, "fid_proxy": 9.0}) == GO
    rule.judge("a", {"step": 2, "fid_proxy": 1.0})
    assert rule.judge("b", {"step": 2, "fid_proxy": 9.0}) == STOP


def test_the_judgement_log_survives_a_torn_last_line_and_refuses_a_damaged_one(tmp_path):
    state = tmp_path / STOP_STATE
    first = PaperStopRule({"fid_proxy": "min"}, state_file=state)
    first.judge("a", {"step": 1, "fid_proxy": 1.0})
    first.judge("b", {"step": 1, "fid_proxy": 5.0})
    with open(state, "a") as f:
        f.write('{"trial": "c", "st')  # killed while appending
    again = PaperStopRule({"fid_proxy": "min"}, state_file=state)
    assert again.reasons == first.reasons and again.seen == first.seen
    state.write_text('{"trial": \n' + state.read_text())
    with pytest.raises(RunDirError, match=f"{state}: line 1 is not JSON"):
        PaperStopRule({"fid_proxy": "min"}, state_file=state)


def test_ray_tune_snapshots_after_a_resume_keep_what_mdsearch_wrote(tmp_path, monkeypatch):
    """On --resume Tune copies the sweep directory's top-level .json and .pkl files into its
    staging folder and uploads that copy over the original at every snapshot: a file of ours
    with such a name would go back to its contents at the resume."""
    from ray.train._internal import storage
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    ours = [STOP_STATE, FILTERED, RESULTS]  # written by mdsearch while Tune runs
    for name in ours + ["stop_rule.json"]:  # the stop rule's old name
        (sweep / name).write_text("at the resume")
    monkeypatch.setattr(storage, "_get_ray_train_session_dir", lambda: str(tmp_path / "ray"))
    context = storage.StorageContext(storage_path=str(tmp_path), experiment_dir_name="sweep")
    manager = _ExperimentCheckpointManager(storage=context, checkpoint_period=0)
    manager.sync_down_experiment_state()  # what Tuner.restore does
    for name in ours + ["stop_rule.json"]:
        (sweep / name).write_text("written after the resume")
    manager.sync_up_experiment_state(lambda: None, force=True, wait=True)  # a snapshot
    assert (sweep / "stop_rule.json").read_text() == "at the resume"  # what went wrong
    assert all((sweep / name).read_text() == "written after the resume" for name in ours)


def test_a_sweep_from_before_the_log_keeps_its_rule_state_on_resume(tmp_path):
    seen = {"60": {"a": {"fid_proxy": 1.0}, "b": {"fid_proxy": 5.0}},
            "120": {"a": {"fid_proxy": 0.5}}}
    reasons = {"b": "paper rule at step 60: worse than the best other candidate"}
    (tmp_path / STOP_STATE_V1).write_text(json.dumps(
        {"seen": seen, "evals": {"a": 2, "b": 1}, "reasons": reasons}))
    rule = PaperStopRule({"fid_proxy": "min"}, state_file=tmp_path / STOP_STATE)
    assert (rule.seen, rule.evals, rule.reasons) == (seen, {"a": 2, "b": 1}, reasons)
    assert (tmp_path / STOP_STATE).is_file()  # converted once; the old file is left as it was
    (tmp_path / STOP_STATE_V1).write_text("{")
    assert PaperStopRule({"fid_proxy": "min"}, state_file=tmp_path / STOP_STATE).seen == seen
    (tmp_path / STOP_STATE).unlink()  # a damaged old state, not yet converted: one clear error
    with pytest.raises(RunDirError, match=f"{tmp_path / STOP_STATE_V1}: the paper stop rule"):
        PaperStopRule({"fid_proxy": "min"}, state_file=tmp_path / STOP_STATE)
