"""Honest quality metrics for proxy trainings of text-to-image models.

The paper ranks architectures by FID (Inception features) and CLIP score. Neither network's
weights ship with this project and nothing is downloaded at run time, so `Evaluator` computes
the real metrics only when it is given local files, and clearly named fallbacks otherwise:

    key            what it is                                  needs
    fid            standard FID on Inception-v3 pool features  inception_path, torch-fidelity
    fid_proxy      FID on the attribute classifier's features  nothing (always computed)
    kid_proxy      KID (unbiased polynomial-kernel MMD) on the  nothing (always computed)
                   same features: unbiased at small sample
                   counts, unlike FID; kid_proxy_std is its
                   std over random real/generated subsets
    clip_score     torchmetrics CLIPScore (100 * cosine, >= 0)  clip_path (local CLIP folder)
    align          attribute-classifier accuracy on generated  labels of the prompts (or
                   images w.r.t. the prompted attributes       synthetic-shapes captions)
                   (mean over attributes)
    align_<attr>   the same, per attribute (shape, colour, ...)
    align_chance   mean over attributes of 1/num_classes: what a generator that ignores the
                   text scores
    align_ceiling  the classifier's held-out accuracy on real rendered images (mean over
                   attributes): the best `align` a perfect generator can get with it
    num_generated, num_reference   the sample counts behind the FIDs

Also: the held-out accuracy per attribute is `Evaluator.ceiling` (and in the cache's .json);
the classifier is only meaningful for the synthetic shapes data.

The attribute classifier is a small CNN trained once per (resolution, seed, training size) on
freshly rendered `SyntheticShapes` images (train split) and validated on the disjoint test split;
its weights and held-out accuracy are cached on disk (`default_cache_dir()`).

Caveats. FID from few samples is biased upwards and noisy: `fid_proxy` (and `fid`) values are
comparable only between evaluations with the same numbers of generated and reference images
(reported as `num_generated` and `num_reference`). `fid_proxy` is not FID: its scale and meaning
depend on the classifier (its version, resolution and seed), so never compare it with published
FIDs. The FID statistics are accumulated and computed in float64 (torchmetrics' states are
float64; the proxy features are cast to float64 before they reach it). In data-parallel
training only rank 0 evaluates, on the whole prompt set, so the metrics never sync across ranks
(`sync_on_compute=False`; torchmetrics would otherwise wait for the other ranks).
"""

from __future__ import annotations

import json
import math
import os
import textwrap
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mdsearch.data.errors import DataError
from mdsearch.paths import CACHE_DIR_ENV
from mdsearch.data.synthetic import (ATTRIBUTE_NAMES, CHANCE, NUM_CLASSES, SyntheticShapes,
                                     labels_for)

__all__ = ["MetricsError", "AttributeClassifier", "ClassifierFeatures", "Evaluator",
           "attribute_accuracy", "default_cache_dir", "load_attribute_classifier",
           "train_attribute_classifier", "save_grid", "INCEPTION_WEIGHTS_FILE",
           "CLASSIFIER_VERSION", "FEATURE_DIM"]

CLASSIFIER_VERSION = "v1"
"""Bump when the classifier's architecture or training recipe changes: it keys the cache."""

FEATURE_DIM = 64
"""Size of the classifier's feature vector (the `fid_proxy` feature space). Kept below the usual
72-144 evaluation images so the feature covariance can have full rank."""

DEFAULT_TRAIN_SIZE = 16000
DEFAULT_EPOCHS = 2
DEFAULT_VAL_SIZE = 2000
BATCH_SIZE = 128
INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
"""The standard FID Inception weights (pytorch-fid's name; torch-fidelity ships the same file
as weights-inception-2015-12-05-6726825d.pth)."""

_TRAIN_THREADS = 1
"""Threads used while training the classifier. On the 2-vCPU development machines one thread
was measured about 4x faster than two for this small network (and one thread makes training
reproducible bit for bit); the previous setting is restored afterwards."""

_EVAL_BATCH = 512
KID_SUBSETS = 100  # random subsets behind kid_proxy's mean and std
KID_SEED = 0


class MetricsError(ValueError):
    """A bad metrics setup or input: the message names the file or argument and the reason."""


def default_cache_dir() -> Path:
    """Where classifier weights are cached: $MDSEARCH_CACHE_DIR/metrics, else
    ~/.cache/mdsearch/metrics."""
    from ..paths import cache_dir

    return cache_dir("metrics")


# --- The attribute classifier --------------------------------------------------------------------

def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """Images as float in [-1, 1]: uint8 [0, 255] is rescaled, floats are taken as [-1, 1]."""
    if images.dtype == torch.uint8:
        return images.float() / 127.5 - 1.0
    if not images.is_floating_point():
        raise MetricsError(f"images must be float in [-1, 1] or uint8 in [0, 255], "
                           f"not {images.dtype}")
    return images.float()


class AttributeClassifier(nn.Module):
    """A small CNN predicting the six synthetic-shapes attributes of an image.

    Convolutions at full resolution (max-pooled down to 16 px when larger), then at half of
    that; the last feature map is summarised by translation-invariant global average and max
    pooling (shape, colour, count) and by a 3x3 average pooling that lines up with the position
    grid. A linear layer + ReLU maps these to the `FEATURE_DIM`-d feature vector, and one linear
    head per attribute gives logits. Inputs: (N, 3, H, W) float in [-1, 1] or uint8 in [0, 255],
    resized (bilinear, antialiased) to the classifier's resolution when H, W differ.
    """

    def __init__(self, resolution: int, width: int = 24, feature_dim: int = FEATURE_DIM):
        super().__init__()
        if not isinstance(resolution, int) or resolution < 8:
            raise MetricsError(f"classifier resolution must be an integer >= 8, got {resolution!r}")
        self.resolution = resolution
        self.num_features = feature_dim
        self.stem = nn.Sequential(*_conv(3, width))
        self.body = nn.Sequential(*_conv(width, 2 * width), *_conv(2 * width, 2 * width),
                                  nn.MaxPool2d(2), *_conv(2 * width, 64))
        self.project = nn.Sequential(nn.Linear(64 * (2 + 9), feature_dim), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(feature_dim, k) for k in NUM_CLASSES)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Images as float [-1, 1] at the classifier's resolution, channels-last."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise MetricsError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
        x = to_unit_range(images)
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear",
                              align_corners=False, antialias=True)
        return x.contiguous(memory_format=torch.channels_last)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The (N, feature_dim) feature vectors."""
        m = self.stem(self.prepare(images))
        if m.shape[-1] > 16:
            m = F.adaptive_max_pool2d(m, 16)
        m = self.body(m)
        pooled = torch.cat([m.mean((2, 3)), m.amax((2, 3)),
                            F.adaptive_avg_pool2d(m, 3).flatten(1)], dim=1)
        return self.project(pooled)

    def logits(self, features: torch.Tensor) -> list[torch.Tensor]:
        """One (N, num_classes) logit tensor per attribute, in `ATTRIBUTE_NAMES` order."""
        return [head(features) for head in self.heads]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.logits(self.features(images))

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted labels (N, 6), long, in `ATTRIBUTE_NAMES` order (evaluated in batches)."""
        was_training = self.training
        self.eval()
        out = [torch.stack([lg.argmax(1) for lg in self(chunk)], dim=1)
               for chunk in images.split(_EVAL_BATCH)]
        self.train(was_training)
        return torch.cat(out)


class ClassifierFeatures(nn.Module):
    """The classifier's feature extractor, as torchmetrics' FID wants a custom `feature` module.

    torchmetrics 1.9 reads `num_features` (else it probes the output size with a random image of
    `input_img_size`, uint8 unless normalize=True: this module accepts that too, resizing it),
    then calls the module on each `update` batch and casts the (N, d) output to float64. Output
    is float64 here already. The module never leaves eval mode and has no trainable parameters.
    """

    def __init__(self, classifier: AttributeClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features
        for p in self.classifier.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ClassifierFeatures:
        """Stay in eval mode (BatchNorm uses its running statistics)."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.classifier.features(chunk)
                          for chunk in images.split(_EVAL_BATCH)]).double()


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rendered(size: int, resolution: int, seed: int,
              split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 3, R, R) in [-1, 1], labels (N, 6)) of a SyntheticShapes split."""
    data = SyntheticShapes(size=size, resolution=resolution, seed=seed, split=split)
    items = [data[i] for i in range(size)]
    return torch.stack([it["image"] for it in items]), torch.stack([it["labels"] for it in items])


def attribute_accuracy(classifier: AttributeClassifier, images: torch.Tensor,
                       labels: torch.Tensor) -> dict[str, float]:
    """Per-attribute accuracy of the classifier's predictions on `images` w.r.t. `labels`."""
    labels = _check_labels(labels, len(images))
    hits = (classifier.predict(images) == labels).double().mean(0)
    return {name: float(h) for name, h in zip(ATTRIBUTE_NAMES, hits)}


def train_attribute_classifier(resolution: int, seed: int = 0,
                               train_size: int = DEFAULT_TRAIN_SIZE,
                               epochs: int = DEFAULT_EPOCHS,
                               val_size: int = DEFAULT_VAL_SIZE,
                               ) -> tuple[AttributeClassifier, dict]:
    """Train a classifier on `train_size` rendered train-split images for `epochs` epochs.

    Deterministic by seed (the global RNG state is saved and restored). AdamW with a one-cycle
    learning rate, batch 128, light Gaussian-noise augmentation (sigma uniform in [0, 0.1]) so
    slightly noisy generated images are still read. Returns the classifier (eval mode) and a
    report: held-out accuracy per attribute on `val_size` test-split images, and timings.
    """
    if train_size < BATCH_SIZE or epochs < 1 or val_size < 1:
        raise MetricsError(f"classifier training needs train_size >= {BATCH_SIZE}, epochs >= 1 "
                           f"and val_size >= 1; got {train_size}, {epochs}, {val_size}")
    started = time.time()
    with _threads(_TRAIN_THREADS), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        images, labels = _rendered(train_size, resolution, seed, "train")
        rendered = time.time()
        model = AttributeClassifier(resolution).to(memory_format=torch.channels_last)
        steps_per_epoch = train_size // BATCH_SIZE
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, pct_start=0.15,
                                                    total_steps=epochs * steps_per_epoch)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(train_size, generator=gen)
            for step in range(steps_per_epoch):
                idx = order[step * BATCH_SIZE:(step + 1) * BATCH_SIZE]
                x = images[idx]
                sigma = 0.1 * torch.rand(len(idx), 1, 1, 1, generator=gen)
                x = x + sigma * torch.randn(x.shape, generator=gen)
                logits = model(x)
                loss = sum(F.cross_entropy(lg, labels[idx, j]) for j, lg in enumerate(logits))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        trained = time.time()
        val_images, val_labels = _rendered(val_size, resolution, seed, "test")
        accuracy = attribute_accuracy(model, val_images, val_labels)
    report = {"version": CLASSIFIER_VERSION, "resolution": resolution, "seed": seed,
              "train_size": train_size, "epochs": epochs, "val_split": "test",
              "val_size": val_size, "accuracy": accuracy,
              "mean_accuracy": sum(accuracy.values()) / len(accuracy),
              "render_seconds": round(rendered - started, 2),
              "train_seconds": round(trained - rendered, 2),
              "total_seconds": round(time.time() - started, 2),
              "threads": _TRAIN_THREADS, "torch": torch.__version__}
    return model, report


def _cache_paths(cache_dir: Path, resolution: int, seed: int, train_size: int,
                 epochs: int) -> tuple[Path, Path]:
    stem = (f"attribute-classifier-{CLASSIFIER_VERSION}-r{resolution}-s{seed}"
            f"-n{train_size}x{epochs}")
    return cache_dir / f"{stem}.pt", cache_dir / f"{stem}.json"


def load_attribute_classifier(resolution: int, *, cache_dir: str | Path | None = None,
                              seed: int = 0, train_size: int = DEFAULT_TRAIN_SIZE,
                              epochs: int = DEFAULT_EPOCHS) -> tuple[AttributeClassifier, dict]:
    """The cached classifier for (resolution, version, seed, training size), trained first if
    the cache has none (or an unreadable one). Returns (classifier in eval mode, report) where
    report["accuracy"] is its held-out per-attribute accuracy; report["cached"] says whether it
    came from the cache.

    Files: <cache_dir>/attribute-classifier-<version>-r<res>-s<seed>-n<size>x<epochs>.pt
    (torch.save of the state_dict, loaded with weights_only=True) and a .json report beside it.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    weights, meta = _cache_paths(cache, resolution, seed, train_size, epochs)
    if weights.is_file() and meta.is_file():
        try:
            report = json.loads(meta.read_text())
            model = AttributeClassifier(resolution)
            model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
            model = model.to(memory_format=torch.channels_last).eval()
            if set(report["accuracy"]) == set(ATTRIBUTE_NAMES):
                return model, {**report, "cached": True, "path": str(weights)}
        except (OSError, ValueError, KeyError, RuntimeError, TypeError):
            pass  # stale or corrupt: retrain and replace
    model, report = train_attribute_classifier(resolution, seed, train_size, epochs)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        _atomic_write(weights, lambda f: torch.save(model.state_dict(), f))
        _atomic_write(meta, lambda f: f.write(json.dumps(report, indent=2).encode()))
    except OSError as err:
        raise MetricsError(f"could not write the attribute-classifier cache in {str(cache)!r}: "
                           f"{err} (set cache_dir or ${CACHE_DIR_ENV} to a writable folder)"
                           ) from None
    return model, {**report, "cached": False, "path": str(weights)}


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


# --- Evaluation ----------------------------------------------------------------------------------

def _check_images(images: torch.Tensor, what: str, min_count: int = 1) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise MetricsError(f"{what} must be a (N, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise MetricsError(f"{what} must be float in [-1, 1], not {images.dtype}")
    if len(images) < min_count:
        raise MetricsError(f"{what}: need at least {min_count} images, got {len(images)}")
    return images.detach().float().cpu().clamp(-1, 1)


def _check_labels(labels: torch.Tensor, count: int) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.shape != (count, len(ATTRIBUTE_NAMES)):
        raise MetricsError(f"labels must have shape ({count}, {len(ATTRIBUTE_NAMES)}) (one class "
                           f"index per attribute: {', '.join(ATTRIBUTE_NAMES)}), "
                           f"got {tuple(labels.shape)}")
    return labels.long().cpu()


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _inception_fid(path: str | Path):
    """torchmetrics' FID on the standard Inception weights read from `path` (no download)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise MetricsError(f"Inception weights file {str(file)!r} does not exist: expected the "
                           f"standard FID Inception weights ({INCEPTION_WEIGHTS_FILE}, as "
                           f"pytorch-fid / torch-fidelity use); nothing is downloaded at run time")
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise MetricsError(f"standard FID with {str(file)!r} needs the torch-fidelity package "
                           f"(torchmetrics' Inception network): pip install torch-fidelity")
    try:
        return FrechetInceptionDistance(feature=2048, reset_real_features=False, normalize=True,
                                        feature_extractor_weights_path=str(file),
                                        sync_on_compute=False)
    except (RuntimeError, OSError, KeyError, ValueError) as err:
        raise MetricsError(f"could not load Inception weights from {str(file)!r}: {err}") from None


class _CLIPFeatures(nn.Module):
    """A CLIPModel whose get_image_features / get_text_features return embedding tensors.

    transformers 5 returns a model output (embeddings in `pooler_output`) where torchmetrics 1.9's
    CLIPScore expects a tensor; older transformers return the tensor, passed through as is."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _embedding(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embedding(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._embedding(self.model.get_text_features(*args, **kwargs))


def _clip_score(path: str | Path):
    """torchmetrics' CLIPScore on a local CLIP folder (Hugging Face format; no download).

    torchmetrics 1.9 accepts only hub names containing 'openai', 'jinaai' or 'zer0int' as a
    string, so the local folder is loaded here and handed over as a callable."""
    folder = Path(path).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise MetricsError(f"CLIP folder {str(folder)!r} does not exist or has no config.json: "
                           f"expected a local Hugging Face CLIP checkpoint (e.g. "
                           f"openai/clip-vit-large-patch14 downloaded elsewhere); nothing is "
                           f"downloaded at run time")
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load():
        model = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
        return _CLIPFeatures(model), CLIPProcessor.from_pretrained(folder, local_files_only=True)

    try:
        return CLIPScore(model_name_or_path=load, sync_on_compute=False)
    except (OSError, ValueError) as err:
        raise MetricsError(f"could not load a CLIP model and processor from {str(folder)!r}: "
                           f"{err}") from None


class Evaluator:
    """Scores generated images against fixed reference images and their prompts.

    Built once per trial: it loads (or trains and caches) the attribute classifier for
    `resolution`, and computes the reference statistics of `reference_images` ((N, 3, R, R)
    float in [-1, 1], N >= 2) for `fid_proxy` and, given `inception_path` (the
    `INCEPTION_WEIGHTS_FILE` file), for standard `fid`. `clip_path` (a local Hugging Face CLIP
    folder) adds `clip_score`. `evaluate` reuses the reference statistics: its cost is a forward
    pass of the generated images (plus Inception / CLIP when given) and a 64x64 eigenproblem.
    See the module docstring for the meaning of every key.
    """

    def __init__(self, resolution: int, reference_images: torch.Tensor, *,
                 inception_path: str | Path | None = None, clip_path: str | Path | None = None,
                 cache_dir: str | Path | None = None, seed: int = 0,
                 classifier_train_size: int = DEFAULT_TRAIN_SIZE,
                 classifier_epochs: int = DEFAULT_EPOCHS):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.kid import KernelInceptionDistance

        reference = _check_images(reference_images, "reference_images", min_count=2)
        self.resolution = int(resolution)
        # Checks of user paths come first, before any training.
        self._fid = _inception_fid(inception_path) if inception_path is not None else None
        self._clip = _clip_score(clip_path) if clip_path is not None else None
        self.classifier, self.classifier_report = load_attribute_classifier(
            self.resolution, cache_dir=cache_dir, seed=seed, train_size=classifier_train_size,
            epochs=classifier_epochs)
        self.ceiling: dict[str, float] = dict(self.classifier_report["accuracy"])
        self._fid_proxy = FrechetInceptionDistance(feature=ClassifierFeatures(self.classifier),
                                                   reset_real_features=False,
                                                   sync_on_compute=False)
        with warnings.catch_warnings():  # it keeps every feature vector: ~1000 x 64 here
            warnings.filterwarnings("ignore", message=".*will save all extracted features")
            self._kid_proxy = KernelInceptionDistance(
                feature=ClassifierFeatures(self.classifier), subsets=KID_SUBSETS,
                reset_real_features=False, sync_on_compute=False)
        self.num_reference = len(reference)
        with torch.no_grad():
            for chunk in reference.split(_EVAL_BATCH):
                self._fid_proxy.update(chunk, real=True)
                self._kid_proxy.update(chunk, real=True)
                if self._fid is not None:
                    for small in chunk.split(32):
                        self._fid.update((small + 1) / 2, real=True)

    def _kid(self, images: torch.Tensor) -> tuple[float, float]:
        """KID of `images` against the reference: 100 subsets of half of min(generated,
        reference) images each (so that they differ and their std means something), drawn from a
        fixed seed (torchmetrics draws them from the global RNG: forked here, so
        the same images always give the same value and training's RNG is left alone)."""
        self._kid_proxy.reset()  # keeps the reference features
        self._kid_proxy.update(images, real=False)
        self._kid_proxy.subset_size = max(2, min(len(images), self.num_reference) // 2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(KID_SEED)
            mean, std = self._kid_proxy.compute()
        return float(mean), float(std)

    def evaluate(self, generated: torch.Tensor, captions: Sequence[str],
                 labels: torch.Tensor | None = None) -> dict[str, float]:
        """Metrics of `generated` ((N, 3, H, W) float in [-1, 1], N >= 2; clamped) made for
        `captions`. `labels` ((N, 6) attribute classes) enable the `align*` keys; when None
        they are read from the captions if all are synthetic-shapes captions, else `align*`
        is left out. Returns only keys that were computed (see the module docstring)."""
        images = _check_images(generated, "generated images", min_count=2)
        captions = list(captions)
        if len(captions) != len(images):
            raise MetricsError(f"got {len(images)} generated images but {len(captions)} captions")
        out: dict[str, float] = {"num_generated": float(len(images)),
                                 "num_reference": float(self.num_reference)}
        with torch.no_grad():
            self._fid_proxy.reset()  # keeps the reference statistics
            self._fid_proxy.update(images, real=False)
            out["fid_proxy"] = float(self._fid_proxy.compute())
            out["kid_proxy"], out["kid_proxy_std"] = self._kid(images)
            if self._fid is not None:
                self._fid.reset()
                for small in images.split(32):
                    self._fid.update((small + 1) / 2, real=False)
                out["fid"] = float(self._fid.compute())
            if self._clip is not None:
                self._clip.reset()
                self._clip.update(_to_uint8(images), captions)
                out["clip_score"] = float(self._clip.compute())

        if labels is None:
            try:
                labels = torch.stack([labels_for(c) for c in captions])
            except DataError:
                labels = None
        if labels is not None:
            accuracy = attribute_accuracy(self.classifier, images, labels)
            out["align"] = sum(accuracy.values()) / len(accuracy)
            out.update({f"align_{name}": value for name, value in accuracy.items()})
            out["align_chance"] = sum(CHANCE.values()) / len(CHANCE)
            out["align_ceiling"] = sum(self.ceiling.values()) / len(self.ceiling)
        return out


# --- Sample grids --------------------------------------------------------------------------------

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
    fig.savefig(path, facecolor="white")
    return path
