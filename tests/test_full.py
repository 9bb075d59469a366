"""Full training: stages (progressive resolution, the relu fine-tune), exact resume across stages,
and data-parallel training through Ray Train with two CPU workers."""

import pytest
import torch

from mdsearch.arch import presets
from mdsearch.arch.blocks import Attention
from mdsearch.arch.spec import ArchSpec
from mdsearch.train.recipe import Recipe, RecipeError, load_recipe
from mdsearch.cli import stage_summary
from mdsearch.rundir import CHECKPOINT
from mdsearch.train.trainer import Training, train_trial

from helpers import TINY, ImageStats, weights

STAGED = {**TINY, "resolution": 8, "batch_size": 4, "checkpoint_every": 2, "eval": {
    **TINY["eval"], "every": 100}, "stages": [
    {"name": "low", "steps": 3, "resolution": 8, "batch_size": 4},
    {"name": "high", "steps": 2, "resolution": 16, "batch_size": 2},
    {"name": "relu", "steps": 2, "attn_nonlinearity": "relu"},
]}
STAGED.pop("steps")


def staged(**overrides) -> Recipe:
    recipe = Recipe.from_dict(STAGED, "staged")
    return recipe.override(overrides) if overrides else recipe


def test_paper_schedule_is_data():
    full = load_recipe("full")
    plan = full.plan()
    assert [(s.name, s.end - s.start, s.resolution, s.batch_size) for s in plan[:2]] == [
        ("256px", 750_000, 256, 4096), ("512px", 250_000, 512, 2048)]
    assert plan[2].attn_nonlinearity == "relu" and plan[2].end - plan[2].start == 10_000
    assert full.steps == 1_010_000 and full.optimizer.lr == 1e-3
    cpu = load_recipe("full_cpu")
    assert [s.attn_nonlinearity for s in cpu.plan()] == [None, None, "relu"]
    assert cpu.plan()[0].resolution < cpu.plan()[1].resolution  # progressive, like full


def test_stages_are_checked_and_steps_follow_them():
    recipe = staged()
    assert recipe.steps == 7 and [s.start for s in recipe.plan()] == [0, 3, 5]
    assert recipe.plan()[2].resolution == 8  # unset: the recipe's own
    assert recipe.override({"stages.0.steps": 10}).steps == 14
    with pytest.raises(RecipeError, match="field steps: 5 is not the sum of the stages"):
        recipe.override({"steps": 5})
    with pytest.raises(RecipeError, match="stages.2.attn_nonlinearity.*'tanh'"):
        recipe.override({"stages.2.attn_nonlinearity": "tanh"})
    with pytest.raises(RecipeError, match=r"batch_size: 2 does not split over 4 workers"):
        recipe.override({"workers": 4})
    with pytest.raises(RecipeError, match="'low' is used by more than one stage"):
        recipe.override({"stages.1.name": "low"})


def test_stages_switch_resolution_and_attention_and_report_before_and_after(tmp_path):
    result = train_trial(presets.get("md"), staged(), tmp_path, evaluator=ImageStats())
    assert result.status == "ok" and result.steps == 7
    stages = [(r["stage"], r["step"], r["resolution"], r.get("event")) for r in result.history]
    # every stage ends with an evaluation; the relu stage also starts with one, before tuning
    assert stages == [("low", 3, 8, None), ("high", 5, 16, None), ("relu", 5, 8, "switch"),
                      ("relu", 7, 8, None)]
    assert (tmp_path / "samples_000005_switch.png").is_file()  # beside, not over, step 5's grid
    assert (tmp_path / "samples_000005.png").is_file()
    table = stage_summary(result.history)
    assert "relu (switched, not yet fine-tuned) | 5" in table and "\nrelu | 7" in table
    # the weights on disk are relu weights, and their spec says so
    assert ArchSpec.from_file(tmp_path / "proxy_spec.yaml").attn_nonlinearity == "relu"
    assert ArchSpec.from_file(tmp_path / "spec.yaml").attn_nonlinearity == "relu"
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["attn_nonlinearity"] == "relu"
    # the same weights under softmax and under relu give different samples: the switch is real
    before, switched = result.history[1], result.history[2]
    assert before["sample_std"] != switched["sample_std"]


class Killed(Exception):
    pass


def kill_after_checkpoint(at: int):
    def hook(step, path):
        if step == at:
            raise Killed  # as if the process died right after writing this checkpoint
    return hook


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    mp = pytest.MonkeyPatch()
    mp.setenv("MDSEARCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    result = train_trial(presets.get("md"), staged(), out, evaluator=ImageStats())
    mp.undo()
    return result, out


@pytest.mark.slow
@pytest.mark.parametrize("stop", [2, 6])  # mid-stage (between evaluations), mid-relu
def test_resume_across_stages_equals_an_uninterrupted_run(tmp_path, uninterrupted, stop):
    full, full_dir = uninterrupted
    with pytest.raises(Killed):
        train_trial(presets.get("md"), staged(), tmp_path / "part", evaluator=ImageStats(),
                    on_checkpoint=kill_after_checkpoint(stop))
    assert torch.load(tmp_path / "part" / CHECKPOINT, weights_only=True)["step"] == stop
    resumed = train_trial(presets.get("md"), staged(), tmp_path / "part", evaluator=ImageStats())
    assert resumed.history == full.history
    wf, wr = weights(full_dir), weights(tmp_path / "part")
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


def test_resumed_run_restores_the_stage_attention(tmp_path):
    with pytest.raises(Killed):
        train_trial(presets.get("md"), staged(), tmp_path, evaluator=ImageStats(),
                    on_checkpoint=kill_after_checkpoint(6))
    run = Training(presets.get("md"), staged(), tmp_path, evaluator=ImageStats())
    run.run()
    assert {m.nonlinearity for m in run.model.modules() if isinstance(m, Attention)} == {"relu"}


@pytest.mark.ray
def test_two_ray_train_workers_continue_a_run_as_one_process_would(tmp_path):
    """Resume a single-process run on two Ray Train workers (gloo, 127.0.0.1): each trains on
    half of every batch, in two accumulated micro-batches, DDP averages the gradients (once, in
    the last micro-batch), and the run ends where one process does."""
    from mdsearch.train.distributed import train_distributed

    recipe = Recipe.from_dict({**TINY, "resources": {"cpu": 1}}, "tiny")
    whole = train_trial(presets.get("md"), recipe, tmp_path / "one")
    train_trial(presets.get("md"), recipe, tmp_path / "two", steps=3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train_distributed(presets.get("md"), recipe.override({"accumulate": 2}),
                               tmp_path / "two", workers=2,
                               mlflow={"experiment": "dp", "run_name": "two",
                                       "tracking_uri": uri})
    assert result.status == "ok" and result.steps == 6 and result.workers == 2
    assert [r["step"] for r in result.history] == [3, 6]
    one, two = whole.history[-1], result.history[-1]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["fid_proxy"] == pytest.approx(one["fid_proxy"], rel=1e-3)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-3
    # rank 0 logged the run to MLflow, once
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("dp").experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["fid_proxy"] == pytest.approx(two["fid_proxy"])
    # Ray Train keeps its own copy of the last checkpoint, for restarts
    assert list((tmp_path / "two" / "ray").rglob(CHECKPOINT))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's error")
def test_asking_for_a_gpu_that_is_not_there_is_a_clear_error(tmp_path):
    from mdsearch.train.distributed import train_distributed
    from mdsearch.train.trainer import TrainError

    with pytest.raises(TrainError, match="device: 'cuda', but torch sees no CUDA GPU"):
        train_trial(presets.get("md"), staged(device="cuda"), tmp_path, evaluator=ImageStats())
    with pytest.raises(TrainError, match="device cuda but resources.gpu is 0"):
        train_distributed(presets.get("md"), staged(device="cuda"), tmp_path, workers=2)


def test_every_recipe_in_trials_loads_as_what_its_kind_says():
    """A recipe named in README (laptop, ufogen_laptop, full_cpu, ...) is refused at its first
    use if it no longer validates; every file in trials/ is checked here instead."""
    from mdsearch.paths import TRIALS
    from mdsearch.train.ufogen import UFOGenRecipe, load_any_recipe
    from mdsearch.train.vae import VAERecipe

    kinds = {p.stem: type(load_any_recipe(p.stem)) for p in TRIALS.glob("*.yaml")}
    assert kinds["laptop"] is kinds["full_cpu"] is kinds["cpu_quick"]
    assert kinds["ufogen_laptop"] is UFOGenRecipe and kinds["vae_cpu"] is VAERecipe
    laptop = load_recipe("laptop")
    assert laptop.steps == sum(s.end - s.start for s in laptop.plan())
