"""The building blocks of the UNet: conv blocks, attention, the gated FFN and a transformer stage.

Parameter layouts follow Stable Diffusion's UNet (diffusers' ResnetBlock2D, Attention,
BasicTransformerBlock, Transformer2DModel) so that the sd15 and sdxl presets have exactly the real
models' parameter counts; the MobileDiffusion knobs (separable conv, SA/CA decoupling, K/V sharing,
FFN expansion, swish, relu attention) are switches on these same blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, [cos | sin] as in SD."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ResBlock(nn.Module):
    """SD's residual block ("FullConv"): GN-SiLU-conv3x3, + time, GN-SiLU-conv3x3, + shortcut."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class SeparableBlock(nn.Module):
    """Fig. 2's separable block ("SPConv"): GN, depthwise kxk, + time, pointwise expansion to
    e*cout, SiLU, pointwise projection to cout, + shortcut."""

    def __init__(self, cin: int, cout: int, temb: int, groups: int, kernel: int, expansion: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, cin, eps=1e-5)
        self.depthwise = nn.Conv2d(cin, cin, kernel, padding=kernel // 2, groups=cin)
        self.time = nn.Linear(temb, cin)
        self.expand = nn.Conv2d(cin, expansion * cout, 1)
        self.project = nn.Conv2d(expansion * cout, cout, 1)
        self.shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.depthwise(self.norm(x))
        h = h + self.time(F.silu(temb))[:, :, None, None]
        h = self.project(F.silu(self.expand(h)))
        return self.shortcut(x) + h


def conv_block(level, cin: int, cout: int, spec) -> nn.Module:
    if level.conv == "separable":
        return SeparableBlock(cin, cout, spec.time_embed_dim, spec.norm_groups,
                              level.kernel_size, level.conv_expansion)
    return ResBlock(cin, cout, spec.time_embed_dim, spec.norm_groups)


class Attention(nn.Module):
    """Multi-head attention. Self-attention when `context_dim` is None, else cross-attention.

    kv_share: one projection gives both keys and values (W_K = W_V, paper §3.2).
    nonlinearity "relu": relu(QK^T / sqrt(d)) / L_k (ref. [57]) instead of softmax.
    kernel: softmax attention by PyTorch's fused kernel ("sdpa") or as two matmuls ("matmul", the
    same math; what a SeedStack uses, since the fused kernel has no vmap rule).
    """

    kernel = "sdpa"


    def __init__(self, dim: int, heads: int, context_dim: int | None = None,
                 kv_share: bool = False, nonlinearity: str = "softmax"):
        super().__init__()
        kv_dim = context_dim or dim
        self.heads, self.kv_share, self.nonlinearity = heads, kv_share, nonlinearity
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = None if kv_share else nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        source = x if context is None else context
        q, k = self.to_q(x), self.to_k(source)
        v = k if self.kv_share else self.to_v(source)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        if self.nonlinearity == "softmax" and self.kernel == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        elif self.nonlinearity == "softmax":
            scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
            out = scores.softmax(dim=-1) @ v
        else:
            scores = torch.relu(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5)
            out = (scores / k.shape[-2]) @ v
        return self.to_out(out.transpose(1, 2).flatten(2))


def set_attn_nonlinearity(model: nn.Module, nonlinearity: str) -> None:
    """Switch every attention of `model` to softmax or relu in place; the weights are unchanged
    (the paper fine-tunes a softmax model into relu attention, §3.2)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.nonlinearity = nonlinearity


def set_attn_kernel(model: nn.Module, kernel: str) -> None:
    """Compute every softmax attention of `model` by "sdpa" or "matmul" (the same math)."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.kernel = kernel


class GatedFFN(nn.Module):
    """GLU feed-forward: x -> (act(gate) * value) -> out, inner width = expansion * dim."""

    def __init__(self, dim: int, expansion: float, activation: str):
        super().__init__()
        inner = int(dim * expansion)
        self.proj_in = nn.Linear(dim, 2 * inner)
        self.proj_out = nn.Linear(inner, dim)
        self.act = F.gelu if activation == "gelu" else F.silu  # swish == silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(value * self.act(gate))


class TransformerLayer(nn.Module):
    """Pre-norm layer: [self-attention] + [cross-attention] + gated FFN, each residual."""

    def __init__(self, dim: int, heads: int, spec, self_attn: bool, cross_attn: bool):
        super().__init__()
        self.self_attn = self.cross_attn = None
        if self_attn:
            self.norm_sa = nn.LayerNorm(dim)
            self.self_attn = Attention(dim, heads, None, spec.kv_share, spec.attn_nonlinearity)
        if cross_attn:
            self.norm_ca = nn.LayerNorm(dim)
            self.cross_attn = Attention(dim, heads, spec.context_dim, False,
                                        spec.attn_nonlinearity)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = GatedFFN(dim, spec.ffn_expansion, spec.ffn_activation)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.self_attn is not None:
            x = x + self.self_attn(self.norm_sa(x))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_ca(x), context)
        return x + self.ffn(self.norm_ffn(x))


class TransformerStage(nn.Module):
    """SD's Transformer2DModel: GN, project in, `layers` transformer layers on the flattened
    feature map, project out, + residual."""

    def __init__(self, dim: int, layers: int, spec, self_attn: bool, cross_attn: bool):
        super().__init__()
        heads = spec.heads(dim)
        self.norm = nn.GroupNorm(spec.norm_groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(
            TransformerLayer(dim, heads, spec, self_attn, cross_attn) for _ in range(layers))
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).flatten(2).transpose(1, 2))
        for layer in self.layers:
            tokens = layer(tokens, context)
        return x + self.proj_out(tokens).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
