import pytest

from mdsearch.arch import presets

TINY = {"head_dim": 16, "norm_groups": 8, "context_dim": 32, "context_len": 8,
        "time_freq_dim": 32, "time_embed_dim": 64}


def tiny(name: str, **overrides):
    """A preset's topology at a width small enough to run real tensors on 2 CPU cores."""
    widths = {"sd15": (32, 64, 64, 64), "sdxl": (32, 64, 64)}.get(name, (32, 64, 64))
    fields = {**TINY, **{f"levels.{i}.channels": c for i, c in enumerate(widths)}}
    if name == "sdxl":
        fields.update(micro_cond_dim=8, pooled_dim=16, **{"levels.2.down.layers": 2,
                                                          "levels.2.up.layers": 2,
                                                          "mid_layers": 2})
    if name == "sd15":
        fields.update(num_heads=4, head_dim=None)
    fields.update(overrides)
    return presets.get(name, fields)


@pytest.fixture
def tiny_spec():
    return tiny
