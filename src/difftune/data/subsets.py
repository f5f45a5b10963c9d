"""The images of kohya data sets, read as kohya sd-scripts reads them (`DreamBoothDataset`, `FineTuningDataset`).

- A subset's images are its folder's image files; each caption comes from its caption file (the first line, every
  line with enable_wildcard), else from the class tokens, else the empty caption, with a warning either way.
- A fine-tuning subset reads captions and tags from its `metadata_file` (kohya's JSON, or JSONL).
- Within a data set, a subset naming a folder (or metadata file) already read is skipped, as are subsets with
  fewer than 1 repeat or no image: each with a warning.
- `validation_split` holds out part of each training subset (kohya's `split_train_val`: a seeded shuffle).
- Regularisation subsets (`is_reg`) are repeated until they match the data set's training samples, image by
  image in turn (`regularisation_repeats`): kohya's count.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from pathlib import Path

from difftune.cli.errors import UserError
from difftune.data.config import DatasetSpec
from difftune.data.folders import (
    IMAGE_EXTENSIONS,
    FolderRows,
    Subset,
    caption_file_for,
    is_image,
    read_caption_file,
)

logger = logging.getLogger(__name__)


def caption_hint(folder: str, names: set[str], extension: str) -> str:
    """When the captions seem to use another extension: the flag or key that reads them."""
    for other in (".txt", ".caption"):
        if other != extension and any(name.endswith(other) for name in names):
            return f" (the folder has {other} files: set caption_extension = '{other}' or --caption_extension {other})"
    return ""


def folder_images(subset: Subset, fallback_prompt: str | None) -> list[tuple[os.DirEntry, list[str]]]:
    """A DreamBooth-style subset's images with their captions, as kohya reads them."""
    folder = str(subset.image_dir)
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    names = {entry.name for entry in entries}
    all_lines = subset.options is not None and subset.options.enable_wildcard
    found, missing = [], []
    for entry in filter(is_image, entries):
        caption_name = caption_file_for(names, entry.name, subset.caption_extension)
        if caption_name is not None:
            captions = read_caption_file(os.path.join(folder, caption_name), all_lines)
        else:
            missing.append(entry.path)
            fallback = subset.class_tokens if subset.class_tokens is not None else fallback_prompt
            captions = [fallback or ""]
        found.append((entry, captions))
    if missing:
        trained = (
            f"its class tokens {subset.class_tokens!r}" if subset.class_tokens is not None
            else f"--instance_prompt {fallback_prompt!r}" if fallback_prompt else "the empty caption"
        )  # fmt: skip
        logger.warning(
            "%d of %d images in %s have no caption file (%s): they train on %s, as in kohya; the first is %s%s",
            len(missing), len(found), folder, subset.caption_extension, trained, missing[0],
            caption_hint(folder, names, subset.caption_extension),
        )  # fmt: skip
    return found


def metadata_images(subset: Subset) -> list[tuple[str, list[str]]]:
    """A fine-tuning subset's (image path, captions): kohya's metadata JSON ({image key: {"caption", "tags"}})
    or JSONL (one {"image_path", "caption", "tags"} per line), the tags joined to the caption as kohya joins
    them (caption + separator + tags; each line with enable_wildcard)."""
    path = subset.metadata_file
    try:
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix.lower() == ".jsonl":
            entries = {}
            for line in filter(str.strip, text.splitlines()):
                item = json.loads(line)
                entries[item["image_path"]] = item
        else:
            entries = json.loads(text)
    except FileNotFoundError:
        raise UserError(f"metadata_file {path} does not exist") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise UserError(
            f"metadata_file {path} is not kohya's metadata (JSON of image -> caption, tags): {error}"
        ) from None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise UserError(f'metadata_file {path} must map each image to {{"caption": ..., "tags": ...}}')
    options = subset.options
    separator = options.separator if options else ","
    wildcard = options is not None and options.enable_wildcard
    images, missing = [], []
    for key, item in entries.items():
        image = locate(key, subset.image_dir)
        if image is None:
            missing.append(key)
            continue
        caption, tags = item.get("caption") or "", item.get("tags")
        if wildcard:
            tags = tags.replace("\n", separator) if tags is not None else None
            lines = [line for line in caption.split("\n") if line.strip()]
            captions = [f"{line}{separator}{tags}" if tags is not None else line for line in lines]
        else:
            if tags:
                caption = f"{caption}{separator}{tags}" if caption else tags
            captions = [caption.split("\n")[0].strip()]
        images.append((image, [c.strip() for c in captions] or [""]))
    if missing:
        raise UserError(
            f"metadata_file {path}: {len(missing)} of {len(entries)} images are not found (the first {missing[0]!r}); "
            "relative names are looked up in the subset's image_dir"
        )
    return images


def locate(key: str, image_dir: Path | None) -> str | None:
    """A metadata key's image: the path itself (relative to image_dir), or, as older kohya metadata names images
    by stem, the stem with an image extension."""
    base = Path(key) if Path(key).is_absolute() or image_dir is None else image_dir / key
    if base.is_file():
        return str(base)
    for extension in sorted(IMAGE_EXTENSIONS):
        for candidate in (base.with_name(base.name + extension), base.with_name(base.name + extension.upper())):
            if candidate.is_file():
                return str(candidate)
    return None


def split_train_validation(paths: list, fraction: float, seed: int) -> set:
    """The held-out part of one subset: kohya's split_train_val (Python's random.shuffle of the sorted paths with
    the validation seed; training keeps the first ceil(n * (1 - fraction))). The rest is held out: kohya takes
    the last round(n * fraction), which can overlap the training part by one image (its bug, not copied)."""
    order = list(paths)
    random.Random(seed).shuffle(order)
    keep = math.ceil(len(order) * (1 - fraction))
    return set(order[keep:])


def read_spec_rows(specs: list[DatasetSpec], source: str, fallback_prompt: str | None, seed: int) -> FolderRows:
    """Every image of the data sets' subsets. `rows.subsets` numbers subsets across the data sets in order;
    `rows.held_out` marks the validation_split images (trained on never, evaluated once)."""
    rows, number = FolderRows(), -1
    for spec in specs:
        seen: set[str] = set()
        for subset in spec.subsets:
            number += 1
            if subset.repeats < 1:
                logger.warning("%s: skipping subset %s: num_repeats %d is below 1 (as kohya)", source, subset.name,
                               subset.repeats)  # fmt: skip
                continue
            if subset.name in seen:
                logger.warning("%s: skipping subset %s: the data set reads it already (kohya uses the first)",
                               source, subset.name)  # fmt: skip
                continue
            seen.add(subset.name)
            if subset.metadata_file is None and not (subset.image_dir and subset.image_dir.is_dir()):
                raise UserError(f"{source}: image folder {subset.image_dir} does not exist")
            if subset.metadata_file is None:
                images = [(entry.path, captions) for entry, captions in folder_images(subset, fallback_prompt)]
            else:
                images = metadata_images(subset)
            if not images:
                logger.warning("%s: skipping subset %s: no images found (as kohya)", source, subset.name)
                continue
            held = set()
            if spec.validation_split > 0 and not subset.is_reg:
                validation_seed = spec.validation_seed if spec.validation_seed is not None else seed
                held = split_train_validation(sorted(p for p, _ in images), spec.validation_split, validation_seed)
            for path, captions in images:
                stat = os.stat(path)
                rows.paths.append(path)
                rows.sizes.append(stat.st_size)
                rows.mtimes.append(stat.st_mtime_ns)
                rows.captions.append(captions)
                rows.repeats.append(subset.repeats)
                rows.subsets.append(number)
                rows.held_out.append(path in held)
    if not rows.paths:
        raise UserError(f"{source} holds no usable image: check each subset's image_dir and num_repeats")
    return rows


def regularisation_repeats(train_samples: int, reg_repeats: list[int]) -> list[int]:
    """Each regularisation image's repeats, as kohya counts them: in turn, each image is added with its
    subset's repeats until the training samples are matched; later rounds add 1 repeat at a time. An image
    never reached gets 0 (when there are more regularisation images than training samples)."""
    repeats = [0] * len(reg_repeats)
    total, first_round = 0, True
    while total < train_samples and reg_repeats:
        for index, count in enumerate(reg_repeats):
            added = count if first_round else 1
            repeats[index] += added
            total += added
            if total >= train_samples:
                break
        first_round = False
    return repeats
