"""Image folders as kohya, OneTrainer and SimpleTuner users keep them: caption files beside the images,
and subfolders named `<repeats>_<class tokens>`.

A caption file is `<image stem><caption extension>` in the image's folder; each non-empty line is an
alternative caption (one is picked per sample and epoch). An image without one takes its folder's class
tokens. Subfolders without a number prefix are skipped with a warning, as kohya does; images directly in
the folder count once, with no class tokens.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from difftune.cli.errors import UserError
from difftune.data.captions import CaptionOptions

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# What datasets' imagefolder reads as captions: a folder with one of these keeps the diffusers layout.
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


@dataclass(frozen=True)
class Subset:
    """A folder of images trained `repeats` times per epoch; `options` None means the flags' processing."""

    image_dir: Path
    repeats: int = 1
    class_tokens: str | None = None
    caption_extension: str = ".txt"
    options: CaptionOptions | None = None
    alpha_mask: bool = False  # --masked_loss: its images' alpha channels are their masks
    is_reg: bool = False  # kohya's regularisation subset: its images are class images (prior preservation)


@dataclass
class FolderRows:
    """One entry per image: the columns of the data set built from caption files."""

    paths: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    repeats: list[int] = field(default_factory=list)
    subsets: list[int] = field(default_factory=list)


def metadata_file(folder: str | Path) -> Path | None:
    """The folder's metadata file (diffusers / datasets imagefolder layout), if it has one."""
    for name in METADATA_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def is_image(entry: os.DirEntry) -> bool:
    return entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS


def kohya_subsets(folder: Path, caption_extension: str, flag: str) -> list[Subset]:
    """The folder's own images (once each), then one subset per `<repeats>_<class tokens>` subfolder."""
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    subsets = [Subset(folder, 1, None, caption_extension)] if any(is_image(e) for e in entries) else []
    for entry in entries:
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        count, underscore, tokens = entry.name.partition("_")
        if not (underscore and count.isdigit()):
            logger.warning("skipping %s: a subfolder is named <repeats>_<class tokens>, e.g. '10_sks dog'", entry.path)
            continue
        if int(count) < 1 or not tokens.strip():
            raise UserError(
                f"{flag} subfolder {entry.name!r} needs at least 1 repeat and class tokens after the '_' "
                "(e.g. '10_sks dog'): rename it"
            )
        subsets.append(Subset(Path(entry.path), int(count), tokens.strip(), caption_extension))
    return subsets


def read_caption_file(path: str | Path) -> list[str]:
    """The non-empty lines of a caption file (an empty file is the empty caption)."""
    try:
        with open(path, encoding="utf-8-sig") as handle:  # (not Path.read_text: 20,000 of them add up)
            text = handle.read()
    except UnicodeDecodeError:
        raise UserError(f"caption file {path} is not UTF-8 text: re-save it as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()] or [""]


def read_subsets(
    subsets: list[Subset], source: str, fallback_prompt: str | None = None, prompt_flag: str = "--instance_prompt"
) -> FolderRows:
    """Every image of the subsets with its captions (`fallback_prompt`, the flag `prompt_flag`, for images with
    neither a caption file nor class tokens); a one-line error for images with no caption at all."""
    rows, missing, total = FolderRows(), [], 0
    for number, subset in enumerate(subsets):
        if not subset.image_dir.is_dir():
            raise UserError(f"{source}: image folder {subset.image_dir} does not exist")
        folder = str(subset.image_dir)
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        names = {e.name for e in entries}
        for entry in filter(is_image, entries):
            total += 1
            caption_name = os.path.splitext(entry.name)[0] + subset.caption_extension
            if caption_name in names:
                captions = read_caption_file(os.path.join(folder, caption_name))
            elif subset.class_tokens or fallback_prompt:
                captions = [subset.class_tokens or fallback_prompt]
            else:
                missing.append(entry.path)
                continue
            stat = entry.stat()
            rows.paths.append(entry.path)
            rows.sizes.append(stat.st_size)
            rows.mtimes.append(stat.st_mtime_ns)
            rows.captions.append(captions)
            rows.repeats.append(subset.repeats)
            rows.subsets.append(number)
    if missing:
        extension = subsets[0].caption_extension
        raise UserError(
            f"{len(missing)} of {total} images in {source} have no caption file ({extension}), the first {missing[0]}: "
            f"add caption files, put them in a '<repeats>_<class tokens>' subfolder, give a metadata.jsonl, or "
            f"caption them all with {prompt_flag}"
        )
    if not rows.paths:
        raise UserError(
            f"{source} holds no usable image: put images (with caption files) in it or in "
            "'<repeats>_<class tokens>' subfolders"
        )
    return rows


def first_rows(rows: FolderRows, count: int) -> FolderRows:
    """The first `count` images of `rows`."""
    return FolderRows(*(getattr(rows, name)[:count] for name in FolderRows.__dataclass_fields__))


def folder_dataset(rows: FolderRows, image_column: str, caption_column: str):
    """The rows as a datasets.Dataset of undecoded images; its fingerprint covers each image's path, size
    and modification time, the captions, repeats and subsets (so caches follow any change)."""
    import datasets

    table = {
        image_column: [{"bytes": None, "path": path} for path in rows.paths],
        caption_column: rows.captions,
        "size": rows.sizes,
        "mtime": rows.mtimes,
        "repeats": rows.repeats,
        "subset": rows.subsets,
    }
    return datasets.Dataset.from_dict(table).cast_column(image_column, datasets.Image(decode=False))


def caption_files_beside(folder: Path, caption_extension: str) -> int:
    """How many caption files a metadata folder also holds (they are ignored: the metadata wins)."""
    return sum(1 for _ in Path(folder).rglob(f"*{caption_extension}"))


def folder_rows(
    train_data_dir: str | Path, folder_flag: str, caption_extension: str, fallback_prompt: str | None
) -> FolderRows | None:
    """The images of a folder read with its caption files and kohya subfolders, or None when a metadata file
    describes it instead; a one-line error for a missing folder, an uncaptioned image or no usable image."""
    if not Path(train_data_dir).is_dir():
        raise UserError(f"{folder_flag} {train_data_dir} does not exist: pass a folder of images")
    if metadata_file(train_data_dir) is not None:
        return None
    subsets = kohya_subsets(Path(train_data_dir), caption_extension, folder_flag)
    return read_subsets(subsets, f"{folder_flag} {train_data_dir}", fallback_prompt)
