"""The training data set: transformed images with tokenized captions, from caches when built.

A sample is one image in one of its repeats (kohya's `<repeats>_<class tokens>` folders): a row of the
underlying data is `repeats` samples, each with its own crops, flips and caption draws. Caches hold rows
(one image encoding per image) and distinct caption texts (one text encoding per text).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from collections.abc import Callable

import torch

from difftune.cli.errors import UserError
from difftune.data.captions import CaptionOptions, pick_caption, variant_rng
from difftune.data.images import ImageTransform, column, draw_flip, face_info, image_name, open_image, sample_rng
from difftune.data.masks import open_mask

logger = logging.getLogger(__name__)


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
        self.batch_groups: list | None = None  # per sample: what a batch shares (--dataset_config: data set, size)
        self.image_cache = None  # a difftune.storage.shards.CacheReader of per-orientation image encodings, by row
        self.text_cache = None  # a difftune.storage.shards.CacheReader of caption encodings, by position in texts()
        self.text_ids: dict[str, int] = {}  # a cached text's position
        self.empty_prompt_share = 0.0  # --proportion_empty_prompts
        self.held_out_indices: list[int] | None = None  # the --eval_data_dir samples, never trained on
        self.sample_rows: list[int] | None = None  # each sample's row, when images repeat
        self.caption_options: list[CaptionOptions] = [CaptionOptions()]
        self.row_options: list[int] | None = None  # each row's entry of caption_options (default: the first)
        self.caption_variants = 0  # --caption_variants: K processed forms per caption, one drawn per sample
        self.unreadable: set[str] = set()  # images found unreadable after the scan (each warned about once)
        self.mask_sources: list[str | None] | None = None  # --masked_loss: each row's (difftune.data.masks)
        self.class_sample: list[bool] | None = None  # per sample: a class image (prior preservation)
        # kohya data sets (difftune.data.config): per row, its subset's transform; per sample, the size the image
        # is resized to before the crop, the loss weight (regularisation images) and the data set's batch size.
        self.transforms: list[ImageTransform] | None = None
        self.row_transforms: list[int] | None = None
        self.resized_sizes: list[tuple[int, int]] | None = None
        self.sample_weights: list[float] | None = None
        self.batch_sizes: list[int] | None = None
        self.keep_partial_batches = False  # kohya trains a bucket's last, smaller batch
        self.sample_steps: dict[int, int] = {}  # token warm-up: each sample's optimizer step this epoch
        self.max_train_steps = 0

    def __len__(self) -> int:
        return len(self.rows) if self.sample_rows is None else len(self.sample_rows)

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    def repeat_rows(self, repeats: list[int]) -> None:
        """Row r becomes repeats[r] consecutive samples."""
        self.sample_rows = [row for row, count in enumerate(repeats) for _ in range(count)]

    def samples_per_epoch(self) -> int:
        """The training samples, repeats counted (the --eval_data_dir images are not trained on, and class images
        come with them)."""
        return len(self) - len(self.held_out_indices or []) - sum(self.class_sample or [])

    def row(self, index: int) -> int:
        return index if self.sample_rows is None else self.sample_rows[index]

    def first_sample(self, row: int) -> int:
        if self.sample_rows is None:
            return row
        if not hasattr(self, "_first_samples"):
            self._first_samples = {}
            for index, sample_row in enumerate(self.sample_rows):
                self._first_samples.setdefault(sample_row, index)
        return self._first_samples[row]

    def set_epoch(self, epoch: int, steps: dict[int, int] | None = None) -> None:
        """The epoch (and, for token warm-up, the optimizer step each sample trains at in it)."""
        self.epoch = epoch
        self.sample_steps = steps or {}

    @property
    def needs_steps(self) -> bool:
        """Whether a caption depends on the training step (token warm-up)."""
        return any(options.depends_on_step for options in self.caption_options)

    def transform_of(self, row: int) -> ImageTransform:
        return self.transform if self.row_transforms is None else self.transforms[self.row_transforms[row]]

    def target_size(self, index: int) -> tuple[int, int]:
        return self.target_sizes[index] if self.target_sizes else (self.resolution, self.resolution)

    def load(self, index: int, flip: bool | None = None, rng: random.Random | None = None) -> dict[str, torch.Tensor]:
        """One transformed image with its size conditioning (`flip` forced, or drawn from `rng`), and with
        --masked_loss its loss mask, cropped and flipped alike."""
        target = self.target_size(index)
        image, original, row = self.open_or_substitute(index)
        mask = None
        if self.mask_sources is not None:
            mask = open_mask(self.rows[row][self.image_column], self.mask_sources[row], image.size)
        transform = self.transform_of(row)
        # (an image substituted for an unreadable one is resized to cover the target: its own size differs)
        resized = self.resized_sizes[index] if self.resized_sizes and row == self.row(index) else None
        face = face_info(image_name(self.rows[row][self.image_column])) if transform.face_crop_range else None
        pixels, original, crop, mask = transform.with_mask(
            image, target, rng, flip, mask, original, resized=resized, face=face
        )
        out = {"pixel_values": pixels, "time_ids": torch.tensor([*original, *crop, *target], dtype=torch.float32)}
        return out if mask is None else {**out, "mask": mask}

    def open_or_substitute(self, index: int):
        """Sample `index`'s image (decoded at a size that still covers its target), its size in the file and its
        row; if it became unreadable after the scan, the next readable image of the
        same target size, with a warning (a batch still gets its images, the run goes on)."""
        for step in range(len(self)):
            candidate = (index + step) % len(self)
            if step and self.target_size(candidate) != self.target_size(index):
                continue
            record = self.rows[self.row(candidate)][self.image_column]
            try:
                # (kohya's rows decode whole, as kohya does: a JPEG's reduced decode changes its pixels)
                covering = None if self.transform_of(self.row(candidate)).kohya else self.target_size(index)
                return *open_image(record, covering), self.row(candidate)
            except Exception as error:  # noqa: BLE001 - any decode failure means unreadable
                if image_name(record) not in self.unreadable:
                    self.unreadable.add(image_name(record))
                    logger.warning("skipping image %s, unreadable since the scan (%s)", image_name(record), error)
        raise UserError(f"no readable image is left of size {self.target_size(index)}: check the data set's files")

    def load_row(self, row: int, flip: bool) -> dict[str, torch.Tensor]:
        """A row's image as every one of its samples sees it with a centre crop (what the image cache holds)."""
        return self.load(self.first_sample(row), flip=flip)

    def options(self, row: int) -> CaptionOptions:
        return self.caption_options[0 if self.row_options is None else self.row_options[row]]

    def caption(self, index: int) -> str:
        """The text sample `index` trains on this epoch: a line picked, maybe dropped, processed."""
        row = self.row(index)
        options = self.options(row)
        if self.drops_caption(index) or options.drops(
            self.epoch, sample_rng(self.seed, self.epoch, index, "caption-dropout")
        ):
            return ""
        caption = pick_caption(self.rows[row][self.caption_column], sample_rng(self.seed, self.epoch, index, "caption"))
        step = {"step": self.sample_steps.get(index, 0), "max_steps": self.max_train_steps}
        if not options.is_random:
            return options.apply(caption, None, **step)
        if self.caption_variants:
            variant = sample_rng(self.seed, self.epoch, index, "caption-variant").randrange(self.caption_variants)
            return options.apply(caption, variant_rng(self.seed, caption, variant), **step)
        return options.apply(caption, sample_rng(self.seed, self.epoch, index, "caption-processing"), **step)

    def texts(self) -> list[str]:
        """Every text a sample can train on (what a text cache holds), sorted: each caption processed, in
        each of its --caption_variants when the processing draws, and the empty caption when one drops."""
        options = self.caption_options
        if self.needs_steps:
            raise UserError(
                "--cache_text_embeddings cannot hold captions that change with the step (token_warmup_step): "
                "drop the cache flag or the warm-up"
            )
        if any(o.is_random for o in options) and not self.caption_variants:
            raise UserError(
                "--cache_text_embeddings with --shuffle_caption or --caption_tag_dropout_rate needs "
                "--caption_variants K (K processed forms of each caption are cached; try 8)"
            )
        drops = any(o.dropout_rate > 0 or o.dropout_every_n_epochs > 0 for o in options)
        texts = {""} if self.empty_prompt_share > 0 or drops else set()
        for row, value in enumerate(column(self.rows, self.caption_column)):
            row_options = self.options(row)
            for caption in [value] if isinstance(value, str) else value:
                if row_options.is_random:
                    texts.update(row_options.apply(caption, variant_rng(self.seed, caption, v))
                                 for v in range(self.caption_variants))  # fmt: skip
                else:
                    texts.add(row_options.apply(caption, None))
        return sorted(texts)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = sample_rng(self.seed, self.epoch, index)
        if self.image_cache is not None:
            out = self.image_cache.sample(
                self.row(index), flip=draw_flip(rng, self.transform_of(self.row(index)).random_flip)
            )
        else:
            out = self.load(index, rng=rng)
        caption = self.caption(index)
        if self.class_sample is not None:
            out["is_class"] = torch.tensor(self.class_sample[index])
        if self.sample_weights is not None:
            out["loss_weight"] = torch.tensor(self.sample_weights[index])
        if self.text_cache is not None:
            return {**out, **self.text_cache.sample(self.text_ids[caption])}
        return {**out, **self.tokenize(caption)}

    def evaluation_view(self) -> CaptionedImageDataset:
        """This data set as the held-out loss reads it, whatever the training epoch: epoch 0's crops and
        flips, and no caption dropout or token warm-up (a shallow copy: the images and caches are shared)."""
        view = copy.copy(self)
        view.epoch, view.empty_prompt_share = 0, 0.0
        view.caption_options = [
            dataclasses.replace(o, dropout_rate=0.0, dropout_every_n_epochs=0, token_warmup_step=0)
            for o in self.caption_options
        ]
        return view

    def drops_caption(self, index: int) -> bool:
        """Caption dropout for classifier-free guidance: this sample trains as the empty prompt this epoch."""
        share = self.empty_prompt_share
        return share > 0 and sample_rng(self.seed, self.epoch, index, "empty-prompt").random() < share
