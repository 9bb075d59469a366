"""The trial loop: determinism, exact resume, failure status, and the CLI contract."""

import json

import pytest
import torch

from mdsearch.arch import presets
from mdsearch.cli import main
from mdsearch.train.recipe import Recipe
from mdsearch.rundir import CHECKPOINT
from mdsearch.train.trainer import train_trial

from helpers import TINY, ImageStats, tiny_recipe, weights



@pytest.mark.slow
def test_same_seed_same_history_and_weights(tmp_path):
    a = train_trial(presets.get("md"), tiny_recipe(), tmp_path / "a", evaluator=ImageStats())
    b = train_trial(presets.get("md"), tiny_recipe(), tmp_path / "b", evaluator=ImageStats())
    assert a.status == "ok" and a.steps == 6 and len(a.history) == 2
    assert a.history == b.history
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train_trial(presets.get("md"), tiny_recipe(seed=1), tmp_path / "c", evaluator=ImageStats())
    assert c.history != a.history


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    full = train_trial(presets.get("md"), tiny_recipe(), tmp_path / "full", evaluator=ImageStats())
    part = train_trial(presets.get("md"), tiny_recipe(), tmp_path / "part", steps=3,
                       evaluator=ImageStats())
    assert part.steps == 3
    resumed = train_trial(presets.get("md"), tiny_recipe(), tmp_path / "part",
                          evaluator=ImageStats())
    assert resumed.steps == 6 and resumed.history == full.history
    wf, wr = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert all(torch.equal(wf[k], wr[k]) for k in wf)
    again = train_trial(presets.get("md"), tiny_recipe(), tmp_path / "part",
                        evaluator=ImageStats())  # a finished trial reports, trains nothing
    assert (again.steps, again.history, again.metrics) == (6, full.history, full.metrics)


@pytest.mark.slow
def test_accumulated_micro_batches_take_the_step_the_whole_batch_takes(tmp_path):
    whole = train_trial(presets.get("md"), tiny_recipe(), tmp_path / "whole",
                        evaluator=ImageStats())
    split = train_trial(presets.get("md"), tiny_recipe(accumulate=2), tmp_path / "split",
                        evaluator=ImageStats())
    assert [r["loss"] for r in split.history] == pytest.approx(
        [r["loss"] for r in whole.history], rel=1e-5)  # the same samples, noise and timesteps
    ww, ws = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert max((ww[k] - ws[k]).abs().max().item() for k in ww) < 1e-3  # summation order only
    # and a split run resumes bit for bit
    part = train_trial(presets.get("md"), tiny_recipe(accumulate=2), tmp_path / "part", steps=3,
                       evaluator=ImageStats())
    resumed = train_trial(presets.get("md"), tiny_recipe(accumulate=2), tmp_path / "part",
                          evaluator=ImageStats())
    assert part.steps == 3 and resumed.history == split.history
    wr = weights(tmp_path / "part")
    assert all(torch.equal(ws[k], wr[k]) for k in ws)


def test_diverging_trial_fails_with_reason_and_keeps_its_work(tmp_path):
    recipe = tiny_recipe(**{"optimizer.lr": 1e12, "optimizer.grad_clip": 0.0, "steps": 40,
                            "eval.every": 1000, "checkpoint_every": 1})
    result = train_trial(presets.get("md"), recipe, tmp_path, evaluator=ImageStats())
    assert result.status == "failed" and "non-finite loss" in result.reason
    assert 0 < result.steps < 40
    assert torch.load(tmp_path / CHECKPOINT, weights_only=True)["step"] == result.steps


def test_train_cli_json_contract(tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps(TINY))
    code = main(["train", "--preset", "md", "--trial", str(recipe), "--out", str(tmp_path / "run"),
                 "--steps", "3", "--json", "--no-mlflow"])
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["status"] == "ok" and result["steps"] == 3
    assert {"reason", "seconds", "params", "gmacs", "metrics", "history"} <= set(result)
    assert result["params"] == 390_449_480  # full-size md: costs never come from the proxy
    metrics = result["metrics"]
    assert {"fid_proxy", "align", "align_chance"} <= set(metrics) and "fid" not in metrics
    assert result["history"][-1]["step"] == 3 and "loss" in result["history"][-1]
    assert "step 3/3" in err  # progress is shown
    assert (tmp_path / "run" / "samples_000003.png").stat().st_size > 0


def test_trials_with_different_seeds_share_one_judge(monkeypatch):
    """Repeats over seeds must be scored by the same classifier, not one per seed."""
    from mdsearch.train import trainer

    seen = []
    monkeypatch.setattr("mdsearch.train.metrics.Evaluator",
                        lambda *args, **kwargs: seen.append(kwargs["seed"]))
    data = type("Data", (), {"reference_images": lambda self, n: None})()
    for seed in (0, 1, 7):
        trainer.make_evaluator(tiny_recipe(seed=seed), data)
    assert seen == [trainer.JUDGE_SEED] * 3


def test_checkpoint_describes_itself_and_old_runs_still_load(tmp_path):
    from mdsearch.rundir import PROXY_SPEC, RECIPE, SPEC
    from mdsearch.train.checkpoint import described, read_checkpoint
    from mdsearch.train.noise import load_run

    train_trial(presets.get("md"), tiny_recipe(), tmp_path, steps=3, evaluator=ImageStats())
    state = read_checkpoint(tmp_path)
    about = described(tmp_path / CHECKPOINT, state)
    assert {"spec", "proxy_spec", "recipe"} <= set(state)
    assert about["spec"] == presets.get("md") and about["recipe"]["name"] == "test"
    assert about["proxy_spec"].channels[0] < presets.get("md").channels[0]
    # the checkpoint alone is enough: the YAML copies may go ...
    for name in (SPEC, PROXY_SPEC, RECIPE):
        (tmp_path / name).unlink()
    assert load_run(tmp_path).step == 3
    # ... and a checkpoint from before it carried them loads from the YAML files beside it
    old = {k: v for k, v in state.items() if k not in ("spec", "proxy_spec", "recipe")}
    torch.save(old, tmp_path / CHECKPOINT)
    with pytest.raises(Exception, match="names no spec or recipe"):
        load_run(tmp_path)
    (tmp_path / SPEC).write_text(presets.get("md").to_yaml())
    (tmp_path / RECIPE).write_text(json.dumps(TINY))
    assert load_run(tmp_path).step == 3


def test_bad_out_directories_are_refused_in_one_line(tmp_path, capsys, monkeypatch):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps(TINY))
    args = ["train", "--preset", "md", "--trial", str(recipe), "--steps", "3", "--no-mlflow"]
    monkeypatch.chdir(tmp_path)
    assert main(args + ["--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err and not (tmp_path / "spec.yaml").exists()
    # a hand-edited spec.yaml is never overwritten by a run of another spec
    run = tmp_path / "run"
    run.mkdir()
    (run / "spec.yaml").write_text("# mine\nlevels: []\n")
    assert main(args + ["--out", str(run)]) == 2
    assert "holds another spec" in capsys.readouterr().err
    assert (run / "spec.yaml").read_text() == "# mine\nlevels: []\n"
    # a damaged checkpoint: which file, that it is damaged, what to do; never weights_only=False
    (run / "spec.yaml").unlink()
    (run / CHECKPOINT).write_bytes(b"\x00" * 10)
    assert main(args + ["--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run / CHECKPOINT}: not a readable mdsearch checkpoint" in err
    assert "weights_only" not in err and len(err.strip().splitlines()) == 1
    # a folder where the checkpoint should be
    (run / CHECKPOINT).unlink()
    (run / CHECKPOINT).mkdir()
    assert main(args + ["--out", str(run)]) == 2
    assert f"{run / CHECKPOINT}: not a file" in capsys.readouterr().err
    # another spec's checkpoint: one line, not a wall of state-dict keys
    (run / CHECKPOINT).rmdir()
    assert main(args + ["--out", str(run)]) == 0
    capsys.readouterr()
    assert main(args + ["--out", str(run), "--set", "levels.0.channels=640", "--steps", "6"]) == 2
    err = capsys.readouterr().err
    assert "this checkpoint is of another model" in err and len(err.strip().splitlines()) == 1


def test_two_runs_on_one_out_directory_cannot_overlap(tmp_path, capsys, lock_holder):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(json.dumps(TINY))
    holder = lock_holder(tmp_path / "run", "training md")
    code = main(["train", "--preset", "md", "--trial", str(recipe), "--out", str(tmp_path / "run"),
                 "--steps", "3", "--no-mlflow"])
    err = capsys.readouterr().err
    assert code == 2 and f"in use by pid {holder.pid}" in err
    assert not (tmp_path / "run" / CHECKPOINT).exists()


def test_compile_falls_back_to_eager_saying_why(tmp_path, monkeypatch):
    """recipe `compile: true` uses torch.compile; when compiling fails the run trains eagerly,
    with the same result as an eager run, and says why in one progress line."""
    def broken(model, *args, **kwargs):
        def first_call(*a, **k):
            raise RuntimeError("InductorError: no working C++ compiler\n(long log)")
        return first_call

    monkeypatch.setattr(torch, "compile", broken)
    said = []
    compiled = train_trial(presets.get("md"), tiny_recipe(compile=True), tmp_path / "c", steps=3,
                           evaluator=ImageStats(), progress=said.append)
    eager = train_trial(presets.get("md"), tiny_recipe(), tmp_path / "e", steps=3,
                        evaluator=ImageStats())
    assert compiled.history == eager.history
    assert [m for m in said if "torch.compile unavailable" in m] == [
        "torch.compile unavailable (RuntimeError: InductorError: no working C++ compiler); "
        "training eagerly"]


def test_an_evaluation_sampled_in_batches_makes_the_images_of_one_batch(tmp_path, monkeypatch):
    """A paper recipe's 30,000 prompts are sampled SAMPLE_BATCH at a time: each prompt keeps its
    noise (its part of one draw), so batching changes no image beyond float rounding."""
    from mdsearch.train import trainer
    from mdsearch.train.trainer import Training, evaluate

    class Keep:
        def evaluate(self, images, captions, labels):
            self.images, self.captions = images, list(captions)
            return {}

    run = Training(presets.get("md"), tiny_recipe(), tmp_path, evaluator=ImageStats())
    data = run.pipeline(run.plan[0].resolution)
    whole, parts = Keep(), Keep()
    evaluate(run.model.unet(0), data, run.schedule, run.recipe, whole)
    monkeypatch.setattr(trainer, "SAMPLE_BATCH", 3)  # 8 prompts: batches of 3, 3 and 2
    evaluate(run.model.unet(0), data, run.schedule, run.recipe, parts)
    assert len(data.prompts) == 8 and parts.captions == whole.captions
    torch.testing.assert_close(parts.images, whole.images, rtol=0, atol=2e-4)  # kernels differ
    assert whole.images.std() > 0.01  # (not a blank image)
