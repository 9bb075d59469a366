"""Choosing what to promote: the best completed trial under a budget, and clear refusals.
(The whole promote -> full training -> export path runs from a real sweep in test_sweep.py.)"""

import pandas as pd
import pytest

from mdsearch.arch import presets
from mdsearch.arch.cost import cost
from mdsearch.search.promote import BUDGETS, PromoteError, choose


def sweep(tmp_path, rows):
    """A sweep directory: results.csv plus each trial's spec.yaml, as a sweep writes them."""
    table = []
    for i, (status, preset, fid, align) in enumerate(rows):
        trial = tmp_path / f"trial_{i}"
        trial.mkdir()
        spec = presets.get(preset)
        (trial / "spec.yaml").write_text(spec.to_yaml())
        c = cost(spec, 512)
        table.append({"trial_id": f"{i}e{i}", "status": status, "params": c.params,
                      "gmacs": c.gmacs, "fid_proxy": fid, "align": align,
                      "align_chance": 0.25, "path": str(trial)})
    pd.DataFrame(table).to_csv(tmp_path / "results.csv", index=False)
    return tmp_path


def test_md_and_md_lite_fit_their_own_budgets_only():
    md, lite = cost(presets.get("md"), 512), cost(presets.get("md-lite"), 512)
    assert not BUDGETS["md"].violations(md.params, md.gmacs)
    assert BUDGETS["md-lite"].violations(md.params, md.gmacs)
    assert not BUDGETS["md-lite"].violations(lite.params, lite.gmacs)


def test_best_completed_trial_under_the_budget_wins(tmp_path):
    run = sweep(tmp_path, [("completed", "md", 300.0, 0.4),      # best overall, md-size
                           ("stopped", "md-lite", 100.0, 0.4),   # never finished: not comparable
                           ("completed", "md-lite", 350.0, 0.4),
                           ("completed", "sd15", 50.0, 0.4)])    # over every budget
    assert choose(run, "md").trial_id == "0e0"  # read as a string, not 0.0
    lite = choose(run, "md-lite")
    assert (lite.trial_id, lite.value, lite.candidates) == ("2e2", 350.0, 1)
    assert lite.spec["name"] == "md-lite" and not lite.text_blind


def test_text_blind_winner_is_flagged(tmp_path):
    chosen = choose(sweep(tmp_path, [("completed", "md", 300.0, 0.26)]), "md")
    assert chosen.text_blind and "WARNING" in chosen.describe()


def test_refusals_name_the_reason(tmp_path):
    run = sweep(tmp_path, [("completed", "sd15", 50.0, 0.4), ("failed", "md", None, None)])
    with pytest.raises(PromoteError, match=r"none of the 1 completed trials meets the md budget"
                                           r".*smallest has 859.5M params"):
        choose(run, "md")
    with pytest.raises(PromoteError, match="budget 'mdlite': unknown; did you mean 'md-lite'"):
        choose(run, "mdlite")
    with pytest.raises(PromoteError, match="no column 'fid'"):
        choose(run, "md", metric="fid")
    with pytest.raises(Exception, match="no results.csv"):
        choose(tmp_path / "trial_0", "md")


def test_candidates_within_the_noise_floor_are_named(tmp_path):
    import shutil

    import yaml

    from mdsearch.paths import SEARCH_SPACES
    from mdsearch.search.space import sweep_recipe
    from mdsearch.search.space import load_space

    run = sweep(tmp_path, [("completed", "md", 300.0, 0.4), ("completed", "md-lite", 301.0, 0.4),
                           ("completed", "md-lite", 330.0, 0.4)])
    unknown = choose(run, "md", metric="fid_proxy")
    assert unknown.noise_floor is None and "noise floor of fid_proxy is unknown" in \
        unknown.describe()
    # the quickstart's recipe: its fid_proxy floor (37.5) is known from the fidelity study
    shutil.copy(SEARCH_SPACES / "quickstart.yaml", run / "space.yaml")
    (run / "recipe.yaml").write_text(yaml.safe_dump(
        sweep_recipe(load_space("quickstart")).to_dict()))
    chosen = choose(run, "md", metric="fid_proxy")
    # 1 and 30 away from md's 300: inside 1.96 x sqrt 2 x 37.5, so fid_proxy cannot rank the
    # three, and promote follows its own advice: the cheapest of them (md-lite, the first of two
    # equal costs), not md, the best by fid_proxy alone
    assert chosen.noise_floor == pytest.approx(37.5, abs=0.1)
    assert (chosen.trial_id, chosen.top_by_metric) == ("1e1", "0e0")
    assert chosen.within_noise == ["0e0", "2e2"]
    assert chosen.gmacs < cost(presets.get("md"), 512).gmacs
    text = chosen.describe()
    assert "2 other candidate(s) are within the noise" in text
    assert "the cheapest of them was chosen (the best by fid_proxy alone was 0e0)" in text
    assert choose(run, "md-lite", metric="fid_proxy").top_by_metric is None  # md is over it


def test_a_latency_limit_filters_candidates_and_needs_a_latency_column(tmp_path):
    run = sweep(tmp_path, [("completed", "md", 300.0, 0.4), ("completed", "md-lite", 350.0, 0.4)])
    with pytest.raises(PromoteError, match="no latency_ms column, so --max-latency-ms"):
        choose(run, "md", max_latency_ms=1000)
    table = pd.read_csv(run / "results.csv", dtype={"trial_id": str})
    table["latency_ms"] = [1956.0, 1500.0]  # md's and md-lite's predicted ms
    table.to_csv(run / "results.csv", index=False)
    assert choose(run, "md").trial_id == "0e0"  # no limit: the better fid_proxy
    limited = choose(run, "md", max_latency_ms=1600)
    assert (limited.trial_id, limited.latency_ms, limited.candidates) == ("1e1", 1500.0, 1)
    assert "latency <= 1600 ms" in limited.budget_text and "1500.0 ms predicted" in \
        limited.describe()
    with pytest.raises(PromoteError, match="none of the 2 completed trials .*latency <= 1000 ms"):
        choose(run, "md", max_latency_ms=1000)
