"""Image folders as kohya, OneTrainer and SimpleTuner users keep them: caption files beside the images,
and subfolders named `<repeats>_<class tokens>`.

A caption file is `<image stem><caption extension>` in the image's folder, read as kohya reads it: its first
line (every non-empty line is an alternative with --enable_wildcard). A plain folder (no `<repeats>_` subfolders)
needs a caption for every image (a caption file or --instance_prompt); kohya's layout is read by
difftune.data.subsets with kohya's rules (class tokens or the empty caption, with a warning).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from difftune.cli.errors import UserError
from difftune.data.captions import CaptionOptions

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# What datasets' imagefolder reads as captions: a folder with one of these keeps the diffusers layout.
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")


@dataclass(frozen=True)
class Augment:
    """A kohya subset's image augmentations (keys flip_aug, color_aug, random_crop, face_crop_aug_range,
    resize_interpolation)."""

    flip: bool = False
    color: bool = False
    random_crop: bool = False
    face_crop_range: tuple[float, float] | None = None
    interpolation: str | None = None


@dataclass(frozen=True)
class Subset:
    """A folder of images trained `repeats` times per epoch; `options` None means the flags' processing.
    kohya subsets (from a --dataset_config or `<repeats>_<class tokens>` folders) carry their `augment`;
    a fine-tuning subset reads its captions from `metadata_file` instead of caption files."""

    image_dir: Path | None
    repeats: int = 1
    class_tokens: str | None = None
    caption_extension: str = ".txt"
    options: CaptionOptions | None = None
    alpha_mask: bool = False  # --masked_loss: its images' alpha channels are their masks
    is_reg: bool = False  # kohya's regularisation subset
    metadata_file: Path | None = None
    augment: Augment | None = None

    @property
    def name(self) -> str:
        return str(self.metadata_file or self.image_dir)

    def summary(self) -> dict:
        """The subset's settings as args.json and the model card record them."""
        out = {"image_dir": str(self.image_dir) if self.image_dir else None, "num_repeats": self.repeats}
        if self.metadata_file:
            out["metadata_file"] = str(self.metadata_file)
        else:
            out |= {"class_tokens": self.class_tokens, "caption_extension": self.caption_extension}
        out |= {"is_reg": self.is_reg, "alpha_mask": self.alpha_mask}
        if self.options is not None:
            out["captions"] = {k: v for k, v in asdict(self.options).items() if v != CAPTION_DEFAULTS[k]}
        if self.augment is not None:
            out["augment"] = {k: v for k, v in asdict(self.augment).items() if v}
        return out


CAPTION_DEFAULTS = asdict(CaptionOptions())


@dataclass
class FolderRows:
    """One entry per image: the columns of the data set built from caption files."""

    paths: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    repeats: list[int] = field(default_factory=list)
    subsets: list[int] = field(default_factory=list)
    held_out: list[bool] = field(default_factory=list)  # kohya's validation_split (empty: none held out)


SPLITS = ("train", "validation", "test")  # a datasets image folder's split subfolders


def is_image_folder(folder: Path) -> bool:
    """A folder with a metadata file or images directly in it."""
    if not folder.is_dir():
        return False
    return metadata_file(folder) is not None or any(is_image(entry) for entry in os.scandir(folder))


def metadata_file(folder: str | Path) -> Path | None:
    """The folder's metadata file (diffusers / datasets imagefolder layout), if it has one."""
    for name in METADATA_FILES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def is_image(entry: os.DirEntry) -> bool:
    """An image file (a symlink to one included; not a dangling one or a loop)."""
    if os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
        return False
    try:
        return os.path.isfile(entry.path)  # (False for a dangling symlink or a loop, where entry.is_file raises)
    except OSError:
        return False


def broken_link(entry: os.DirEntry) -> str | None:
    """Why an image's symlink leads nowhere (None: it is not a broken image link)."""
    if not entry.is_symlink() or os.path.splitext(entry.name)[1].lower() not in IMAGE_EXTENSIONS:
        return None
    try:
        os.stat(entry.path)
    except OSError as error:
        return f"a symlink that leads nowhere: {error.strerror}"
    return None


def check_metadata_paths(metadata: Path, source: str) -> None:
    """metadata.jsonl names files inside its folder: an absolute path or a `..` is refused with one line (datasets
    would stop with its generic error)."""
    if metadata.suffix != ".jsonl":
        return
    with open(metadata, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                name = json.loads(line).get("file_name") if line.strip() else None
            except (ValueError, AttributeError):
                raise UserError(f"{source}: line {number} of {metadata} is not a JSON object: fix it") from None
            if isinstance(name, str) and (os.path.isabs(name) or ".." in Path(name).parts):
                raise UserError(
                    f"{source}: line {number} of {metadata} names {name!r}, outside the folder: file_name must be "
                    "a path relative to the folder, without '..' (move the image into it)"
                )


def kohya_subsets(folder: Path, caption_extension: str, flag: str, top_level: bool = True) -> list[Subset]:
    """One subset per `<repeats>_<class tokens>` subfolder, split as kohya splits the name (on "_": "10" and
    "10_" have empty class tokens; a count below 1 skips the folder with a warning); a subfolder without a
    count is skipped with a warning. With `top_level`, the folder's own images come first, once each."""
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    subsets = [Subset(folder, 1, None, caption_extension)] if top_level and any(is_image(e) for e in entries) else []
    for entry in entries:
        if not os.path.isdir(entry.path) or entry.name.startswith("."):  # (isdir: False for a symlink loop)
            continue
        named_like_a_file = {caption_extension.lower(), ".txt", ".caption", *IMAGE_EXTENSIONS}
        if os.path.splitext(entry.name)[1].lower() in named_like_a_file:
            raise UserError(
                f"{entry.path} is a folder, named like a caption or image file: a caption or image must be a file, "
                "and a subfolder is named <repeats>_<class tokens> (e.g. '10_sks dog'): rename or remove it"
            )
        count, _, tokens = entry.name.partition("_")
        try:
            repeats = int(count)
        except ValueError:
            logger.warning("skipping %s: a subfolder is named <repeats>_<class tokens>, e.g. '10_sks dog'", entry.path)
            continue
        if repeats < 1:
            logger.warning("skipping %s: %d repeats (kohya skips folders below 1)", entry.path, repeats)
            continue
        subsets.append(Subset(Path(entry.path), repeats, tokens, caption_extension))
    if not top_level and any(is_image(e) for e in entries):
        logger.warning(
            "%s %s: its own images are not trained (as in kohya): only its '<repeats>_<class tokens>' subfolders",
            flag, folder,
        )  # fmt: skip
    return subsets


def caption_file_for(folder_names: set[str], image_name: str, extension: str) -> str | None:
    """The name of the caption file of `image_name` among `folder_names` (None: it has none): kohya's
    `<stem><extension>`, else, for a face crop `<name>_<4 numbers>`, `<name><extension>`."""
    stem = os.path.splitext(image_name)[0]
    parts = stem.split("_")
    candidates = [stem + extension]
    if len(parts) >= 5:  # kohya's face-crop images share their source image's caption
        candidates.append("_".join(parts[:-4]) + extension)
    return next((name for name in candidates if name in folder_names), None)


def read_caption_file(path: str | Path, all_lines: bool = False) -> list[str]:
    """A caption file as kohya reads it: its first line stripped, or with `all_lines` (--enable_wildcard)
    its non-empty stripped lines, each an alternative ([""] when all are blank). An empty file is refused."""
    try:
        # utf-8-sig: a BOM is not part of the caption (kohya keeps it); not Path.read_text: 20,000 add up.
        with open(path, encoding="utf-8-sig") as handle:
            lines = handle.readlines()  # kohya's line ends: \n, \r\n and \r
    except UnicodeDecodeError:
        raise UserError(f"caption file {path} is not UTF-8 text: re-save it as UTF-8") from None
    except IsADirectoryError:
        raise UserError(f"caption file {path} is a folder, not a file: rename or remove it") from None
    if not lines:
        raise UserError(f"caption file {path} is empty: write a caption in it or delete it")
    if not all_lines:
        return [lines[0].strip()]
    return [line.strip() for line in lines if line.strip()] or [""]


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
        for entry in entries:
            if (why := broken_link(entry)) is not None:
                logger.warning("skipping image %s: %s", entry.path, why)
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
    if rows.held_out:
        table["held_out"] = rows.held_out
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
    splits = [name for name in SPLITS if is_image_folder(Path(train_data_dir) / name)]
    if splits and not any(is_image(entry) for entry in os.scandir(train_data_dir)):
        raise UserError(
            f"{folder_flag} {train_data_dir} looks like a Hugging Face image folder with splits "
            f"({', '.join(splits)}/): pass it as --dataset_name {train_data_dir} (its train split trains)"
        )
    subsets = kohya_subsets(Path(train_data_dir), caption_extension, folder_flag)
    return read_subsets(subsets, f"{folder_flag} {train_data_dir}", fallback_prompt)
