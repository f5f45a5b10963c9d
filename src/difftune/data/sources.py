"""Where the data comes from: a Hub data set or an image folder, checked, unreadable images dropped."""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from difftune.cli.errors import UserError
from difftune.data import dreambooth, folders, masks
from difftune.data.buckets import closest_bucket, image_size, make_buckets
from difftune.data.captions import CaptionOptions, options_from_args
from difftune.data.config import DatasetSpec, load_dataset_config
from difftune.data.dataset import CaptionedImageDataset
from difftune.data.images import ImageTransform, column
from difftune.data.selection import append_rows, checked_selection
from difftune.storage.hub import is_offline, looks_like_hub_id

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
    caption_extension: str = ".txt",
    cache_dir: str | None = None,
    workers: int = 0,
    fallback_prompt: str | None = None,
):
    """A datasets.Dataset with undecoded images, checked columns, and unreadable images dropped. A folder
    without a metadata file is read with its caption files and kohya subfolders (difftune.data.folders;
    `fallback_prompt` captions the images with neither): then the data set has "repeats" and "subset" columns too."""
    import datasets

    if train_data_dir is not None:
        source = f"{folder_flag} {train_data_dir}"
        rows = folders.folder_rows(train_data_dir, folder_flag, caption_extension, fallback_prompt)
        if rows is not None:
            dataset = folders.folder_dataset(rows, image_column, caption_column)
            return checked_selection(dataset, image_column, max_train_samples, seed, source, cache_dir, workers)
        metadata = folders.metadata_file(train_data_dir)
        ignored = folders.caption_files_beside(Path(train_data_dir), caption_extension)
        if ignored:
            logger.warning("%s has %s: its captions win, the %d %s files are ignored", source, metadata.name,
                           ignored, caption_extension)  # fmt: skip
        kwargs = {"path": "imagefolder", "data_dir": train_data_dir}
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
    for flag, name in (("--image_column", image_column), ("--caption_column", caption_column)):
        if name not in columns:
            raise UserError(f"{flag} {name!r} is not a column of {source}; its columns are {columns}")
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return checked_selection(dataset, image_column, max_train_samples, seed, source, cache_dir, workers)


def dataset_from_args(
    args, transform: ImageTransform, tokenize: Callable[[str], dict[str, torch.Tensor]]
) -> CaptionedImageDataset:
    """The training data set described by the data flags (see difftune.train.args.add_data_args). The images of
    --eval_data_dir come after the training images, as `held_out_indices`: transformed and cached alike,
    each once (repeats count for training only). Class images (difftune.data.dreambooth) come between the two:
    `class_sample` marks them."""
    columns = [args.image_column, args.caption_column]
    extension = getattr(args, "caption_extension", None) or ".txt"
    specs, scanning = None, (getattr(args, "cache_dir", None), args.dataloader_num_workers)
    if getattr(args, "dataset_config", None):
        specs = load_dataset_config(args.dataset_config, args)
        source = f"--dataset_config {args.dataset_config}"
        subsets = [subset for spec in specs for subset in spec.subsets]
        rows = folders.read_subsets(subsets, source, getattr(args, "instance_prompt", None))
        images = folders.folder_dataset(rows, *columns)
        images = checked_selection(images, args.image_column, args.max_train_samples, args.seed, source, *scanning)
    else:
        images = load_captioned_images(
            args.dataset_name,
            args.dataset_config_name,
            args.train_data_dir,
            *columns,
            args.max_train_samples,
            args.seed,
            folder_flag=dreambooth.instance_folder_flag(args),
            caption_extension=extension,
            cache_dir=scanning[0],
            workers=scanning[1],
            fallback_prompt=getattr(args, "instance_prompt", None),
        )
    repeats = column(images, "repeats") if "repeats" in images.column_names else [1] * len(images)
    row_subsets = column(images, "subset") if specs else None
    is_class = [subsets[s].is_reg for s in row_subsets] if specs else [False] * len(images)
    classes = dreambooth.class_rows(args, columns, scanning) if hasattr(args, "with_prior_preservation") else None
    if classes is not None:
        instances = dreambooth.with_caption_lists(images.select_columns(columns), args.caption_column)
        images = append_rows(instances, classes.select_columns(columns), "the class images")
        repeats, is_class = repeats + column(classes, "repeats"), is_class + [True] * len(classes)
        row_subsets = row_subsets + [None] * len(classes) if specs else None
    held_out = 0
    if getattr(args, "eval_data_dir", None):
        evaluation = load_captioned_images(
            None, None, args.eval_data_dir, *columns, None, args.seed, "--eval_data_dir", extension, *scanning
        )
        held_out = len(evaluation)
        images = append_rows(
            images.select_columns(columns), evaluation.select_columns(columns), f"--eval_data_dir {args.eval_data_dir}"
        )
    dataset = CaptionedImageDataset(images, *columns, transform, tokenize, args.resolution, args.seed)
    dataset.empty_prompt_share = getattr(args, "proportion_empty_prompts", 0.0)
    if any(count > 1 for count in repeats):
        dataset.repeat_rows(repeats + [1] * held_out)
        logger.info("%d images, %d samples per epoch with their repeats", len(repeats), len(dataset) - held_out)
    dataset.held_out_indices = list(range(len(dataset) - held_out, len(dataset))) if held_out else None
    if any(is_class):
        rows_class = is_class + [False] * held_out
        dataset.class_sample = [rows_class[dataset.row(i)] for i in range(len(dataset))]
    dataset.caption_options = [options_from_args(args)] if hasattr(args, "caption_prefix") else [CaptionOptions()]
    dataset.caption_variants = getattr(args, "caption_variants", 0)
    if specs:
        apply_dataset_specs(dataset, specs, row_subsets + [None] * held_out)
    if specs:
        alpha_rows = [s is not None and subsets[s].alpha_mask for s in row_subsets]
    else:
        alpha_rows = [getattr(args, "alpha_mask", False)] * len(repeats)
    dataset.mask_sources = masks.mask_sources(args, images, args.image_column, alpha_rows, is_class)
    return dataset


def apply_dataset_specs(dataset: CaptionedImageDataset, specs: list[DatasetSpec], row_subsets: list) -> None:
    """Each row's caption options, and each sample's size and batch group (its data set and bucket), from a
    --dataset_config; rows of no subset (--eval_data_dir) keep the flags' options and --resolution."""
    subsets = [(number, subset) for number, spec in enumerate(specs) for subset in spec.subsets]
    flags_options = len(subsets)
    dataset.caption_options = [subset.options for _, subset in subsets] + dataset.caption_options
    dataset.row_options = [flags_options if s is None else s for s in row_subsets]
    sizes, groups = [], []
    for row, subset in enumerate(row_subsets):
        if subset is None:
            size, group = (dataset.resolution, dataset.resolution), None
        else:
            spec = specs[subsets[subset][0]]
            size = spec.resolution
            if spec.enable_bucket:  # buckets of about the data set's area
                side = round(math.sqrt(size[0] * size[1]))
                size = closest_bucket(*image_size(dataset.rows[row][dataset.image_column]), make_buckets(side))
            group = subsets[subset][0]
        sizes.append(size)
        groups.append((group, size))
    dataset.target_sizes = [sizes[dataset.row(i)] for i in range(len(dataset))]
    dataset.batch_groups = [groups[dataset.row(i)] for i in range(len(dataset))]
    described = [(spec.resolution, spec.enable_bucket) for spec in specs]
    dataset.fingerprint = hashlib.sha256(f"{dataset.fingerprint}:{described}".encode()).hexdigest()[:16]
