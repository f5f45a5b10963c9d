"""The base model's --revision / --variant, the data flags (kohya's data-set keys, the caches) and their
checks: what a run trains on."""

from __future__ import annotations

import argparse
import contextlib
import logging

from difftune.cli.errors import UserError
from difftune.data.captions import add_caption_args
from difftune.data.config import INTERPOLATIONS
from difftune.data.dreambooth import add_dreambooth_args
from difftune.data.masks import add_mask_args


def add_model_args(group: argparse._ArgumentGroup) -> None:
    """--revision and --variant, after a script's base-model flags in its "model" group."""
    group.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the base model.")
    group.add_argument("--variant", default=None, help="Weights variant of the base model, e.g. fp16.")


def add_data_args(parser: argparse.ArgumentParser, *, resolution: int) -> argparse._ArgumentGroup:
    """The data flags and the groups that shape the data (masked loss, kohya data sets, captions, DreamBooth);
    returns the "data" group, for a script's own data flags."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        default="lambdalabs/pokemon-blip-captions",
        help="Hub data set id or local data set path (ignored when --train_data_dir is given).",
    )
    group.add_argument("--dataset_config_name", default=None)
    group.add_argument(
        "--train_data_dir",
        default=None,
        help="A folder of images with a metadata.jsonl (file_name, text), or with caption files beside them "
        "and kohya '<repeats>_<class tokens>' subfolders (see docs/data.md).",
    )
    group.add_argument(
        "--dataset_config",
        default=None,
        help="A kohya data-set config (TOML or .json: [general], [[datasets]], [[datasets.subsets]]), trained "
        "with kohya's rules; see docs/data.md.",
    )
    group.add_argument("--image_column", default="image")
    group.add_argument("--caption_column", default="text")
    group.add_argument("--max_train_samples", type=int, default=None, help="Train on this many samples at most.")
    group.add_argument("--resolution", type=int, default=resolution, help="Training image side, a multiple of 8.")
    group.add_argument(
        "--center_crop", action="store_true",
        help="Crop the centre (default: a random crop; kohya's forms crop the centre unless --random_crop).",
    )  # fmt: skip
    group.add_argument(
        "--random_flip", "--flip_aug", action="store_true", help="Flip images horizontally at random (kohya: flip_aug)."
    )
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    add_mask_args(parser.add_argument_group("masked loss (see docs/data.md, Masked loss)"))
    add_kohya_data_args(parser)
    add_caption_args(parser)
    add_dreambooth_args(parser)
    return group


def add_kohya_data_args(parser: argparse.ArgumentParser) -> None:
    """kohya's data-set keys as flags: the level above a --dataset_config's [general], and the settings of
    `<repeats>_<class tokens>` folders (kohya's argparse names and defaults)."""
    group = parser.add_argument_group("kohya data sets (--dataset_config, '<repeats>_<class tokens>' folders)")
    group.add_argument("--random_crop", action="store_true", help="Crop at random (default: the centre, as kohya).")
    group.add_argument("--color_aug", action="store_true", help="kohya's colour augmentation (hue or gamma, 1 in 3).")
    group.add_argument(
        "--face_crop_aug_range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
        help="kohya's face crop for images named <name>_<cx>_<cy>_<w>_<h> (without buckets).",
    )  # fmt: skip
    group.add_argument(
        "--resize_interpolation", default=None, choices=INTERPOLATIONS,
        help="Resampling filter (default: area when shrinking, else lanczos, as kohya).",
    )  # fmt: skip
    group.add_argument("--min_bucket_reso", type=int, default=256, help="Smallest bucket side (kohya's default).")
    group.add_argument("--max_bucket_reso", type=int, default=1024, help="Largest bucket side (kohya's default).")
    group.add_argument("--bucket_reso_steps", type=int, default=64, help="Bucket sides are multiples of this.")
    group.add_argument(
        "--bucket_no_upscale", action="store_true", help="Buckets from the image sizes, never enlarging an image."
    )


@contextlib.contextmanager
def muted(*names: str):
    """Those loggers silent for a moment."""
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger, disabled in zip(loggers, before, strict=True):
            logger.disabled = disabled


def check_kohya_data_args(args: argparse.Namespace, image_flag: str) -> None:
    """A --dataset_config is read and checked whole (every problem in one message), and kohya's forms checked
    against the caches, before any model loads."""
    from difftune.data.sources import kohya_specs

    for name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    face = args.face_crop_aug_range
    if face is not None and not 0 < face[0] <= face[1]:
        raise UserError(f"--face_crop_aug_range {face[0]} {face[1]} must satisfy 0 < LOW <= HIGH")
    with muted("difftune.data.folders", "difftune.data.config"):  # (their warnings come again when data loads)
        specs = kohya_specs(args)
    defaults = {"min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64, "bucket_no_upscale": False}
    kohya_only = [f"--{n}" for n in ("random_crop", "color_aug") if getattr(args, n)]
    kohya_only += [f"--{n}" for n, default in defaults.items() if getattr(args, n) != default]
    kohya_only += ["--face_crop_aug_range"] * (face is not None) + ["--resize_interpolation"] * bool(
        args.resize_interpolation
    )
    if not specs:
        if kohya_only:
            raise UserError(
                f"{', '.join(kohya_only)} apply to kohya's data forms (--dataset_config, '<repeats>_<class tokens>' "
                "folders); for other data use --center_crop / --random_flip (--aspect_ratio_buckets: kohya's "
                "default buckets)"
            )
        return
    subsets = [subset for spec in specs for subset in spec.subsets]
    missing = [str(s.metadata_file) for s in subsets if s.metadata_file and not s.metadata_file.is_file()]
    missing += [str(s.image_dir) for s in subsets if not s.metadata_file and not s.image_dir.is_dir()]
    if missing:
        raise UserError(f"{len(missing)} image folders or metadata files of the data set do not exist: "
                        f"{', '.join(missing)}")  # fmt: skip
    drawn = sorted({k for s in subsets for k, on in (("random_crop", s.augment.random_crop),
                                                   ("color_aug", s.augment.color)) if on})  # fmt: skip
    if getattr(args, image_flag, False) and drawn:
        raise UserError(
            f"--{image_flag} cannot hold images that change every epoch ({' and '.join(drawn)}, as kohya refuses "
            f"to cache latents with them): drop --{image_flag} or those settings"
        )


def add_cache_args(parser: argparse.ArgumentParser, image_flag: str, image_help: str) -> None:
    group = parser.add_argument_group("speed (encode once, reuse across runs)")
    group.add_argument(image_flag, action="store_true", help=image_help + " Needs --center_crop.")
    group.add_argument(
        "--cache_text_embeddings", action="store_true", help="Encode the captions once (not with --train_text_encoder)."
    )
    group.add_argument("--cache_dir", default="work_dirs/cache", help="Where caches live; shared by runs.")


def check_cache_args(args: argparse.Namespace, image_flag: str) -> None:
    from difftune.data.config import kohya_root

    kohya = args.dataset_config or kohya_root(args.train_data_dir)  # (centre-cropped unless random_crop)
    if getattr(args, image_flag) and not args.center_crop and not kohya:
        raise UserError(
            f"--{image_flag} needs --center_crop: random crops differ every epoch and cannot be cached "
            f"(add --center_crop, or drop --{image_flag})"
        )
    if args.cache_text_embeddings and args.train_text_encoder:
        raise UserError(
            "--cache_text_embeddings cannot be used with --train_text_encoder: the embeddings change as it trains"
        )
