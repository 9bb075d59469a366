"""The UNet builder: `build(spec)` turns an ArchSpec into an nn.Module.

The whole network is one parametric module, `LevelPath`, used once per level and side:

    latents -> conv_in -> [down level 0] -> ... -> [down level n-1]
                                                     [mid block, only when spec.mid == "sd"]
            <- conv_out <- [up level 0]   <- ... <- [up level n-1]

A down path runs its conv blocks (each optionally followed by a transformer stage) and then
downsamples; every block output, and the input of each resolution, is kept as a skip connection.
An up path concatenates those skips, one per conv block (as SD does), and then upsamples. With
`mid: unified` (paper §3.4) the innermost down and up paths meet directly and form one stack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Downsample, TransformerStage, Upsample, conv_block, timestep_features
from .spec import ArchSpec, Level, Path

MICRO_COND_SCALARS = 6  # SD-XL: original size (h, w), crop (top, left), target size (h, w)


class Block(nn.Module):
    """A conv block followed, optionally, by a transformer stage."""

    def __init__(self, spec: ArchSpec, level: Level, path: Path, cin: int, cout: int):
        super().__init__()
        self.conv = conv_block(level, cin, cout, spec)
        self.transformer = (TransformerStage(cout, path.layers, spec, path.self_attn,
                                             path.cross_attn) if path.layers else None)

    def forward(self, x, temb, context):
        x = self.conv(x, temb)
        return x if self.transformer is None else self.transformer(x, context)


class LevelPath(nn.Module):
    """One side ("down" or "up") of one level, driven entirely by the spec."""

    def __init__(self, spec: ArchSpec, index: int, side: str, cin: int,
                 skip_channels: list[int] | None = None, block=Block):
        super().__init__()
        level = spec.levels[index]
        path, cout = getattr(level, side), level.channels
        self.side, self.num_skips = side, len(skip_channels or [])
        blocks = []
        for j in range(path.conv_blocks):
            extra = skip_channels[j] if side == "up" and j < self.num_skips else 0
            blocks.append(block(spec, level, path, cin + extra, cout))
            blocks[-1].in_parts = (cin, extra)  # its input: [x, skip] (the supernet slices each)
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        innermost = index == len(spec.levels) - 1
        if side == "down":
            self.resample = Downsample(cout) if not innermost else None
        else:
            self.resample = Upsample(cout) if index > 0 else None
        self.out_channels = cout

    def forward(self, x, temb, context, skips: list[torch.Tensor]):
        if self.side == "down":
            for block in self.blocks:
                x = block(x, temb, context)
                skips.append(x)
            if self.resample is not None:
                x = self.resample(x)
                skips.append(x)  # the next level's input is its first skip, as in SD
            return x
        mine = [skips.pop() for _ in range(self.num_skips)]  # this resolution's skips
        for j, block in enumerate(self.blocks):
            if j < len(mine):
                x = torch.cat([x, mine[j]], dim=1)
            x = block(x, temb, context)
        return x if self.resample is None else self.resample(x)


class MidBlock(nn.Module):
    """SD's bottleneck: conv block, transformer stage (SA + CA), conv block."""

    def __init__(self, spec: ArchSpec):
        super().__init__()
        level = spec.levels[-1]
        c = level.channels
        self.conv1 = conv_block(level, c, c, spec)
        self.transformer = (TransformerStage(c, spec.mid_layers, spec, True, True)
                            if spec.mid_layers else None)
        self.conv2 = conv_block(level, c, c, spec)

    def forward(self, x, temb, context):
        x = self.conv1(x, temb)
        if self.transformer is not None:
            x = self.transformer(x, context)
        return self.conv2(x, temb)


class UNet(nn.Module):
    def __init__(self, spec: ArchSpec, block=Block):
        """`block`: the class of the levels' blocks (the cost model's cache swaps in a stand-in
        with Block's signature; everything else is always built as is)."""
        super().__init__()
        spec.validate(spec.name)
        self.spec = spec
        ch = spec.channels
        self.time_mlp = nn.Sequential(nn.Linear(spec.time_freq_dim, spec.time_embed_dim),
                                      nn.SiLU(), nn.Linear(spec.time_embed_dim, spec.time_embed_dim))
        self.add_mlp = None
        add_dim = spec.pooled_dim + MICRO_COND_SCALARS * spec.micro_cond_dim
        if add_dim:  # SD-XL's "text_time" embedding, added to the time embedding
            self.add_mlp = nn.Sequential(nn.Linear(add_dim, spec.time_embed_dim), nn.SiLU(),
                                         nn.Linear(spec.time_embed_dim, spec.time_embed_dim))
        self.conv_in = nn.Conv2d(spec.latent_channels, ch[0], 3, padding=1)

        # Down path; record the channels of every skip, grouped by resolution.
        skips_per_level: list[list[int]] = [[ch[0]]]
        self.down = nn.ModuleList()
        cin = ch[0]
        for i, level in enumerate(spec.levels):
            self.down.append(LevelPath(spec, i, "down", cin, block=block))
            skips_per_level[i] += [level.channels] * level.down.conv_blocks
            cin = level.channels
            if i < len(ch) - 1:
                skips_per_level.append([cin])  # downsampled map: first skip of level i + 1

        self.mid = MidBlock(spec) if spec.mid == "sd" else None

        # Up path, innermost level first; each level uses its own resolution's skips, newest first.
        self.up = nn.ModuleList()
        for i in reversed(range(len(ch))):
            self.up.append(LevelPath(spec, i, "up", cin, skips_per_level[i][::-1], block=block))
            cin = ch[i]

        self.norm_out = nn.GroupNorm(spec.norm_groups, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], spec.latent_channels, 3, padding=1)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor | float,
                context: torch.Tensor, pooled: torch.Tensor | None = None,
                micro_cond: torch.Tensor | None = None) -> torch.Tensor:
        """latents (B, latent_channels, H, W), timesteps (B,) or scalar, context (B, L, context_dim);
        SD-XL style models also take pooled (B, pooled_dim) and micro_cond (B, 6) (zeros if None).
        Returns a tensor of the latents' shape."""
        spec, batch = self.spec, latents.shape[0]
        timesteps = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(batch)
        temb = self.time_mlp(timestep_features(timesteps, spec.time_freq_dim).to(latents.dtype))
        if self.add_mlp is not None:
            temb = temb + self.add_mlp(self._added_condition(batch, latents, pooled, micro_cond))

        x = self.conv_in(latents)
        skips = [x]
        for level in self.down:
            x = level(x, temb, context, skips)
        if self.mid is not None:
            x = self.mid(x, temb, context)
        for level in self.up:
            x = level(x, temb, context, skips)
        return self.conv_out(F.silu(self.norm_out(x)))

    def _added_condition(self, batch, latents, pooled, micro_cond):
        spec, parts = self.spec, []
        if spec.pooled_dim:
            parts.append(pooled if pooled is not None
                         else latents.new_zeros(batch, spec.pooled_dim))
        if spec.micro_cond_dim:
            if micro_cond is None:
                micro_cond = latents.new_zeros(batch, MICRO_COND_SCALARS)
            features = timestep_features(micro_cond.reshape(-1), spec.micro_cond_dim)
            parts.append(features.reshape(batch, -1).to(latents.dtype))
        return torch.cat(parts, dim=1)


def build(spec: ArchSpec) -> UNet:
    """The UNet an ArchSpec describes (weights initialised by PyTorch's defaults)."""
    return UNet(spec)
