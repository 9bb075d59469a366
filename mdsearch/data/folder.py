"""Real captioned images: an image folder with a captions file, or the COCO captions format.

    ImageCaptionFolder(root, "captions.jsonl", 64)   # {"file": "a.png", "caption": "..."} a line
    ImageCaptionFolder(root, "captions.csv", 64)     # a header row with columns file,caption
    CocoCaptions(root="coco/train2017",
                 annotations="coco/annotations/captions_train2017.json", resolution=64)

Relative paths (the captions file, the annotations file, each image file) are taken relative to
`root`. Items are dicts like the synthetic dataset's: image (3, H, W) float in [-1, 1] (RGB, the
shorter side resized to `resolution` and the centre cropped square), caption, index; there are
no attribute labels, so the "labels" key is absent (which keeps torch's default collate working).

A missing or malformed captions/annotations file raises `DataError` at construction. Image files
are never silently dropped: those missing at construction, and those that fail to decode (found
lazily by `__getitem__`, or all at once by `verify()`), are skipped and listed in `.skipped` as
(file, reason) pairs, with a logged warning that gives the count. A skipped item is replaced by
the next readable one, so a DataLoader never sees a hole. (With DataLoader workers, lazily found
failures are recorded in the worker processes; run `verify()` first to see them all here.)
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from .errors import DataError

log = logging.getLogger(__name__)

# What PIL raises on a missing, truncated, corrupt or oversized image file.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class Skipped(NamedTuple):
    """An image that was left out, and why."""

    file: str
    reason: str


def load_image(path: str | Path, resolution: int) -> torch.Tensor:
    """An image file as float (3, resolution, resolution) in [-1, 1]: RGB, the shorter side
    resized to `resolution` (bicubic) and the centre cropped. Raises one of IMAGE_ERRORS if the
    file can't be read."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        img = ImageOps.fit(img, (resolution, resolution), method=Image.Resampling.BICUBIC,
                           centering=(0.5, 0.5))
        array = np.asarray(img, dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def _check_resolution(resolution: int) -> int:
    if not isinstance(resolution, (int, np.integer)) or isinstance(resolution, bool) \
            or not 8 <= resolution <= 4096:
        raise DataError(f"resolution must be an integer from 8 to 4096, got {resolution!r}")
    return int(resolution)


def _resolve(root: Path, path: str | Path) -> Path:
    path = Path(path).expanduser()
    return path if path.is_absolute() else root / path


def _root_and_file(root: str | Path, file: str | Path, root_what: str,
                   file_what: str) -> tuple[Path, Path]:
    """The image folder and the captions/annotations file (relative to it), both checked."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root_what} {str(root)!r} does not exist or is not a folder")
    path = _resolve(root, file)
    if not path.is_file():
        raise DataError(f"{file_what} {str(path)!r} does not exist (relative paths are taken "
                        f"from the image folder {str(root)!r})")
    return root, path


class CaptionedImages(Dataset):
    """A list of (image file, caption) pairs, loaded lazily; the base of the two formats."""

    def __init__(self, entries: list[tuple[Path, str]], resolution: int, source: str):
        self.resolution = _check_resolution(resolution)
        self.source = source  # the captions/annotations file, for messages
        self.skipped: list[Skipped] = []
        self._bad: set[str] = set()  # files found unreadable by __getitem__
        self.entries: list[tuple[Path, str]] = []
        missing = []
        for path, caption in entries:
            if path.is_file():
                self.entries.append((path, caption))
            else:
                missing.append(Skipped(str(path), "missing file"))
        self._skip(missing, len(entries))

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} items")
        # A corrupt image is recorded (once) and replaced by the next readable one.
        for step in range(len(self)):
            i = (index + step) % len(self)
            path, caption = self.entries[i]
            if str(path) in self._bad:
                continue
            try:
                image = load_image(path, self.resolution)
            except IMAGE_ERRORS as err:
                self._bad.add(str(path))
                self.skipped.append(Skipped(str(path), f"unreadable image: {err}"))
                log.warning("%s: skipped unreadable image %s (%s); %d skipped in all, "
                            "see .skipped", self.source, path, err, len(self.skipped))
                continue
            return {"image": image, "caption": caption, "index": i}
        raise DataError(f"{self.source}: none of the {len(self)} listed images could be read; "
                        f"first problem: {self.skipped[0].file}: {self.skipped[0].reason}")

    def verify(self) -> list[Skipped]:
        """Decode every image now; drop the unreadable ones from the dataset (recorded in
        `.skipped`, with a warning) and return the full list of skipped files."""
        keep, unreadable, listed = [], [], len(self.entries)
        for path, caption in self.entries:
            if str(path) in self._bad:
                continue  # already recorded by __getitem__
            try:
                with Image.open(path) as img:
                    img.verify()  # checks the file's structure
                with Image.open(path) as img:
                    img.load()  # and that the pixels decode (verify alone misses truncation)
                keep.append((path, caption))
            except IMAGE_ERRORS as err:
                unreadable.append(Skipped(str(path), f"unreadable image: {err}"))
        self.entries = keep
        self._bad.clear()
        self._skip(unreadable, listed)
        return list(self.skipped)

    def captions(self) -> list[str]:
        """Every item's caption, in order (for the text-embedding cache)."""
        return [caption for _, caption in self.entries]

    def _skip(self, new: list[Skipped], listed: int) -> None:
        """Record skipped items, warn with their count, and fail if nothing is left."""
        self.skipped.extend(new)
        if new:
            log.warning("%s: skipped %d of %d listed items: %s (first: %s); see .skipped",
                        self.source, len(new), listed, new[0].reason.split(":")[0],
                        new[0].file)
        if not self.entries:
            first = self.skipped[0] if self.skipped else None
            detail = f"; first skipped: {first.file} ({first.reason})" if first else ""
            raise DataError(f"{self.source}: no usable images{detail}")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, resolution={self.resolution}, "
                f"items={len(self)}, skipped={len(self.skipped)})")


class ImageCaptionFolder(CaptionedImages):
    """Images in a folder with a captions file: JSONL (`{"file": ..., "caption": ...}` a line)
    or CSV (a header row naming the columns file and caption)."""

    def __init__(self, root: str | Path, captions: str | Path, resolution: int):
        root, path = _root_and_file(root, captions, "image folder", "captions file")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            rows = _read_jsonl(path)
        elif suffix == ".csv":
            rows = _read_csv(path)
        else:
            raise DataError(f"captions file {str(path)!r}: unknown format {suffix!r}; "
                            f"use .jsonl (one {{\"file\", \"caption\"}} object a line) or .csv "
                            f"(columns file,caption)")
        if not rows:
            raise DataError(f"captions file {str(path)!r} lists no images")
        super().__init__([(_resolve(root, f), c) for f, c in rows], resolution, str(path))


def _check_row(path: Path, where: str, file: object, caption: object) -> tuple[str, str]:
    if not isinstance(file, str) or not file.strip():
        raise DataError(f"captions file {str(path)!r}, {where}: 'file' must be a non-empty "
                        f"string, got {file!r}")
    if not isinstance(caption, str):
        raise DataError(f"captions file {str(path)!r}, {where}: 'caption' must be a string, "
                        f"got {caption!r}")
    return file.strip(), caption


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"captions file {str(path)!r}, line {number}: not valid JSON "
                                f"({err.msg})") from None
            if not isinstance(record, dict) or "file" not in record or "caption" not in record:
                raise DataError(f"captions file {str(path)!r}, line {number}: expected an "
                                f"object with keys 'file' and 'caption', got {line.strip()[:80]}")
            rows.append(_check_row(path, f"line {number}", record["file"], record["caption"]))
    return rows


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "file" not in columns or "caption" not in columns:
            raise DataError(f"captions file {str(path)!r}: the header row must name the columns "
                            f"'file' and 'caption', got {columns}")
        reader.fieldnames = columns
        rows = []
        for record in reader:
            where = f"line {reader.line_num}"
            if record.get("caption") is None:
                raise DataError(f"captions file {str(path)!r}, {where}: missing the caption "
                                f"column")
            rows.append(_check_row(path, where, record["file"], record["caption"]))
    return rows


class CocoCaptions(CaptionedImages):
    """The COCO captions format: `annotations` is a JSON file with an `images` list
    ({"id", "file_name"}) and an `annotations` list ({"image_id", "caption"}); image files lie in
    `root`. One item per caption (COCO has about five per image), or with
    `one_caption_per_image=True` one per image with its first caption."""

    def __init__(self, root: str | Path, annotations: str | Path, resolution: int,
                 one_caption_per_image: bool = False):
        root, path = _root_and_file(root, annotations, "COCO image folder",
                                    "COCO annotations file")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise DataError(f"COCO annotations file {str(path)!r}: not valid JSON ({err.msg} at "
                            f"line {err.lineno})") from None
        if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
                or not isinstance(data.get("annotations"), list):
            raise DataError(f"COCO annotations file {str(path)!r}: expected an object with "
                            f"'images' and 'annotations' lists")
        files = {}
        for i, image in enumerate(data["images"]):
            if not isinstance(image, dict) or "id" not in image \
                    or not isinstance(image.get("file_name"), str):
                raise DataError(f"COCO annotations file {str(path)!r}: images[{i}] needs an 'id' "
                                f"and a 'file_name' string")
            files[image["id"]] = image["file_name"]
        entries, seen = [], set()
        for i, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict) or not isinstance(ann.get("caption"), str) \
                    or "image_id" not in ann:
                raise DataError(f"COCO annotations file {str(path)!r}: annotations[{i}] needs an "
                                f"'image_id' and a 'caption' string")
            if ann["image_id"] not in files:
                raise DataError(f"COCO annotations file {str(path)!r}: annotations[{i}] refers to "
                                f"image_id {ann['image_id']!r}, which is not in 'images'")
            if one_caption_per_image and ann["image_id"] in seen:
                continue
            seen.add(ann["image_id"])
            entries.append((_resolve(root, files[ann["image_id"]]), " ".join(ann["caption"].split())))
        if not entries:
            raise DataError(f"COCO annotations file {str(path)!r} has no captions")
        super().__init__(entries, resolution, str(path))
