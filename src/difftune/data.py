"""Captioned image data: loading (Hub data set or image folder), transforms, batching.

Randomness here (crop position, flip, caption choice, shuffle order) is derived from
(seed, epoch, sample index), not from a global RNG, so a resumed run sees exactly
the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
import io
import logging
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from difftune.errors import UserError
from difftune.hub import is_offline, looks_like_hub_id

logger = logging.getLogger(__name__)


def load_captioned_images(
    dataset_name: str | None,
    dataset_config_name: str | None,
    train_data_dir: str | None,
    image_column: str,
    caption_column: str,
    max_train_samples: int | None,
    seed: int,
    folder_flag: str = "--train_data_dir",
):
    """A datasets.Dataset with undecoded images, checked columns, and unreadable images dropped."""
    import datasets

    if train_data_dir is not None:
        if not Path(train_data_dir).is_dir():
            raise UserError(f"{folder_flag} {train_data_dir} does not exist: pass a folder of images")
        source, kwargs = f"{folder_flag} {train_data_dir}", {"path": "imagefolder", "data_dir": train_data_dir}
    elif dataset_name is not None:
        if not Path(dataset_name).exists() and not looks_like_hub_id(dataset_name):
            raise UserError(f"--dataset_name {dataset_name} does not exist: pass a Hub data set id or a local path")
        source, kwargs = f"--dataset_name {dataset_name}", {"path": dataset_name, "name": dataset_config_name}
    else:
        raise UserError("no training data: pass --dataset_name or --train_data_dir")
    try:
        dataset = datasets.load_dataset(**kwargs, split="train")
    except Exception as error:  # noqa: BLE001 - every loading failure becomes one clear line
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        hint = (
            "the Hub is offline (HF_HUB_OFFLINE=1): use a cached data set or --train_data_dir"
            if is_offline() and train_data_dir is None and dataset_name and not Path(dataset_name).exists()
            else f"check that {folder_flag} is an image folder with a metadata.jsonl (file_name, text)"
            if train_data_dir is not None
            else "check the name, or use --train_data_dir for a local image folder"
        )
        raise UserError(f"cannot load {source}: {first_line} ({hint})") from None

    columns = list(dataset.column_names)
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column not in columns:
            raise UserError(f"{flag} {column!r} is not a column of {source}; its columns are {columns}")
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    if max_train_samples is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(max_train_samples, len(dataset))))
    dataset = drop_unreadable_images(dataset, image_column)
    if len(dataset) == 0:
        raise UserError(f"{source} has no readable images")
    return dataset


def image_name(record: dict) -> str:
    return record.get("path") or "<image bytes>"


def image_source(record: dict):
    """What PIL opens for an undecoded datasets image record ({"bytes", "path"})."""
    return io.BytesIO(record["bytes"]) if record.get("bytes") else record["path"]


def open_image(record: dict) -> Image.Image:
    """Decode an undecoded datasets image record to RGB."""
    image = Image.open(image_source(record))
    image.load()
    return image.convert("RGB")


def drop_unreadable_images(dataset, image_column: str):
    """Skip images that PIL cannot decode, with a warning naming each one."""
    good = []
    for index, row in enumerate(dataset.select_columns([image_column])):
        record = row[image_column]
        try:
            with Image.open(image_source(record)) as image:
                image.load()  # a full decode: a header check misses truncated files
        except Exception as error:  # noqa: BLE001 - any decode failure means unreadable
            logger.warning("skipping unreadable image %s (%s)", image_name(record), error)
            continue
        good.append(index)
    return dataset if len(good) == len(dataset) else dataset.select(good)


def sample_rng(seed: int, epoch: int, index: int, stream: str = "") -> random.Random:
    """An RNG for one sample in one epoch, independent of what ran before; a named `stream` draws
    apart from the augmentation's, so adding a draw there changes no other."""
    return random.Random(f"{seed}:{epoch}:{index}{':' + stream if stream else ''}")


def draw_flip(rng: random.Random, random_flip: bool) -> bool:
    """The flip decision; with a centre crop it is the sample's first draw (cached and live data agree)."""
    return random_flip and rng.random() < 0.5


@dataclass(frozen=True)
class ImageTransform:
    """Resize to cover the target size, crop (centre or random), maybe flip, normalise.

    Returns the tensor, the original (height, width) and the crop's (top, left) in the
    resized image as seen after the flip: what SDXL's micro-conditioning wants.
    """

    center_crop: bool
    random_flip: bool
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)

    def __call__(
        self, image: Image.Image, size: tuple[int, int], rng: random.Random | None, flip: bool | None = None
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """`flip` forces the flip decision (for caching both orientations); else it is drawn from `rng`."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        target_h, target_w = size
        original = (image.height, image.width)
        scale = max(target_h / image.height, target_w / image.width)
        resized_h = max(target_h, round(image.height * scale))
        resized_w = max(target_w, round(image.width * scale))
        image = F.resize(image, [resized_h, resized_w], interpolation=InterpolationMode.BILINEAR, antialias=True)
        if self.center_crop:
            top, left = round((resized_h - target_h) / 2), round((resized_w - target_w) / 2)
        else:
            top, left = rng.randint(0, resized_h - target_h), rng.randint(0, resized_w - target_w)
        image = F.crop(image, top, left, target_h, target_w)
        if draw_flip(rng, self.random_flip) if flip is None else flip:
            image = F.hflip(image)
            left = resized_w - left - target_w
        tensor = F.normalize(F.to_tensor(image), self.mean, self.std)
        return tensor, original, (top, left)


class Tokenize:
    """Captions to fixed-length token ids for one or more tokenizers (picklable for workers)."""

    def __init__(self, tokenizers: dict[str, object], attention_mask: bool = False) -> None:
        self.tokenizers = tokenizers
        self.attention_mask = attention_mask

    def __call__(self, caption: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, tokenizer in self.tokenizers.items():
            tokens = tokenizer(
                caption,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            out[f"{name}_input_ids"] = tokens.input_ids[0]
            if self.attention_mask:
                out[f"{name}_attention_mask"] = tokens.attention_mask[0]
        return out


def pick_caption(value, rng: random.Random | None) -> str:
    """A caption column holds a string or a list of strings (then one is chosen at random)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value:
        if rng is None:
            raise UserError("--cache_text_embeddings needs one caption per image; this data set has lists of them")
        return rng.choice(value)
    raise UserError(f"caption column holds {type(value).__name__} values; captions must be strings or lists of them")


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


def dataset_from_args(
    args, transform: ImageTransform, tokenize: Callable[[str], dict[str, torch.Tensor]]
) -> CaptionedImageDataset:
    """The training data set described by the data flags (see difftune.args.add_data_args). The images of
    --eval_data_dir come after the training images, as `held_out_indices`: transformed and cached alike."""
    columns = [args.image_column, args.caption_column]
    images = load_captioned_images(
        args.dataset_name,
        args.dataset_config_name,
        args.train_data_dir,
        *columns,
        args.max_train_samples,
        args.seed,
    )
    held_out = None
    if getattr(args, "eval_data_dir", None):
        evaluation = load_captioned_images(None, None, args.eval_data_dir, *columns, None, args.seed, "--eval_data_dir")
        held_out = list(range(len(images), len(images) + len(evaluation)))
        images = append_rows(
            images.select_columns(columns), evaluation.select_columns(columns), f"--eval_data_dir {args.eval_data_dir}"
        )
    dataset = CaptionedImageDataset(images, *columns, transform, tokenize, args.resolution, args.seed)
    dataset.empty_prompt_share = getattr(args, "proportion_empty_prompts", 0.0)
    dataset.held_out_indices = held_out
    return dataset


def append_rows(rows, more, source: str):
    """`rows` then `more`, one datasets.Dataset (its fingerprint covers both, so caches tell it apart)."""
    import datasets

    try:
        return datasets.concatenate_datasets([rows, more])
    except ValueError as error:
        raise UserError(
            f"{source} does not match the training data's columns ({error}): give it the same caption format"
        ) from None


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def make_buckets(
    resolution: int, multiple: int = 64, max_ratio: float = 4.0, min_area: float = 0.75
) -> list[tuple[int, int]]:
    """(height, width) buckets with sides in steps of `multiple`, between min_area and 1 times resolution^2 pixels."""
    area = resolution * resolution
    buckets = set()
    for side in range(multiple, int(resolution * max_ratio) + 1, multiple):
        other = (area // side) // multiple * multiple
        if other >= multiple and max(side, other) / min(side, other) <= max_ratio and side * other >= min_area * area:
            buckets.update({(side, other), (other, side)})
    return sorted(buckets)


def assign_buckets(dataset: CaptionedImageDataset, buckets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each image's bucket: the closest aspect ratio (log scale), then the larger area."""
    sizes = []
    for index in range(len(dataset)):
        record = dataset.rows[index][dataset.image_column]
        with Image.open(image_source(record)) as image:  # reads the header only
            ratio = math.log(image.height / image.width)
        sizes.append(min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1])))
    return sizes


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches, reshuffled each epoch from (seed, epoch), split across processes.

    Each global batch of batch_size * num_processes samples is cut into one batch per
    process; incomplete global batches are dropped so that every process runs the same
    number of steps. With `groups` (e.g. aspect-ratio buckets) every global batch comes from
    one group. `start` skips batches (for resuming mid-epoch).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        num_processes: int = 1,
        process_index: int = 0,
        groups: list | None = None,
    ) -> None:
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.groups = groups
        self.epoch, self.start = 0, 0
        if len(self) == 0:
            raise UserError(
                f"{num_samples} training images cannot fill one batch of {batch_size} per process "
                f"on {num_processes} process(es){' from one aspect-ratio bucket' if groups else ''}: "
                "lower --train_batch_size or add images"
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def global_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        size = self.batch_size * self.num_processes
        if self.groups is None:
            return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
        by_group: dict = {}
        for index in order:
            by_group.setdefault(self.groups[index], []).append(index)
        batches = [
            members[i : i + size] for members in by_group.values() for i in range(0, len(members) - size + 1, size)
        ]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __len__(self) -> int:
        size = self.batch_size * self.num_processes
        if self.groups is None:
            return self.num_samples // size
        counts: dict = {}
        for group in self.groups:
            counts[group] = counts.get(group, 0) + 1
        return sum(count // size for count in counts.values())

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.start :]:
            offset = self.process_index * self.batch_size
            yield batch[offset : offset + self.batch_size]


def num_update_steps_per_epoch(batches_per_epoch: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps per epoch: the last one accumulates what is left (as diffusers' scripts count)."""
    return math.ceil(batches_per_epoch / gradient_accumulation_steps)


def epochs_for(max_train_steps: int, steps_per_epoch: int) -> int:
    return math.ceil(max_train_steps / steps_per_epoch)
