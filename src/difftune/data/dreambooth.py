"""DreamBooth with prior preservation: the flags (diffusers' names), their checks, and the class images as rows
of the training data.

Class images come from --class_data_dir (generated there by difftune.generate.class_images when too few). They are
appended to the data set's rows, so they share its transforms, buckets and caches; the batch sampler pairs every
instance batch with a class batch (data.sampling.PairedBatchSampler), and the loss is the instance loss +
--prior_loss_weight x the class loss (difftune.train.objectives).

kohya's regularisation images (a --reg_data_dir of `<repeats>_<class tokens>` folders, `is_reg = true` subsets)
keep kohya's meaning instead: part of the epoch (difftune.data.subsets), each weighted --prior_loss_weight.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from pathlib import Path

from difftune.cli.errors import UserError
from difftune.data import folders
from difftune.data.selection import checked_selection

logger = logging.getLogger("difftune")

CLASS_FLAGS = (
    "class_data_dir", "class_prompt", "num_class_images", "prior_loss_weight", "sample_batch_size",
    "prior_generation_precision",
)  # fmt: skip


def add_dreambooth_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("DreamBooth (diffusers' names; see docs/dreambooth.md)")
    group.add_argument("--instance_data_dir", default=None, help="The same as --train_data_dir (give one of them).")
    group.add_argument("--instance_prompt", default=None, help="The caption of every training image without one.")
    group.add_argument(
        "--with_prior_preservation", action="store_true",
        help="Add class images to every batch: loss = instance loss + --prior_loss_weight x class loss.",
    )  # fmt: skip
    group.add_argument(
        "--class_data_dir", default=None,
        help="Folder of class images; the missing ones (up to --num_class_images) are generated there.",
    )  # fmt: skip
    group.add_argument("--class_prompt", default=None, help="Generates the class images; their caption too.")
    group.add_argument("--num_class_images", type=int, default=100, help="Class images to train with.")
    group.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the class images' loss.")
    group.add_argument("--sample_batch_size", type=int, default=4, help="Batch size of class-image generation.")
    group.add_argument(
        "--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"],
        help="The dtype class images are generated in (no = fp32). Default: the frozen models' (--mixed_precision).",
    )  # fmt: skip
    group.add_argument(
        "--reg_data_dir", default=None,
        help="kohya's form: '<repeats>_<class tokens>' subfolders of regularisation images, trained in the epoch "
        "as kohya does (repeated up to the training samples' count, loss weighted --prior_loss_weight).",
    )  # fmt: skip


def count_images(folder: str | Path) -> int:
    """The image files directly in `folder` (0 if it does not exist)."""
    if not Path(folder).is_dir():
        return 0
    return sum(1 for entry in os.scandir(folder) if folders.is_image(entry))


def instance_folder_flag(args) -> str:
    """The flag that named the training image folder, for messages: DreamBooth's alias or --train_data_dir."""
    return "--instance_data_dir" if getattr(args, "instance_data_dir", None) else "--train_data_dir"


def check_dreambooth_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Resolve --instance_data_dir and refuse prior-preservation settings that cannot run (before models load)."""
    if args.instance_data_dir is not None:
        if args.train_data_dir is not None:
            raise UserError("--instance_data_dir and --train_data_dir name the same folder: pass one of them")
        args.train_data_dir = args.instance_data_dir
    if args.num_class_images < 1 or args.sample_batch_size < 1:
        raise UserError("--num_class_images and --sample_batch_size must be positive")
    if args.prior_loss_weight < 0:
        raise UserError(f"--prior_loss_weight must be >= 0, got {args.prior_loss_weight}")
    if args.reg_data_dir is not None and not Path(args.reg_data_dir).is_dir():
        raise UserError(f"--reg_data_dir {args.reg_data_dir} does not exist: pass a folder of kohya subfolders")
    if args.with_prior_preservation and args.reg_data_dir is not None:
        raise UserError(
            "--reg_data_dir (kohya: regularisation images in the epoch) and --with_prior_preservation (diffusers: "
            "a class batch with every batch) are two forms of the same thing: pass one of them"
        )
    if not args.with_prior_preservation:
        kohya = args.reg_data_dir is not None or getattr(args, "dataset_config", None)  # (is_reg weights)
        unused = [
            f"--{name}" for name in CLASS_FLAGS
            if getattr(args, name) != parser.get_default(name) and not (kohya and name == "prior_loss_weight")
        ]  # fmt: skip
        if unused:
            logger.warning("%s: unused without --with_prior_preservation", ", ".join(unused))
        return
    if args.class_data_dir is None:
        raise UserError(
            "--with_prior_preservation needs --class_data_dir (a folder of class images; the missing ones are "
            "generated there with --class_prompt)"
        )
    found = count_images(args.class_data_dir)
    if found < args.num_class_images and not args.class_prompt:
        raise UserError(
            f"--class_data_dir {args.class_data_dir} holds {found} images, fewer than --num_class_images "
            f"{args.num_class_images}: give --class_prompt to generate the rest, or lower --num_class_images"
        )
    if found < args.num_class_images:
        check_instance_folder(args)


def check_instance_folder(args: argparse.Namespace) -> None:
    """Class images can take minutes to generate: an instance image folder that cannot train (missing, empty,
    uncaptioned, a badly named subfolder) fails first, with the error the data set would give later."""
    if args.train_data_dir is not None and not args.dataset_config:
        extension = args.caption_extension or ".txt"
        folders.folder_rows(args.train_data_dir, instance_folder_flag(args), extension, args.instance_prompt)


def with_caption_lists(images, caption_column: str):
    """`images` with each caption a list of alternatives (the class rows' form), so that the two can be joined."""
    import datasets

    if not isinstance(images.features[caption_column], datasets.Value):
        return images
    return images.map(lambda caption: {caption_column: [caption]}, input_columns=caption_column)


def class_rows(args, columns: list[str], scanning: tuple):
    """The class images as a datasets.Dataset (image, caption, repeats columns), or None without them: the first
    --num_class_images of --class_data_dir (captioned --class_prompt unless a caption file says otherwise)."""
    if not args.with_prior_preservation:
        return None
    source = f"--class_data_dir {args.class_data_dir}"
    extension = getattr(args, "caption_extension", None) or ".txt"
    subset = folders.Subset(Path(args.class_data_dir), caption_extension=extension)
    rows = folders.read_subsets([subset], source, args.class_prompt, prompt_flag="--class_prompt")
    rows = folders.first_rows(rows, args.num_class_images)
    images = checked_selection(folders.folder_dataset(rows, *columns), columns[0], None, args.seed, source, *scanning)
    return images.select_columns([*columns, "repeats"])


def class_seed(seed: int) -> int:
    """The class batches' shuffling seed: apart from the instance batches' (seed + epoch)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:class-batches".encode()).digest()[:4], "little")
