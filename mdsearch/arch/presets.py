"""Named presets (timm-style): `get("md", ffn_expansion=4)` is MD with one field changed.

Every reading of the paper that the paper leaves open is written down, with its evidence, in
docs/architecture.md.
"""

from __future__ import annotations

from typing import Any, Callable

from .spec import ArchSpec, Level, Path, SpecError


def _sd_levels(channels, attn_layers, down_blocks=2) -> list[Level]:
    """SD-style levels: `down_blocks` res blocks down, one more up, SA+CA transformers."""
    levels = []
    for c, layers in zip(channels, attn_layers):
        attn = dict(layers=layers, self_attn=bool(layers), cross_attn=bool(layers))
        levels.append(Level(channels=c, down=Path(conv_blocks=down_blocks, **attn),
                            up=Path(conv_blocks=down_blocks + 1, **attn)))
    return levels


def sd15() -> ArchSpec:
    """Stable Diffusion 1.5's UNet (859,520,964 parameters)."""
    return ArchSpec(name="sd15", levels=_sd_levels((320, 640, 1280, 1280), (1, 1, 1, 0)),
                    mid="sd", mid_layers=1, latent_channels=4, context_dim=768, context_len=77,
                    head_dim=None, num_heads=8, ffn_expansion=4, ffn_activation="gelu")


def sdxl() -> ArchSpec:
    """SD-XL's base UNet (2,567,463,684 parameters), with its micro-conditioning embedding."""
    return ArchSpec(name="sdxl", levels=_sd_levels((320, 640, 1280), (0, 2, 10)),
                    mid="sd", mid_layers=10, latent_channels=4, context_dim=2048, context_len=77,
                    micro_cond_dim=256, pooled_dim=1280, head_dim=64, ffn_expansion=4,
                    ffn_activation="gelu")


def md(innermost_channels: int = 1024, innermost_up_layers: int = 3, name: str = "md") -> ArchSpec:
    """MobileDiffusion per Table 6 (Table 1: 386M params, 182 GFLOPs, 11 conv, 15 SA + 18 CA)."""
    ca = dict(self_attn=False, cross_attn=True)
    full = dict(self_attn=True, cross_attn=True)
    levels = [
        Level(channels=320, down=Path(conv_blocks=1), up=Path(conv_blocks=2)),
        Level(channels=640, down=Path(conv_blocks=1, layers=1, **ca),
              up=Path(conv_blocks=2, layers=1, **ca)),
        Level(channels=innermost_channels, conv="separable", kernel_size=3, conv_expansion=3,
              down=Path(conv_blocks=2, layers=3, **full),
              up=Path(conv_blocks=3, layers=innermost_up_layers, **full)),
    ]
    return ArchSpec(name=name, levels=levels, mid="unified", latent_channels=8, context_dim=768,
                    context_len=77, head_dim=64, kv_share=True, ffn_expansion=3,
                    ffn_activation="swish", attn_nonlinearity="softmax")


def md_lite() -> ArchSpec:
    """MD-Lite per Table 6: innermost channels 896 and 2 (not 3) layers per Up-3 stage."""
    return md(innermost_channels=896, innermost_up_layers=2, name="md-lite")


PRESETS: dict[str, Callable[[], ArchSpec]] = {
    "sd15": sd15, "sdxl": sdxl, "md": md, "md-lite": md_lite,
}


def get(name: str, overrides: dict[str, Any] | None = None, **fields: Any) -> ArchSpec:
    """A preset, with fields overridden: get("md", ffn_expansion=4) or
    get("md", {"levels.2.channels": 896}) for nested (dotted) fields."""
    if name not in PRESETS:
        raise SpecError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    spec = PRESETS[name]()
    changes = {**(overrides or {}), **fields}
    return spec.override(changes, source="overrides") if changes else spec
