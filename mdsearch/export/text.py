"""Export a frozen text encoder as its own ONNX graph, checked against PyTorch in ONNX Runtime.

    encoder = get_text_encoder("minilm", max_length=spec.context_len)
    result = export_text_encoder(encoder, "out/md")   # out/md/text_encoder.onnx, out/md/tokenizer/
    result.max_abs_err, result.latency_ms, result.path

The graph maps token ids of a fixed batch of 1 and the encoder's fixed max_length L to `context`
(1, L, dim): exactly what `TextEncoder.encode` returns as `tokens` and the UNet takes as its
`context` input, i.e. the last hidden states, float32, with no normalisation and the padding
positions left as they are (the UNet was trained on them). MiniLM takes (input_ids,
attention_mask), both int64 (1, L), since it masks padding inside the model; CLIP takes input_ids
only, as Stable Diffusion runs it (its causal attention never lets real tokens see the padding
that follows them). The tokenizer is saved beside the graph (OUT/tokenizer/, its
model_max_length set to L) so an app can pad captions to L with it.

Parity is measured as for the UNet: a real caption (padded, so the mask matters) through
`TextEncoder.encode`, and random token ids with half the positions masked as padding through the
same PyTorch model, against ONNX Runtime (CPU). `max_abs_err` is the largest absolute difference
over both and `rel_err` that difference relative to the largest output magnitude (fp32 passes at
<= 1e-4). `--fp16` exports a half-precision copy and reports its error against fp32 PyTorch.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..progress import quiet
from ..data.text import TextEncoder
from .onnx import (OPSET, ExportError, GraphResult, check_opset, needs_external_data, onnx_size,
                   ort_parity, write_graph)

PARITY_CAPTION = "a small red circle above a large blue square"


@dataclass(kw_only=True)
class TextExportResult(GraphResult):
    """One exported text encoder (fields as the UNet's `ExportResult`, plus what an app needs
    to feed it: `inputs`, `max_length`, the tokenizer folder, and the output width `dim`)."""

    encoder: str
    params: int
    max_length: int
    dim: int
    inputs: list[str]
    tokenizer: str


class ContextGraph(torch.nn.Module):
    """The exported computation: token ids (and mask) -> the encoder's last hidden states,
    as `TextEncoder.encode` computes its `tokens`."""

    def __init__(self, encoder: TextEncoder):
        super().__init__()
        self.model = encoder.model
        self.uses_mask = encoder.mask_in_model

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = attention_mask if self.uses_mask else None
        return self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state


def input_names(encoder: TextEncoder) -> list[str]:
    return ["input_ids", "attention_mask"] if encoder.mask_in_model else ["input_ids"]


def parity_inputs(encoder: TextEncoder) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) pairs, int64 (1, L): a real caption padded to L, and random
    ids of which the last half are masked as padding (fixed seed)."""
    length = encoder.max_length
    batch = encoder.tokenizer([PARITY_CAPTION], padding="max_length", truncation=True,
                              max_length=length, return_tensors="pt")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, int(encoder.model.config.vocab_size), (1, length), generator=g)
    mask = (torch.arange(length) < max(length // 2, 1)).long().unsqueeze(0)
    return [(batch["input_ids"].long(), batch["attention_mask"].long()), (ids, mask)]


def references(encoder: TextEncoder, graph: ContextGraph,
               inputs: list[tuple[torch.Tensor, torch.Tensor]]) -> list[np.ndarray]:
    """PyTorch's output for each input pair: the real caption through `encode` itself (so the
    check ties the graph to what training used), the random ids through the model."""
    if encoder.device.type != "cpu":
        raise ExportError(f"text encoder {encoder.name!r} is on {encoder.device}; export a CPU "
                          f"copy (get_text_encoder(..., device='cpu'))")
    first = encoder.encode([PARITY_CAPTION]).tokens.numpy()
    with torch.inference_mode():
        rest = [graph(ids, mask).float().numpy() for ids, mask in inputs[1:]]
    return [first, *rest]


def prepare(encoder: TextEncoder):
    """What every text-encoder export needs: input names, the graph module, the parity inputs,
    PyTorch's outputs on them, and the parameter count."""
    graph = ContextGraph(encoder).eval()
    inputs = parity_inputs(encoder)
    return (input_names(encoder), graph, inputs, references(encoder, graph, inputs),
            sum(p.numel() for p in graph.parameters()))


def save_tokenizer(encoder: TextEncoder, out_dir: Path) -> Path:
    """The encoder's tokenizer in OUT_DIR/tokenizer/, padding to the graph's max_length."""
    tokenizer = copy.deepcopy(encoder.tokenizer)
    tokenizer.model_max_length = encoder.max_length
    folder = out_dir / "tokenizer"
    tokenizer.save_pretrained(str(folder))
    return folder


def export_text_encoder(encoder: TextEncoder, out_dir: str | Path, fp16: bool = False,
                        opset: int = OPSET, latency_runs: int = 5,
                        progress=None) -> TextExportResult:
    """Export `encoder` to OUT_DIR/text_encoder.onnx (text_encoder_fp16.onnx) with its
    tokenizer, check it in ONNX Runtime."""
    check_opset(opset)
    say = progress or quiet
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / ("text_encoder_fp16.onnx" if fp16 else "text_encoder.onnx")
    names, graph, inputs, reference, params = prepare(encoder)

    exported = copy.deepcopy(graph).half() if fp16 else graph  # the caller's model stays fp32
    large = needs_external_data(params, fp16)
    say(f"exporting text encoder {encoder.name} ({params / 1e6:.1f}M params, {len(names)} "
        f"inputs of 1x{encoder.max_length} tokens) to {path}")
    export_seconds = write_graph(exported, inputs[0][:len(names)], path, names, ["context"],
                                 opset, large)
    del exported
    tokenizer = save_tokenizer(encoder, out)

    say("checking the text encoder's parity in ONNX Runtime")
    feeds = [dict(zip(names, (ids.numpy(), mask.numpy()))) for ids, mask in inputs]
    result = TextExportResult(
        path=str(path), format="onnx", encoder=encoder.name, params=params,
        max_length=encoder.max_length, dim=encoder.dim, inputs=names, tokenizer=str(tokenizer),
        opset=opset, fp16=fp16, size_bytes=onnx_size(path), external_data=large,
        export_seconds=export_seconds,
        **ort_parity(path, feeds, reference, fp16, latency_runs))
    (out / (path.stem + ".json")).write_text(json.dumps(result.to_dict(), indent=2))
    return result
