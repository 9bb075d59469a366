"""The quality signal a sweep ranks by: deterministic held-out metrics, KID, metric directions,
ordered search dimensions, the annealed learning rate, and the paired verdicts of reports."""

import math

import optuna
import pandas as pd
import pytest
import torch

from mdsearch.analysis.reliability import noise_table, paired_delta, verdict_text
from mdsearch.quality import resolvable
from mdsearch.arch import presets
from mdsearch.quality import direction
from mdsearch.search.space import SpaceError, parse_space
from mdsearch.train.heldout import EvalBank, heldout_metrics
from mdsearch.train.trainer import Training, lr_factor

from helpers import tiny_recipe


NO_CROSS_ATTENTION = {"levels.1.down.layers": 0, "levels.1.down.cross_attn": False,  # ablations.yaml
                      "levels.1.up.layers": 0, "levels.1.up.cross_attn": False,
                      "levels.2.down.cross_attn": False, "levels.2.up.cross_attn": False}


def _run(tmp_path, name, spec=None, **recipe):
    return Training(spec or presets.get("md"), tiny_recipe(**recipe), tmp_path / name)


@pytest.mark.minilm
def test_val_loss_is_bit_identical_for_the_same_weights_and_across_trials(tmp_path):
    a = _run(tmp_path, "a")
    data_a = a.pipeline(16)
    first, second = a.heldout(data_a), a.heldout(data_a)
    assert first == second  # the same weights, evaluated twice
    assert set(first) == {"val_loss", "val_loss_low", "val_loss_mid", "val_loss_high",
                          "text_gain"}
    b = _run(tmp_path, "b")  # another trial, same seed: identical initial weights
    assert b.heldout(b.pipeline(16)) == first  # its own bank, built the same: the same items
    c = _run(tmp_path, "c", **{"seed": 1})
    assert c.heldout(c.pipeline(16))["val_loss"] != first["val_loss"]


@pytest.mark.minilm
def test_bank_is_stratified_and_its_redraw_differs(tmp_path):
    run = _run(tmp_path, "a")
    data = run.pipeline(16)
    bank = EvalBank(data, 30, run.schedule.steps)
    assert bank.t.tolist() == sorted(bank.t.tolist()) and bank.t[0] < 34 and bank.t[-1] > 966
    assert [int((bank.band == i).sum()) for i in range(3)] == [10, 10, 10]
    other = bank.redraw(data, run.schedule.steps, seed=1)
    assert torch.equal(other.latents, bank.latents) and not torch.equal(other.noise, bank.noise)
    m1 = heldout_metrics(run.ema.model.unet(0), bank, run.schedule)
    m2 = heldout_metrics(run.ema.model.unet(0), other, run.schedule)
    assert m1["val_loss"] != m2["val_loss"]


@pytest.mark.minilm
def test_text_gain_is_exactly_zero_without_cross_attention(tmp_path):
    blind = presets.get("md", NO_CROSS_ATTENTION)
    run = _run(tmp_path, "blind", spec=blind)
    assert run.heldout(run.pipeline(16))["text_gain"] == 0.0
    seeing = _run(tmp_path, "seeing")
    assert seeing.heldout(seeing.pipeline(16))["text_gain"] != 0.0


def _space(**dims):
    return parse_space({"name": "t", "base": "md", "dimensions": dims,
                        "objectives": ["val_loss_mid"],
                        "search": {"algorithm": "tpe", "num_samples": 4}}, "t.yaml")


def test_numeric_dimensions_reach_optuna_as_numbers():
    space = _space(layers={"fields": ["levels.2.down.layers", "levels.2.up.layers"],
                           "range": [1, 4]},
                   channels={"field": "levels.2.channels", "values": [1024, 512, 768]},
                   ffn={"field": "ffn_expansion", "values": [2, 3, 5]},
                   kv={"field": "kv_share", "bool": True})
    from mdsearch.search.searchers import define_by_run

    study = optuna.create_study()
    trial = study.ask()
    point = define_by_run(space)(trial)
    dists = trial.distributions
    assert isinstance(dists["layers"], optuna.distributions.IntDistribution)
    assert (dists["layers"].low, dists["layers"].high, dists["layers"].step) == (1, 4, 1)
    assert isinstance(dists["channels"], optuna.distributions.IntDistribution)
    assert dists["channels"].step == 256 and point["channels"] in (512, 768, 1024)
    assert isinstance(dists["ffn_rank"], optuna.distributions.IntDistribution)  # uneven: ranks
    assert point["ffn"] in (2, 3, 5) and "ffn_rank" not in space.point_of({**point, "ffn_rank": 0})
    assert isinstance(dists["kv"], optuna.distributions.CategoricalDistribution)


def test_objective_directions_come_from_the_metric_registry():
    assert _space(kv={"field": "kv_share", "bool": True}).quality.mode == "min"
    with pytest.raises(SpaceError, match="text_gain is better when higher"):
        parse_space({"name": "t", "base": "md", "objectives": [{"text_gain": "min"}],
                     "dimensions": {"kv": {"field": "kv_share", "bool": True}}}, "t.yaml")
    with pytest.raises(SpaceError, match="unknown metric: give its direction"):
        parse_space({"name": "t", "base": "md", "objectives": ["my_score"],
                     "dimensions": {"kv": {"field": "kv_share", "bool": True}}}, "t.yaml")
    assert direction("align_shape") == "max" and direction("kid_proxy") == "min"


def test_learning_rate_anneals_linearly_to_zero_over_the_end_of_the_run():
    factors = [lr_factor(s, warmup=2, total=10, anneal=0.5) for s in range(10)]
    assert factors[:5] == [0.5, 1, 1, 1, 1]
    assert factors[5:] == pytest.approx([1.0, 0.8, 0.6, 0.4, 0.2])
    assert [lr_factor(s, 0, 10, 0.0) for s in range(10)] == [1.0] * 10


def test_paired_delta_verdicts_respect_direction_and_seeds():
    base = pd.Series([0.100, 0.102, 0.101], index=[0, 1, 2])
    worse = paired_delta(base + 0.01, base, "val_loss")
    assert worse["verdict"] == "worse" and worse["low"] > 0
    assert paired_delta(base + 0.01, base, "text_gain")["verdict"] == "better"
    noisy = paired_delta(base + pd.Series([0.002, -0.003, 0.001], index=[0, 1, 2]), base,
                         "val_loss")
    assert noisy["verdict"] == "no detectable difference"
    assert verdict_text(noisy).startswith("no detectable difference (|Δ| < ")
    one = paired_delta(base[:1] + 0.001, base[:1], "val_loss")
    assert one["verdict"] == "not enough seeds to tell"
    assert paired_delta(base[:1] + 0.01, base[:1], "val_loss", floor=0.001)["verdict"] == "worse"


def test_intervals_read_together_are_simultaneous():
    base = pd.Series([0.100, 0.102, 0.101], index=[0, 1, 2])
    variant = base + pd.Series([0.004, 0.003, 0.0035], index=[0, 1, 2])  # +0.0035 +- 0.0005
    alone = paired_delta(variant, base, "val_loss")
    in_a_table = paired_delta(variant, base, "val_loss", comparisons=11)
    assert alone["verdict"] == "worse"  # one 95% interval excludes 0 ...
    assert in_a_table["verdict"] == "no detectable difference"  # ... one of 11 read together not
    assert in_a_table["high"] - in_a_table["low"] > alone["high"] - alone["low"]
    assert in_a_table["delta"] == alone["delta"]


def test_noise_table_and_resolvable_winner():
    runs = pd.DataFrame({"config": list("aabbcc"), "seed": [0, 1] * 3,
                         "val_loss": [1.0, 1.02, 2.0, 2.02, 3.0, 3.02]})
    row = noise_table(runs, ["val_loss"]).iloc[0]
    assert row["seed_std"] == pytest.approx(math.sqrt(0.0002))
    assert row["config_std"] == pytest.approx(1.0)
    assert row["seed_tau"] == 1.0
    assert resolvable(pd.Series([1.0, 1.5]), "val_loss", floor=0.1)[0]
    assert not resolvable(pd.Series([1.0, 1.1]), "val_loss", floor=0.1)[0]
    assert not resolvable(pd.Series([1.0, 1.5]), "val_loss", floor=math.nan)[0]


def test_stop_rule_tolerance_is_absolute_and_per_metric():
    from mdsearch.search.schedulers import PaperStopRule

    rule = PaperStopRule({"text_gain": "max", "val_loss_mid": "min"}, margin=0.5,
                         tolerance={"text_gain": 0.005, "val_loss_mid": 0.005})
    rule.judge("best", {"step": 60, "text_gain": 0.050, "val_loss_mid": 0.060})
    # worse on both, but by less than the tolerance on text_gain: continue
    assert rule.judge("a", {"step": 60, "text_gain": 0.046, "val_loss_mid": 0.070}) == "CONTINUE"
    assert rule.judge("b", {"step": 60, "text_gain": 0.040, "val_loss_mid": 0.070}) == "STOP"
    assert "text_gain 0.005" in rule.reasons["b"]


@pytest.mark.minilm
def test_reliability_command_measures_evaluation_noise_of_a_run(tmp_path, capsys):
    import json

    from mdsearch.cli import main
    from mdsearch.train.trainer import train_trial

    from helpers import ImageStats

    train_trial(presets.get("md"), tiny_recipe(), tmp_path / "run", evaluator=ImageStats())
    assert main(["reliability", str(tmp_path / "run"), "--redraws", "2", "--bank-only",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    entry = result["metrics"]["val_loss"]
    assert len(entry["values"]) == 2 and entry["eval_std"] > 0
    assert main(["reliability", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a trained run directory" in err[0]


def test_noise_floors_take_each_part_from_the_best_source(tmp_path):
    import json

    from mdsearch.quality import noise_floors
    from mdsearch.search.space import sweep_recipe
    from mdsearch.search.space import load_space

    recipe = sweep_recipe(load_space("quickstart")).to_dict()
    table = pd.DataFrame({"status": ["completed"] * 2, "c": [1, 2], "seed": [0, 0],
                          "text_gain": [0.05, 0.06]})
    (tmp_path / "reliability.json").write_text(json.dumps(
        {"metrics": {"text_gain": {"eval_std": 0.001, "seed_std": None}}}))
    floor = noise_floors(table, ["c"], recipe, tmp_path)["text_gain"]
    assert floor["eval_std"] == 0.001  # measured on this sweep
    import yaml

    from mdsearch.paths import ANALYSIS
    from mdsearch.quality import NOISE_FLOORS

    study = next(e for e in yaml.safe_load((ANALYSIS / NOISE_FLOORS).read_text())
                 if e["recipe"]["steps"] == recipe["steps"])
    assert floor["seed_std"] == study["metrics"]["text_gain"]["seed_std"]  # the study's, same recipe
    assert floor["floor"] == pytest.approx(math.hypot(floor["seed_std"], 0.001))
    assert "seed: benchmarks/proxy_fidelity.py" in floor["source"]
    two_seeds = pd.DataFrame({"status": ["completed"] * 4, "c": [1, 1, 2, 2], "seed": [0, 1] * 2,
                              "text_gain": [0.050, 0.052, 0.060, 0.062]})
    own = noise_floors(two_seeds, ["c"], {**recipe, "steps": 7})["text_gain"]
    assert own["seed_std"] == pytest.approx(math.sqrt(0.000002)) and own["eval_std"] is None
    assert "seed noise unknown" not in own["source"]
    assert noise_floors(table, ["c"], {**recipe, "steps": 7}) == {}  # nothing known


@pytest.mark.minilm
def test_sampled_metrics_only_every_kth_evaluation_and_at_the_end(tmp_path):
    from mdsearch.train.trainer import train_trial

    from helpers import ImageStats

    result = train_trial(presets.get("md"), tiny_recipe(**{"steps": 9, "eval.sample_every": 2}),
                         tmp_path / "run", evaluator=ImageStats())
    sampled = [r["step"] for r in result.history if "sample_mean" in r]
    assert [r["step"] for r in result.history] == [3, 6, 9]
    assert sampled == [6, 9]  # every 2nd evaluation, and always the last
    assert all("val_loss_mid" in r and "text_gain" in r for r in result.history)
    assert not (tmp_path / "run" / "samples_000003.png").exists()


def test_recipe_rejects_a_bank_too_small_to_have_three_bands():
    from mdsearch.train.recipe import RecipeError

    with pytest.raises(RecipeError, match="eval.bank: 0 .no held-out bank. or at least 3"):
        tiny_recipe(**{"eval.bank": 2})
    with pytest.raises(RecipeError, match="optimizer.anneal: must be in .0, 1."):
        tiny_recipe(**{"optimizer.anneal": 1.5})


def test_seeds_to_resolve_takes_the_seed_noise_out_of_the_spread():
    apart = pd.DataFrame({"config": ["a", "a", "b", "b"], "seed": [0, 1, 0, 1],
                          "val_loss": [0.0, 2.0, 10.0, 12.0]})
    row = noise_table(apart, ["val_loss"]).iloc[0]
    # means 1 and 11 (variance 50) hold seed noise 2 / 2 seeds: a true spread of sqrt(49)
    assert row["config_std_true"] == pytest.approx(7.0)
    assert row["seeds_needed"] == 1  # ceil((sqrt 2 / (7 / 3)) ** 2)
    tied = apart.assign(val_loss=[0.0, 2.0, 2.0, 0.0])  # equal means: no spread beyond the noise
    row = noise_table(tied, ["val_loss"]).iloc[0]
    assert row["config_std_true"] == 0 and row["seeds_needed"] == float("inf")
