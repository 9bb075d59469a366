"""Autoencoders (the paper's section 3.5): the loss terms, the frozen-encoder lightweight decoder,
exact resume, the run directory as a diffusers folder that recipes train in, costs, bad input,
and the latent-channel study as a sweep with its report."""

import json

import pytest
import torch
import torch.nn.functional as F

from mdsearch.cli import main
from mdsearch.data.autoencoder import DiffusersAutoencoder, make_autoencoder
from mdsearch.data.errors import DataError
from mdsearch.rundir import CHECKPOINT, DIFFUSERS_CONFIG, DIFFUSERS_WEIGHTS, RESULT
from mdsearch.train.recipe import RecipeError
from mdsearch.train.vae import (VAERecipe, VAETraining, build_vae, cost_of, decoder_modules,
                                vae_train)
from mdsearch.train.trainer import _step_generator

from helpers import VAE_TINY as TINY, VaeStats as Stats, vae_recipe as recipe

LIGHT = {"train": "decoder", "arch": {**TINY["arch"], "decoder_widths": [4, 4, 8, 8],
                                      "decoder_layers": 1},
         "loss": {"kl_weight": 0.0, "adv_weight": 0.1, "adv_start": 0}}


def state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae") / "c4"
    assert vae_train(recipe(), out, evaluator=Stats()).status == "ok"
    return out


def test_loss_is_l2_plus_weighted_kl_plus_adaptively_weighted_adversarial(tmp_path):
    run = VAETraining(recipe(loss={"kl_weight": 0.01, "adv_weight": 0.0}), tmp_path / "a",
                      evaluator=Stats())
    x = run.images(run.train_set, range(4))
    eps = torch.randn((4, 4, 4, 4), generator=_step_generator(0, 0))
    loss, recon, parts = run.losses(x, eps)
    # the posterior sample with that noise (diffusers' own sampler): every term by hand
    posterior = run.vae.encode(x).latent_dist
    z = posterior.sample(generator=_step_generator(0, 0))
    torch.testing.assert_close(recon, run.vae.decode(z).sample)
    l2 = (recon - x).pow(2).sum() / 4
    kl = (0.5 * (posterior.mean ** 2 + posterior.var - 1 - posterior.logvar)).sum() / 4
    torch.testing.assert_close(loss, l2 + 0.01 * kl)
    assert parts["l2"] == pytest.approx(F.mse_loss(recon, x).item(), rel=1e-5)

    run = VAETraining(recipe(loss={"kl_weight": 0.0, "adv_weight": 0.3, "adv_start": 0}),
                      tmp_path / "b", evaluator=Stats())
    loss, recon, _ = run.losses(x, eps)
    nll = (recon - x).pow(2).sum() / 4
    adv = -run.disc(recon).mean()
    last = run.vae.decoder.conv_out.weight
    g_nll, = torch.autograd.grad(nll, last, retain_graph=True)
    g_adv, = torch.autograd.grad(adv, last, retain_graph=True)
    weight = 0.3 * g_nll.norm() / (g_adv.norm() + 1e-4)
    torch.testing.assert_close(loss, nll + weight * adv)


def test_adversarial_term_starts_at_adv_start(tmp_path):
    run = VAETraining(recipe(loss={"adv_start": 3}), tmp_path / "a", evaluator=Stats())
    x, eps = run.images(run.train_set, range(4)), torch.zeros(4, 4, 4, 4)
    assert run.losses(x, eps)[2]["adv"] == 0
    run.step = 3
    assert run.losses(x, eps)[2]["adv"] != 0


def test_run_directory_is_a_diffusers_folder_with_unit_variance_scaling(trained):
    assert (trained / DIFFUSERS_CONFIG).is_file() and (trained / DIFFUSERS_WEIGHTS).is_file()
    ae = make_autoencoder({"kind": "diffusers", "path": str(trained)})
    assert (ae.channels, ae.factor) == (4, 8)
    from mdsearch.data import make_dataset

    data = make_dataset(TINY["data"], 32, "train")
    images = torch.stack([data[i]["image"] for i in range(64)])
    latents = ae.encode(images)
    assert latents.shape == (64, 4, 4, 4)
    assert latents.std().item() == pytest.approx(1.0, abs=0.25)  # the scaling SD uses
    assert ae.decode(latents).shape == images.shape
    result = json.loads((trained / RESULT).read_text())
    assert {"psnr", "ssim", "kl", "rfid_proxy", "decoder_gmacs"} <= set(result["metrics"])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, accumulate):
    full = tmp_path / "full"
    vae_train(recipe(accumulate=accumulate), full, evaluator=Stats())
    part = tmp_path / "part"
    vae_train(recipe(accumulate=accumulate), part, steps=2, evaluator=Stats())
    vae_train(recipe(accumulate=accumulate), part, evaluator=Stats())
    a, b = torch.load(full / CHECKPOINT), torch.load(part / CHECKPOINT)
    for key in ("model", "discriminator"):
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=0, atol=0)
    assert json.loads(a["history"]) == json.loads(b["history"])


def test_lightweight_decoder_keeps_the_encoder_frozen(trained, tmp_path):
    start = DiffusersAutoencoder(trained).vae
    run = VAETraining(recipe(**LIGHT), tmp_path / "light", init=trained, evaluator=Stats())
    encoder_before = state(run.vae.encoder)
    torch.testing.assert_close(encoder_before, state(start.encoder), rtol=0, atol=0)
    decoder_before = state(run.vae.decoder)
    result = run.run()
    assert result.status == "ok"
    torch.testing.assert_close(state(run.vae.encoder), encoder_before, rtol=0, atol=0)
    torch.testing.assert_close(state(run.vae.quant_conv), state(start.quant_conv), rtol=0, atol=0)
    changed = [k for k, v in state(run.vae.decoder).items()
               if not torch.equal(v, decoder_before[k])]
    assert changed and not any(k.startswith("condition_encoder") for k in changed)
    light = make_autoencoder({"kind": "diffusers", "path": str(tmp_path / "light")})
    assert type(light.vae).__name__ == "AsymmetricAutoencoderKL" and light.factor == 8
    # a light run's encoder (an asymmetric folder) is as good a start as the full run's
    again = VAETraining(recipe(**LIGHT), tmp_path / "again", init=tmp_path / "light",
                        evaluator=Stats())
    torch.testing.assert_close(state(again.vae.encoder), encoder_before, rtol=0, atol=0)
    x = torch.zeros(1, 3, 32, 32)
    torch.testing.assert_close(light.encode(x) / light.scale,
                               DiffusersAutoencoder(trained).encode(x) / DiffusersAutoencoder(
                                   trained).scale)


def test_decoder_cost_counts_what_decoding_runs(tmp_path):
    light = recipe(**LIGHT)
    same_decoder = recipe(arch={**TINY["arch"], "widths": [4, 4, 8, 8]})
    a, b = cost_of(light, 64), cost_of(same_decoder, 64)
    # the asymmetric decoder's unused inpainting encoder is not counted
    assert (a.decoder_params, a.decoder_gmacs) == (b.decoder_params, b.decoder_gmacs)
    vae = build_vae(same_decoder)
    assert b.decoder_params == sum(p.numel() for m in decoder_modules(vae)
                                   for p in m.parameters())
    assert cost_of(recipe(), 64).decoder_gmacs * 4 == pytest.approx(
        cost_of(recipe(), 128).decoder_gmacs, rel=0.02)  # convs scale with the pixels


@pytest.mark.parametrize("field, value, match", [
    ("train", "encoder", "field train"),
    ("arch", {"widths": [8, 10], "norm_groups": 4}, "arch.widths.1"),
    ("resolution", 36, "field resolution"),
    ("loss", {"perceptual_weight": 1.0}, "loss.perceptual_path"),
    ("accumulate", 3, "field accumulate: 3 must be positive and split each worker's 4"),
    ("workers", 3, "field workers: 3 must be positive and split batch_size"),
])
def test_recipe_errors_name_the_field(field, value, match):
    with pytest.raises(RecipeError, match=match):
        recipe(**{field: value})


def test_decoder_training_needs_a_matching_init(trained, tmp_path):
    with pytest.raises(RecipeError, match="--init"):
        VAETraining(recipe(**LIGHT), tmp_path / "x")
    other = {**LIGHT, "arch": {**LIGHT["arch"], "latent_channels": 8}}
    with pytest.raises(RecipeError, match="latent_channels 4"):
        VAETraining(recipe(**other), tmp_path / "y", init=trained)
    # train: all starts from scratch: an --init it would ignore is refused, not ignored
    assert recipe().train == "all"
    with pytest.raises(RecipeError, match="field train: all .* would be ignored"):
        VAETraining(recipe(), tmp_path / "z", init=trained)


def test_a_non_finite_loss_fails_the_run_with_its_reason(tmp_path, monkeypatch):
    run = VAETraining(recipe(), tmp_path / "nan", evaluator=Stats())
    real = run.losses

    def broken(g, x):
        loss, recon, parts = real(g, x)
        return loss * float("nan"), recon, parts

    monkeypatch.setattr(run, "losses", broken)
    result = run.run()
    assert result.status == "failed" and "non-finite autoencoder loss" in result.reason


def test_corrupt_or_mismatched_autoencoder_is_one_clear_error(trained, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(trained, broken)
    (broken / DIFFUSERS_WEIGHTS).write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="cannot load it as a diffusers AutoencoderKL"):
        make_autoencoder({"kind": "diffusers", "path": str(broken)})
    (broken / DIFFUSERS_CONFIG).write_text("[1, 2")
    with pytest.raises(DataError, match="not a JSON object"):
        make_autoencoder({"kind": "diffusers", "path": str(broken)})

    from mdsearch.train.trainer import train_trial
    from helpers import ImageStats, tiny_recipe
    from mdsearch.arch import presets

    latent = tiny_recipe().override({"autoencoder": {"kind": "diffusers", "path": str(trained)},
                                     "resolution": 32})
    run = tmp_path / "latent"
    assert train_trial(presets.get("md"), latent, run, evaluator=ImageStats()).status == "ok"
    proxy = (run / "proxy_spec.yaml").read_text()
    assert "latent_channels: 4" in proxy
    c8 = tmp_path / "c8"
    vae_train(recipe(arch={**TINY["arch"], "latent_channels": 8}), c8, steps=2,
              evaluator=Stats())
    swapped = latent.override({"autoencoder": {"kind": "diffusers", "path": str(c8)}})
    with pytest.raises(DataError, match="takes 4-channel latents but autoencoder"):
        train_trial(presets.get("md"), swapped, run, evaluator=ImageStats())


def test_cli_vae_train_and_bad_recipe(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nkind: vae\narch: {latent_channels: 0}\n")
    assert main(["vae", "train", "--recipe", str(bad), "--out", str(tmp_path / "o"),
                 "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.yaml" in err and "arch" in err
    diffusion = tmp_path / "diffusion.yaml"
    diffusion.write_text("name: d\nresolution: 16\n")
    assert main(["vae", "train", "--recipe", str(diffusion), "--out", str(tmp_path / "p"),
                 "--no-mlflow"]) == 2
    assert "kind: vae" in capsys.readouterr().err


@pytest.mark.ray
def test_latent_channel_space_sweeps_autoencoders_and_reports_the_study(tmp_path):
    import yaml

    from mdsearch.analysis.report import build_report
    from mdsearch.search.space import load_space
    from mdsearch.search.sweep import SweepError, run_sweep

    trial = tmp_path / "vae.yaml"
    # 16 px: the sample metrics' classifier at the resolution the sweep tests already use
    trial.write_text(yaml.safe_dump({**TINY, "kind": "vae", "steps": 2, "resolution": 16,
                                     "resources": {"cpu": 1, "gpu": 0}}))
    space = {"name": "c", "base": "autoencoder", "trial": str(trial),
             "dimensions": {"latent_channels": {"field": "recipe.arch.latent_channels",
                                                "values": [4, 8]}},
             "objectives": [{"psnr": "max"}, {"gmacs": "min"}],
             "search": {"algorithm": "grid", "max_concurrent": 2}, "seeds": [0, 1]}
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump(space))
    diffusion_space = tmp_path / "d.yaml"
    diffusion_space.write_text(yaml.safe_dump({**space, "trial": "cpu_quick"}))
    with pytest.raises(SweepError, match="base: autoencoder"):
        run_sweep(load_space(diffusion_space), name="d", storage=tmp_path / "s", mlflow=False)
    result = run_sweep(load_space(space_file), name="c", storage=tmp_path / "sweeps",
                       mlflow=False)
    table = result.table
    assert (table["status"] == "completed").all() and len(table) == 4
    assert table["psnr"].notna().all()
    costs = table.groupby("latent_channels")["params"].first()
    assert costs[8] > costs[4]  # the cost is the autoencoder's, and grows with c
    report = build_report(tmp_path / "sweeps" / "c")
    text = report.files["latent_channels_md"].read_text()
    assert "8 (paper)" in text and "Δ psnr vs the c before" in text
    assert report.files["reconstructions_c4"].is_file()


def test_export_of_an_autoencoder_run_says_what_it_is(trained, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(trained), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "an autoencoder run (mdsearch vae train), not a diffusion run" in err
    assert "Traceback" not in err and not (tmp_path / "b").exists()


def test_a_perceptual_path_that_is_not_a_torch_export_is_one_line(tmp_path, capfd):
    from mdsearch.train.vae import load_perceptual

    (tmp_path / "lpips.pt2").write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(RecipeError, match="lpips.pt2: not a torch.export program"):
        load_perceptual(tmp_path / "lpips.pt2")
    assert "Traceback" not in capfd.readouterr().err  # nothing logged before the one line


@pytest.mark.ray
def test_two_ray_train_workers_train_as_one_process_does(tmp_path):
    """Two workers, each with half of every batch, end where one process does that accumulates
    the same halves as two micro-batches (the adversarial term's adaptive weight is per
    micro-batch, as in one process): the gradients of both networks are summed over the workers
    before each step."""
    from mdsearch.train.distributed import train_distributed

    one = vae_train(recipe(accumulate=2), tmp_path / "one")
    two = train_distributed(None, recipe(resources={"cpu": 1}), tmp_path / "two", workers=2)
    assert two.status == "ok" and two.steps == 4 and two.workers == 2
    assert [h["step"] for h in two.history] == [2, 4]
    assert two.metrics["psnr"] == pytest.approx(one.metrics["psnr"], rel=1e-4)
    a = torch.load(tmp_path / "one" / CHECKPOINT, weights_only=True)
    b = torch.load(tmp_path / "two" / CHECKPOINT, weights_only=True)
    for key in ("model", "discriminator"):
        assert max((a[key][k].float() - b[key][k].float()).abs().max().item()
                   for k in a[key]) < 1e-3
    assert (tmp_path / "two" / DIFFUSERS_WEIGHTS).is_file()  # rank 0 exported the folder
