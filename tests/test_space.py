"""Search spaces as data: the shipped spaces, the language, and its error messages."""

import random

import pytest
import yaml

from mdsearch.arch import presets
from mdsearch.search.space import CostCache, SpaceError, load_space, parse_space, product

BASE = {
    "base": "md",
    "dimensions": {"inner_channels": {"field": "levels.2.channels", "values": [640, 1024]}},
    "objectives": [{"fid_proxy": "min"}],
}


def space(**changes):
    return parse_space({**BASE, **changes}, "test.yaml")


def error(data) -> str:
    with pytest.raises(SpaceError) as info:
        parse_space(data, "test.yaml")
    return str(info.value)


def test_shipped_spaces_load():
    qs, md, ab = load_space("quickstart"), load_space("md_search"), load_space("ablations")
    assert qs.num_samples >= 8 and qs.budget.max_params == 330e6
    assert md.budget.max_params == 400e6 and md.budget.max_gmacs == 200
    assert [o.metric for o in md.objectives] == ["fid_proxy", "gmacs"]
    assert len(product(ab)) == 12 * 2  # one-factor variants x seeds


def test_md_and_md_lite_are_points_of_the_papers_space():
    md = load_space("md_search")
    point = {"inner_channels": 1024, "inner_down_layers": 3, "inner_up_layers": 3}
    assert md.spec_for(point).levels == presets.get("md").levels
    lite = {"inner_channels": 896, "inner_down_layers": 3, "inner_up_layers": 2}
    assert md.spec_for(lite).levels == presets.get("md-lite").levels
    assert point in md.grid() and lite in md.grid()


def test_ablation_variants_change_one_factor():
    ab = load_space("ablations")
    base = ab.spec_for({"variant": "baseline"})
    assert base.counts() == presets.get("md").counts()
    no_ca = ab.spec_for({"variant": "no_cross_attn"})
    assert no_ca.counts()["ca_layers"] == 0 and no_ca.counts()["sa_layers"] > 0
    assert ab.spec_for({"variant": "relu_attention"}).attn_nonlinearity == "relu"
    assert ab.spec_for({"variant": "kernel_9"}).levels[2].kernel_size == 9
    t64 = ab.spec_for({"variant": "transformer_64_on"})
    assert t64.levels[0].down.layers == 1 and t64.levels[0].down.self_attn


def test_tied_fields_move_together():
    s = space(dimensions={"layers": {"fields": ["levels.2.down.layers", "levels.2.up.layers"],
                                     "range": [1, 2]}},
              ties={"levels.1.up.layers": "levels.1.down.layers"})
    spec = s.spec_for({"layers": 2})
    assert spec.levels[2].down.layers == spec.levels[2].up.layers == 2
    tied = space(dimensions={"d": {"field": "levels.2.down.layers", "values": [1, 4]}},
                 ties={"levels.2.up.layers": "d"})
    assert tied.spec_for({"d": 4}).levels[2].up.layers == 4


def test_conditional_dimension_only_where_active():
    s = space(dimensions={
        "conv": {"field": "levels.2.conv", "values": ["full", "separable"]},
        "kernel": {"field": "levels.2.kernel_size", "values": [3, 7], "when": {"conv": "separable"}},
    })
    grid = s.grid()
    assert {"conv": "full"} in grid and {"conv": "separable", "kernel": 7} in grid
    assert len(grid) == 3
    rng = random.Random(0)
    for _ in range(20):
        p = s.sample(rng)
        assert ("kernel" in p) == (p["conv"] == "separable")


def test_ranges_expand_with_step_and_type():
    s = space(dimensions={"ffn": {"field": "ffn_expansion", "range": [2.0, 3.0], "step": 0.5},
                          "c": {"field": "levels.2.channels", "range": [640, 896], "step": 128}})
    assert s.dimension("ffn").values == [2.0, 2.5, 3.0]
    assert s.dimension("c").values == [640, 768, 896]


def test_budget_filters_over_budget_points_with_reason():
    s = space(constraints={"max_params": "330M", "max_gmacs": 175})
    cache = CostCache()
    ok_cost, ok_why = s.screen({"inner_channels": 640}, cache)
    assert ok_why is None and ok_cost["params"] <= 330e6
    cost, why = s.screen({"inner_channels": 1024}, cache)  # md itself: 390M, 185.5 GMACs
    assert why.startswith("over budget") and "params 390.4M > 330.0M" in why
    assert "GMACs 185.5 > 175.0" in why


def test_unsatisfiable_budget_fails_at_once_with_the_cheapest_found():
    s = space(constraints={"max_params": "50M"})
    with pytest.raises(SpaceError, match="no configuration of this space satisfies params <= 50M"
                                         ".*cheapest configuration found has 203.1M params"):
        s.check_feasible(CostCache())
    space(constraints={"max_params": "400M"}).check_feasible(CostCache())  # md fits: no error


@pytest.mark.parametrize("change, expected", [
    ({"dimensions": {"c": {"field": "levels.2.chanels", "values": [1]}}},
     "dimensions.c: .*unknown field 'levels.2.chanels'; did you mean 'levels.2.channels'"),
    ({"dimensions": {"k": {"field": "levels.2.kernel_size", "values": [3, "x"]}}},
     "dimensions.k: value 'x' for levels.2.kernel_size: expected int"),
    ({"dimensions": {"k": {"field": "kv_share", "valus": [True]}}},
     "dimensions.k.valus: unknown; did you mean 'values'"),
    ({"dimensions": {"k": {"field": "kv_share", "values": [True], "range": [1, 2]}}},
     "dimensions.k: give exactly one of"),
    ({"dimensions": {"k": {"field": "levels.2.kernel_size", "values": [3],
                           "when": {"conv": "full"}}}},
     "dimensions.k.when.conv: not a dimension"),
    ({"dimensions": {"c": {"field": "levels.2.channels", "range": [900, 600]}}},
     "dimensions.c.range: high 600 < low 900"),
    # non-finite and absurd numbers (a probe of hostile inputs found tracebacks here)
    ({"dimensions": {"f": {"field": "ffn_expansion", "values": [float("inf"), 3]}}},
     "dimensions.f.values: must be finite numbers, got inf"),
    ({"dimensions": {"f": {"field": "ffn_expansion", "range": [1, float("nan")]}}},
     "dimensions.f.range: bounds must be finite numbers"),
    ({"dimensions": {"c": {"field": "levels.2.channels", "range": [1, 10 ** 9]}}},
     "dimensions.c.range: .* gives more than 10000 values"),
    ({"seeds_per_trial": 0}, "seeds_per_trial: must be an integer in 1..64"),
    ({"scheduler": {"kind": "paper", "metrics": ["text_gain"],
                    "tolerance": {"text_gain": float("nan")}}},
     "scheduler.tolerance.text_gain: a non-negative number, got nan"),
    ({"constraints": {"max_parms": 1}}, "constraints.max_parms: unknown; did you mean 'max_params'"),
    ({"constraints": {"max_params": "lots"}}, "constraints.max_params: a positive number"),
    ({"objectives": [{"gmacs": "min"}]}, "needs at least one quality metric"),
    ({"objectives": [{"fid_proxy": "lowest"}]}, "mode must be min or max"),
    ({"search": {"algorithm": "bayes"}}, "search.algorithm: 'bayes' is not one of tpe, nsga2"),
    ({"seeds": [0, 1]}, "seeds: repeats over several seeds need `search.algorithm: grid`"),
    ({"scheduler": {"kind": "paper", "margn": 0.1}}, "scheduler.margn: unknown for kind paper"),
    ({"base": "md-tiny"}, "base: 'md-tiny' is neither a preset"),
    ({"dimensionz": {}}, "key 'dimensionz': unknown; did you mean 'dimensions'"),
])
def test_malformed_spaces_name_file_key_and_reason(change, expected):
    message = error({**BASE, **change})
    assert message.startswith("test.yaml: ")
    assert pytest.importorskip("re").search(expected, message), message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(SpaceError, match="nope.yaml: file not found"):
        load_space(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: md\ndimensions: [unclosed\n")
    with pytest.raises(SpaceError, match="bad.yaml: not valid YAML"):
        load_space(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(BASE))
    assert load_space(good).name == "good"


def test_invalid_combination_is_filtered_not_raised():
    s = space(dimensions={"c": {"field": "levels.2.channels", "values": [1024, 1056]}})
    cost, why = s.screen({"c": 1056}, CostCache())  # 1056 channels: not divisible by head_dim 64
    assert cost is None and why.startswith("invalid spec:") and "head_dim 64" in why
