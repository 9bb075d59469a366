"""ArchSpec: the one declarative description of a UNet of the MobileDiffusion family.

A spec is plain data (dataclasses of ints, floats, bools and strings). It round-trips to YAML and
JSON, it is validated in one place (`ArchSpec.validate`), and every search knob of the paper's
section 3 is a field:

    levels[i].channels                      width of level i (level 0 = highest resolution)
    levels[i].conv                          "full" (SD residual block) or "separable" (Fig. 2)
    levels[i].kernel_size, .conv_expansion  the separable block's depthwise kernel and expansion
    levels[i].down / .up                    one side of the level (a `Path`):
        .conv_blocks                        conv blocks on that side
        .layers                             transformer layers after each conv block (0 = none)
        .self_attn, .cross_attn             SA / CA in those layers, independently (SA/CA decoupling)
    mid                                     "unified" (paper §3.4: innermost down + up form one
                                            stack, no separate bottleneck) or "sd" (SD's mid block)
    kv_share, ffn_expansion, ffn_activation, attn_nonlinearity, head_dim | num_heads
    latent_channels, context_dim, context_len, time_freq_dim, time_embed_dim,
    micro_cond_dim, pooled_dim              (SD-XL's micro-conditioning embedding; 0 = off)

Overrides use dotted paths: ``ffn_expansion=3``, ``levels.2.channels=896``,
``levels.-1.up.layers=2`` (negative indices count from the innermost level).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any

import yaml

from .. import config


MAX_WIDTH = 65536  # widths beyond this are typos (SD-XL's widest is 1280)
MAX_FFN_EXPANSION = 64  # FFN inner width per channel (the paper searches 2-4)

class SpecError(config.ConfigError):
    """A malformed architecture spec: the message names the source, the field and the reason."""


@dataclass
class Path:
    """One side (down or up) of a UNet level."""

    conv_blocks: int = 1
    layers: int = 0  # transformer layers after each conv block; 0 = no transformer here
    self_attn: bool = False
    cross_attn: bool = False

    @property
    def transformer(self) -> bool:
        return self.layers > 0


@dataclass
class Level:
    """One resolution of the UNet: its width, its conv type and its down and up paths."""

    channels: int
    down: Path = field(default_factory=Path)
    up: Path = field(default_factory=lambda: Path(conv_blocks=2))
    conv: str = "full"  # "full" | "separable"
    kernel_size: int = 3  # depthwise kernel of the separable block (unused by "full")
    conv_expansion: int = 4  # pointwise expansion of the separable block (unused by "full")


CONV_TYPES = ("full", "separable")
MID_TYPES = ("unified", "sd")
ACTIVATIONS = ("gelu", "swish")
ATTN_NONLINEARITIES = ("softmax", "relu")


@dataclass
class ArchSpec:
    name: str = "custom"
    levels: list[Level] = field(default_factory=list)
    mid: str = "unified"
    mid_layers: int = 1  # transformer layers of the SD-style mid block (mid == "sd")
    latent_channels: int = 4
    context_dim: int = 768
    context_len: int = 77
    time_freq_dim: int = 320  # sinusoidal timestep features
    time_embed_dim: int = 1280  # width of the time embedding MLP, fed to every conv block
    micro_cond_dim: int = 0  # SD-XL: sinusoidal features per micro-conditioning scalar (6 scalars)
    pooled_dim: int = 0  # SD-XL: pooled text embedding added to the time embedding
    head_dim: int | None = 64
    num_heads: int | None = None
    kv_share: bool = False  # W_K = W_V in self-attention
    ffn_expansion: float = 4.0  # GLU inner width = ffn_expansion * channels (doubled for the gate)
    ffn_activation: str = "gelu"  # "gelu" | "swish"
    attn_nonlinearity: str = "softmax"  # "softmax" | "relu" (relu(QK^T/sqrt(d)) / seq_len)
    norm_groups: int = 32

    def __post_init__(self):
        if isinstance(self.ffn_expansion, int) and not isinstance(self.ffn_expansion, bool):
            self.ffn_expansion = float(self.ffn_expansion)  # 3 and 3.0 are the same spec

    # ---- derived views -------------------------------------------------------------------
    @property
    def channels(self) -> tuple[int, ...]:
        return tuple(level.channels for level in self.levels)

    def heads(self, channels: int) -> int:
        return self.num_heads if self.num_heads else channels // self.head_dim

    # ---- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: Any, source: str = "spec") -> "ArchSpec":
        spec = config.from_dict(cls, data, source, error=SpecError)
        spec.validate(source)
        return spec

    @classmethod
    def from_file(cls, path: str | FilePath) -> "ArchSpec":
        data = config.load_yaml(path, error=SpecError)  # JSON is a subset of YAML
        return cls.from_dict(data, source=str(path))

    def override(self, overrides: dict[str, Any], source: str = "overrides") -> "ArchSpec":
        """A new spec with dotted-path fields replaced, validated: {"levels.2.channels": 896}."""
        data = self.to_dict()
        for key, value in overrides.items():
            config.set_path(data, key, value, source, error=SpecError)
        return ArchSpec.from_dict(data, source=f"{self.name} + {source}")

    # ---- validation ----------------------------------------------------------------------
    def validate(self, source: str = "spec") -> None:
        """Every field in range (NaN and infinity are never in range)."""
        def fail(where: str, reason: str) -> None:
            raise SpecError(f"{source}: field {where}: {reason}")

        if not self.levels:
            fail("levels", "a UNet needs at least one level")
        _check_choice(self.mid, MID_TYPES, "mid", fail)
        _check_choice(self.ffn_activation, ACTIVATIONS, "ffn_activation", fail)
        _check_choice(self.attn_nonlinearity, ATTN_NONLINEARITIES, "attn_nonlinearity", fail)
        for name in ("latent_channels", "context_dim", "context_len", "time_freq_dim",
                     "time_embed_dim", "norm_groups"):
            if getattr(self, name) < 1:
                fail(name, f"must be positive, got {getattr(self, name)}")
        if self.time_freq_dim % 2:
            fail("time_freq_dim", f"must be even (sin and cos halves), got {self.time_freq_dim}")
        for name in ("micro_cond_dim", "pooled_dim"):
            if getattr(self, name) < 0:
                fail(name, f"must be 0 (off) or positive, got {getattr(self, name)}")
        if self.micro_cond_dim % 2:
            fail("micro_cond_dim", f"must be even, got {self.micro_cond_dim}")
        if not (isinstance(self.ffn_expansion, (int, float))
                and 0 < self.ffn_expansion <= MAX_FFN_EXPANSION):
            fail("ffn_expansion", f"must be a positive number, at most "
                                  f"{MAX_FFN_EXPANSION}, got {self.ffn_expansion}")
        if (self.head_dim is None) == (self.num_heads is None):
            fail("head_dim/num_heads", "set exactly one of them (the other null)")
        for name in ("head_dim", "num_heads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                fail(name, f"must be positive, got {getattr(self, name)}")
        for name in ("context_dim", "context_len", "time_freq_dim", "time_embed_dim",
                     "micro_cond_dim", "pooled_dim", "latent_channels"):
            if getattr(self, name) > MAX_WIDTH:
                fail(name, f"{getattr(self, name)} is beyond any UNet (at most {MAX_WIDTH})")
        if self.mid == "sd" and self.mid_layers < 0:
            fail("mid_layers", f"must be >= 0, got {self.mid_layers}")

        for i, level in enumerate(self.levels):
            at = f"levels[{i}]"
            if not 1 <= level.channels <= MAX_WIDTH:
                fail(f"{at}.channels", f"must be between 1 and {MAX_WIDTH}, got {level.channels}")
            if level.channels % self.norm_groups:
                fail(f"{at}.channels",
                     f"{level.channels} is not divisible by norm_groups {self.norm_groups}")
            _check_choice(level.conv, CONV_TYPES, f"{at}.conv", fail)
            if level.kernel_size < 1 or level.kernel_size % 2 == 0:
                fail(f"{at}.kernel_size", f"must be odd and positive, got {level.kernel_size}")
            if level.conv_expansion < 1:
                fail(f"{at}.conv_expansion", f"must be >= 1, got {level.conv_expansion}")
            for side in ("down", "up"):
                path: Path = getattr(level, side)
                where = f"{at}.{side}"
                if path.conv_blocks < 0 or path.layers < 0:
                    fail(where, f"counts must be >= 0, got conv_blocks={path.conv_blocks}, "
                                f"layers={path.layers}")
                if side == "up" and path.conv_blocks < 1:
                    fail(f"{where}.conv_blocks", "the up path needs at least one conv block "
                                                 "to merge the skip connections")
                if path.layers == 0 and (path.self_attn or path.cross_attn):
                    fail(f"{where}.self_attn/cross_attn",
                         "set on a path without transformers (layers: 0); set layers >= 1 or "
                         "turn them off")
                if path.layers > 0 and not (path.self_attn or path.cross_attn):
                    fail(f"{where}.layers", f"{path.layers} transformer layers with neither "
                                            "self_attn nor cross_attn")
                if path.layers > 0 and path.conv_blocks == 0:
                    fail(f"{where}.layers", "transformers follow conv blocks; conv_blocks is 0")
            if level.down.transformer or level.up.transformer or (
                    self.mid == "sd" and i == len(self.levels) - 1 and self.mid_layers > 0):
                self._check_heads(level.channels, f"{at}.channels", fail)

    def _check_heads(self, channels: int, where: str, fail) -> None:
        if self.num_heads and channels % self.num_heads:
            fail(where, f"{channels} channels are not divisible by num_heads {self.num_heads}")
        if self.head_dim and channels % self.head_dim:
            fail(where, f"{channels} channels are not divisible by head_dim {self.head_dim}")

    # ---- Table 1 columns -----------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        """conv blocks, self-attention and cross-attention layers (the paper's Table 1)."""
        conv = sa = ca = 0
        for level in self.levels:
            for path in (level.down, level.up):
                conv += path.conv_blocks
                stage_layers = path.conv_blocks * path.layers
                sa += stage_layers * path.self_attn
                ca += stage_layers * path.cross_attn
        if self.mid == "sd":
            conv += 2
            sa += self.mid_layers
            ca += self.mid_layers
        return {"conv_blocks": conv, "sa_layers": sa, "ca_layers": ca}


def _check_choice(value, choices, where, fail) -> None:
    if value not in choices:
        fail(where, f"{value!r} is not one of {', '.join(choices)}")


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """CLI `--set k=v` items to an override dict; values are parsed as YAML scalars."""
    return config.parse_set(items, error=SpecError)
