"""Sample grids: a run's generated images, each under its caption, as one PNG per evaluation.

(Written by the trainer at every sampled evaluation, so it lives in the training layer, not in
`mdsearch.analysis` with the sweep plots.)
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from .metrics import MetricsError, _check_images


def _wrap(caption: str, width: int = 26, max_lines: int = 4) -> str:
    lines = textwrap.wrap(caption, width=width) or [" "]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][:width - 3] + "..."
    return "\n".join(lines)


def save_grid(images: torch.Tensor, captions: Sequence[str], path: str | Path,
              ncols: int = 8) -> Path:
    """Save images ((N, 3, H, W) float in [-1, 1]) as a PNG grid, each under its wrapped caption.

    One mosaic image (nearest-neighbour upscaled, white gutters for the captions) drawn in one
    matplotlib axes on the Agg canvas (no pyplot, no global backend change): a few tenths of a
    second for 32 images, where one axes per image took most of a second. Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    images = _check_images(images, "grid images")
    captions = list(captions)
    if len(captions) != len(images):
        raise MetricsError(f"got {len(images)} grid images but {len(captions)} captions")
    n = len(images)
    ncols = max(1, min(int(ncols), n))
    nrows = math.ceil(n / ncols)
    wrapped = [_wrap(c) for c in captions]
    lines = max(c.count("\n") + 1 for c in wrapped)
    cell, pad, line, dpi = 1.5, 0.04, 6.5 * 1.15 / 72, 120  # inches: image side, margin, text
    text_h = lines * line + 2 * pad
    width, height = ncols * cell, nrows * (cell + text_h)
    px = int(round((cell - 2 * pad) * dpi))  # one image's side in the mosaic, pixels
    gap, top = int(round(2 * pad * dpi)), int(round(text_h * dpi))
    pixels = (images + 1) / 2
    pixels = F.interpolate(pixels, size=(px, px), mode="nearest").permute(0, 2, 3, 1).numpy()
    mosaic = torch.ones(nrows * (top + px + gap), ncols * (px + gap), 3).numpy()
    for i in range(n):
        r, c = divmod(i, ncols)
        y, x = r * (top + px + gap) + top, c * (px + gap) + gap // 2
        mosaic[y:y + px, x:x + px] = pixels[i]
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(mosaic, interpolation="nearest", vmin=0, vmax=1, aspect="auto")
    ax.set_axis_off()
    for i in range(n):
        r, c = divmod(i, ncols)
        fig.text((c + 0.5) * cell / width, 1 - (r * (cell + text_h) + pad) / height, wrapped[i],
                 ha="center", va="top", fontsize=6.5, linespacing=1.15)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, facecolor="white", format="png")
    return path
