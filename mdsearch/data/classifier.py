"""The judge of the synthetic shapes data: a small CNN that names a rendered image's attributes.

The attribute classifier is a small CNN trained once per (resolution, seed, training size) on
freshly rendered `SyntheticShapes` images (train split) and validated on the disjoint test split;
its weights and held-out accuracy are cached on disk (`default_cache_dir()`).

Its features are the space of `fid_proxy` and `kid_proxy`, and its predictions score `align`
(`mdsearch.train.metrics`). It is only meaningful for the synthetic shapes data.
"""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MdsearchError
from ..paths import CACHE_DIR_ENV
from ..rundir import atomic_path
from .synthetic import ATTRIBUTE_NAMES, NUM_CLASSES, SyntheticShapes

CLASSIFIER_VERSION = "v1"
"""Bump when the classifier's architecture or training recipe changes: it keys the cache."""

FEATURE_DIM = 64
"""Size of the classifier's feature vector (the `fid_proxy` feature space). Kept below the usual
72-144 evaluation images so the feature covariance can have full rank."""

DEFAULT_TRAIN_SIZE = 16000
DEFAULT_EPOCHS = 2
DEFAULT_VAL_SIZE = 2000
BATCH_SIZE = 128
EVAL_BATCH = 512  # images per classifier forward pass when judging

_TRAIN_THREADS = 1
"""Threads used while training the classifier. On the 2-vCPU development machines one thread
was measured about 4x faster than two for this small network (and one thread makes training
reproducible bit for bit); the previous setting is restored afterwards."""


class MetricsError(MdsearchError):
    """A bad metrics setup or input: the message names the file or argument and the reason."""


def check_labels(labels: torch.Tensor, count: int) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.shape != (count, len(ATTRIBUTE_NAMES)):
        raise MetricsError(f"labels must have shape ({count}, {len(ATTRIBUTE_NAMES)}) (one class "
                           f"index per attribute: {', '.join(ATTRIBUTE_NAMES)}), "
                           f"got {tuple(labels.shape)}")
    return labels.long().cpu()


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
               for chunk in images.split(EVAL_BATCH)]
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
                          for chunk in images.split(EVAL_BATCH)]).double()


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
    labels = check_labels(labels, len(images))
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
    # enable_grad: the first evaluation of a run may ask for it from inside torch.no_grad()
    with _threads(_TRAIN_THREADS), torch.random.fork_rng(devices=[]), torch.enable_grad():
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
        except (OSError, ValueError, KeyError, RuntimeError, TypeError,
                pickle.UnpicklingError):  # (a damaged file: torch.load's unpickler says so)
            pass  # stale or corrupt: retrain and replace
    model, report = train_attribute_classifier(resolution, seed, train_size, epochs)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_path(weights) as tmp:
            torch.save(model.state_dict(), tmp)
        with atomic_path(meta) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    except OSError as err:
        raise MetricsError(f"could not write the attribute-classifier cache in {str(cache)!r}: "
                           f"{err} (set cache_dir or ${CACHE_DIR_ENV} to a writable folder)"
                           ) from None
    return model, {**report, "cached": False, "path": str(weights)}
