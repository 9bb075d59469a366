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

Also: the held-out accuracy per attribute is `Evaluator.ceiling` (and in the cache's .json).
The attribute classifier (the synthetic data's judge) lives in `mdsearch.data.classifier`; sample
grids are drawn by `mdsearch.train.grid`.

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

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from torch import nn

from ..data.classifier import (DEFAULT_EPOCHS, DEFAULT_TRAIN_SIZE, EVAL_BATCH, ClassifierFeatures,
                               MetricsError, attribute_accuracy,
                               load_attribute_classifier)
from ..data.errors import DataError
from ..data.synthetic import CHANCE, labels_for

INCEPTION_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
"""The standard FID Inception weights (pytorch-fid's name; torch-fidelity ships the same file
as weights-inception-2015-12-05-6726825d.pth)."""

KID_SUBSETS = 100  # random subsets behind kid_proxy's mean and std
KID_SEED = 0


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
            for chunk in reference.split(EVAL_BATCH):
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
        for chunk in images.split(EVAL_BATCH):
            self._kid_proxy.update(chunk, real=False)
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
            for chunk in images.split(EVAL_BATCH):  # as the reference: bounded memory
                self._fid_proxy.update(chunk, real=False)
            out["fid_proxy"] = float(self._fid_proxy.compute())
            out["kid_proxy"], out["kid_proxy_std"] = self._kid(images)
            if self._fid is not None:
                self._fid.reset()
                for small in images.split(32):
                    self._fid.update((small + 1) / 2, real=False)
                out["fid"] = float(self._fid.compute())
            if self._clip is not None:
                self._clip.reset()
                for start in range(0, len(images), EVAL_BATCH):
                    self._clip.update(_to_uint8(images[start:start + EVAL_BATCH]),
                                      captions[start:start + EVAL_BATCH])
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
