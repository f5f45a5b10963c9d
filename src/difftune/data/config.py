"""--dataset_config FILE: kohya's TOML data-set layout ([general], [[datasets]], [[datasets.subsets]]).

Lower levels override higher ones; the command-line caption flags are the level above [general]. Keys we
do not support are refused (one line naming them), so a kohya file either runs as kohya would run it or
not at all. kohya's defaults hold: `num_repeats = 1` means no repetition, `caption_extension` is `.caption`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import tomllib

from difftune.cli.errors import UserError
from difftune.data.captions import CaptionOptions
from difftune.data.folders import Subset

# Subset keys and the CaptionOptions field each sets (None: a Subset field).
CAPTION_KEYS = {
    "caption_prefix": "prefix",
    "caption_suffix": "suffix",
    "caption_dropout_rate": "dropout_rate",
    "caption_separator": "separator",
    "keep_tokens": "keep_tokens",
    "shuffle_caption": "shuffle",
    "caption_tag_dropout_rate": "tag_dropout_rate",
}
SUBSET_KEYS = {"image_dir", "num_repeats", "class_tokens", "caption_extension", "alpha_mask", "is_reg", *CAPTION_KEYS}
DATASET_KEYS = {"resolution", "enable_bucket", "batch_size"}
KOHYA_CAPTION_EXTENSION = ".caption"


@dataclass(frozen=True)
class DatasetSpec:
    """One [[datasets]] entry: its subsets, its (height, width) resolution, and whether it buckets."""

    subsets: list[Subset]
    resolution: tuple[int, int]
    enable_bucket: bool


def check_keys(table: dict, allowed: set[str], where: str, path: Path) -> None:
    for key in table:
        if key not in allowed:
            raise UserError(
                f"--dataset_config {path}: {where} key {key!r} is not supported; supported keys: "
                f"{', '.join(sorted(allowed))}"
            )


def resolution_of(value, path: Path) -> tuple[int, int]:
    """kohya's resolution: one side, or [width, height]; as (height, width), multiples of 8."""
    sides = [value, value] if isinstance(value, int) else value
    if not (
        isinstance(sides, list) and len(sides) == 2 and all(isinstance(s, int) and s > 0 and s % 8 == 0 for s in sides)
    ):
        raise UserError(f"--dataset_config {path}: resolution {value!r} must be a multiple of 8 or [width, height]")
    return sides[1], sides[0]


def subset_of(settings: dict, base: CaptionOptions, path: Path) -> Subset:
    if "image_dir" not in settings:
        raise UserError(f"--dataset_config {path}: a [[datasets.subsets]] entry has no image_dir")
    options = dataclasses.replace(base, **{CAPTION_KEYS[k]: v for k, v in settings.items() if k in CAPTION_KEYS})
    repeats = settings.get("num_repeats", 1)
    if not isinstance(repeats, int) or repeats < 1:
        raise UserError(f"--dataset_config {path}: num_repeats must be an integer >= 1 (1: no repetition)")
    for key in ("alpha_mask", "is_reg"):
        if not isinstance(settings.get(key, False), bool):
            raise UserError(f"--dataset_config {path}: {key} must be true or false")
    image_dir = Path(settings["image_dir"]).expanduser()
    return Subset(
        image_dir, repeats, settings.get("class_tokens"), settings["caption_extension"], options,
        alpha_mask=settings.get("alpha_mask", False), is_reg=settings.get("is_reg", False),
    )  # fmt: skip


def load_dataset_config(path: str | Path, args) -> list[DatasetSpec]:
    """The data sets of a kohya --dataset_config file; sets args.train_batch_size from its batch_size."""
    path = Path(path)
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"--dataset_config {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"--dataset_config {path} is not valid TOML: {error}") from None
    check_keys(config, {"general", "datasets"}, "top-level", path)
    general = config.get("general", {})
    check_keys(general, SUBSET_KEYS - {"image_dir"} | DATASET_KEYS, "[general]", path)
    base = {"caption_extension": args.caption_extension or KOHYA_CAPTION_EXTENSION, "resolution": args.resolution}
    base |= {
        "enable_bucket": getattr(args, "aspect_ratio_buckets", False),
        "alpha_mask": getattr(args, "alpha_mask", False),
    }
    flags = {key: getattr(args, key) for key in CAPTION_KEYS}  # the command line is the level above [general]
    specs, batch_sizes = [], set()
    for dataset in config.get("datasets", []):
        check_keys(dataset, SUBSET_KEYS - {"image_dir"} | DATASET_KEYS | {"subsets"}, "[[datasets]]", path)
        level = {**base, **flags, **general, **{k: v for k, v in dataset.items() if k != "subsets"}}
        batch_sizes.add(level.get("batch_size", args.train_batch_size))
        subsets = []
        for subset in dataset.get("subsets", []):
            check_keys(subset, SUBSET_KEYS, "[[datasets.subsets]]", path)
            settings = {**level, **subset}
            subsets.append(subset_of(settings, CaptionOptions(), path))
        if not subsets:
            raise UserError(f"--dataset_config {path}: a [[datasets]] entry has no [[datasets.subsets]]")
        specs.append(DatasetSpec(subsets, resolution_of(level["resolution"], path), bool(level["enable_bucket"])))
    if not specs:
        raise UserError(f"--dataset_config {path} has no [[datasets]]")
    if not all(isinstance(size, int) and size > 0 for size in batch_sizes):
        raise UserError(f"--dataset_config {path}: batch_size must be a positive integer")
    if len(batch_sizes) > 1:
        raise UserError(
            f"--dataset_config {path}: batch_size differs between data sets ({sorted(batch_sizes)}): use one"
        )
    args.train_batch_size = batch_sizes.pop()
    return specs
