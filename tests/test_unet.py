"""The builder: forward contract, and every knob's effect checked against hand-computed counts."""

import pytest
import torch

from helpers import tiny
from mdsearch.arch import presets
from mdsearch.arch.blocks import Attention
from mdsearch.arch.cost import example_inputs
from mdsearch.arch.unet import build


def nparams(spec) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build(spec).parameters())


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
@pytest.mark.parametrize("size", [(16, 16), (32, 24)])
def test_forward_returns_latent_shape(name, size):
    spec = tiny(name)
    torch.manual_seed(0)
    model = build(spec)
    x = torch.randn(2, spec.latent_channels, *size)
    out = model(x, torch.tensor([10, 900]), torch.randn(2, spec.context_len, spec.context_dim))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_forward_uses_time_and_text_and_backpropagates():
    spec = tiny("md")
    torch.manual_seed(0)
    model = build(spec)
    (x, t, ctx), _ = example_inputs(spec, 16, batch=2)
    out = model(x, t, ctx)
    assert not torch.allclose(out, model(x, t * 0 + 3, ctx))
    assert not torch.allclose(out, model(x, t, torch.randn_like(ctx)))
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_sdxl_micro_conditioning_changes_the_output():
    spec = tiny("sdxl")
    torch.manual_seed(0)
    model = build(spec)
    (x, t, ctx), extra = example_inputs(spec, 16)
    out = model(x, t, ctx, **extra)
    assert not torch.allclose(out, model(x, t, ctx, pooled=torch.randn(1, spec.pooled_dim),
                                         micro_cond=torch.tensor([[512., 512, 0, 0, 512, 512]])))


def test_same_seed_same_model():
    spec = tiny("md")
    torch.manual_seed(3)
    a = build(spec).state_dict()
    torch.manual_seed(3)
    b = build(spec).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_relu_attention_is_relu_scores_over_sequence_length():
    torch.manual_seed(0)
    attn = Attention(dim=16, heads=2, context_dim=8, nonlinearity="relu")
    x, ctx = torch.randn(1, 5, 16), torch.randn(1, 7, 8)
    q = attn.to_q(x).view(1, 5, 2, 8).transpose(1, 2)
    k = attn.to_k(ctx).view(1, 7, 2, 8).transpose(1, 2)
    v = attn.to_v(ctx).view(1, 7, 2, 8).transpose(1, 2)
    weights = torch.relu(q @ k.transpose(-1, -2) / 8 ** 0.5) / 7
    expected = attn.to_out((weights @ v).transpose(1, 2).reshape(1, 5, 16))
    assert torch.allclose(attn(x, ctx), expected, atol=1e-6)


def test_kv_sharing_uses_one_projection_for_keys_and_values():
    attn = Attention(dim=16, heads=2, kv_share=True)
    assert attn.to_v is None
    assert sum(p.numel() for p in attn.parameters()) == 3 * 16 * 16 + 16


# ---- parameter deltas of each knob on the full-size MD, computed by hand ---------------------
MD = presets.get("md")
CTX = 768


def test_kv_share_saves_one_projection_per_self_attention_layer():
    assert nparams(presets.get("md", kv_share=False)) - nparams(MD) == 15 * 1024 ** 2


def test_ffn_expansion_delta():
    # +d inner units per layer: GLU in (d x 2d weights + 2d bias) and out (d x d): 3d^2 + 2d
    per_layer = lambda d: 3 * d * d + 2 * d  # noqa: E731
    expected = 3 * per_layer(640) + 15 * per_layer(1024)
    assert nparams(presets.get("md", ffn_expansion=4)) - nparams(MD) == expected


def test_self_attention_at_32x32_adds_exactly_the_sa_layers():
    spec = presets.get("md", {"levels.1.down.self_attn": True, "levels.1.up.self_attn": True})
    d = 640  # layer norm (2d) + q and shared k/v (2 d^2) + out (d^2 + d)
    assert nparams(spec) - nparams(MD) == 3 * (3 * d * d + 3 * d)
    assert spec.counts()["sa_layers"] == 18 and spec.counts()["ca_layers"] == 18


def test_no_cross_attention_anywhere():
    off = {f"levels.{i}.{side}.cross_attn": False for i in (1, 2) for side in ("down", "up")}
    off.update({"levels.1.down.layers": 0, "levels.1.up.layers": 0})  # CA-only layers go
    spec = presets.get("md", off)
    assert spec.counts() == {"conv_blocks": 11, "sa_layers": 15, "ca_layers": 0}
    ca = lambda d: 2 * d + d * d + 2 * CTX * d + d * d + d  # noqa: E731
    ffn = lambda d: 2 * d + d * 6 * d + 6 * d + 3 * d * d + d  # noqa: E731  (norm + GLU, e=3)
    stage = lambda d: 2 * d + 2 * (d * d + d)  # noqa: E731  (group norm + proj in/out)
    expected = 15 * ca(1024) + 3 * (ca(640) + ffn(640) + stage(640))
    assert nparams(MD) - nparams(spec) == expected


def test_separable_kernel_size_delta():
    cins = [640, 1024, 2048, 2048, 1024 + 640]  # down: from level 1, then 1024; up: + skips
    spec = presets.get("md", {"levels.2.kernel_size": 7})
    assert nparams(spec) - nparams(MD) == sum(c * (49 - 9) for c in cins)


def test_full_vs_separable_conv_delta():
    cins, c, t = [640, 1024, 2048, 2048, 1664], 1024, 1280

    def full(cin):
        return (2 * cin + cin * c * 9 + c + t * c + c + 2 * c + c * c * 9 + c
                + (cin * c + c if cin != c else 0))

    def separable(cin, e=3):
        return (2 * cin + cin * 9 + cin + t * cin + cin + cin * e * c + e * c + e * c * c + c
                + (cin * c + c if cin != c else 0))

    spec = presets.get("md", {"levels.2.conv": "full"})
    assert nparams(spec) - nparams(MD) == sum(full(x) - separable(x) for x in cins)


def test_sd_style_mid_block_adds_two_conv_blocks_and_a_transformer():
    spec = presets.get("md", mid="sd", mid_layers=1)
    assert spec.counts() == {"conv_blocks": 13, "sa_layers": 16, "ca_layers": 19}
    assert nparams(spec) > nparams(MD)


def test_sdxl_micro_conditioning_embedding_size():
    no_add = presets.get("sdxl", micro_cond_dim=0, pooled_dim=0)
    t = 1280
    assert nparams(presets.get("sdxl")) - nparams(no_add) == (1280 + 6 * 256) * t + t + t * t + t


def test_activation_and_attention_nonlinearity_change_function_not_size():
    torch.manual_seed(0)
    base = build(tiny("md"))
    (x, t, ctx), _ = example_inputs(base.spec, 16)
    for knob in ({"ffn_activation": "gelu"}, {"attn_nonlinearity": "relu"}):
        variant = build(tiny("md", **knob))
        variant.load_state_dict(base.state_dict())  # same shapes, so same weights load
        assert not torch.allclose(base(x, t, ctx), variant(x, t, ctx))
