"""Export: ONNX graphs that ONNX Runtime runs, matching PyTorch; the CLI contract."""

import json

import pytest
import torch

from mdsearch.cli import main
from mdsearch.export.onnx import ExportError, export_unet, load_checkpoint, random_model

pytest.importorskip("onnxruntime")


def test_md_topology_exports_with_fp32_parity(tmp_path, tiny_spec):
    spec = tiny_spec("md")
    result = export_unet(spec, random_model(spec), tmp_path, latent_size=16, latency_runs=2)
    assert result.within_tolerance and result.rel_err <= 1e-4
    assert result.max_abs_err < 1e-3 and result.latency_ms > 0 and result.size_bytes > 0
    assert not result.external_data and result.opset >= 17
    saved = json.loads((tmp_path / "unet.json").read_text())
    assert saved["max_abs_err"] == result.max_abs_err


def test_fp16_export_runs_and_reports_its_error(tmp_path, tiny_spec):
    spec = tiny_spec("md")
    model = random_model(spec)
    result = export_unet(spec, model, tmp_path, latent_size=16, fp16=True, latency_runs=1)
    assert result.fp16 and result.path.endswith("unet_fp16.onnx")
    assert 0 < result.max_abs_err < 0.5  # half precision: small but non-zero
    assert next(model.parameters()).dtype == torch.float32  # the caller's model is untouched


def test_relu_attention_and_sd15_topologies_export(tmp_path, tiny_spec):
    for name, spec in (("relu", tiny_spec("md", attn_nonlinearity="relu")),
                       ("sd15", tiny_spec("sd15"))):
        r = export_unet(spec, random_model(spec), tmp_path / name, latent_size=16,
                        latency_runs=1)
        assert r.within_tolerance, (name, r.rel_err)


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


def test_bad_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ExportError, match="proxy_spec.yaml: the spec the checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "proxy_spec.yaml").write_text("levels: [{channels: 32}]\nnorm_groups: 8\n")
    assert main(["export", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a readable mdsearch checkpoint" in capsys.readouterr().err
