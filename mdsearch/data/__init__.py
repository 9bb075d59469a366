"""Datasets and frozen text encoders for proxy training of text-to-image diffusion UNets.

    make_dataset({"kind": "synthetic", "size": 10000, "seed": 0}, resolution=32, split="train")
    make_dataset({"kind": "folder", "root": "data/pets", "captions": "captions.jsonl"}, 64, "train")
    make_dataset({"kind": "coco", "root": "coco/train2017",
                  "annotations": "../annotations/captions_train2017.json"}, 64, "train")

Every dataset yields dicts {"image": (3, H, W) float in [-1, 1], "caption": str, "index": int},
plus "labels" (LongTensor of attribute classes) for the synthetic dataset; torch's default
DataLoader collate batches them. Every dataset has a `captions()` method for the text-embedding
cache (`mdsearch.data.text.cached_embeddings`). Text encoders live in `mdsearch.data.text`
(imported lazily: it pulls in transformers).

Modules: synthetic (the built-in shapes dataset), folder (image folders and COCO), text
(MiniLM / CLIP encoders and the embedding cache), errors (`DataError`).
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from ..errors import did_you_mean
from .errors import DataError
from .folder import CocoCaptions, ImageCaptionFolder, Skipped, load_image
from .synthetic import (ATTRIBUTES, CHANCE, SyntheticShapes, caption_for, eval_prompts,
                        labels_for, render)

__all__ = ["DataError", "make_dataset", "DATASET_KINDS", "SPLITS", "SyntheticShapes",
           "ImageCaptionFolder", "CocoCaptions", "Skipped", "load_image", "ATTRIBUTES", "CHANCE",
           "caption_for", "labels_for", "render", "eval_prompts"]

SPLITS = ("train", "val", "test")

# kind -> (required keys, optional keys with defaults)
DATASET_KINDS: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    "synthetic": ((), {"size": 10000, "eval_size": 1000, "seed": 0}),
    "folder": (("root", "captions"), {}),
    "coco": (("root", "annotations"), {"one_caption_per_image": False}),
}
"""The dataset kinds a recipe's data section can name, with their required and optional keys.

synthetic: `size` items for train, `eval_size` for val and test (independent streams per split).
folder / coco: `captions` / `annotations` is one file for every split, or a mapping from split
to file, e.g. {"train": "train.jsonl", "val": "val.jsonl"}; relative paths are taken from root.
"""


def make_dataset(cfg: dict, resolution: int, split: str = "train") -> Dataset:
    """The dataset a recipe's data config describes, at `resolution`, for `split`."""
    if not isinstance(cfg, dict):
        raise DataError(f"data config must be a mapping with a 'kind' key, got {cfg!r}")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}{did_you_mean(split, SPLITS)}")
    kind = cfg.get("kind")
    if kind is None:
        raise DataError(f"data config {cfg!r} has no 'kind': expected one of "
                        f"{', '.join(DATASET_KINDS)}")
    if kind not in DATASET_KINDS:
        raise DataError(f"data config: unknown kind {kind!r}"
                        f"{did_you_mean(str(kind), DATASET_KINDS)}")
    required, optional = DATASET_KINDS[kind]
    allowed = {"kind", *required, *optional}
    for key in cfg:
        if key not in allowed:
            raise DataError(f"data config (kind {kind!r}): unknown key {key!r}"
                            f"{did_you_mean(key, sorted(allowed))}")
    missing = [key for key in required if key not in cfg]
    if missing:
        raise DataError(f"data config (kind {kind!r}): missing key(s) {', '.join(missing)}")
    args = {**optional, **{k: v for k, v in cfg.items() if k != "kind"}}

    if kind == "synthetic":
        size = args["size"] if split == "train" else args["eval_size"]
        return SyntheticShapes(size=size, resolution=resolution, seed=args["seed"], split=split)
    if kind == "folder":
        return ImageCaptionFolder(args["root"], _for_split(args, "captions", split), resolution)
    return CocoCaptions(args["root"], _for_split(args, "annotations", split), resolution,
                        one_caption_per_image=bool(args["one_caption_per_image"]))


def _for_split(args: dict, key: str, split: str) -> str:
    """A file given once for every split, or per split as {split: file}."""
    value = args[key]
    if isinstance(value, dict):
        if split not in value:
            raise DataError(f"data config: {key} has no entry for split {split!r} "
                            f"(it has {', '.join(map(str, value)) or 'none'})")
        value = value[split]
    if not isinstance(value, str) or not value:
        raise DataError(f"data config: {key} must be a file path (or a mapping from split to "
                        f"file path), got {value!r}")
    return value
