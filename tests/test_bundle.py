"""The phone bundle: decoder export, manifest.json, and `mdsearch generate` in ONNX Runtime alone,
matching the same image made through PyTorch."""

import json
import re

import numpy as np
import pytest
import torch
import yaml
from helpers import tiny

from mdsearch.arch.unet import build
from mdsearch.cli import main
from mdsearch.export.manifest import (MANIFEST, AutoencoderInfo, BundleFiles, Manifest,
                                      SamplerInfo, ScheduleInfo, TextEncoderInfo, read_manifest,
                                      write_manifest)
from mdsearch.export.onnx import ExportError
from mdsearch.export.pipeline import (PARITY_TOLERANCE, Bundle, alphas_cumprod, ddim,
                                      ddim_timesteps, generate)
from mdsearch.train.diffusion import NoiseSchedule, ddim_sample

ort = pytest.importorskip("onnxruntime")
PROMPT = "one large orange triangle on the left on a black background"


# --- The numpy sampler is ddim_sample ------------------------------------------------------------

def test_numpy_timesteps_are_torchs():
    for steps in range(1, 201):  # torch's float32 linspace rounds differently from float64's
        expected = torch.linspace(999, 0, steps).round().long().numpy()
        assert np.array_equal(ddim_timesteps(1000, steps), expected), steps


@pytest.mark.parametrize("prediction, kind, guidance, clip", [
    ("epsilon", "scaled_linear", 3.0, None), ("v", "linear", 2.0, 1.0),
    ("epsilon", "linear", 1.0, 1.0)])
def test_numpy_ddim_matches_ddim_sample(prediction, kind, guidance, clip):
    weight = torch.randn(3, 3, generator=torch.Generator().manual_seed(1)) * 0.3

    def model(x, t, context):  # any deterministic function of (x, t, context)
        mixed = torch.einsum("oc,bchw->bohw", weight, x)
        shift = context.mean((1, 2)).view(-1, 1, 1, 1)
        return mixed * (t.float() / 1000).view(-1, 1, 1, 1) + shift

    schedule = NoiseSchedule(kind=kind, prediction=prediction)
    context = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(2))
    null = torch.zeros(1, 4, 8)
    expected = ddim_sample(model, schedule, context, null, (1, 3, 4, 4), steps=7,
                           guidance=guidance, generator=torch.Generator().manual_seed(5),
                           clip_x0=clip).numpy()
    noise = torch.randn((1, 3, 4, 4), generator=torch.Generator().manual_seed(5)).numpy()

    def unet(x, t, c):
        return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c)).numpy()

    got = ddim(unet, noise, context.numpy(), null.numpy(), alphas_cumprod(kind, 1000),
               prediction, 7, guidance, clip)
    assert np.abs(got - expected).max() <= 1e-6 * np.abs(expected).max()  # float32 rounding


# --- The manifest --------------------------------------------------------------------------------

def _manifest(decoder: str | None = "decoder.onnx") -> Manifest:
    return Manifest(
        spec="md", source="runs/md/checkpoint.pt", resolution=16, latent_size=8,
        latent_channels=4, fp16=False, clip_x0=None,
        files=BundleFiles("unet.onnx", "text_encoder.onnx", "tokenizer", decoder),
        autoencoder=AutoencoderInfo("diffusers", 0.18215, 2, "AutoencoderKL"),
        noise_schedule=ScheduleInfo("scaled_linear", "epsilon", 1000),
        sampler=SamplerInfo("ddim", 20, 3.0), text_encoder=TextEncoderInfo("minilm", 8, 384))


def _bundle_files(folder):
    for name in ("unet.onnx", "text_encoder.onnx", "decoder.onnx"):
        (folder / name).write_bytes(b"")
    (folder / "tokenizer").mkdir()


def test_manifest_round_trip(tmp_path):
    _bundle_files(tmp_path)
    written = write_manifest(tmp_path, _manifest())
    assert written == tmp_path / MANIFEST
    read = read_manifest(tmp_path)
    assert read.to_dict() == _manifest().to_dict()
    assert read.path("unet") == tmp_path / "unet.onnx" and read.path("tokenizer").is_dir()
    assert list(tmp_path.glob(".*tmp")) == []  # atomic: no temporary file left


@pytest.mark.parametrize("change, message", [
    (lambda d: d.pop("sampler"), "missing required field(s): sampler"),
    (lambda d: d["sampler"].update(kind="euler"), "field sampler.kind: 'euler' is not one of"),
    (lambda d: d["sampler"].update(steps="20"), "field sampler.steps: expected int"),
    (lambda d: d["noise_schedule"].update(prediction="x0"), "field noise_schedule.prediction"),
    (lambda d: d.update(latent_size=6), "field latent_size: 6 x autoencoder.factor 2"),
    (lambda d: d["files"].update(decoder=None), "field files.decoder: null exactly when"),
    (lambda d: d["files"].update(unet="gone.onnx"), "field files.unet: "),
    (lambda d: d["sampler"].update(guidance=float("nan")),
     "field sampler.guidance: must be a positive finite number, got nan"),
    (lambda d: d["autoencoder"].update(scaling_factor=0.0),
     "field autoencoder.scaling_factor: must be a positive finite number, got 0.0"),
    (lambda d: d.update(clip_x0=float("inf")), "field clip_x0: must be positive or null"),
    (lambda d: d.update(clip_x0=1.0), "field clip_x0: null in a latent-space bundle"),
    # a shared bundle never makes generate open a file outside its folder
    (lambda d: d["files"].update(unet="/etc/passwd"),
     "field files.unet: '/etc/passwd' is not a path inside the bundle folder"),
    (lambda d: d["files"].update(unet="../../../../../etc/passwd"),
     "field files.unet: '../../../../../etc/passwd' is not a path inside the bundle folder"),
    (lambda d: d["files"].update(text_encoder="../other/text_encoder.onnx"),
     "field files.text_encoder: '../other/text_encoder.onnx' is not a path inside"),
    (lambda d: d.update(sampeler={}), "unknown field 'sampeler'"),
])
def test_malformed_manifest_names_the_field(tmp_path, change, message):
    _bundle_files(tmp_path)
    data = _manifest().to_dict()
    change(data)
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ExportError, match=re.escape(message)) as err:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(err.value)


def error_line(stderr: str) -> str:
    """The CLI's one error line (progress lines aside)."""
    lines = [line for line in stderr.splitlines() if line.startswith("mdsearch generate: error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_missing_bundle_or_file_is_a_one_line_cli_error(tmp_path, capsys):
    args = ["generate", "--prompt", "x", "--out", str(tmp_path / "x.png")]
    assert main([*args, "--bundle", str(tmp_path / "nowhere")]) == 2
    assert "nowhere: no such bundle folder" in error_line(capsys.readouterr().err)
    assert main([*args, "--bundle", str(tmp_path)]) == 2  # a folder without manifest.json
    assert "manifest.json: missing" in error_line(capsys.readouterr().err)
    _bundle_files(tmp_path)
    write_manifest(tmp_path, _manifest())
    (tmp_path / "decoder.onnx").unlink()
    assert main([*args, "--bundle", str(tmp_path)]) == 2
    err = error_line(capsys.readouterr().err)
    assert "field files.decoder:" in err and "decoder.onnx is missing" in err
    (tmp_path / "decoder.onnx").write_bytes(b"")  # every file there, but not what it should be
    assert main([*args, "--bundle", str(tmp_path)]) == 2
    assert "is not a tokenizer folder" in error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()
    assert main(["generate", "--bundle", str(tmp_path), "--prompt", "x",
                 "--out", str(tmp_path)]) == 2  # a folder, refused before loading anything
    assert "a folder; give the image file to write" in error_line(capsys.readouterr().err)


# --- Bundles of runs, exported and run ---------------------------------------------------------

def tiny_vae(folder):
    """A random diffusers AutoencoderKL small enough for a test: factor 2, 4 latent channels."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8],
                        layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(folder)
    return folder


def make_run(folder, spec, recipe: dict, one_step: bool = False):
    """A run directory as training leaves it (checkpoint with the spec and recipe inside, and
    recipe.yaml beside it), with random weights: parity needs no training."""
    torch.manual_seed(0)
    weights = build(spec).state_dict()
    folder.mkdir(parents=True)
    torch.save({"ema": weights, "model": weights, "spec": spec.to_yaml(),
                "proxy_spec": spec.to_yaml(), "recipe": json.dumps(recipe),
                "one_step": one_step}, folder / "checkpoint.pt")
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return folder


RECIPE = {"name": "t", "text_encoder": {"name": "minilm", "max_length": 8},
          "eval": {"sample_steps": 3, "guidance": 2.0}}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    """Two exported runs: pixel space (identity, linear schedule, epsilon, x0 clipped) at 8x8,
    and a diffusers VAE (scaled_linear, v) at 16x16 from 8x8x4 latents."""
    root = tmp_path_factory.mktemp("bundles")
    runs = {
        "pixel": make_run(root / "pixel_run", tiny("md", context_dim=384, latent_channels=3),
                          {**RECIPE, "resolution": 8, "noise_schedule": "linear",
                           "prediction": "epsilon"}),
        "vae": make_run(root / "vae_run", tiny("md", context_dim=384, latent_channels=4),
                        {**RECIPE, "resolution": 16, "prediction": "v",
                         "autoencoder": {"kind": "diffusers",
                                         "path": str(tiny_vae(root / "vae"))}}),
    }
    exported = {}
    for name, run in runs.items():
        out = root / f"{name}_bundle"
        assert main(["export", "--checkpoint", str(run), "--out", str(out), "--json"]) == 0
        exported[name] = out
    return runs, exported


@pytest.mark.slow
@pytest.mark.minilm
def test_pixel_space_bundle(bundles, capsys):
    runs, out = bundles
    manifest = read_manifest(out["pixel"])
    assert manifest.files.decoder is None and not (out["pixel"] / "decoder.onnx").exists()
    assert manifest.autoencoder.kind == "identity" and manifest.clip_x0 == 1.0
    assert (manifest.resolution, manifest.latent_size, manifest.latent_channels) == (8, 8, 3)
    assert manifest.noise_schedule == ScheduleInfo("linear", "epsilon", 1000)
    assert manifest.sampler == SamplerInfo("ddim", 3, 2.0)
    assert manifest.text_encoder == TextEncoderInfo("minilm", 8, 384, "")

    result = generate(out["pixel"], PROMPT, seed=3, check=runs["pixel"])
    assert result.max_abs_diff < PARITY_TOLERANCE
    assert result.pixels.shape == (3, 8, 8) and np.abs(result.pixels).max() <= 1
    latency = result.latency
    assert latency.unet_calls == 6 and latency.text_encoder_calls == 2  # 3 steps x CFG
    assert latency.decoder_ms is None and latency.total_ms > latency.unet_ms > 0

    # one step, no guidance (a UFOGen generator's sampler): one UNet call. This run predicts
    # epsilon, so its one step from t = T - 1 divides the UNet's output by sqrt(alpha_bar):
    # a float32 difference between ORT and PyTorch (~1e-6) reaches the pixels 157x larger
    one = generate(out["pixel"], PROMPT, seed=3, steps=1, guidance=1.0, check=runs["pixel"])
    assert one.sampler == "one-step" and one.latency.unet_calls == 1
    a_last = float(alphas_cumprod("linear", 1000)[-1])
    gain = ((1 - a_last) / a_last) ** 0.5
    assert one.latency.text_encoder_calls == 1 and one.max_abs_diff < PARITY_TOLERANCE * gain


@pytest.mark.slow
@pytest.mark.minilm
def test_latent_bundle_decodes_with_the_vae(bundles):
    runs, out = bundles
    saved = json.loads((out["vae"] / "decoder.json").read_text())
    assert saved["within_tolerance"] and saved["rel_err"] <= 1e-4 and saved["latency_ms"] > 0
    assert (saved["latent_size"], saved["image_size"], saved["factor"]) == (8, 16, 2)
    manifest = read_manifest(out["vae"])
    assert manifest.files.decoder == "decoder.onnx" and manifest.clip_x0 is None
    assert manifest.autoencoder == AutoencoderInfo("diffusers", 0.18215, 2, "AutoencoderKL")
    assert (manifest.resolution, manifest.latent_size, manifest.latent_channels) == (16, 8, 4)
    assert manifest.noise_schedule == ScheduleInfo("scaled_linear", "v", 1000)

    bundle = Bundle(out["vae"])
    result = generate(bundle, PROMPT, seed=1, check=runs["vae"])
    assert result.pixels.shape == (3, 16, 16) and result.max_abs_diff < PARITY_TOLERANCE
    assert (np.abs(result.pixels) < 0.99).mean() > 0.5  # not saturated: the check means something
    assert result.latency.decoder_calls == 1 and result.latency.decoder_ms > 0
    # the same seed, the same image; another seed, another
    again = bundle.generate(PROMPT, seed=1)
    assert np.array_equal(again.pixels, result.pixels)
    assert not np.array_equal(bundle.generate(PROMPT, seed=2).pixels, result.pixels)


@pytest.mark.slow
@pytest.mark.minilm
def test_a_manifest_whose_factor_the_decoder_contradicts_is_refused(bundles, tmp_path):
    """resolution = latent_size x factor holds in the manifest, but the decoder upsamples 2x,
    not 4x: refused on loading (its warm-up run), naming the fields, not a wrong-sized PNG."""
    import shutil

    _, out = bundles
    copy = shutil.copytree(out["vae"], tmp_path / "b")
    data = json.loads((copy / MANIFEST).read_text())
    data["autoencoder"]["factor"], data["resolution"] = 4, 32
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ExportError, match="fields resolution and autoencoder.factor say 32 px, "
                                          "but .*decoder.onnx gives 16x16 images"):
        Bundle(copy)
    # the decoder's entry naming the UNet (same latents input): refused by the graph's inputs
    data = json.loads((out["vae"] / MANIFEST).read_text())
    data["files"]["decoder"] = data["files"]["unet"]
    (copy / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ExportError, match="field files.decoder: .* takes context, latents, "
                                          "timesteps, not the decoder's latents"):
        Bundle(copy)


@pytest.mark.slow
@pytest.mark.minilm
def test_null_context_is_trainings(bundles, tmp_path):
    """Guidance's unconditional branch is the empty caption, as training's null context
    (the embedding cache stores it in float16)."""
    from mdsearch.data.text import cached_embeddings, get_text_encoder

    _, out = bundles
    training = cached_embeddings(get_text_encoder("minilm", max_length=8), ["a caption"],
                                 cache_dir=tmp_path).null.tokens.numpy()
    bundle = Bundle(out["pixel"], warmup=False)
    null = bundle.encode(bundle.manifest.text_encoder.null_caption)
    assert null.shape == training.shape == (1, 8, 384)
    assert np.abs(null - training).max() <= 1e-3 * np.abs(training).max()


@pytest.mark.slow
@pytest.mark.minilm
def test_cli_generate_writes_the_png(bundles, tmp_path, capsys):
    from PIL import Image

    _, out = bundles
    png = tmp_path / "sub" / "img.png"
    assert main(["generate", "--bundle", str(out["vae"]), "--prompt", PROMPT, "--out", str(png),
                 "--seed", "4", "--steps", "2", "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with Image.open(png) as image:
        assert image.size == (16, 16) and image.mode == "RGB"
    assert last["path"] == str(png) and last["size"] == [16, 16] and last["steps"] == 2
    assert last["latency"]["unet_calls"] == 4 and last["max_abs_diff"] is None
    assert main(["generate", "--bundle", str(out["pixel"]), "--prompt", PROMPT,
                 "--out", str(png)]) == 0  # overwrites; prints the Table-4-shaped table
    text = capsys.readouterr().out
    assert "| UNet ms per call | UNet calls |" in text and "- (pixel space)" in text
    with Image.open(png) as image:
        assert image.size == (8, 8)


@pytest.mark.slow
@pytest.mark.minilm
def test_manifest_sampler_follows_the_run(bundles):
    """The recipe's DDIM steps and guidance; one step without guidance for a one-step (UFOGen)
    checkpoint; no manifest for an export that is not a whole bundle."""
    from mdsearch.data.autoencoder import IdentityAutoencoder
    from mdsearch.export.bundle import Exported, bundle_manifest
    from mdsearch.export.onnx import ExportResult
    from mdsearch.export.text import TextExportResult
    from mdsearch.train.recipe import Recipe

    _, out = bundles
    exported = Exported(
        ExportResult(**json.loads((out["pixel"] / "unet.json").read_text())),
        TextExportResult(**json.loads((out["pixel"] / "text_encoder.json").read_text())))
    recipe, pixels = Recipe.from_dict({**RECIPE, "resolution": 8}), IdentityAutoencoder()
    assert bundle_manifest(exported, recipe, pixels).sampler == SamplerInfo("ddim", 3, 2.0)
    one_step = bundle_manifest(exported, recipe, pixels, one_step=True)
    assert one_step.sampler == SamplerInfo("one-step", 1, 1.0)
    assert bundle_manifest(Exported(exported.unet, None), recipe, pixels) is None


# --- The decoder on its own ----------------------------------------------------------------------

def test_fp16_decoder_and_channel_mismatch(tmp_path, tiny_spec):
    from mdsearch.data.autoencoder import IdentityAutoencoder, make_autoencoder
    from mdsearch.data.errors import DataError
    from mdsearch.export.bundle import export_models
    from mdsearch.export.onnx import random_model
    from mdsearch.export.decoder import export_decoder

    autoencoder = make_autoencoder({"kind": "diffusers", "path": str(tiny_vae(tmp_path / "v"))})
    result = export_decoder(autoencoder, tmp_path, latent_size=4, fp16=True, latency_runs=1)
    assert result.fp16 and result.path.endswith("decoder_fp16.onnx") and result.image_size == 8
    assert 0 <= result.max_abs_err < 0.05
    assert next(autoencoder.vae.parameters()).dtype == torch.float32  # the caller's stays fp32
    pixel_unet = tiny_spec("md", latent_channels=3)
    with pytest.raises(DataError, match="field latent_channels: the UNet takes 3-channel"):
        export_models(pixel_unet, random_model(pixel_unet), tmp_path / "refused", 4,
                      autoencoder=autoencoder)
    assert not (tmp_path / "refused").exists()  # refused before anything is written
    with pytest.raises(ExportError, match="pixel space, so there is no decoder"):
        export_decoder(IdentityAutoencoder(), tmp_path, latent_size=4)


@pytest.mark.slow
@pytest.mark.minilm
def test_generate_check_against_another_run_fails_in_one_line(bundles, tmp_path, capsys):
    """`generate --check RUN` with a RUN the bundle was not exported from reported a 0.487 pixel
    difference and exited 0; above one 8-bit level it is a failed check."""
    runs, out = bundles
    code = main(["generate", "--bundle", str(out["pixel"]), "--prompt", PROMPT, "--out",
                 str(tmp_path / "same.png"), "--check", str(runs["pixel"])])
    assert code == 0
    other = make_run(tmp_path / "other_run", tiny("md", context_dim=384, latent_channels=3),
                     yaml.safe_load((runs["pixel"] / "recipe.yaml").read_text()))
    state = torch.load(other / "checkpoint.pt", weights_only=True)
    torch.manual_seed(1)  # the same recipe and spec, other weights
    state["ema"] = state["model"] = {k: v + 0.05 * torch.randn_like(v) if v.is_floating_point()
                                     else v for k, v in state["model"].items()}
    torch.save(state, other / "checkpoint.pt")
    with pytest.raises(SystemExit, match="check failed: the bundle's image differs from"):
        main(["generate", "--bundle", str(out["pixel"]), "--prompt", PROMPT, "--out",
              str(tmp_path / "other.png"), "--check", str(other)])


@pytest.mark.slow
@pytest.mark.minilm
def test_generate_grid_draws_each_prompt_from_the_bundle(bundles, tmp_path, capsys):
    from PIL import Image

    from mdsearch.export.pipeline import Bundle, generate_grid

    _, out = bundles
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# the README's grid\n{PROMPT}\n\n  two small red circles at the top on "
                       "a gray background  \nthree large white rings on a striped background\n")
    png = tmp_path / "grid" / "grid.png"
    assert main(["generate", "--bundle", str(out["pixel"]), "--grid", str(prompts), "--out",
                 str(png), "--seed", "2", "--columns", "2", "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["path"] == str(png)
    assert [i["prompt"] for i in last["images"]] == [
        PROMPT, "two small red circles at the top on a gray background",
        "three large white rings on a striped background"]
    with Image.open(png) as image:
        two_columns = image.size
    results = generate_grid(out["pixel"], [PROMPT] * 3, tmp_path / "four.png", seed=2)
    with Image.open(tmp_path / "four.png") as image:
        assert image.size[0] > 1.4 * two_columns[0]  # 3 images in a row, not 2
    bundle = Bundle(out["pixel"])
    assert np.array_equal(results[0].pixels, bundle.generate(PROMPT, seed=2).pixels)


@pytest.mark.parametrize("content, message", [
    (None, "no such prompts file"),
    ("# only a comment\n\n", "no prompts (one caption per line"),
    (b"a red circle\n\xff\xfe\n", "not UTF-8 text"),
    ("a red circle\nblue\x07square\n", "line 2: not a caption"),
    ("".join(f"prompt {i}\n" for i in range(65)), "65 prompts; a grid takes at most 64")])
def test_a_bad_prompts_file_is_one_line_and_writes_nothing(tmp_path, capsys, content, message):
    prompts = tmp_path / "prompts.txt"
    if isinstance(content, bytes):
        prompts.write_bytes(content)
    elif content is not None:
        prompts.write_text(content)
    png = tmp_path / "grid.png"
    assert main(["generate", "--bundle", str(tmp_path), "--grid", str(prompts), "--out",
                 str(png)]) == 2
    line = error_line(capsys.readouterr().err)
    assert str(prompts) in line and message in line
    assert not png.exists()
    with pytest.raises(SystemExit) as exit_:  # one image or a grid, not both
        main(["generate", "--bundle", str(tmp_path), "--grid", str(prompts), "--prompt", "x",
              "--out", str(png)])
    assert exit_.value.code == 2
