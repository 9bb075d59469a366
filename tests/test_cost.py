"""Cost model: exact against fvcore on real tensors, and the paper's figures and claims."""

import pytest
import torch

from helpers import tiny
from mdsearch.arch import presets
from mdsearch.arch.cost import MacCounter, cost, example_inputs, fvcore_count
from mdsearch.arch.spec import SpecError
from mdsearch.arch.unet import build


@pytest.mark.parametrize("name, knobs", [
    ("md", {}),
    ("md", {"attn_nonlinearity": "relu", "kv_share": False}),
    ("md", {"levels.2.kernel_size": 7, "ffn_expansion": 4, "mid": "sd"}),
    ("md-lite", {}),
    ("sd15", {}),
    ("sdxl", {}),
])
def test_cost_agrees_with_fvcore_on_real_tensors(name, knobs):
    spec = tiny(name, **knobs)
    ours = cost(spec, resolution=8 * 32)
    ref = fvcore_count(spec, resolution=8 * 32)
    for kind in ("conv", "linear", "attention"):  # the same ops, counted the same way
        assert ours.gmacs_by_kind[kind] * 1e9 == pytest.approx(ref[kind], rel=1e-6), kind


def test_total_agrees_with_fvcore_at_full_width():
    """fvcore also counts norms and upsampling element-wise; at real widths that is < 1%."""
    spec = presets.get("md")
    ours, ref = cost(spec, resolution=128), fvcore_count(spec, resolution=128)
    assert ours.gmacs * 1e9 == pytest.approx(ref["total"], rel=0.01)
    assert ours.gmacs * 1e9 < ref["total"]


def test_meta_count_equals_a_count_on_real_tensors():
    spec = tiny("md")
    counter = MacCounter()
    args, kwargs = example_inputs(spec, 32)
    with torch.no_grad(), counter:
        build(spec)(*args, **kwargs)
    assert sum(counter.macs.values()) / 1e9 == pytest.approx(cost(spec, 256).gmacs, rel=1e-9)


def test_sd15_is_the_real_unet():
    c = cost(presets.get("sd15"))
    assert c.params == 859_520_964
    assert c.gmacs == pytest.approx(401.6, abs=0.05)  # with SDPA counted (339.0 without)
    assert c.gmacs_by_kind["attention"] == pytest.approx(401.6 - 339.0, abs=0.6)


def test_sdxl_parameters():
    assert cost(presets.get("sdxl")).params == pytest.approx(2_567.5e6, rel=0.01)


def test_md_matches_table1():
    c = cost(presets.get("md"), 512)
    assert c.params == pytest.approx(386e6, rel=0.05)
    assert c.gmacs == pytest.approx(182, rel=0.05)
    assert (c.conv_blocks, c.sa_layers, c.ca_layers) == (11, 15, 18)
    assert c.channels == [320, 640, 1024] and c.latent_size == 64


def test_md_lite_is_smaller_than_md_on_both():
    md, lite = cost(presets.get("md")), cost(presets.get("md-lite"))
    assert (lite.sa_layers, lite.ca_layers) == (12, 15)
    assert lite.params < md.params and lite.gmacs < md.gmacs


def test_paper_claim_kv_sharing_saves_about_5_percent():
    shared, separate = cost(presets.get("md")), cost(presets.get("md", kv_share=False))
    saving = 1 - shared.params / separate.params
    assert 0.03 < saving < 0.07, saving  # paper: "approximately a 5% reduction"


def test_paper_claim_ffn_expansion_4_to_3_saves_about_10_percent():
    e3, e4 = cost(presets.get("md")), cost(presets.get("md", ffn_expansion=4))
    saving = 1 - e3.params / e4.params
    assert 0.08 < saving < 0.14, saving  # paper: "10% reduction in parameters count"


def test_paper_claim_dropping_sa_at_32x32_keeps_ca_and_saves_compute():
    with_sa = presets.get("md", {"levels.1.down.self_attn": True, "levels.1.up.self_attn": True})
    a, b = cost(with_sa), cost(presets.get("md"))
    assert (a.sa_layers - b.sa_layers, a.ca_layers - b.ca_layers) == (3, 0)
    model = build(tiny("md"))
    level1 = [model.down[1], model.up[1]]
    layers = [layer for path in level1 for blk in path.blocks for layer in blk.transformer.layers]
    assert layers and all(l.self_attn is None and l.cross_attn is not None for l in layers)
    # SA over 1024 tokens is costly: QK^T and AV alone are 2 * 1024^2 * 640 MACs per layer
    assert a.gmacs_by_kind["attention"] - b.gmacs_by_kind["attention"] == pytest.approx(
        3 * 2 * 1024 ** 2 * 640 / 1e9)


def test_cost_scales_with_resolution_and_rejects_bad_ones():
    small, large = cost(presets.get("md"), 256), cost(presets.get("md"), 512)
    assert small.params == large.params and 3 < large.gmacs / small.gmacs < 4.5
    with pytest.raises(SpecError, match="multiple of 8"):
        cost(presets.get("md"), 500)
    with pytest.raises(SpecError, match="not divisible by 2\\^\\(levels-1\\) = 8"):
        cost(presets.get("sd15"), 8 * 12)


def test_block_cache_gives_exactly_the_uncached_totals():
    """Screening shares block costs across specs (arch.cost.BlockCosts): the totals must equal
    the plain meta-device count, on the presets and on random specs of the paper's space,
    with a cold cache and with one warmed by other specs."""
    import random

    from mdsearch.arch.cost import BlockCosts
    from mdsearch.search.space import load_space

    space = load_space("md_search")
    rng = random.Random(7)
    specs = [presets.get(name) for name in ("md", "md-lite", "sd15", "sdxl")]
    specs += [space.spec_for(space.sample(rng)) for _ in range(12)]
    specs += [presets.get("md", {"levels.1.channels": 512, "levels.2.down.layers": 1,
                                 "ffn_expansion": 2, "levels.2.conv": "full"})]
    warm = BlockCosts()
    for spec in specs:
        plain = cost(spec, 512)
        for cached in (cost(spec, 512, cache=BlockCosts()), cost(spec, 512, cache=warm)):
            assert (cached.params, cached.gmacs_by_kind) == (plain.params, plain.gmacs_by_kind)
    assert len(warm.params) < sum(len(s.levels) for s in specs) * 4  # blocks were shared
