"""UFOGen one-step fine-tuning: the recipe, LoRA as a no-op at start, the discriminator's logit,
exact resume, a diverging discriminator, and the CLI contract."""

import json

import pytest
import torch

from mdsearch.arch import presets
from mdsearch.arch.proxy import proxy_spec
from mdsearch.arch.unet import build
from mdsearch.cli import main
from mdsearch.rundir import CHECKPOINT, RESULT
from mdsearch.train.checkpoint import CheckpointError
from mdsearch.train.recipe import RecipeError
from mdsearch.train.trainer import train_trial
from mdsearch.train.ufogen import (Discriminator, LoRA, UFOGenRecipe, add_lora, merged_state,
                                   ufogen_trial)

from helpers import UFO, ImageStats, tiny_recipe, ufogen_recipe as recipe

@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A trained diffusion run (the tiny md proxy, 6 steps) to fine-tune from."""
    out = tmp_path_factory.mktemp("start") / "md"
    assert train_trial(presets.get("md"), tiny_recipe(), out, evaluator=ImageStats()).status == "ok"
    return out


def small_unet():
    spec = proxy_spec(presets.get("md"), 0.0625, 3, 384, 8)
    torch.manual_seed(0)
    return build(spec)


def inputs(batch=2):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 3, 16, 16, generator=g), torch.tensor([999, 10][:batch]),
            torch.randn(batch, 8, 384, generator=g))


def test_lora_starts_as_a_no_op_and_trains_only_adapters():
    base = small_unet()
    x, t, c = inputs()
    before = base(x, t, c)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    lora = add_lora(base, LoRA(rank=4, alpha=4, targets=["to_q", "to_v", "proj_in"]))
    assert torch.equal(lora(x, t, c), before)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    merged = merged_state(lora)
    assert merged.keys() == state.keys()
    assert all(torch.equal(merged[k], state[k]) for k in state)  # B = 0: merging adds nothing


def test_lora_merge_equals_the_adapted_model():
    model = add_lora(small_unet(), LoRA(rank=4, alpha=8, targets=["to_q", "to_out"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x, t, c = inputs()
    plain = small_unet()
    plain.load_state_dict(merged_state(model))
    assert torch.allclose(plain(x, t, c), model(x, t, c), atol=1e-5)


def test_lora_targets_that_match_nothing_are_a_recipe_error():
    with pytest.raises(RecipeError, match="lora.targets"):
        add_lora(small_unet(), LoRA(targets=["no_such_module"]))


def test_discriminator_gives_one_logit_per_sample():
    x, t, c = inputs(2)
    assert Discriminator(small_unet())(x, t, c).shape == (2,)


@pytest.mark.parametrize("field,value", [("reconstruction", "l1"), ("adapter", "qlora"),
                                         ("timesteps", [1000]), ("ema_distill_decay", 1.5),
                                         ("kind", "diffusion")])
def test_recipe_errors_name_the_field(field, value):
    with pytest.raises(RecipeError, match=f"field {field}"):
        recipe(**{field: value})


@pytest.mark.slow
def test_history_holds_the_start_in_one_step_and_ddim_then_the_one_step_model(start, tmp_path):
    result = ufogen_trial(start, recipe(), tmp_path / "ufo", evaluator=ImageStats())
    assert result.status == "ok" and result.steps == 4
    samplers = [(r["step"], r["sampler"]) for r in result.history]
    assert samplers == [(0, "ddim-2"), (0, "1-step"), (2, "1-step"), (4, "1-step")]
    state = torch.load(tmp_path / "ufo" / CHECKPOINT, weights_only=True)
    assert state["one_step"] and state["model"].keys() == small_unet().state_dict().keys()
    saved = json.loads((tmp_path / "ufo" / RESULT).read_text())
    assert saved["metrics"] == result.metrics


@pytest.mark.slow
@pytest.mark.parametrize("changes", [{}, {"reconstruction": "ema_distill", "adapter": "lora"}])
def test_resumed_fine_tune_equals_an_uninterrupted_one(start, tmp_path, changes):
    r = recipe(**changes)
    whole = ufogen_trial(start, r, tmp_path / "whole", evaluator=ImageStats())
    ufogen_trial(start, r, tmp_path / "split", steps=2, evaluator=ImageStats())
    resumed = ufogen_trial(start, r, tmp_path / "split", evaluator=ImageStats())
    assert resumed.history == whole.history
    a = torch.load(tmp_path / "whole" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "split" / CHECKPOINT, weights_only=True)
    for key in ("generator", "discriminator"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key])


def test_distill_teacher_stays_the_starting_model(start, tmp_path):
    from mdsearch.train.ufogen import UFOGen

    run = UFOGen(start, recipe(reconstruction="distill"), tmp_path / "d", evaluator=ImageStats())
    before = {k: v.clone() for k, v in run.teacher.state_dict().items()}
    run.run()
    assert all(torch.equal(before[k], v) for k, v in run.teacher.state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in run.G.state_dict().items())


def test_a_diverging_discriminator_fails_the_run_with_its_reason(start, tmp_path, monkeypatch):
    monkeypatch.setattr(Discriminator, "forward",
                        lambda self, x, t, c: torch.full((x.shape[0],), float("nan")))
    result = ufogen_trial(start, recipe(), tmp_path / "nan", evaluator=ImageStats())
    assert result.status == "failed" and "discriminator" in result.reason
    assert json.loads((tmp_path / "nan" / RESULT).read_text())["status"] == "failed"


def test_cli_ufogen_recipe_needs_init(tmp_path, capsys):
    assert main(["train", "--trial", "ufogen_cpu", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--init" in err and len(err.strip().splitlines()) == 1


def test_cli_init_needs_a_ufogen_recipe(start, tmp_path, capsys):
    assert main(["train", "--init", str(start), "--trial", "cpu_quick",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "kind: ufogen" in err and len(err.strip().splitlines()) == 1


def test_cli_init_from_a_damaged_checkpoint_is_one_line(tmp_path, capsys, monkeypatch):
    # a fresh MLflow store, as on a first run: MLflow's own set-up chatter must not show
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tmp_path / "run"
    run.mkdir()
    (run / CHECKPOINT).write_bytes(b"not a checkpoint")
    code = main(["train", "--init", str(run), "--trial", "ufogen_cpu",
                 "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 2 and str(run / CHECKPOINT) in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_one_step_run_exports_its_generator_and_says_it_is_one_step(start, tmp_path, capsys):
    run = tmp_path / "ufo"
    ufogen_trial(start, recipe(adapter="lora", steps=2), run, evaluator=ImageStats())
    assert main(["export", "--checkpoint", str(run), "--no-text-encoder",
                 "--out", str(tmp_path / "onnx"), "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["one_step"] is True and last["within_tolerance"]  # LoRA merged, ORT = PyTorch
    assert last["latent_size"] == 16  # the start's resolution, from the run's recipe.yaml
    # noise floors are a diffusion run's: a one-step run is refused in one line, not KeyError
    assert main(["reliability", str(run), "--redraws", "2"]) == 2
    assert "a ufogen run; noise floors are measured on diffusion" in capsys.readouterr().err


@pytest.mark.ray
def test_table5_space_sweeps_recipe_fields_of_fine_tunes_of_one_run(start, tmp_path):
    import yaml

    from mdsearch.analysis.report import build_report
    from mdsearch.search.space import SpaceError, load_space
    from mdsearch.search.sweep import SweepError, run_sweep

    recipe_file = tmp_path / "ufo.yaml"
    recipe_file.write_text(yaml.safe_dump({**UFO, "kind": "ufogen"}))
    space = {"name": "t5", "base": "init", "trial": str(recipe_file),
             "dimensions": {"reconstruction": {"field": "recipe.reconstruction",
                                               "values": ["diffusion", "distill"]},
                            "adapter": {"field": "recipe.adapter", "values": ["full"]}},
             "objectives": [{"fid_proxy": "min"}],
             "search": {"algorithm": "grid", "max_concurrent": 2}}
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space))
    with pytest.raises(SweepError, match="--init"):
        run_sweep(load_space(space_file), name="no_init", storage=tmp_path / "s", mlflow=False)
    bad = tmp_path / "bad.yaml"
    bad_dims = {**space["dimensions"], "reconstruction": {"field": "recipe.reconstruction",
                                                          "values": ["diffusion", "l1"]}}
    bad.write_text(yaml.safe_dump({**space, "dimensions": bad_dims}))
    with pytest.raises(SpaceError, match="dimensions.reconstruction: value 'l1'"):
        run_sweep(load_space(bad), name="bad", storage=tmp_path / "s", mlflow=False,
                  init=str(start))
    # a one-step generator is no start for UFOGen: refused before Ray starts, as train --init does
    one_step = tmp_path / "one_step"
    assert ufogen_trial(start, recipe(steps=2), one_step, evaluator=ImageStats()).status == "ok"
    with pytest.raises(CheckpointError, match="already a one-step"):
        run_sweep(load_space(space_file), name="from_one_step", storage=tmp_path / "s",
                  mlflow=False, init=str(one_step))
    assert not (tmp_path / "s" / "from_one_step" / "tuner.pkl").exists()
    result = run_sweep(load_space(space_file), name="t5", storage=tmp_path / "sweeps",
                       mlflow=False, init=str(start))
    table = result.table
    assert sorted(table["reconstruction"]) == ["diffusion", "distill"]
    assert (table["status"] == "completed").all() and table["fid_proxy"].notna().all()
    sweep = tmp_path / "sweeps" / "t5"
    trials = sorted(sweep.glob("run_trial_*"))
    assert len(trials) == 2
    for trial in trials:  # each trial fine-tuned with its own point's recipe
        ufo = yaml.safe_load((trial / "ufogen.yaml").read_text())
        assert f"reconstruction={ufo['reconstruction']}" in trial.name
    report = build_report(sweep)
    assert "Distill loss" in report.files["table5_md"].read_text()


@pytest.mark.slow
def test_bf16_autocast_fine_tune_runs_on_the_cpu(start, tmp_path):
    bf16 = ufogen_trial(start, recipe(precision="bf16", steps=2, eval={"every": 2, "prompts": 8}),
                        tmp_path / "bf16", evaluator=ImageStats())
    fp32 = ufogen_trial(start, recipe(steps=2, eval={"every": 2, "prompts": 8}),
                        tmp_path / "fp32", evaluator=ImageStats())
    assert bf16.status == "ok" and fp32.status == "ok"
    # the autocast is in effect: the fine-tuned weights differ from fp32's
    assert bf16.history[-1]["sample_std"] != fp32.history[-1]["sample_std"]


def test_evaluations_sample_the_one_step_model_with_every_asked_number_of_steps(start, tmp_path):
    result = ufogen_trial(start, recipe(steps=2, eval={"every": 2, "prompts": 8, "steps": [1, 3]}),
                          tmp_path / "steps", evaluator=ImageStats())
    samplers = [(r["step"], r["sampler"]) for r in result.history]
    assert samplers == [(0, "ddim-2"), (0, "1-step"), (2, "1-step"), (2, "ddim-3")]
    one_step = result.history[2]
    assert result.metrics == {k: v for k, v in one_step.items() if k not in ("step", "sampler")}
    with pytest.raises(RecipeError, match="eval.steps"):
        recipe(eval={"every": 2, "prompts": 8, "steps": [4]})


@pytest.mark.ray
def test_two_ray_train_workers_fine_tune_as_one_process_does(start, tmp_path):
    """Each worker takes half of every batch (its share of the losses) and the gradients of G and
    D are summed over the two before each step: the run ends where one process does."""
    from mdsearch.train.distributed import train_distributed

    r = recipe(resources={"cpu": 1}, steps=2)  # evaluations: the start's two, then step 2's
    one = ufogen_trial(start, r, tmp_path / "one")
    two = train_distributed(None, r, tmp_path / "two", workers=2, init=start)
    assert two.status == "ok" and two.steps == 2 and two.workers == 2
    assert [(h["step"], h["sampler"]) for h in two.history] == \
        [(h["step"], h["sampler"]) for h in one.history]
    assert two.metrics["fid_proxy"] == pytest.approx(one.metrics["fid_proxy"], rel=1e-3)
    a = torch.load(tmp_path / "one" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "two" / CHECKPOINT, weights_only=True)
    for key in ("generator", "discriminator"):
        assert max((a[key][k] - b[key][k]).abs().max().item() for k in a[key]) < 1e-3
    begun = torch.load(start / CHECKPOINT, weights_only=True)["ema"]
    moved = max((a["generator"][k] - begun[k]).abs().max().item() for k in a["generator"])
    assert moved > 1e-3  # (the comparison above is not of two untrained copies)
