"""Where the data comes from: a Hub data set or an image folder, checked, unreadable images dropped."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from difftune.cli.errors import UserError
from difftune.data import dreambooth, folders, masks
from difftune.data.buckets import BucketRule, image_size
from difftune.data.captions import CaptionOptions, options_from_args
from difftune.data.config import DatasetSpec, load_dataset_config, specs_from_folders
from difftune.data.dataset import CaptionedImageDataset
from difftune.data.images import ImageTransform, column
from difftune.data.selection import append_rows, checked_selection
from difftune.data.subsets import read_spec_rows, regularisation_repeats
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
        folders.check_metadata_paths(metadata, source)
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


def kohya_specs(args) -> list[DatasetSpec] | None:
    """The run's kohya data sets: its --dataset_config, or its `<repeats>_<class tokens>` folders (None: neither)."""
    if getattr(args, "dataset_config", None):
        return load_dataset_config(args.dataset_config, args)
    return specs_from_folders(args)


def dataset_from_args(
    args, transform: ImageTransform, tokenize: Callable[[str], dict[str, torch.Tensor]]
) -> CaptionedImageDataset:
    """The training data set described by the data flags (see difftune.train.args.add_data_args). The images of
    --eval_data_dir come after the training images, as `held_out_indices`: transformed and cached alike,
    each once (repeats count for training only). Class images (difftune.data.dreambooth) come between the two:
    `class_sample` marks them. kohya's forms (a --dataset_config, `<repeats>_<class tokens>` folders) train with
    kohya's rules: see `apply_dataset_specs`."""
    columns = [args.image_column, args.caption_column]
    extension = getattr(args, "caption_extension", None) or ".txt"
    scanning = (getattr(args, "cache_dir", None), args.dataloader_num_workers)
    specs = kohya_specs(args)
    if specs:
        source = (
            f"--dataset_config {args.dataset_config}"
            if args.dataset_config
            else f"--train_data_dir {args.train_data_dir}"
        )
        subsets = [subset for spec in specs for subset in spec.subsets]
        rows = read_spec_rows(specs, source, getattr(args, "instance_prompt", None), args.seed)
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
    held_rows = column(images, "held_out") if "held_out" in images.column_names else [False] * len(images)
    is_class = [False] * len(images)
    classes = dreambooth.class_rows(args, columns, scanning) if hasattr(args, "with_prior_preservation") else None
    if classes is not None:
        instances = dreambooth.with_caption_lists(images.select_columns(columns), args.caption_column)
        images = append_rows(instances, classes.select_columns(columns), "the class images")
        repeats, is_class = repeats + column(classes, "repeats"), is_class + [True] * len(classes)
        held_rows = held_rows + [False] * len(classes)
        row_subsets = row_subsets + [None] * len(classes) if specs else None
    if specs:
        repeats = kohya_repeats(specs, subsets, repeats, row_subsets, held_rows, source)
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
    all_repeats = [1 if held else count for count, held in zip(repeats, held_rows, strict=True)] + [1] * held_out
    if specs or any(count > 1 for count in repeats):
        dataset.repeat_rows(all_repeats)
    if not specs and any(count > 1 for count in repeats):
        logger.info("%d images, %d samples per epoch with their repeats", len(repeats), len(dataset) - held_out)
    held = [dataset.first_sample(row) for row, flag in enumerate(held_rows) if flag and all_repeats[row]]
    held += list(range(len(dataset) - held_out, len(dataset))) if held_out else []
    dataset.held_out_indices = held if (held or specs) else None
    if any(is_class):
        rows_class = is_class + [False] * held_out
        dataset.class_sample = [rows_class[dataset.row(i)] for i in range(len(dataset))]
    dataset.caption_options = [options_from_args(args)] if hasattr(args, "caption_prefix") else [CaptionOptions()]
    dataset.caption_variants = getattr(args, "caption_variants", 0)
    if specs:
        apply_dataset_specs(dataset, args, specs, row_subsets + [None] * held_out)
        args.datasets = [spec.summary() for spec in specs]  # recorded in args.json and the card
        args.trained_size = list(specs[0].resolution)  # (height, width) validation and infer.py sample at
        alpha_rows = [s is not None and subsets[s].alpha_mask for s in row_subsets]
    else:
        alpha_rows = [getattr(args, "alpha_mask", False)] * len(repeats)
    dataset.mask_sources = masks.mask_sources(args, images, args.image_column, alpha_rows, is_class)
    return dataset


def kohya_repeats(
    specs: list[DatasetSpec], subsets: list, repeats: list[int], row_subsets: list, held_rows: list[bool], source: str
) -> list[int]:
    """Each row's repeats with kohya's regularisation count (per data set: the regularisation images repeated in
    turn up to its training samples), and the counts in the log as kohya gives them."""
    repeats, first = list(repeats), 0
    for number, spec in enumerate(specs, start=1):
        mine = range(first, first + len(spec.subsets))
        first += len(spec.subsets)
        rows = [r for r, s in enumerate(row_subsets) if s in mine]
        train = [r for r in rows if not subsets[row_subsets[r]].is_reg and not held_rows[r]]
        reg = [r for r in rows if subsets[row_subsets[r]].is_reg]
        train_samples = sum(repeats[r] for r in train)
        reg_repeats = regularisation_repeats(train_samples, [repeats[r] for r in reg])
        for row, count in zip(reg, reg_repeats, strict=True):
            repeats[row] = count
        held = sum(held_rows[r] for r in rows)
        logger.info(
            "%s data set %d: %d training images, %d samples per epoch with repeats%s%s",
            source, number, len(train), train_samples,
            f"; {len(reg)} regularisation images, {sum(reg_repeats)} samples with repeats" if reg else "",
            f"; {held} images held out (validation_split)" if held else "",
        )  # fmt: skip
        if reg and sum(1 for count in reg_repeats if count == 0):
            logger.warning("%s data set %d: %d regularisation images are not used (more than training samples, "
                           "as kohya)", source, number, sum(1 for count in reg_repeats if count == 0))  # fmt: skip
    return repeats


def apply_dataset_specs(dataset: CaptionedImageDataset, args, specs: list[DatasetSpec], row_subsets: list) -> None:
    """kohya's rules per row and sample: the subset's caption options and image transform (its augmentations,
    kohya's resize and crop), the data set's bucket (kohya's bucket rule) and batch size, and the loss weight of
    regularisation images (--prior_loss_weight). Rows of no subset (class images of --class_data_dir,
    --eval_data_dir) keep the flags' options and --resolution."""
    subsets = [(number, subset) for number, spec in enumerate(specs) for subset in spec.subsets]
    flags_options = len(subsets)
    dataset.caption_options = [subset.options for _, subset in subsets] + dataset.caption_options
    dataset.row_options = [flags_options if s is None else s for s in row_subsets]
    base = dataset.transform
    dataset.transforms = [
        kohya_transform(base, subset.augment, specs[number].enable_bucket) for number, subset in subsets
    ] + [base]
    dataset.row_transforms = [flags_options if s is None else s for s in row_subsets]
    rules = [BucketRule.from_spec(spec) for spec in specs]
    weight = getattr(args, "prior_loss_weight", 1.0)
    sizes, resized, groups, batch_sizes, weights = [], [], [], [], []
    for row, subset in enumerate(row_subsets):
        if subset is None:
            size, scaled, group, batch_size, is_reg = (
                (dataset.resolution,) * 2,
                None,
                None,
                args.train_batch_size,
                False,
            )
        else:
            number = subsets[subset][0]
            size, scaled = rules[number].select(*image_size(dataset.rows[row][dataset.image_column]))
            group, batch_size, is_reg = number, specs[number].batch_size, subsets[subset][1].is_reg
        sizes.append(size)
        resized.append(scaled)
        groups.append((group, size))
        batch_sizes.append(batch_size)
        weights.append(weight if is_reg else 1.0)
    per_sample = [dataset.row(i) for i in range(len(dataset))]
    dataset.target_sizes = [sizes[row] for row in per_sample]
    dataset.resized_sizes = [resized[row] for row in per_sample]
    dataset.batch_groups = [groups[row] for row in per_sample]
    dataset.batch_sizes = [batch_sizes[row] for row in per_sample]
    dataset.keep_partial_batches = True
    if any(w != 1.0 for w in weights):
        dataset.sample_weights = [weights[row] for row in per_sample]
    described = [spec.summary() for spec in specs]
    dataset.fingerprint = hashlib.sha256(f"{dataset.fingerprint}:{described}".encode()).hexdigest()[:16]


def kohya_transform(base: ImageTransform, augment, enable_bucket: bool) -> ImageTransform:
    """The script's transform (its normalisation) with a kohya subset's augmentations and kohya's geometry (its
    face crop only without buckets, as kohya)."""
    augment = augment or folders.Augment()
    return dataclasses.replace(
        base, kohya=True, center_crop=not augment.random_crop, random_flip=augment.flip, color_aug=augment.color,
        face_crop_range=None if enable_bucket else augment.face_crop_range, interpolation=augment.interpolation,
    )  # fmt: skip
