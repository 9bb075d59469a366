"""Analysis: the exact Pareto front, Kendall's tau, ablation and Table-5-shaped tables, reports."""

import itertools
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

from mdsearch.analysis.fidelity import fidelity, kendall_tau_b
from mdsearch.rundir import front_probability, pareto_mask
from mdsearch.analysis.report import build_report
from mdsearch.analysis.tables import ablation_table, write_table
from mdsearch.paths import SEARCH_SPACES
from mdsearch.search.space import sweep_recipe
from mdsearch.search.space import load_space


def brute_front(v: np.ndarray) -> np.ndarray:
    keep = []
    for i, a in enumerate(v):
        if np.isnan(a).any():
            keep.append(False)
            continue
        keep.append(not any(np.all(b <= a) and np.any(b < a)
                            for j, b in enumerate(v) if j != i and not np.isnan(b).any()))
    return np.array(keep)


@pytest.mark.parametrize("seed", range(20))
def test_pareto_front_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    n, k = rng.integers(1, 40), rng.integers(2, 4)
    v = rng.integers(0, 6, size=(n, k)).astype(float)  # small integers: many ties and duplicates
    if n > 3:
        v[rng.integers(n)] = np.nan
    assert np.array_equal(pareto_mask(v), brute_front(v))


def test_pareto_front_keeps_duplicates_and_drops_dominated():
    v = [[1, 5], [1, 5], [2, 2], [2, 3], [5, 1], [5, 1.5]]
    assert pareto_mask(v).tolist() == [True, True, True, False, True, False]


def test_front_probability_of_two_trials_is_the_normal_cdf_of_their_gap():
    """A cheaper trial is always on the front; a dearer one only when its noisy quality is
    better, which for two normal means is Phi(gap / sqrt(se_a^2 + se_b^2))."""
    from scipy.stats import norm

    means = [[1.0, 0.00], [2.0, -0.03]]  # (cost, quality to minimise)
    errors = [[0.0, 0.02], [0.0, 0.03]]
    p = front_probability(means, errors, draws=200_000)
    assert p[0] == 1.0
    assert p[1] == pytest.approx(norm.cdf(0.03 / math.hypot(0.02, 0.03)), abs=0.005)


@pytest.mark.parametrize("seed", range(3))
def test_front_probability_matches_counting_fronts_draw_by_draw(seed):
    rng = np.random.default_rng(seed)
    n, k, draws = 7, 3, 400
    means, errors = rng.normal(size=(n, k)), rng.uniform(0, 0.8, size=(n, k))
    errors[:, 0] = 0.0  # an exact cost column
    means[2] = np.nan  # never on the front
    # the same draws, one front at a time (front_probability draws in chunks of 500, in order)
    x = means[~np.isnan(means).any(axis=1)]
    noise = np.random.default_rng(0).standard_normal((draws, *x.shape))
    counted = np.zeros(len(x))
    for d in range(draws):
        counted += pareto_mask(x + noise[d] * errors[~np.isnan(means).any(axis=1)])
    p = front_probability(means, errors, draws=draws, seed=0)
    assert p[2] == 0 and np.allclose(np.delete(p, 2), counted / draws)
    exact = front_probability(means, np.zeros_like(errors))
    assert np.array_equal(exact > 0, pareto_mask(means)) and set(exact) <= {0.0, 1.0}


def test_a_sweeps_front_chances_take_each_trials_own_error_or_the_floor():
    from scipy.stats import norm

    from mdsearch.quality import front_chances

    table = pd.DataFrame({"trial_id": ["a", "b", "c", "d"],
                          "status": ["completed", "completed", "completed", "filtered"],
                          "gmacs": [10.0, 20.0, 30.0, 5.0], "val_loss": [0.50, 0.49, 0.60, None],
                          "val_loss_se": [0.01, 0.01, 0.01, None]})
    p = front_chances(table, [("val_loss", "min"), ("gmacs", "min")], draws=100_000)
    assert list(p.index) == [0, 1, 2]  # completed trials only
    assert p[0] == 1.0 and p[2] < 0.01  # the cheapest is on it; c is beaten by both
    assert p[1] == pytest.approx(norm.cdf(0.01 / math.hypot(0.01, 0.01)), abs=0.01)
    # without own seeds: the metric's noise floor, the same for every trial
    single = table.drop(columns="val_loss_se")
    assert front_chances(single, [("val_loss", "min"), ("gmacs", "min")]).empty  # no noise known
    floor = {"val_loss": {"floor": 0.01 * math.sqrt(2)}}
    q = front_chances(single, [("val_loss", "min"), ("gmacs", "min")], floor, draws=100_000)
    assert q[1] == pytest.approx(norm.cdf(0.01 / 0.02), abs=0.01)
    # one objective: the probability of being the best
    best = front_chances(table, [("val_loss", "min")], draws=100_000)
    assert best[1] > best[0] > best[2] and best.sum() == pytest.approx(1.0)


def test_kendall_tau_b():
    assert kendall_tau_b([1, 2, 3, 4], [10, 20, 30, 40]) == 1
    assert kendall_tau_b([1, 2, 3, 4], [4, 3, 2, 1]) == -1
    assert math.isnan(kendall_tau_b([1], [1]))
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for _ in range(10):
        x, y = rng.integers(0, 5, 15), rng.integers(0, 5, 15)  # with ties
        assert kendall_tau_b(x, y) == pytest.approx(scipy_stats.kendalltau(x, y).statistic)


def results(rows):
    """A results table in results.csv's column order: ids, the varied fields and the seed,
    then cost, metrics and steps."""
    base = {"status": "completed", "stop_reason": "", "steps": 240, "params": 390e6,
            "gmacs": 185.5}
    t = pd.DataFrame([{**base, **r} for r in rows])
    tail = ["params", "gmacs", "fid_proxy", "align", "steps"]
    head = ["trial_id", "status", "stop_reason"]
    middle = [c for c in t.columns if c not in head + tail]
    return t[head + middle + [c for c in tail if c in t.columns]]


def test_ablation_table_pairs_seeds_and_reports_spread():
    t = results([
        {"trial_id": "a", "variant": "baseline", "seed": 0, "fid_proxy": 100.0, "align": 0.5},
        {"trial_id": "b", "variant": "baseline", "seed": 1, "fid_proxy": 110.0, "align": 0.6},
        {"trial_id": "c", "variant": "ffn_4", "seed": 0, "fid_proxy": 90.0, "align": 0.55,
         "params": 429e6, "gmacs": 190.0},
        {"trial_id": "d", "variant": "ffn_4", "seed": 1, "fid_proxy": 104.0, "align": 0.6,
         "params": 429e6, "gmacs": 190.0},
        {"trial_id": "e", "variant": "gelu", "seed": 0, "status": "stopped", "fid_proxy": 500.0},
    ])
    ab = ablation_table(t, quality="fid_proxy").set_index("variant")
    assert ab.loc["baseline", "n"] == 2 and ab.loc["baseline", "d_fid_proxy"] == 0
    assert ab.loc["ffn_4", "d_fid_proxy"] == pytest.approx(-8.0)  # mean of -10 and -6
    assert ab.loc["ffn_4", "d_fid_proxy_std"] == pytest.approx(np.std([-10, -6], ddof=1))
    assert ab.loc["ffn_4", "d_params_pct"] == pytest.approx(10.0)
    assert ab.loc["gelu", "n"] == 0 and ab.loc["gelu", "not_completed"] == 1
    # two seeds that disagree by 4 leave -8 inside its 95% interval: no verdict either way
    assert ab.loc["ffn_4", "verdict_fid_proxy"] == "no detectable difference"
    assert ab.loc["ffn_4", "d_fid_proxy_low"] < 0 < ab.loc["ffn_4", "d_fid_proxy_high"]
    assert ab.loc["gelu", "verdict_fid_proxy"] == "not enough seeds to tell"
    with pytest.raises(ValueError, match="needs the baseline measured"):
        ablation_table(t[t["variant"] != "baseline"], quality="fid_proxy")


def test_table5_from_ufogen_trials(tmp_path):
    from mdsearch.analysis.tables import ufogen_table

    rows = []
    for (r, a), (fid, noise) in {("diffusion", "full"): (200, [0, 3, -3]),
                                 ("diffusion", "lora"): (400, [2, -2, 1]),
                                 ("distill", "full"): (202, [-3, 2, 0]),
                                 ("distill", "lora"): (420, [1, 0, -2]),
                                 ("ema_distill", "full"): (210, [3, -1, 1])}.items():
        for seed in range(3):  # (ema_distill + LoRA failed)
            rows.append({"status": "completed", "reconstruction": r, "adapter": a,
                         "seed": seed, "fid_proxy": fid + noise[seed], "align": 0.5})
    rows.append({"status": "failed", "reconstruction": "ema_distill", "adapter": "lora",
                 "seed": 0, "fid_proxy": None, "align": None})
    shown, raw = ufogen_table(pd.DataFrame(rows), extra=("align",))
    raw = raw.set_index(["reconstruction", "adapter"])
    assert raw.loc[("distill", "full"), "paper_fid"] == 11.20  # the paper's figure, beside ours
    assert raw.loc[("diffusion", "lora"), "verdict"] == "worse"  # +200 with noise of a few
    assert raw.loc[("distill", "full"), "verdict"] == "no detectable difference"
    assert raw.loc[("ema_distill", "lora"), "n"] == 0
    row = shown.set_index(["reconstruction loss", "fine-tuning"])
    assert row.loc[("EMA distill loss", "LoRA"), "Δ fid_proxy vs diffusion + full"] == \
        "no completed trial"
    assert row.loc[("Diffusion loss", "full"), "fid_proxy (ours)"] == "200 ± 3"
    paths = write_table(shown, tmp_path / "table5", raw=raw.reset_index(), caption="Table 5")
    assert "| Distill loss" in paths["md"].read_text()
    assert "\\begin{tabular}" in paths["tex"].read_text()


def sweep_dir(tmp_path, table, space="quickstart"):
    d = tmp_path / "sweep"
    d.mkdir()
    table.to_csv(d / "results.csv", index=False)
    shutil.copy(SEARCH_SPACES / f"{space}.yaml", d / "space.yaml")
    return d


@pytest.mark.slow
def test_report_from_a_sweep_directory(tmp_path):
    rows = []
    for i, (c, layers, gain, gm) in enumerate([(512, 1, 0.030, 95), (768, 2, 0.046, 120),
                                               (768, 4, 0.044, 133), (1024, 2, 0.047, 148),
                                               (512, 4, 0.036, 105)]):
        rows.append({"trial_id": f"t{i}", "inner_channels": c, "inner_layers": layers,
                     "ffn_expansion": 3, "transformer_32": "on", "seed": 0, "text_gain": gain,
                     "align": 0.3, "gmacs": gm, "params": gm * 2e6})
    rows.append({"trial_id": "s", "status": "stopped", "inner_channels": 512, "inner_layers": 2,
                 "ffn_expansion": 2, "transformer_32": "off", "seed": 0, "text_gain": -0.02,
                 "steps": 60, "gmacs": 100, "params": 2e8, "stop_reason": "paper rule"})
    rows.append({"trial_id": "filtered_0001", "status": "filtered", "steps": 0,
                 "inner_channels": 1280, "gmacs": 200, "params": 5e8})
    d = sweep_dir(tmp_path, results(rows))
    recipe = sweep_recipe(load_space("quickstart")).to_dict()  # as the sweep wrote it
    (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    report = build_report(d, tmp_path / "out")
    for key in ("pareto", "pareto_params", "quality_vs_align", "pareto_csv", "summary", "html"):
        assert report.files[key].is_file() and report.files[key].stat().st_size > 0
    front = pd.read_csv(report.files["pareto_csv"], dtype={"trial_id": str})
    assert sorted(front["trial_id"]) == ["t0", "t1", "t3", "t4"]  # t2 is dominated by t1
    assert {"inner_channels", "inner_layers", "gmacs", "text_gain"} <= set(front.columns)
    summary = report.files["summary"].read_text()
    # the study's noise floor for this exact recipe: t3 (0.047) cannot be told from t1 (0.046)
    assert "No winner at this budget**: 3 trials (t3, t1, t2)" in summary
    assert "| text_gain | max |" in summary and "proxy_fidelity.py" in summary
    (d / "recipe.yaml").write_text(yaml.safe_dump({**recipe, "steps": 123}))
    unknown = build_report(d, tmp_path / "out2").files["summary"].read_text()
    assert "Noise floor of text_gain unknown" in unknown
    summary = report.files["summary"].read_text()
    assert "filtered before training (over budget or invalid): 1" in summary
    assert "never with the paper's FID" in summary
    page = report.files["html"].read_text()
    assert page.count("data:image/png;base64,") == 3 and 'src="pareto.png"' not in page


def test_report_of_an_ablation_sweep_has_the_table(tmp_path):
    rows = [{"trial_id": f"{v}{s}", "variant": v, "seed": s, "text_gain": g + s / 1000,
             "align": 0.4} for v, g in (("baseline", 0.05), ("no_kv_share", 0.04), ("gelu", 0.05))
            for s in (0, 1)]
    d = sweep_dir(tmp_path, results(rows), space="ablations")
    report = build_report(d)
    assert report.out == d / "report"
    table = report.files["ablation_md"].read_text()
    assert "no_kv_share" in table and "-0.01" in table
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
    assert "| worse" in rows["no_kv_share"]  # text_gain 0.01 lower on both seeds
    assert "no detectable difference" in rows["gelu"]
    assert "Ablations" in report.files["summary"].read_text()


def test_fidelity_matches_configurations_across_budgets(tmp_path):
    cfgs = list(itertools.product([512, 768, 1024], [1, 2]))
    short = results([{"trial_id": f"s{i}", "inner_channels": c, "inner_layers": n, "seed": 0,
                      "fid_proxy": 100 + i} for i, (c, n) in enumerate(cfgs)])
    long = results([{"trial_id": f"l{i}", "inner_channels": c, "inner_layers": n, "seed": 0,
                     "fid_proxy": 50 + (i if i != 5 else -1)} for i, (c, n) in enumerate(cfgs)])
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    short.to_csv(a / "results.csv", index=False)
    long.to_csv(b / "results.csv", index=False)
    out = fidelity(a, b, "fid_proxy", out=tmp_path / "f")
    assert out["pairs"] == 6 and out["kendall_tau_b"] == pytest.approx(kendall_tau_b(
        range(6), [0, 1, 2, 3, 4, -1]))
    assert (tmp_path / "f" / "fidelity.png").is_file()


def test_fidelity_against_the_same_sweep_at_an_earlier_step(tmp_path):
    import json

    rows = []
    d = tmp_path / "sweep"
    for i, early in enumerate([3.0, 1.0, 2.0]):  # early ranking: t1 < t2 < t0; final: t0 < t1 < t2
        trial = d / f"trial{i}"  # a trial's folder is inside its sweep's (results.csv: its name)
        trial.mkdir(parents=True)
        (trial / "result.json").write_text("\n".join(json.dumps(r) for r in (
            {"step": 60, "fid_proxy": early}, {"step": 120, "fid_proxy": 10.0 + i})))
        rows.append({"trial_id": f"t{i}", "inner_channels": 512 + 256 * i, "seed": 0,
                     "fid_proxy": 10.0 + i, "steps": 120, "path": str(trial)})
    results(rows).to_csv(d / "results.csv", index=False)
    out = fidelity(d, d, "fid_proxy", short_step=60)
    assert out["pairs"] == 3 and out["steps_short"] == 60 and out["steps_long"] == 120
    assert out["kendall_tau_b"] == pytest.approx(kendall_tau_b([3, 1, 2], [10, 11, 12]))


def test_trials_with_their_own_seeds_are_ranked_by_their_own_standard_errors():
    """With `<metric>_se` (a K-seed stack per trial) the winner statement needs no floor: a gap
    beyond the 95% band of a difference of means names a winner, one inside it does not."""
    import pandas as pd

    from mdsearch.quality import mean_difference_band, winner_statement

    def table(values, ses):
        return pd.DataFrame({"trial_id": ["a", "b", "c"], "status": ["completed"] * 3,
                             "text_gain": values, "text_gain_se": ses, "seeds_measured": [4] * 3})

    band = mean_difference_band(0.001, 0.001, 4, 4)
    assert band == pytest.approx(2.447 * 2 ** 0.5 * 0.001, rel=1e-3)  # t(0.975, 6 dof)
    clear = winner_statement(table([0.05, 0.04, 0.03], [0.001] * 3), "text_gain", None)
    assert clear.startswith("Winner: a, ahead of the runner-up by 0.01")
    tied = winner_statement(table([0.05, 0.049, 0.03], [0.001] * 3), "text_gain", None)
    assert "No winner at this budget**: 2 trials (a, b)" in tied
    assert "4-seed means" in tied


@pytest.mark.parametrize("text", ["{not json", "[]", "", '{"metrics": [1]}',
                                  '{"metrics": {"text_gain": {"seed_std": "x"}}}'])
def test_a_damaged_reliability_file_is_refused_naming_it(tmp_path, text):
    import pandas as pd

    from mdsearch.quality import noise_floors
    from mdsearch.rundir import RELIABILITY, RunDirError

    (tmp_path / RELIABILITY).write_text(text)
    table = pd.DataFrame({"status": ["completed"], "text_gain": [0.1], "seed": [0], "a": [1]})
    with pytest.raises(RunDirError, match=f"{tmp_path / RELIABILITY}: not a noise-floor file"):
        noise_floors(table, ["a"], None, tmp_path)


def test_fidelity_of_a_sweep_with_itself_is_refused(tmp_path):
    from mdsearch.analysis.fidelity import fidelity
    from mdsearch.rundir import RunDirError

    with pytest.raises(RunDirError, match="a sweep compared with itself"):
        fidelity(tmp_path, tmp_path)
