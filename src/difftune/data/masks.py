"""Loss masks (--masked_loss): white trains, black is ignored, grey weights in between.

A training image's mask is its alpha channel (--alpha_mask, or `alpha_mask = true` in a --dataset_config
subset) or the grayscale image of the same stem in --mask_dir; an image with neither trains unmasked (a
mask of ones). The mask goes through its image's resize, crop and flip (ImageTransform), is reduced to the
latent grid by area interpolation (`on_grid`: when cached with the latents, else in the loss), and
multiplies the element loss before the per-sample mean, as kohya's apply_masked_loss does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from difftune.cli.errors import UserError
from difftune.data.folders import IMAGE_EXTENSIONS

# torch, PIL and difftune.data.images (both, and numpy) are imported where used: the flags import this module, and
# --help must not wait for them.
if TYPE_CHECKING:
    import torch
    from PIL import Image

logger = logging.getLogger(__name__)

ALPHA = "alpha"  # a row's mask source: its image's alpha channel (otherwise a mask file's path, or None)


def add_mask_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--masked_loss", action="store_true", help="Weight the loss by a mask per image (--alpha_mask, --mask_dir)."
    )
    group.add_argument(
        "--alpha_mask", action="store_true", help="--masked_loss: each image's alpha channel is its mask."
    )
    group.add_argument(
        "--mask_dir",
        default=None,
        help="--masked_loss: a folder of grayscale masks, one per training image with the same stem.",
    )


def check_mask_args(args: argparse.Namespace) -> None:
    """Refuse mask flags that cannot mean anything (before any model loads)."""
    if args.alpha_mask and args.mask_dir:
        raise UserError("--alpha_mask and --mask_dir both give the loss masks: pass one of them")
    given = "--alpha_mask" if args.alpha_mask else "--mask_dir" if args.mask_dir else None
    if given and not args.masked_loss:
        raise UserError(f"{given} gives loss masks but the loss is not masked: add --masked_loss (or drop {given})")
    if args.masked_loss and not (given or args.dataset_config):
        raise UserError(
            "--masked_loss needs masks: add --alpha_mask (the images' alpha channel) or --mask_dir DIR "
            "(a grayscale image per training image, with its stem)"
        )
    if args.mask_dir and not Path(args.mask_dir).is_dir():
        raise UserError(f"--mask_dir {args.mask_dir} does not exist: pass a folder of mask images")


def has_alpha(record: dict) -> bool:
    """Whether the image has transparency (read from its header)."""
    from PIL import Image

    from difftune.data.images import image_source

    with Image.open(image_source(record)) as image:
        return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def mask_files(folder: Path) -> dict[str, str]:
    """The mask images of `folder` by stem."""
    files: dict[str, str] = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        stem, extension = os.path.splitext(entry.name)
        if entry.is_file() and extension.lower() in IMAGE_EXTENSIONS:
            if stem in files:
                raise UserError(
                    f"--mask_dir {folder} has two masks for {stem!r} ({files[stem]}, {entry.path}): keep one"
                )
            files[stem] = entry.path
    return files


def mask_sources(
    args: argparse.Namespace, rows, image_column: str, alpha_rows: list[bool], class_rows: list[bool]
) -> list[str | None] | None:
    """Each row's mask source (ALPHA, a file, or None: trains unmasked), None without --masked_loss. The rows
    of `class_rows` (one per training row) that are True are class images (prior preservation), and the rows
    after them held out: both train, or score, unmasked. Warns with the count of training images without a mask."""
    if not getattr(args, "masked_loss", False):
        if any(alpha_rows):
            raise UserError("--dataset_config: a subset sets alpha_mask = true: add --masked_loss to train with it")
        return None
    if not args.mask_dir and not any(alpha_rows):
        raise UserError("--masked_loss needs masks: add --alpha_mask, --mask_dir DIR, or alpha_mask = true in a subset")
    from difftune.data.images import column

    records = column(rows, image_column)[: len(class_rows)]
    files = mask_files(Path(args.mask_dir)) if args.mask_dir else {}
    sources: list[str | None] = []
    for record, alpha, is_class in zip(records, alpha_rows, class_rows, strict=True):
        if is_class:
            sources.append(None)
        elif alpha:
            sources.append(ALPHA if has_alpha(record) else None)
        else:
            stem = Path(record.get("path") or "").stem
            sources.append(files.get(stem))
    instances = class_rows.count(False)
    missing = sources.count(None) - class_rows.count(True)
    if missing == instances:
        what = f"--mask_dir {args.mask_dir} has no file" if args.mask_dir else "no image has an alpha channel"
        raise UserError(f"--masked_loss: {what} for any of the {missing} training images (masks share their stem)")
    if missing:
        why = [f"no file in --mask_dir {args.mask_dir}"] if args.mask_dir else []
        if any(alpha_rows):
            why.insert(0, "no alpha channel" if all(alpha_rows) or args.mask_dir else "no alpha_mask or no alpha")
        logger.warning("--masked_loss: %d of %d training images have no mask (%s): they train unmasked", missing,
                       instances, " / ".join(why))  # fmt: skip
    return sources + [None] * (len(rows) - len(class_rows))


def open_mask(record: dict, source: str | None, size: tuple[int, int]) -> Image.Image:
    """A row's mask as a grayscale image; all white (ones) for a row without one. `size` is the image's
    (width, height): a mask file of another size is stretched to it by the transform."""
    from PIL import Image

    from difftune.data.images import image_source

    if source is None:
        return Image.new("L", size, 255)
    try:
        with Image.open(image_source(record) if source == ALPHA else source) as image:
            image.load()
            return image.convert("RGBA").getchannel("A") if source == ALPHA else image.convert("L")
    except OSError as error:
        raise UserError(f"cannot read the mask {source if source != ALPHA else record.get('path')}: {error}") from None


def fingerprint(sources: list[str | None]) -> str:
    """What a cache of masks depends on beyond the images: each mask file's path, size and modification time."""
    described = []
    for source in sources:
        if source in (None, ALPHA):
            described.append(source)
        else:
            stat = os.stat(source)
            described.append([source, stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]


def on_grid(mask: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Masks (batch, 1, H, W) reduced to the latent grid `size` by area interpolation (the mean of the pixels
    each latent covers); a mask already on that grid is returned as it is."""
    import torch.nn.functional as F

    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.float()
    return F.interpolate(mask.float(), size=tuple(size), mode="area")
