"""The elastic supernet's weight sharing: every configuration of a space is a slice of one set of
weights, and a slice computes what the configuration's own UNet computes with those weights."""

import pytest
import torch

from mdsearch.arch.proxy import proxy_spec
from mdsearch.arch.spec import ArchSpec, Level, Path
from mdsearch.arch.supernet import (SupernetError, build_supernet, extract, run_subnet,
                                    subnet_weights, supernet_spec)
from mdsearch.search.space import load_space

SMALL = ArchSpec(
    name="small", latent_channels=3, context_dim=24, context_len=5, time_freq_dim=16,
    time_embed_dim=32, head_dim=8, norm_groups=8, ffn_expansion=4.0,
    levels=[Level(channels=32, down=Path(conv_blocks=1), up=Path(conv_blocks=2)),
            Level(channels=64, conv="separable", conv_expansion=3,
                  down=Path(conv_blocks=2, layers=2, self_attn=True, cross_attn=True),
                  up=Path(conv_blocks=3, layers=2, self_attn=True, cross_attn=True))])


def inputs(spec, seed=0, size=8):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, spec.latent_channels, size, size, generator=g),
            torch.tensor([10.0, 700.0]),
            torch.randn(2, spec.context_len, spec.context_dim, generator=g))


def supernet(spec=SMALL, seed=0):
    torch.manual_seed(seed)
    net = build_supernet(spec)
    with torch.no_grad():  # no zero biases, so that a wrong slice cannot hide
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def test_every_quickstart_configuration_is_a_slice_of_its_supernet():
    space = load_space("quickstart")
    specs = [proxy_spec(space.spec_for(p), 0.0625, 3, 384, 16) for p in space.grid()]
    big = supernet_spec(specs)
    assert big.levels[2].channels == max(s.levels[2].channels for s in specs)
    assert big.ffn_expansion == 4.0 and big.levels[1].down.cross_attn
    net = supernet(big)
    for spec in specs:  # every one slices to exactly its own UNet's shapes
        subnet_weights(net, spec)
    x = inputs(specs[0], size=16)
    for spec in (specs[0], specs[-1], big):
        with torch.no_grad():
            shared = run_subnet(net, spec, *x)
            plain = extract(net, spec)(*x)
        assert shared.shape == x[0].shape and torch.equal(shared, plain)


@pytest.mark.parametrize("change, silence", [
    # fewer transformer layers: the supernet's extra layers with their residual branches zeroed
    ({"levels.1.down.layers": 1, "levels.1.up.layers": 1},
     lambda n: [n.down[1].blocks[j].transformer.layers[1] for j in range(2)]
     + [n.up[0].blocks[j].transformer.layers[1] for j in range(3)]),
    # no cross-attention at level 1: the supernet's cross-attention outputs zeroed
    ({"levels.1.down.cross_attn": False, "levels.1.up.cross_attn": False},
     lambda n: [layer.cross_attn for path in (n.down[1], n.up[0]) for b in path.blocks
                for layer in b.transformer.layers]),
])
def test_a_smaller_depth_or_no_attention_is_the_supernet_with_those_parts_silenced(change,
                                                                                  silence):
    net, sub = supernet(), SMALL.override(change)
    x = inputs(SMALL)
    with torch.no_grad():
        for module in silence(net):
            for name, p in module.named_parameters():
                if name.endswith(("to_out.weight", "to_out.bias", "proj_out.weight",
                                  "proj_out.bias")):
                    p.zero_()
        assert torch.allclose(run_subnet(net, sub, *x), run_subnet(net, SMALL, *x),
                              atol=1e-6, rtol=0)


def test_a_narrower_ffn_is_the_supernet_ffn_with_its_extra_units_silenced():
    """The GLU input projection holds [value | gate]: a wrong half would change the output."""
    net, sub = supernet(), SMALL.override({"ffn_expansion": 2})
    x = inputs(SMALL)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("ffn.proj_out.weight"):
                p[:, p.shape[1] // 2:] = 0
        assert torch.allclose(run_subnet(net, sub, *x), run_subnet(net, SMALL, *x),
                              atol=1e-6, rtol=0)
        assert not torch.allclose(run_subnet(net, sub, *x),
                                  run_subnet(supernet(seed=1), sub, *x), atol=1e-3)


def test_a_narrower_level_takes_the_leading_channels_of_each_part_of_a_concatenated_input():
    net, sub = supernet(), SMALL.override({"levels.1.channels": 32})
    w = subnet_weights(net, sub)
    # up level 0's first block takes [x from level 1 (64 -> 32), skip of level 0 (32)]
    full = net.up[1].blocks[0].conv.conv1.weight
    assert net.up[1].blocks[0].in_parts == (64, 32)
    expected = torch.cat([full[:, :32], full[:, 64:96]], dim=1)
    assert torch.equal(w["up.1.blocks.0.conv.conv1.weight"], expected)
    # a separable block's depthwise conv acts on its input: [x (64 -> 32), skip (64 -> 32)]
    depthwise = net.up[0].blocks[0].conv.depthwise.weight
    assert torch.equal(w["up.0.blocks.0.conv.depthwise.weight"],
                       torch.cat([depthwise[:32], depthwise[64:96]]))
    q = net.down[1].blocks[0].transformer.layers[0].self_attn.to_q.weight  # heads: leading
    assert torch.equal(w["down.1.blocks.0.transformer.layers.0.self_attn.to_q.weight"],
                       q[:32, :32])
    out = run_subnet(net, sub, *inputs(SMALL))
    assert torch.isfinite(out).all()


def test_a_configurations_loss_trains_exactly_its_slice_of_the_supernet():
    net, sub = supernet(), SMALL.override({"levels.1.channels": 32, "ffn_expansion": 2})
    run_subnet(net, sub, *inputs(SMALL)).square().mean().backward()
    q = net.down[1].blocks[0].transformer.layers[0].self_attn.to_q.weight.grad
    assert q[:32, :32].abs().sum() > 0 and q[32:].abs().sum() == 0 and q[:, 32:].abs().sum() == 0
    proj_in = net.down[1].blocks[0].transformer.layers[0].ffn.proj_in.weight.grad  # 2 x 256
    used = torch.zeros(512, dtype=torch.bool)
    used[:64] = used[256:320] = True  # the value and gate halves' first 64 units each
    assert proj_in[used].abs().sum() > 0 and proj_in[~used].abs().sum() == 0


def test_an_extracted_configuration_is_a_plain_model_with_the_supernets_weights():
    net, sub = supernet(), SMALL.override({"levels.1.up.conv_blocks": 2, "ffn_expansion": 3})
    model = extract(net, sub)
    x = inputs(SMALL)
    with torch.no_grad():
        assert torch.equal(model(*x), run_subnet(net, sub, *x))
    assert not any(p.requires_grad is False for p in model.parameters())
    assert model.spec == sub


@pytest.mark.parametrize("change, field", [
    ({"levels.1.conv": "full"}, "levels.1.conv"),
    ({"kv_share": True}, "kv_share"),
    ({"attn_nonlinearity": "relu"}, "attn_nonlinearity"),
])
def test_a_space_varying_what_slicing_cannot_hold_is_refused_naming_the_field(change, field):
    with pytest.raises(SupernetError, match=f"{field}: the configurations differ"):
        supernet_spec([SMALL, SMALL.override(change)])


def test_a_configuration_larger_than_the_supernet_is_refused_naming_the_weight():
    net = supernet(SMALL.override({"levels.1.channels": 32}))
    with pytest.raises(SupernetError, match=r"needs \d+ along dim 0, the supernet holds \d+: "
                                            "not a sub-network"):
        subnet_weights(net, SMALL)
