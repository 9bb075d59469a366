"""What a training run reads: the dataset, its frozen text embeddings, the autoencoder, and the
fixed evaluation prompts, at one resolution."""

from __future__ import annotations

import torch

from . import make_dataset
from .autoencoder import make_autoencoder
from .errors import DataError
from .text import cached_embeddings, get_text_encoder


class DataPipeline:
    """Dataset, frozen text embeddings, autoencoder, and the fixed evaluation prompts of a
    recipe (its `data`, `text_encoder` and `autoencoder` configs), at one resolution.

    `prompts`: how many evaluation prompts (the synthetic data's balanced attribute
    combinations, else validation captions); `bank`: how many validation captions the held-out
    bank uses (their embeddings are cached with the rest)."""

    def __init__(self, data: dict, text_encoder: dict, autoencoder: dict, resolution: int,
                 prompts: int, bank: int = 0):
        self.data_cfg = data
        self.resolution = resolution
        self.autoencoder = make_autoencoder(autoencoder)
        if self.resolution % self.autoencoder.factor:
            raise DataError(f"resolution {self.resolution} is not divisible by the "
                            f"autoencoder's factor {self.autoencoder.factor}")
        self.latent_size = self.resolution // self.autoencoder.factor
        self.train = make_dataset(data, self.resolution, "train")
        self.val = make_dataset(data, self.resolution, "val")
        self.encoder = get_text_encoder(**dict(text_encoder))
        self.prompts, self.prompt_labels = self._eval_prompts(prompts)
        bank_captions = [self.val[i]["caption"] for i in range(min(bank, len(self.val)))]
        self.embeddings = cached_embeddings(
            self.encoder, list(self.train.captions()) + self.prompts + bank_captions)
        self.null_context = self.embeddings.null.tokens
        self.bank = None  # the held-out EvalBank, built on first use (mdsearch.train.heldout)

    def _eval_prompts(self, n: int):
        if self.data_cfg["kind"] == "synthetic":
            from .synthetic import eval_prompts

            pairs = eval_prompts()
            pairs = [pairs[i % len(pairs)] for i in range(n)]
            return [c for c, _ in pairs], torch.stack([lab for _, lab in pairs])
        captions = list(self.val.captions())
        return [captions[i % len(captions)] for i in range(n)], None

    def context(self, captions: list[str]) -> torch.Tensor:
        return self.embeddings.lookup(captions).tokens

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, self.autoencoder.channels, self.latent_size, self.latent_size)

    def batch(self, indices: list[int]):
        """Training examples by index: latents and captions."""
        items = [self.train[i] for i in indices]
        images = torch.stack([item["image"] for item in items])
        return self.autoencoder.encode(images), [item["caption"] for item in items]

    def reference_images(self, count: int) -> torch.Tensor:
        count = min(count, len(self.val))
        return torch.stack([self.val[i]["image"] for i in range(count)])
