"""The training data set: transformed images with tokenized captions, from caches when built."""

from __future__ import annotations

import copy
import random
from collections.abc import Callable

import torch

from difftune.data.captions import pick_caption
from difftune.data.images import ImageTransform, draw_flip, image_name, open_image, sample_rng
from difftune.errors import UserError


class CaptionedImageDataset(torch.utils.data.Dataset):
    """Transformed images with their tokenized captions and SDXL size conditioning."""

    def __init__(
        self,
        hf_dataset,
        image_column: str,
        caption_column: str,
        transform: ImageTransform,
        tokenize: Callable[[str], dict[str, torch.Tensor]],
        resolution: int,
        seed: int,
    ) -> None:
        self.rows = hf_dataset.select_columns([image_column, caption_column])
        self.fingerprint = hf_dataset._fingerprint  # changes with the data and the selection
        self.image_column, self.caption_column = image_column, caption_column
        self.transform, self.tokenize = transform, tokenize
        self.resolution, self.seed = resolution, seed
        self.epoch = 0
        self.target_sizes: list[tuple[int, int]] | None = None  # per sample, when bucketing
        self.image_cache = None  # a difftune.cache.CacheReader of per-orientation image encodings
        self.text_cache = None  # a difftune.cache.CacheReader of caption encodings
        self.empty_prompt_share = 0.0  # --proportion_empty_prompts
        self.empty_text: dict[str, torch.Tensor] | None = None  # the empty caption's cached encodings
        self.held_out_indices: list[int] | None = None  # the --eval_data_dir rows, never trained on

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def target_size(self, index: int) -> tuple[int, int]:
        return self.target_sizes[index] if self.target_sizes else (self.resolution, self.resolution)

    def load(self, index: int, flip: bool | None = None, rng: random.Random | None = None) -> dict[str, torch.Tensor]:
        """One transformed image with its size conditioning (`flip` forced, or drawn from `rng`)."""
        record = self.rows[index][self.image_column]
        try:
            image = open_image(record)
        except Exception as error:  # noqa: BLE001
            raise UserError(f"cannot read image {image_name(record)}: {error}") from None
        target = self.target_size(index)
        pixels, original, crop = self.transform(image, target, rng, flip)
        return {"pixel_values": pixels, "time_ids": torch.tensor([*original, *crop, *target], dtype=torch.float32)}

    def caption(self, index: int, rng: random.Random | None = None) -> str:
        return pick_caption(self.rows[index][self.caption_column], rng)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = sample_rng(self.seed, self.epoch, index)
        if self.image_cache is not None:
            out = self.image_cache.sample(index, flip=draw_flip(rng, self.transform.random_flip))
        else:
            out = self.load(index, rng=rng)
        drop = self.drops_caption(index)
        if self.text_cache is not None:
            return {**out, **(self.empty_text if drop else self.text_cache.sample(index))}
        caption = self.caption(index, rng)
        return {**out, **self.tokenize("" if drop else caption)}

    def evaluation_view(self) -> CaptionedImageDataset:
        """This data set as the held-out loss reads it, whatever the training epoch: epoch 0's crops and
        flips, and no caption dropout (a shallow copy: the images and caches are shared)."""
        view = copy.copy(self)
        view.epoch, view.empty_prompt_share = 0, 0.0
        return view

    def drops_caption(self, index: int) -> bool:
        """Caption dropout for classifier-free guidance: this sample trains as the empty prompt this epoch."""
        share = self.empty_prompt_share
        return share > 0 and sample_rng(self.seed, self.epoch, index, "empty-prompt").random() < share
