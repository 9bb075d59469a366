"""Batched training seeds (recipe `seeds: K`, mdsearch.arch.seeds.SeedStack): a seed inside a
stack is the same experiment as that seed alone, a stack resumes bit for bit, and one diverging
seed stops alone."""

import json

import pytest
import torch

from mdsearch.arch import presets
from mdsearch.arch.seeds import SeedStack
from mdsearch.arch.unet import build
from mdsearch.cli import main
from mdsearch.rundir import CHECKPOINT, RESULT
from mdsearch.train.trainer import TrainError, train_trial

from helpers import ATOL, RTOL, ImageStats, tiny_recipe

# A seed in a stack and alone differ only by the order in which batched kernels sum: after 20
# steps of AdamW, losses and held-out metrics agree to 2e-4 relative (measured: ~1e-5).
HELDOUT = ("val_loss", "val_loss_low", "val_loss_mid", "val_loss_high", "text_gain")


def recipe(**changes):
    return tiny_recipe(**{"steps": 20, "eval.every": 10, "checkpoint_every": 10,
                          "eval.bank": 24, **changes})


@pytest.mark.parametrize("knobs", [{}, {"attn_nonlinearity": "relu", "kv_share": True,
                                        "levels.0.conv": "separable"}])
def test_a_stack_computes_what_each_seed_alone_computes(tiny_spec, knobs):
    spec = tiny_spec("md", **knobs)
    stack = SeedStack.build(spec, [0, 1, 2])
    x = torch.randn(3, 2, spec.latent_channels, 16, 16)
    t, c = torch.randint(0, 1000, (3, 2)), torch.randn(3, 2, spec.context_len, spec.context_dim)
    out = stack(x, t, c)
    for k in range(3):
        torch.manual_seed(k)
        alone = build(spec)
        torch.testing.assert_close(out[k], alone(x[k], t[k], c[k]), rtol=1e-4, atol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(stack.unet(k).state_dict().values(),
                                                     alone.state_dict().values()))


@pytest.mark.slow
def test_a_seed_in_a_batch_is_that_seed_alone_after_20_steps(tmp_path):
    md = presets.get("md")
    stacked = train_trial(md, recipe(seeds=3, seed=5), tmp_path / "stack", evaluator=ImageStats())
    assert stacked.status == "ok" and stacked.seeds == [5, 6, 7]
    last = stacked.history[-1]
    assert last["seeds_measured"] == 3 and last["sampled_seed"] == 5
    for k, seed in enumerate([5, 6, 7]):
        alone = train_trial(md, recipe(seed=seed), tmp_path / f"s{seed}", evaluator=ImageStats())
        for name in HELDOUT:
            assert last[f"{name}_s{k}"] == pytest.approx(alone.history[-1][name], rel=RTOL,
                                                         abs=ATOL), (seed, name)
        if k == 0:  # the sampled metrics come from the first seed
            for name in ("sample_mean", "sample_std"):
                assert last[name] == pytest.approx(alone.history[-1][name], rel=1e-3, abs=1e-5)
    values = [last[f"val_loss_s{k}"] for k in range(3)]
    assert last["val_loss"] == pytest.approx(sum(values) / 3)
    std = torch.tensor(values, dtype=torch.float64).std().item()
    assert last["val_loss_std"] == pytest.approx(std) and last["val_loss_se"] == pytest.approx(
        std / 3 ** 0.5)


def test_losses_of_a_stack_match_solo_losses_step_by_step(tmp_path):
    """The training loss logged each step: the mean of the seeds' losses, each the solo one."""
    md = presets.get("md")
    r = recipe(steps=6, **{"eval.every": 6, "eval.bank": 0, "log_every": 1})
    stacked = train_trial(md, r.override({"seeds": 2}), tmp_path / "stack",
                          evaluator=ImageStats())
    solo = [train_trial(md, r.override({"seed": s}), tmp_path / f"s{s}", evaluator=ImageStats())
            for s in (0, 1)]
    mean = (solo[0].history[-1]["loss"] + solo[1].history[-1]["loss"]) / 2
    assert stacked.history[-1]["loss"] == pytest.approx(mean, rel=RTOL)


@pytest.mark.slow
def test_a_stack_resumes_bit_for_bit(tmp_path):
    md = presets.get("md")
    full = train_trial(md, recipe(seeds=2), tmp_path / "full", evaluator=ImageStats())
    part = train_trial(md, recipe(seeds=2), tmp_path / "part", steps=10, evaluator=ImageStats())
    assert part.steps == 10
    resumed = train_trial(md, recipe(seeds=2), tmp_path / "part", evaluator=ImageStats())
    assert resumed.history == full.history
    a = torch.load(tmp_path / "full" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "part" / CHECKPOINT, weights_only=True)
    assert a["seeds"] == [0, 1]
    for part_name in ("model", "ema"):
        assert all(torch.equal(a["stack"][part_name][k], b["stack"][part_name][k])
                   for k in a["stack"][part_name])
    # "model" holds the first seed as a plain UNet: every reader of a run loads it
    plain = build(presets.get("md")).state_dict().keys()
    assert set(a["model"]) == set(plain) or len(a["model"]) == len(plain)


@pytest.mark.slow
def test_resuming_with_other_seeds_is_one_clear_error(tmp_path):
    md = presets.get("md")
    train_trial(md, recipe(seeds=2), tmp_path / "run", steps=10, evaluator=ImageStats())
    with pytest.raises(TrainError, match=r"trained seeds \[0, 1\], the recipe asks for \[0, 1, 2\]"):
        train_trial(md, recipe(seeds=3), tmp_path / "run", evaluator=ImageStats())


@pytest.mark.slow
def test_one_diverging_seed_fails_alone(tmp_path, monkeypatch):
    """Seed 1's loss turns non-finite at step 4: it stops with its reason; seeds 0 and 2 train
    on, unchanged by it, and the run ends ok with their metrics."""
    from mdsearch.arch import seeds as seeds_module

    forward = seeds_module.SeedStack.forward
    calls = {"n": 0}

    def poisoned(self, latents, timesteps, context):
        out = forward(self, latents, timesteps, context)
        if self.training and self.count == 3:
            calls["n"] += 1
            if calls["n"] >= 4:
                out = out.clone()
                out[1] = float("nan")
        return out

    monkeypatch.setattr(seeds_module.SeedStack, "forward", poisoned)
    md = presets.get("md")
    run = train_trial(md, recipe(seeds=3), tmp_path / "stack", evaluator=ImageStats())
    assert run.status == "ok" and run.steps == 20
    assert run.seed_failures == {"1": "non-finite loss (nan) at step 4"}
    last = run.history[-1]
    assert last["seeds_measured"] == 2 and "val_loss_s1" not in last
    monkeypatch.setattr(seeds_module.SeedStack, "forward", forward)
    alone = train_trial(md, recipe(seed=2), tmp_path / "s2", evaluator=ImageStats())
    assert last["val_loss_s2"] == pytest.approx(alone.history[-1]["val_loss"], rel=RTOL, abs=ATOL)
    assert json.loads((tmp_path / "stack" / RESULT).read_text())["seed_failures"] == {
        "1": "non-finite loss (nan) at step 4"}


def test_every_seed_diverging_fails_the_run(tmp_path):
    run = train_trial(presets.get("md"), recipe(seeds=2, **{"optimizer.lr": 1e30}),
                      tmp_path / "x", evaluator=ImageStats())
    assert run.status == "failed" and run.reason.startswith("every seed failed: seed 0: non-finite")


def test_cli_train_seeds(tmp_path, capsys):
    recipe_file = tmp_path / "r.yaml"
    import yaml

    recipe_file.write_text(yaml.safe_dump(recipe(steps=4, **{"eval.every": 4}).to_dict()))
    main(["train", "--preset", "md", "--trial", str(recipe_file), "--out", str(tmp_path / "r"),
          "--seeds", "2", "--no-mlflow", "--json"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["seeds"] == [0, 1] and "val_loss_se" in result["metrics"]
    with pytest.raises(SystemExit) as err:
        main(["train", "--preset", "md", "--trial", str(recipe_file), "--out",
              str(tmp_path / "z"), "--seeds", "0", "--no-mlflow"])
    assert err.value.code == 2
