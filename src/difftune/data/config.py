"""kohya sd-scripts' data-set config (`--dataset_config`, TOML or JSON) and its folder conventions, as DatasetSpecs.

A config has three levels, `[general]`, `[[datasets]]` and `[[datasets.subsets]]`; a key's value comes from the
lowest level that sets it, then from the command line, then from kohya's default (the same fallback chain as
kohya's `BlueprintGenerator`). Keys are checked against kohya's schema (`library/config_util.py`): its types,
the levels each key may sit at, and ranges kohya enforces later or not at all. Every problem of a file is
reported at once, in one line, before any model loads. The `<repeats>_<class tokens>` folders of
`--train_data_dir` / `--reg_data_dir` become the same specs (kohya's `generate_dreambooth_subsets_config_by_subdirs`),
so both forms train through one implementation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from difftune.cli.config_file import read_table
from difftune.cli.errors import UserError
from difftune.data.captions import CaptionOptions, options_from_args
from difftune.data.folders import Augment, Subset, kohya_subsets, metadata_file

logger = logging.getLogger(__name__)

# kohya's resize_interpolation names (library/utils.py's validate_interpolation_fn), for the config checker and
# --resize_interpolation; here, not in difftune.data.images (which has their PIL filters), so the flags need no PIL.
INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")

KOHYA_CAPTION_EXTENSION = ".caption"


@dataclass(frozen=True)
class DatasetSpec:
    """One kohya data set: its subsets, (height, width) resolution, batch size, bucket rule and held-out split."""

    subsets: list[Subset]
    resolution: tuple[int, int]
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None
    fine_tuning: bool = False  # its subsets read a metadata_file (kohya's fine-tuning style)

    def summary(self) -> dict:
        """What the run trained with, for args.json and the model card (resolution as kohya writes it: [w, h])."""
        out = {"resolution": [self.resolution[1], self.resolution[0]], "batch_size": self.batch_size}
        if self.enable_bucket:
            out |= {k: getattr(self, k) for k in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps")}
            out["bucket_no_upscale"] = self.bucket_no_upscale
        if self.validation_split:
            out |= {"validation_split": self.validation_split, "validation_seed": self.validation_seed}
        out["subsets"] = [subset.summary() for subset in self.subsets]
        return out


# Value checks: each returns the value to use, or raises ValueError with what it must be.
def _bool(value):
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _int(low: int | None = None) -> Callable:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("must be an integer")
        if low is not None and value < low:
            raise ValueError(f"must be >= {low}")
        return value

    return check


def _number(low: float | None = None, high: float | None = None, high_open: bool = False) -> Callable:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError("must be a number")
        if (low is not None and value < low) or (high is not None and (value >= high if high_open else value > high)):
            raise ValueError(f"must be in [{low}, {high}{')' if high_open else ']'}")
        return float(value)

    return check


def _str(value):
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _one_of(names: tuple[str, ...]) -> Callable:
    def check(value):
        if value not in names:
            raise ValueError(f"must be one of {', '.join(names)}")
        return value

    return check


def _resolution(value):
    sides = [value, value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not (isinstance(sides, list) and len(sides) == 2 and all(_is_int(s) and s > 0 and s % 8 == 0 for s in sides)):
        raise ValueError("must be a positive multiple of 8, or [width, height] of them")
    return sides[1], sides[0]  # kohya writes [width, height]; ours is (height, width)


def _face_range(value):
    if not (isinstance(value, list) and len(value) == 2 and all(_is_number(v) for v in value)):
        raise ValueError("must be [low, high], two numbers")
    low, high = map(float, value)
    if not 0 < low <= high:
        raise ValueError("must satisfy 0 < low <= high")
    return low, high


def _caption_extension(value):
    _str(value)
    return value if not value or value.startswith(".") else "." + value  # kohya adds the dot


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _dict(value):
    if not isinstance(value, dict):
        raise ValueError("must be a table")
    return value


# kohya's schema, by where a key may sit. "Ascendable" keys may sit at a subset, a data set or [general].
SUBSET_ASCENDABLE = {
    "color_aug": _bool,
    "face_crop_aug_range": _face_range,
    "flip_aug": _bool,
    "num_repeats": _int(0),
    "random_crop": _bool,
    "shuffle_caption": _bool,
    "keep_tokens": _int(0),
    "keep_tokens_separator": _str,
    "secondary_separator": _str,
    "caption_separator": _str,
    "enable_wildcard": _bool,
    "token_warmup_min": _int(0),
    "token_warmup_step": _number(0),
    "caption_prefix": _str,
    "caption_suffix": _str,
    "custom_attributes": _dict,
    "resize_interpolation": _one_of(INTERPOLATIONS),
    "caption_dropout_every_n_epochs": _int(0),
    "caption_dropout_rate": _number(0, 1),
    "caption_tag_dropout_rate": _number(0, 1),
}
DREAMBOOTH_ASCENDABLE = {"caption_extension": _caption_extension, "class_tokens": _str, "cache_info": _bool}
DREAMBOOTH_SUBSET_ONLY = {"image_dir": _str, "is_reg": _bool, "alpha_mask": _bool}
FINE_TUNING_SUBSET_ONLY = {"metadata_file": _str, "image_dir": _str, "alpha_mask": _bool}
DATASET_ASCENDABLE = {
    "batch_size": _int(1),
    "bucket_no_upscale": _bool,
    "bucket_reso_steps": _int(1),
    "enable_bucket": _bool,
    "max_bucket_reso": _int(1),
    "min_bucket_reso": _int(1),
    "validation_seed": _int(),
    "validation_split": _number(0, 1, high_open=True),
    "resolution": _resolution,
    "network_multiplier": _number(),
    "resize_interpolation": _one_of(INTERPOLATIONS),
}
GENERAL = DATASET_ASCENDABLE | SUBSET_ASCENDABLE | DREAMBOOTH_ASCENDABLE
# Keys of other kinds of kohya training: refused with what they are for.
OTHER_TRAINING = {"conditioning_data_dir": "ControlNet training's conditioning images"}
# Accepted, and without effect here (a note in the log says so).
WITHOUT_EFFECT = {
    "cache_info": "kohya's image-info cache: our scan cache (--cache_dir) records image sizes already",
    "custom_attributes": "extra per-subset values read only by kohya's own model-specific trainers",
}
# Subset keys and the CaptionOptions field each sets.
CAPTION_KEYS = {
    "caption_prefix": "prefix",
    "caption_suffix": "suffix",
    "caption_dropout_rate": "dropout_rate",
    "caption_separator": "separator",
    "keep_tokens": "keep_tokens",
    "shuffle_caption": "shuffle",
    "caption_tag_dropout_rate": "tag_dropout_rate",
    "keep_tokens_separator": "keep_tokens_separator",
    "secondary_separator": "secondary_separator",
    "enable_wildcard": "enable_wildcard",
    "caption_dropout_every_n_epochs": "dropout_every_n_epochs",
    "token_warmup_min": "token_warmup_min",
    "token_warmup_step": "token_warmup_step",
}


def command_line_level(args) -> dict:
    """The level above [general]: the flags with kohya's meaning (kohya's argparse fallback)."""
    level = {key: getattr(options_from_args(args), name) for key, name in CAPTION_KEYS.items()}
    level |= {
        "caption_extension": _caption_extension(getattr(args, "caption_extension", None) or KOHYA_CAPTION_EXTENSION),
        "resolution": (args.resolution, args.resolution),
        "batch_size": getattr(args, "train_batch_size", 1),
        "enable_bucket": getattr(args, "aspect_ratio_buckets", False),
        "min_bucket_reso": getattr(args, "min_bucket_reso", 256),
        "max_bucket_reso": getattr(args, "max_bucket_reso", 1024),
        "bucket_reso_steps": getattr(args, "bucket_reso_steps", 64),
        "bucket_no_upscale": getattr(args, "bucket_no_upscale", False),
        "flip_aug": getattr(args, "random_flip", False),
        "random_crop": getattr(args, "random_crop", False),
        "color_aug": getattr(args, "color_aug", False),
        "face_crop_aug_range": getattr(args, "face_crop_aug_range", None),
        "resize_interpolation": getattr(args, "resize_interpolation", None),
        "alpha_mask": getattr(args, "alpha_mask", False),
        "validation_split": getattr(args, "validation_split", 0.0),
        "validation_seed": None,
        "num_repeats": 1,
    }
    return level


class Problems:
    """Every problem of a config file, reported together in one line."""

    def __init__(self, path: Path) -> None:
        self.path, self.items, self.unsupported = path, [], []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        items = list(self.items)
        if self.unsupported:
            items.append(f"unsupported keys (not in kohya's data-set schema): {', '.join(self.unsupported)}")
        if items:
            count = f"{len(items)} problems: " if len(items) > 1 else ""
            raise UserError(f"--dataset_config {self.path}: {count}{'; '.join(items)}")


def check_table(table, schema: dict, where: str, problems: Problems, elsewhere: dict[str, str]) -> dict:
    """The table's values checked against `schema`; keys found in `elsewhere` (key -> where it belongs) are
    misplaced, keys of other trainings refused by name, the rest unsupported."""
    if not isinstance(table, dict):
        problems.add(where, "must be a table")
        return {}
    checked = {}
    for key, value in table.items():
        if value is None:  # (JSON null: kohya's fallback treats it as absent)
            continue
        if key in schema:
            try:
                checked[key] = schema[key](value)
            except ValueError as error:
                problems.add(where, f"{key} = {value!r} {error}")
        elif key in OTHER_TRAINING:
            problems.add(where, f"{key} is for {OTHER_TRAINING[key]}, which difftune does not train: remove it")
        elif key in elsewhere:
            problems.add(where, f"{key} belongs in {elsewhere[key]}, not here")
        else:
            problems.unsupported.append(f"{where} {key}")
    return checked


def read_config_file(path: Path) -> dict:
    """The file's tables: JSON for a .json name (as kohya decides), YAML for .yaml, else TOML."""
    return read_table(path, "--dataset_config", default_kind="TOML")


def load_dataset_config(path: str | Path, args) -> list[DatasetSpec]:
    """The data sets of a kohya --dataset_config file (every problem in one UserError)."""
    path = Path(path)
    config = read_config_file(path)
    problems = Problems(path)
    for key in config:
        if key not in ("general", "datasets"):
            problems.unsupported.append(f"top-level {key}")
    subset_only = {k: "[[datasets.subsets]]" for k in DREAMBOOTH_SUBSET_ONLY | FINE_TUNING_SUBSET_ONLY}
    general = check_table(config.get("general", {}), GENERAL, "[general]", problems, subset_only)
    datasets = config.get("datasets", [])
    if not isinstance(datasets, list):
        problems.add("datasets", "must be an array of tables ([[datasets]])")
        datasets = []
    base = command_line_level(args) | general
    specs = []
    for number, dataset in enumerate(datasets, start=1):
        where = f"[[datasets]] #{number}"
        subsets = dataset.get("subsets", []) if isinstance(dataset, dict) else []
        subsets = subsets if isinstance(subsets, list) else []
        fine_tuning = [isinstance(s, dict) and "metadata_file" in s for s in subsets]
        if any(fine_tuning) and not all(fine_tuning):
            problems.add(
                where, "mixes subsets with and without metadata_file (as kohya, split them into two data sets)"
            )
        is_ft = bool(subsets) and all(fine_tuning)
        schema = DATASET_ASCENDABLE | SUBSET_ASCENDABLE | ({} if is_ft else DREAMBOOTH_ASCENDABLE)
        table = check_table(
            {k: v for k, v in dataset.items() if k != "subsets"} if isinstance(dataset, dict) else dataset,
            schema, where, problems, subset_only | _dreambooth_only(is_ft),
        )  # fmt: skip
        level = base | table
        subset_schema = SUBSET_ASCENDABLE | (FINE_TUNING_SUBSET_ONLY if is_ft else DREAMBOOTH_ASCENDABLE)
        subset_schema = subset_schema | ({} if is_ft else DREAMBOOTH_SUBSET_ONLY)
        built = []
        for index, subset in enumerate(subsets, start=1):
            at = f"{where} [[datasets.subsets]] #{index}"
            settings = level | check_table(
                subset, subset_schema, at, problems, _dataset_only() | _dreambooth_only(is_ft)
            )
            if not is_ft and "image_dir" not in settings:
                problems.add(at, "has no image_dir (the folder of its images)")
                continue
            built.append(subset_from(settings, path))
        if not subsets:
            problems.add(where, "has no [[datasets.subsets]]")
        specs.append(spec_from(built, level, is_ft))
    if not datasets:
        problems.add("file", "has no [[datasets]]")
    problems.raise_if_any()
    for spec in specs:
        check_spec(spec, f"--dataset_config {path}")
    note_without_effect(config, path)
    return specs


def _dreambooth_only(is_ft: bool) -> dict[str, str]:
    keys = {**DREAMBOOTH_ASCENDABLE, "is_reg": None}
    return {k: "a data set without metadata_file (DreamBooth style)" for k in keys} if is_ft else {}


def _dataset_only() -> dict[str, str]:
    return {k: "[[datasets]] or [general]" for k in DATASET_ASCENDABLE if k not in SUBSET_ASCENDABLE}


def subset_from(settings: dict, path: Path) -> Subset:
    """A subset from its merged settings (subset > data set > [general] > command line)."""
    options = CaptionOptions(**{name: settings[key] for key, name in CAPTION_KEYS.items() if key in settings})
    augment = Augment(
        flip=settings.get("flip_aug", False),
        color=settings.get("color_aug", False),
        random_crop=settings.get("random_crop", False),
        face_crop_range=settings.get("face_crop_aug_range"),
        interpolation=settings.get("resize_interpolation"),
    )
    image_dir = settings.get("image_dir")
    metadata = settings.get("metadata_file")
    return Subset(
        Path(image_dir).expanduser() if image_dir else None,
        settings.get("num_repeats", 1),
        settings.get("class_tokens"),
        settings.get("caption_extension", KOHYA_CAPTION_EXTENSION),
        options,
        alpha_mask=settings.get("alpha_mask", False),
        is_reg=settings.get("is_reg", False),
        metadata_file=Path(metadata).expanduser() if metadata else None,
        augment=augment,
    )


def spec_from(subsets: list[Subset], level: dict, fine_tuning: bool) -> DatasetSpec:
    multiplier = level.get("network_multiplier", 1.0)
    if multiplier != 1.0:
        raise UserError(
            f"network_multiplier = {multiplier}: kohya scales a data set's network output with it; difftune trains "
            "every data set at 1.0 (remove the key)"
        )
    return DatasetSpec(
        subsets,
        tuple(level["resolution"]),
        level["batch_size"],
        level["enable_bucket"],
        level["min_bucket_reso"],
        level["max_bucket_reso"],
        level["bucket_reso_steps"],
        level["bucket_no_upscale"],
        level.get("validation_split", 0.0),
        level.get("validation_seed"),
        fine_tuning,
    )


def check_spec(spec: DatasetSpec, where: str, prefix: str = "") -> None:
    """What kohya asserts when it builds the data set: the bucket range covers the resolution (`where` names the
    source in the message; `prefix` is "--" when the range comes from flags)."""
    if not spec.enable_bucket or spec.bucket_no_upscale:
        return
    low = spec.min_bucket_reso - spec.min_bucket_reso % spec.bucket_reso_steps
    high = spec.max_bucket_reso + (-spec.max_bucket_reso) % spec.bucket_reso_steps
    if min(spec.resolution) < low or max(spec.resolution) > high:
        raise UserError(
            f"{where}: resolution {spec.resolution[1]}x{spec.resolution[0]} is outside {prefix}min_bucket_reso "
            f"{spec.min_bucket_reso} .. {prefix}max_bucket_reso {spec.max_bucket_reso}: widen the bucket range"
        )


def note_without_effect(config: dict, path: Path) -> None:
    found = set()

    def walk(table) -> None:
        if isinstance(table, dict):
            found.update(k for k in table if k in WITHOUT_EFFECT)
            for value in table.values():
                walk(value)
        elif isinstance(table, list):
            for value in table:
                walk(value)

    walk(config)
    for key in sorted(found):
        logger.info("--dataset_config %s: %s has no effect here (%s)", path, key, WITHOUT_EFFECT[key])


def kohya_root(folder: str | Path | None) -> bool:
    """Whether `folder` is in kohya's DreamBooth layout: at least one `<repeats>_<class tokens>` subfolder (and
    no metadata file, which would make it a datasets image folder)."""
    if folder is None or not Path(folder).is_dir() or metadata_file(folder) is not None:
        return False
    return any(entry.is_dir() and entry.name.partition("_")[0].isdigit() for entry in Path(folder).iterdir())


def specs_from_folders(args) -> list[DatasetSpec] | None:
    """kohya's folder form as one data set: `--train_data_dir`'s `<repeats>_<class tokens>` subfolders (images
    directly in it are ignored, as kohya ignores them) and `--reg_data_dir`'s as regularisation subsets; None when
    --train_data_dir is not in that layout (a plain folder of captioned images, or a datasets image folder)."""
    train_dir, reg_dir = getattr(args, "train_data_dir", None), getattr(args, "reg_data_dir", None)
    if not kohya_root(train_dir):
        if reg_dir is not None:
            raise UserError(
                f"--reg_data_dir is kohya's form and needs --train_data_dir in it too: put the training images of "
                f"{train_dir} in '<repeats>_<class tokens>' subfolders (e.g. '10_sks dog')"
            )
        return None
    level = command_line_level(args)
    options = CaptionOptions(**{name: level[key] for key, name in CAPTION_KEYS.items()})
    augment = Augment(level["flip_aug"], level["color_aug"], level["random_crop"], level["face_crop_aug_range"],
                      level["resize_interpolation"])  # fmt: skip
    subsets = []
    for folder, is_reg, flag in ((train_dir, False, "--train_data_dir"), (reg_dir, True, "--reg_data_dir")):
        if folder is None:
            continue
        found = kohya_subsets(Path(folder), level["caption_extension"], flag, top_level=False)
        subsets += [
            Subset(s.image_dir, s.repeats, s.class_tokens, s.caption_extension, options,
                   alpha_mask=level["alpha_mask"], is_reg=is_reg, augment=augment)
            for s in found
        ]  # fmt: skip
    spec = spec_from(subsets, level, fine_tuning=False)
    check_spec(spec, "--train_data_dir", prefix="--")
    return [spec]
