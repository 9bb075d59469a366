"""ArchSpec: serialisation, overrides and validation errors a user sees."""

import json

import pytest
import yaml

from mdsearch.arch import presets
from mdsearch.arch.spec import ArchSpec, SpecError, parse_set


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_yaml_and_json_round_trip(name, tmp_path):
    spec = presets.get(name)
    assert ArchSpec.from_dict(yaml.safe_load(spec.to_yaml())) == spec
    assert ArchSpec.from_dict(json.loads(spec.to_json())) == spec
    path = tmp_path / "spec.yaml"
    path.write_text(spec.to_yaml())
    assert ArchSpec.from_file(path) == spec


def test_table6_topology_of_md_and_md_lite():
    md, lite = presets.get("md"), presets.get("md-lite")
    assert md.channels == (320, 640, 1024) and lite.channels == (320, 640, 896)
    assert md.counts() == {"conv_blocks": 11, "sa_layers": 15, "ca_layers": 18}
    assert lite.counts() == {"conv_blocks": 11, "sa_layers": 12, "ca_layers": 15}
    # Table 6: Down-2 has one CA-only layer; Up-3 stages are (SA x3 + CA x3) x3 in MD.
    assert (md.levels[1].down.self_attn, md.levels[1].down.cross_attn) == (False, True)
    assert (md.levels[2].up.conv_blocks, md.levels[2].up.layers) == (3, 3)
    assert [lv.conv for lv in md.levels] == ["full", "full", "separable"]


def test_sd_presets_count_like_table1():
    assert presets.get("sd15").counts() == {"conv_blocks": 22, "sa_layers": 16, "ca_layers": 16}
    assert presets.get("sdxl").counts()["conv_blocks"] == 17


def test_overrides_by_field_and_dotted_path():
    spec = presets.get("md", ffn_expansion=4)
    assert spec.ffn_expansion == 4.0 and presets.get("md").ffn_expansion == 3.0
    spec = presets.get("md", {"levels.-1.channels": 896, "levels.2.up.layers": 2})
    assert spec.levels[2].channels == 896 and spec.levels[2].up.layers == 2
    assert parse_set(["ffn_expansion=4", "kv_share=false", "name=x"]) == {
        "ffn_expansion": 4, "kv_share": False, "name": "x"}


@pytest.mark.parametrize("overrides, words", [
    ({"levels.2.channels": 1000}, ["levels[2].channels", "1000", "divisible"]),
    ({"head_dim": None, "num_heads": 7}, ["levels[1].channels", "num_heads 7"]),
    ({"levels.0.down.conv_blocks": -1}, ["levels[0].down", "conv_blocks=-1"]),
    ({"levels.0.down.self_attn": True}, ["levels[0].down.self_attn", "without transformers"]),
    ({"levels.2.up.self_attn": False, "levels.2.up.cross_attn": False},
     ["levels[2].up.layers", "neither"]),
    ({"ffn_activation": "relu"}, ["ffn_activation", "gelu, swish"]),
    ({"attn_nonlinearity": "sigmoid"}, ["attn_nonlinearity", "softmax, relu"]),
    ({"levels.1.conv": "depthwise"}, ["levels[1].conv", "full, separable"]),
    ({"levels.2.kernel_size": 4}, ["levels[2].kernel_size", "odd"]),
    ({"levels.0.up.conv_blocks": 0}, ["levels[0].up.conv_blocks", "skip"]),
    ({"head_dim": None}, ["head_dim/num_heads", "exactly one"]),
    ({"ffn_expansion": 0}, ["ffn_expansion", "positive"]),
    ({"levels.0.channels": "wide"}, ["levels[0].channels", "expected int", "wide"]),
    ({"kv_share": "yes"}, ["kv_share", "expected bool"]),
])
def test_invalid_specs_name_the_field_and_reason(overrides, words):
    with pytest.raises(SpecError) as err:
        presets.get("md", overrides)
    for word in words:
        assert word in str(err.value)


def test_unknown_fields_get_a_did_you_mean():
    with pytest.raises(SpecError, match="did you mean 'ffn_expansion'"):
        presets.get("md", ffn_expansio=3)
    with pytest.raises(SpecError, match="did you mean 'levels.2.channels'"):
        presets.get("md", {"levels.2.channel": 3})
    with pytest.raises(SpecError, match="not a valid index"):
        presets.get("md", {"levels.7.channels": 3})
    data = presets.get("md").to_dict()
    data["levels"][1]["down"]["cros_attn"] = True
    with pytest.raises(SpecError, match=r"levels\[1\]\.down\.cros_attn.*did you mean 'cross_attn'"):
        ArchSpec.from_dict(data, source="mine.yaml")


def test_bad_files_give_one_clear_error(tmp_path):
    with pytest.raises(SpecError, match="not found"):
        ArchSpec.from_file(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("levels: [channels: 3\n")
    with pytest.raises(SpecError, match=r"bad\.yaml: not valid YAML"):
        ArchSpec.from_file(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(SpecError, match="must be a mapping"):
        ArchSpec.from_file(bad)
    bad.write_text("name: x\nlevels:\n  - down: {conv_blocks: 1}\n")
    with pytest.raises(SpecError, match=r"levels\[0\] is missing required field\(s\): channels"):
        ArchSpec.from_file(bad)


def test_unknown_preset():
    with pytest.raises(SpecError, match="unknown preset 'mdd'"):
        presets.get("mdd")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 99999999999999999999999, 0])
def test_ffn_expansion_out_of_range_is_named(value):
    from mdsearch.arch import presets
    from mdsearch.arch.spec import SpecError

    with pytest.raises(SpecError, match="field ffn_expansion: must be a positive number, at most 64"):
        presets.get("md", {"ffn_expansion": value})
