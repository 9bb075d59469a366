"""Trial recipes and proxy shrinking."""

import pytest
import torch

from mdsearch.arch import presets
from mdsearch.arch.proxy import proxy_spec
from mdsearch.arch.unet import build
from mdsearch.train.recipe import RecipeError, load_recipe


def test_shipped_recipes_load():
    quick, paper = load_recipe("cpu_quick"), load_recipe("trials/proxy_30k.yaml")
    assert quick.autoencoder["kind"] == "identity" and quick.width < 1
    assert (paper.steps, paper.resolution, paper.optimizer.lr) == (30000, 256, 1e-3)
    assert paper.optimizer.betas == [0.9, 0.999] and paper.optimizer.weight_decay == 0.01
    # the paper's shape: 32 data-parallel workers of one GPU, 128 samples each, no accumulation
    assert (paper.batch_size, paper.workers, paper.accumulate) == (4096, 32, 1)
    assert paper.resources["gpu"] == 1


def test_recipe_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nstep: 10\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: unknown field 'step'; did you mean 'steps'"):
        load_recipe(bad)
    bad.write_text("name: x\noptimizer: {lr: fast}\n")
    with pytest.raises(RecipeError, match=r"optimizer\.lr: expected float, got 'fast'"):
        load_recipe(bad)
    bad.write_text("name: x\nnoise_schedule: cosine\n")
    with pytest.raises(RecipeError, match="noise_schedule: .cosine. is not one of"):
        load_recipe(bad)
    bad.write_text("name: x\nwidth: 2\n")
    with pytest.raises(RecipeError, match=r"width: must be in \(0, 1\]"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "absent.yaml")
    with pytest.raises(RecipeError, match="unknown field 'eval.evry'"):
        load_recipe("cpu_quick").override({"eval.evry": 3})


@pytest.mark.parametrize("name", ["md", "md-lite", "sd15", "sdxl"])
def test_proxy_keeps_topology_and_shrinks_width(name):
    full = presets.get(name)
    proxy = proxy_spec(full, 0.0625, latent_channels=3, context_dim=384, context_len=16)
    assert proxy.counts() == full.counts()
    assert [lv.down.layers for lv in proxy.levels] == [lv.down.layers for lv in full.levels]
    assert all(p <= f / 8 for p, f in zip(proxy.channels, full.channels))
    assert (proxy.latent_channels, proxy.context_dim, proxy.context_len) == (3, 384, 16)
    model = build(proxy)
    out = model(torch.randn(1, 3, 16, 16), torch.tensor([3]), torch.randn(1, 16, 384))
    assert out.shape == (1, 3, 16, 16)


def test_width_one_keeps_the_spec():
    full = presets.get("md")
    assert proxy_spec(full, 1.0) == full
    with pytest.raises(ValueError, match="width"):
        proxy_spec(full, 0)
