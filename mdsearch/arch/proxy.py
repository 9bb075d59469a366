"""Shrinking a full-size spec into a proxy for short trainings: same topology, narrower.

The proxy keeps every level, path, block count, transformer layer and switch of the full-size spec;
only widths change (channels, time embedding, heads) and the conditioning sizes follow the data
pipeline (latent channels of the autoencoder, the text encoder's width and length). Cost
objectives are always taken from the full-size spec; only quality comes from the proxy.
"""

from __future__ import annotations

from .spec import ArchSpec

CHANNEL_MULTIPLE = 16  # proxy widths are multiples of this (so 8 norm groups always divide them)


def _round(x: float, multiple: int, minimum: int) -> int:
    return max(minimum, int(round(x / multiple)) * multiple)


def proxy_spec(spec: ArchSpec, width: float, latent_channels: int | None = None,
               context_dim: int | None = None, context_len: int | None = None) -> ArchSpec:
    """`spec` with widths multiplied by `width` (rounded to multiples of 16) and conditioning
    sizes replaced by those of the data pipeline. width=1 keeps every width unchanged."""
    if not 0 < width <= 1:
        raise ValueError(f"proxy width {width}: expected 0 < width <= 1")
    changes: dict = {}
    if width < 1:
        channels = [_round(c * width, CHANNEL_MULTIPLE, CHANNEL_MULTIPLE) for c in spec.channels]
        changes.update({f"levels.{i}.channels": c for i, c in enumerate(channels)})
        changes["norm_groups"] = min(spec.norm_groups, CHANNEL_MULTIPLE // 2)
        changes["time_freq_dim"] = _round(spec.time_freq_dim * width, 2, 16)
        changes["time_embed_dim"] = _round(spec.time_embed_dim * width, CHANNEL_MULTIPLE, 32)
        if spec.micro_cond_dim:
            changes["micro_cond_dim"] = _round(spec.micro_cond_dim * width, 2, 8)
        if spec.head_dim:  # scale the head width, keep it a power of two that divides channels
            head = 8
            while head * 2 <= spec.head_dim * width and all(c % (head * 2) == 0 for c in channels):
                head *= 2
            changes["head_dim"] = head
        else:  # fixed head count (SD-1.5): keep it where it divides, else fewer heads
            heads = spec.num_heads
            while any(c % heads for c in channels):
                heads -= 1
            changes["num_heads"] = heads
    for name, value in (("latent_channels", latent_channels), ("context_dim", context_dim),
                        ("context_len", context_len)):
        if value is not None:
            changes[name] = value
    if spec.pooled_dim and context_dim is not None:
        changes["pooled_dim"] = context_dim  # the text encoder's pooled embedding
    return spec.override(changes, source=f"proxy(width={width})") if changes else spec
