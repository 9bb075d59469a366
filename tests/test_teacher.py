"""The teacher-relative arm (recipe `teacher`, mdsearch.train.teacher): teacher_gap on the held-out
bank, distillation toward a trained run's predictions, and the checks on the teacher run."""

import pytest
import yaml

from mdsearch.arch import presets
from mdsearch.cli import main
from mdsearch.rundir import RunDirError
from mdsearch.train.recipe import RecipeError
from mdsearch.train.trainer import train_trial

from helpers import ATOL, RTOL, ImageStats, tiny_recipe


def recipe(**changes):
    return tiny_recipe(**{"steps": 12, "eval.every": 12, "checkpoint_every": 12,
                          "eval.bank": 24, **changes})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    result = train_trial(presets.get("md"), recipe(steps=24, seed=9), out, evaluator=ImageStats())
    assert result.status == "ok"
    return out


@pytest.mark.slow
def test_teacher_gap_is_the_distance_to_the_teachers_predictions(tmp_path, teacher):
    md = presets.get("md")
    # the teacher's own weights, retrained bit for bit with the teacher named: gap 0
    itself = train_trial(md, recipe(steps=24, seed=9, **{"teacher.run": str(teacher)}),
                         tmp_path / "itself", evaluator=ImageStats())
    assert itself.history[-1]["teacher_gap"] == pytest.approx(0.0, abs=1e-12)
    # another model: a positive gap; judging it does not change how it trains
    plain = train_trial(md, recipe(), tmp_path / "plain", evaluator=ImageStats())
    judged = train_trial(md, recipe(**{"teacher.run": str(teacher)}), tmp_path / "judged",
                         evaluator=ImageStats())
    assert judged.history[-1]["teacher_gap"] > 1e-4
    assert judged.history[-1]["val_loss"] == plain.history[-1]["val_loss"]
    assert "teacher_gap" not in plain.history[-1]


@pytest.mark.slow
def test_distilling_moves_a_student_toward_its_teacher(tmp_path, teacher):
    md = presets.get("md")
    changes = {"teacher.run": str(teacher), "optimizer.lr": 3e-3}
    plain = train_trial(md, recipe(**changes), tmp_path / "w0", evaluator=ImageStats())
    distilled = train_trial(md, recipe(**changes, **{"teacher.weight": 1.0}), tmp_path / "w1",
                            evaluator=ImageStats())
    assert distilled.history[-1]["teacher_gap"] < 0.9 * plain.history[-1]["teacher_gap"]


@pytest.mark.slow
def test_a_distilled_seed_in_a_stack_is_that_seed_alone(tmp_path, teacher):
    md = presets.get("md")
    changes = {"teacher.run": str(teacher), "teacher.weight": 0.5}
    stacked = train_trial(md, recipe(seeds=2, **changes), tmp_path / "stack",
                          evaluator=ImageStats())
    for k in (0, 1):
        alone = train_trial(md, recipe(seed=k, **changes), tmp_path / f"s{k}",
                            evaluator=ImageStats())
        for name in ("val_loss", "teacher_gap"):
            assert stacked.history[-1][f"{name}_s{k}"] == pytest.approx(
                alone.history[-1][name], rel=RTOL, abs=ATOL), (k, name)


def test_a_teacher_that_does_not_match_is_one_line_before_training(tmp_path, teacher, capsys):
    md = presets.get("md")
    with pytest.raises(RunDirError, match="field teacher.run: .*trained at 16 px, this recipe at 32"):
        train_trial(md, recipe(resolution=32, **{"teacher.run": str(teacher)}), tmp_path / "r")
    with pytest.raises(RunDirError, match="field teacher.run: .*another prediction"):
        train_trial(md, recipe(prediction="v", **{"teacher.run": str(teacher)}), tmp_path / "p")
    with pytest.raises(RunDirError, match="not a directory"):
        train_trial(md, recipe(**{"teacher.run": str(tmp_path / "nowhere")}), tmp_path / "n")
    with pytest.raises(RecipeError, match="field teacher.weight: distilling needs teacher.run"):
        recipe(**{"teacher.weight": 0.5})
    with pytest.raises(RecipeError, match=r"field teacher.weight: must be in \[0, 1\]"):
        recipe(**{"teacher.run": str(teacher), "teacher.weight": 2.0})
    # the CLI: exit 2, one line naming the field
    recipe_file = tmp_path / "taught.yaml"
    recipe_file.write_text(yaml.safe_dump(
        recipe(**{"teacher.run": str(tmp_path / "nowhere")}).to_dict()))
    assert main(["train", "--preset", "md", "--trial", str(recipe_file), "--out",
                 str(tmp_path / "cli"), "--no-mlflow"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mdsearch")]
    assert len(err) == 1 and "field teacher.run" in err[0]
    assert not (tmp_path / "cli").exists()  # nothing written


def test_a_sweep_with_a_wrong_teacher_stops_before_any_trial(tmp_path, teacher):
    from mdsearch.search.space import load_space
    from mdsearch.search.sweep import run_sweep

    from helpers import SWEEP_RECIPE as RECIPE, SWEEP_SPACE as SPACE, write

    space = load_space(write(tmp_path / "space.yaml", SPACE))
    other = write(tmp_path / "recipe.yaml", {**RECIPE, "resolution": 32,
                                             "teacher": {"run": str(teacher)}})
    with pytest.raises(RunDirError, match="field teacher.run: .*trained at 16 px"):
        run_sweep(space, other, name="t", storage=tmp_path / "s", mlflow=False)
    assert not (tmp_path / "s" / "t").exists()
