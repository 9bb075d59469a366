"""Export: ONNX graphs that ONNX Runtime runs, matching PyTorch; Core ML packages; the CLI
contract."""

import json
import sys

import numpy as np
import pytest
import torch

from mdsearch.cli import main
from mdsearch.data.errors import DataError
from mdsearch.data.text import TextEncoder, get_text_encoder
from mdsearch.export.bundle import export_models, pair_text_encoder, trial_text_encoder
from mdsearch.export.onnx import ExportError, export_unet, load_checkpoint, random_model
from mdsearch.export.text import export_text_encoder

ort = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def minilm():
    return get_text_encoder("minilm", max_length=8)


@pytest.mark.slow
def test_md_topology_exports_with_fp32_parity(tmp_path, tiny_spec):
    spec = tiny_spec("md")
    result = export_unet(spec, random_model(spec), tmp_path, latent_size=16, latency_runs=2)
    assert result.within_tolerance and result.rel_err <= 1e-4
    assert result.max_abs_err < 1e-3 and result.latency_ms > 0 and result.size_bytes > 0
    assert not result.external_data and result.opset >= 17
    saved = json.loads((tmp_path / "unet.json").read_text())
    assert saved["max_abs_err"] == result.max_abs_err


@pytest.mark.slow
def test_fp16_export_runs_and_reports_its_error(tmp_path, tiny_spec):
    spec = tiny_spec("md")
    model = random_model(spec)
    result = export_unet(spec, model, tmp_path, latent_size=16, fp16=True, latency_runs=1)
    assert result.fp16 and result.path.endswith("unet_fp16.onnx")
    assert 0 < result.max_abs_err < 0.5  # half precision: small but non-zero
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched


@pytest.mark.slow
def test_relu_attention_and_sd15_topologies_export(tmp_path, tiny_spec):
    for name, spec in (("relu", tiny_spec("md", attn_nonlinearity="relu")),
                       ("sd15", tiny_spec("sd15"))):
        r = export_unet(spec, random_model(spec), tmp_path / name, latent_size=16,
                        latency_runs=1)
        assert r.within_tolerance, (name, r.rel_err)


@pytest.mark.slow
def test_cli_exports_a_trained_checkpoint_with_json(tmp_path, capsys, monkeypatch,
                                                    tmp_path_factory):
    from mdsearch.train.recipe import Recipe
    from mdsearch.train.trainer import train_trial

    monkeypatch.setenv("MDSEARCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))

    class Stats:
        def evaluate(self, images, captions, labels):
            return {"sample_mean": images.mean().item()}

    recipe = Recipe.from_dict({
        "name": "t", "data": {"kind": "synthetic", "size": 32, "eval_size": 16, "seed": 0},
        "text_encoder": {"name": "minilm", "max_length": 8}, "resolution": 16, "width": 0.0625,
        "batch_size": 2, "steps": 2, "ema_decay": 0.9, "checkpoint_every": 2, "log_every": 1,
        "eval": {"every": 2, "sample_steps": 1, "prompts": 4, "reference_images": 16}})
    from mdsearch.arch import presets

    train_trial(presets.get("md"), recipe, tmp_path / "trial", evaluator=Stats())
    spec, model = load_checkpoint(tmp_path / "trial")
    assert spec.latent_channels == 3  # the pixel-space proxy that was trained
    assert main(["export", "--checkpoint", str(tmp_path / "trial"), "--resolution", "16",
                 "--out", str(tmp_path / "onnx"), "--json"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"max_abs_err", "latency_ms", "path"} <= set(last)
    assert last["latent_size"] == 16 and last["within_tolerance"]
    text = last["text_encoder"]  # exported by default: the trial's MiniLM, at its 8 tokens
    assert {"max_abs_err", "latency_ms", "path"} <= set(text) and text["within_tolerance"]
    assert text["encoder"] == "minilm" and text["max_length"] == 8 and text["dim"] == 384
    assert (tmp_path / "onnx" / "text_encoder.onnx").is_file()
    assert (tmp_path / "onnx" / "tokenizer" / "tokenizer.json").is_file()


def test_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="checkpoint.pt: not a readable mdsearch checkpoint"):
        load_checkpoint(tmp_path)
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable mdsearch checkpoint" in capsys.readouterr().err
    # an old-style checkpoint (no spec inside) with no proxy_spec.yaml beside it
    torch.save({"ema": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(ExportError, match="proxy_spec.yaml: the spec the checkpoint"):
        load_checkpoint(tmp_path)


# --- The text encoder's own graph ---------------------------------------------------------------

@pytest.mark.minilm
def test_minilm_text_encoder_exports_with_fp32_parity(tmp_path, minilm):
    result = export_text_encoder(minilm, tmp_path, latency_runs=2)
    assert result.within_tolerance and result.rel_err <= 1e-4 and result.max_abs_err < 1e-3
    assert result.latency_ms > 0 and result.size_bytes > 0 and result.opset >= 17
    assert result.inputs == ["input_ids", "attention_mask"] and result.dim == 384
    saved = json.loads((tmp_path / "text_encoder.json").read_text())
    assert saved["max_abs_err"] == result.max_abs_err

    # What a phone app does: the saved tokenizer pads to the graph's length, the graph's output
    # is exactly what training used as context (TextEncoder.encode's tokens).
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(result.tokenizer)
    batch = tokenizer(["a red circle"], padding="max_length", truncation=True, return_tensors="np")
    assert batch["input_ids"].shape == (1, 8) and batch["attention_mask"][0, -1] == 0
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["context"]
    context = session.run(None, {"input_ids": batch["input_ids"].astype(np.int64),
                                 "attention_mask": batch["attention_mask"].astype(np.int64)})[0]
    expected = minilm.encode(["a red circle"]).tokens.numpy()
    assert context.shape == (1, 8, 384) and np.abs(context - expected).max() < 1e-4


class TinyCLIP(TextEncoder):
    """CLIP's text tower at a tiny random width: the graph takes input_ids only."""

    name = "clip"
    mask_in_model = False

    def __init__(self, tokenizer):
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(0)
        config = CLIPTextConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                max_position_embeddings=16)
        super().__init__(CLIPTextModel(config), tokenizer, 8, "cpu", cache_id="tiny-clip")

    def _pool(self, out, tokens, mask):
        return out.pooler_output


def test_clip_style_encoder_exports_ids_only(tmp_path, minilm):
    encoder = TinyCLIP(minilm.tokenizer)
    result = export_text_encoder(encoder, tmp_path, latency_runs=1)
    assert result.inputs == ["input_ids"] and result.within_tolerance
    session = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]


def test_context_dim_mismatch_is_a_clear_error(tmp_path, tiny_spec, minilm, capsys):
    spec = tiny_spec("md")  # context_dim 32: no known encoder is that wide
    with pytest.raises(ExportError, match="takes 32-wide context but text encoder 'minilm'"):
        export_models(spec, random_model(spec), tmp_path, 16, encoder=minilm)
    assert not list(tmp_path.iterdir())  # refused before anything was written
    file = tmp_path / "spec.yaml"
    file.write_text(spec.to_yaml())
    args = ["export", "--spec", str(file), "--latent-size", "16", "--out", str(tmp_path / "o")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "field context_dim: no known text encoder outputs 32-wide tokens" in err
    assert "--no-text-encoder" in err and "Traceback" not in err
    assert main([*args, "--text-encoder", "minilm"]) == 2
    err = capsys.readouterr().err
    assert f"{file}: field context_dim: the UNet takes 32-wide context" in err
    assert "outputs 384-wide tokens" in err


def test_trial_recipe_names_the_text_encoder(tmp_path, tiny_spec, monkeypatch):
    assert trial_text_encoder(tmp_path) is None
    sweep, trial = tmp_path, tmp_path / "trial_0"
    trial.mkdir()
    (sweep / "recipe.yaml").write_text("name: x\ntext_encoder: {name: clip, path: /nowhere}\n")
    assert trial_text_encoder(trial / "checkpoint.pt") == (
        {"name": "clip", "path": "/nowhere"}, sweep / "recipe.yaml")
    (trial / "recipe.yaml").write_text("name: x\n")  # the trial's own: the default, minilm
    assert trial_text_encoder(trial)[0] == {"name": "minilm"}
    (trial / "recipe.yaml").write_text("name: x\ntext_encoder: {name: clip, path: /nowhere}\n")
    monkeypatch.delenv("MDSEARCH_CLIP_PATH", raising=False)
    with pytest.raises(DataError, match="'/nowhere' does not exist"):
        pair_text_encoder(tiny_spec("md", context_dim=768), trial_dir=trial)
    (trial / "recipe.yaml").write_text("text_encoder: clip\n")
    with pytest.raises(ExportError, match="recipe.yaml: field text_encoder: expected a mapping"):
        trial_text_encoder(trial)


# --- Core ML (optional extra) --------------------------------------------------------------------

def _check_coreml(result, name, tmp_path):
    from mdsearch.export.coreml import can_predict

    assert result.format == "coreml" and result.path.endswith(f"{name}.mlpackage")
    assert (tmp_path / f"{name}.mlpackage").is_dir() and result.size_bytes > 0
    assert result.target == "iOS16" and result.opset is None
    if can_predict():
        assert result.within_tolerance and result.latency_ms > 0
    else:
        assert result.max_abs_err is None and result.latency_ms is None
        assert result.parity.startswith("not run: Core ML predictions need macOS")
    saved = json.loads((tmp_path / f"{name}.json").read_text())
    assert saved["parity"] == result.parity


@pytest.mark.slow
def test_coreml_converts_the_md_unet(tmp_path, tiny_spec):
    pytest.importorskip("coremltools")
    from mdsearch.export.coreml import convert_unet

    spec = tiny_spec("md")
    result = convert_unet(spec, random_model(spec), tmp_path, 8, latency_runs=1)
    _check_coreml(result, "unet", tmp_path)


@pytest.mark.slow
@pytest.mark.minilm
def test_coreml_converts_the_minilm_text_encoder(tmp_path, minilm):
    pytest.importorskip("coremltools")
    from mdsearch.export.coreml import convert_text_encoder

    result = convert_text_encoder(minilm, tmp_path, latency_runs=1)
    _check_coreml(result, "text_encoder", tmp_path)
    assert result.inputs == ["input_ids", "attention_mask"]
    assert (tmp_path / "tokenizer" / "tokenizer.json").is_file()


def test_coreml_without_coremltools_is_a_one_line_error(tmp_path, tiny_spec, capsys,
                                                        monkeypatch):
    monkeypatch.setitem(sys.modules, "coremltools", None)  # `import coremltools` fails
    file = tmp_path / "spec.yaml"
    file.write_text(tiny_spec("md").to_yaml())
    assert main(["export", "--spec", str(file), "--format", "coreml", "--no-text-encoder",
                 "--latent-size", "8", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "coremltools, which is not installed" in err
    assert "pip install -c constraints.txt -e '.[coreml]'" in err
    assert not (tmp_path / "o").exists()
