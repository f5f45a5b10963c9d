"""Small fast tests written for the mutants `make mutation-auto` found alive in data/config.py (docs/mutation.md):
each asserts what a user sees (a data set's settings, kohya's defaults, a refusal line, a log note)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest

from difftune.cli.errors import UserError
from difftune.data import config
from difftune.data.captions import CaptionOptions
from difftune.data.config import DatasetSpec
from difftune.data.folders import Augment, Subset

# The flags every training script has (the others are looked up with kohya's default when a command lacks them).
CAPTION_FLAGS = {
    "caption_prefix": "",
    "caption_suffix": "",
    "caption_dropout_rate": 0.0,
    "caption_separator": ",",
    "keep_tokens": 0,
    "shuffle_caption": False,
    "caption_tag_dropout_rate": 0.0,
}


def flags(**overrides) -> argparse.Namespace:
    return argparse.Namespace(**(CAPTION_FLAGS | {"resolution": 64} | overrides))


def load(tmp_path: Path, text: str | dict, args=None) -> list[DatasetSpec]:
    """The specs of a config text (TOML), or of a dict written as JSON (which can hold null)."""
    path = tmp_path / ("data.json" if isinstance(text, dict) else "data.toml")
    path.write_text(json.dumps(text) if isinstance(text, dict) else text)
    return config.load_dataset_config(path, args or flags())


def refusal(tmp_path: Path, text: str | dict, args=None) -> str:
    """The one-line refusal of a config, without its `--dataset_config <path>: ` head."""
    with pytest.raises(UserError) as caught:
        load(tmp_path, text, args)
    path = tmp_path / ("data.json" if isinstance(text, dict) else "data.toml")
    message = str(caught.value)
    head = f"--dataset_config {path}: "
    assert message.startswith(head), message
    return message[len(head) :]


# --- the command line, the level above [general]: kohya's defaults for flags a command lacks ---

KOHYA_DEFAULTS = CAPTION_FLAGS | {
    "keep_tokens_separator": "",
    "secondary_separator": "",
    "enable_wildcard": False,
    "caption_dropout_every_n_epochs": 0,
    "token_warmup_min": 1,
    "token_warmup_step": 0,
    "caption_extension": ".caption",
    "resolution": (64, 64),
    "batch_size": 1,
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
    "flip_aug": False,
    "random_crop": False,
    "color_aug": False,
    "face_crop_aug_range": None,
    "resize_interpolation": None,
    "alpha_mask": False,
    "validation_split": 0.0,
    "validation_seed": None,
    "num_repeats": 1,
}


def test_a_command_without_the_flags_gets_kohyas_defaults():
    level = config.command_line_level(flags())
    assert level == KOHYA_DEFAULTS
    assert [type(level[k]) for k in ("enable_bucket", "flip_aug", "alpha_mask")] == [bool, bool, bool]


ALL_FLAGS = {
    "caption_extension": "txt",
    "resolution": 512,
    "train_batch_size": 4,
    "aspect_ratio_buckets": True,
    "min_bucket_reso": 320,
    "max_bucket_reso": 2048,
    "bucket_reso_steps": 32,
    "bucket_no_upscale": True,
    "random_flip": True,
    "random_crop": True,
    "color_aug": True,
    "face_crop_aug_range": (1.5, 2.5),
    "resize_interpolation": "area",
    "alpha_mask": True,
    "validation_split": 0.25,
    "keep_tokens_separator": "|||",
    "secondary_separator": ";;;",
    "enable_wildcard": True,
    "caption_dropout_every_n_epochs": 3,
    "token_warmup_min": 2,
    "token_warmup_step": 0.5,
}


def test_every_flag_reaches_the_command_line_level():
    args = flags(caption_prefix="pre", caption_suffix="suf", caption_dropout_rate=0.1, caption_separator=";",
                 keep_tokens=2, shuffle_caption=True, caption_tag_dropout_rate=0.2, **ALL_FLAGS)  # fmt: skip
    assert config.command_line_level(args) == {
        "caption_prefix": "pre",
        "caption_suffix": "suf",
        "caption_dropout_rate": 0.1,
        "caption_separator": ";",
        "keep_tokens": 2,
        "shuffle_caption": True,
        "caption_tag_dropout_rate": 0.2,
        "keep_tokens_separator": "|||",
        "secondary_separator": ";;;",
        "enable_wildcard": True,
        "caption_dropout_every_n_epochs": 3,
        "token_warmup_min": 2,
        "token_warmup_step": 0.5,
        "caption_extension": ".txt",  # kohya adds the dot
        "resolution": (512, 512),
        "batch_size": 4,
        "enable_bucket": True,
        "min_bucket_reso": 320,
        "max_bucket_reso": 2048,
        "bucket_reso_steps": 32,
        "bucket_no_upscale": True,
        "flip_aug": True,
        "random_crop": True,
        "color_aug": True,
        "face_crop_aug_range": (1.5, 2.5),
        "resize_interpolation": "area",
        "alpha_mask": True,
        "validation_split": 0.25,
        "validation_seed": None,
        "num_repeats": 1,
    }


# --- a config's data set: kohya's defaults, every key at every level, the fallback chain ---

HOME = Path.home()


def test_a_minimal_config_trains_with_kohyas_defaults(tmp_path):
    (spec,) = load(tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "~/images"\n')
    assert spec == DatasetSpec(
        [Subset(HOME / "images", 1, None, ".caption", CaptionOptions(), augment=Augment())],
        (64, 64), 1, False, 256, 1024, 64, False, 0.0, None, False,
    )  # fmt: skip
    assert spec.subsets[0].alpha_mask is False and spec.subsets[0].is_reg is False


SUBSET_KEYS = """
num_repeats = 3
class_tokens = "sks dog"
caption_extension = "txt"
flip_aug = true
color_aug = true
random_crop = true
face_crop_aug_range = [1.5, 2]
resize_interpolation = "box"
caption_prefix = "a photo of"
caption_suffix = "high quality"
caption_dropout_rate = 0.25
caption_separator = ";"
keep_tokens = 2
shuffle_caption = true
caption_tag_dropout_rate = 0.5
keep_tokens_separator = "|||"
secondary_separator = ";;;"
enable_wildcard = true
caption_dropout_every_n_epochs = 4
token_warmup_min = 3
token_warmup_step = 0.5
"""
EVERY_OPTION = CaptionOptions(
    prefix="a photo of", suffix="high quality", dropout_rate=0.25, separator=";", keep_tokens=2, shuffle=True,
    tag_dropout_rate=0.5, keep_tokens_separator="|||", secondary_separator=";;;", enable_wildcard=True,
    dropout_every_n_epochs=4, token_warmup_min=3, token_warmup_step=0.5,
)  # fmt: skip
EVERY_AUGMENT = Augment(flip=True, color=True, random_crop=True, face_crop_range=(1.5, 2.0), interpolation="box")


@pytest.mark.parametrize("level", ["[general]", "[[datasets]]", "[[datasets.subsets]]"])
def test_every_subset_key_reaches_the_subset_from_any_level(tmp_path, level):
    subset = '[[datasets.subsets]]\nimage_dir = "~/images"\nis_reg = true\nalpha_mask = true\n'
    text = {
        "[general]": f"[general]\n{SUBSET_KEYS}[[datasets]]\n{subset}",
        "[[datasets]]": f"[[datasets]]\n{SUBSET_KEYS}{subset}",
        "[[datasets.subsets]]": f"[[datasets]]\n{subset}{SUBSET_KEYS}",
    }[level]
    (spec,) = load(tmp_path, text)
    assert spec.subsets == [
        Subset(HOME / "images", 3, "sks dog", ".txt", EVERY_OPTION, alpha_mask=True, is_reg=True,
               augment=EVERY_AUGMENT)
    ]  # fmt: skip
    assert spec.fine_tuning is False


DATASET_KEYS = """
resolution = [128, 64]
batch_size = 3
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 512
bucket_reso_steps = 32
bucket_no_upscale = true
validation_split = 0.5
validation_seed = 7
network_multiplier = 1
"""


@pytest.mark.parametrize("level", ["[general]", "[[datasets]]"])
def test_every_data_set_key_reaches_the_spec_from_either_level(tmp_path, level):
    subset = '[[datasets.subsets]]\nimage_dir = "/images"\n'
    text = f"[general]\n{DATASET_KEYS}[[datasets]]\n{subset}" if level == "[general]" else (
        f"[[datasets]]\n{DATASET_KEYS}{subset}"
    )  # fmt: skip
    (spec,) = load(tmp_path, text)
    # kohya writes [width, height]: 128 wide, 64 high
    assert spec == DatasetSpec(
        [Subset(Path("/images"), 1, None, ".caption", CaptionOptions(), augment=Augment())],
        (64, 128), 3, True, 64, 512, 32, True, 0.5, 7, False,
    )  # fmt: skip
    assert spec.summary() == {
        "resolution": [128, 64],
        "batch_size": 3,
        "min_bucket_reso": 64,
        "max_bucket_reso": 512,
        "bucket_reso_steps": 32,
        "bucket_no_upscale": True,
        "validation_split": 0.5,
        "validation_seed": 7,
        "subsets": [
            {"image_dir": "/images", "num_repeats": 1, "class_tokens": None, "caption_extension": ".caption",
             "is_reg": False, "alpha_mask": False, "captions": {}, "augment": {}}
        ],
    }  # fmt: skip


def test_the_lowest_level_that_sets_a_key_wins(tmp_path):
    text = """
[general]
num_repeats = 2
class_tokens = "general"
keep_tokens = 1
batch_size = 2
resolution = 256

[[datasets]]
num_repeats = 3
class_tokens = "data set"
resolution = 128
  [[datasets.subsets]]
  image_dir = "/a"
  num_repeats = 4
  [[datasets.subsets]]
  image_dir = "/b"

[[datasets]]
  [[datasets.subsets]]
  image_dir = "/c"
  class_tokens = "subset"
"""
    first, second = load(tmp_path, text, flags(keep_tokens=5, train_batch_size=8))
    assert [(s.repeats, s.class_tokens, s.options.keep_tokens) for s in first.subsets] == [
        (4, "data set", 1), (3, "data set", 1)
    ]  # fmt: skip
    assert [(s.repeats, s.class_tokens, s.options.keep_tokens) for s in second.subsets] == [(2, "subset", 1)]
    assert (first.resolution, first.batch_size, second.resolution, second.batch_size) == ((128, 128), 2, (256, 256), 2)


def test_flags_fill_what_no_level_sets(tmp_path):
    (spec,) = load(
        tmp_path, '[[datasets]]\n[[datasets.subsets]]\nimage_dir = "/a"\n', flags(keep_tokens=5, **ALL_FLAGS)
    )
    assert spec == DatasetSpec(
        [Subset(Path("/a"), 1, None, ".txt", CaptionOptions(keep_tokens=5, keep_tokens_separator="|||",
                secondary_separator=";;;", enable_wildcard=True, dropout_every_n_epochs=3, token_warmup_min=2,
                token_warmup_step=0.5), alpha_mask=True,
                augment=Augment(True, True, True, (1.5, 2.5), "area"))],
        (512, 512), 4, True, 320, 2048, 32, True, 0.25, None, False,
    )  # fmt: skip


def test_a_fine_tuning_data_set_reads_its_metadata_file(tmp_path):
    text = '[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "~/meta.json"\nimage_dir = "~/ft"\nalpha_mask = true\n'
    text += '[[datasets]]\n[[datasets.subsets]]\nmetadata_file = "/m.jsonl"\n'
    first, second = load(tmp_path, text)
    assert first.subsets == [
        Subset(HOME / "ft", 1, None, ".caption", CaptionOptions(), alpha_mask=True, metadata_file=HOME / "meta.json",
               augment=Augment())
    ]  # fmt: skip
    assert second.subsets == [
        Subset(None, 1, None, ".caption", CaptionOptions(), metadata_file=Path("/m.jsonl"), augment=Augment())
    ]  # fmt: skip
    assert first.fine_tuning is second.fine_tuning is True


def test_json_null_is_absent_and_nothing_is_noted(tmp_path, caplog):
    subset = {"num_repeats": None, "image_dir": "/a", "class_tokens": None, "batch_size": None, "flip_aug": None}
    with caplog.at_level(logging.INFO, logger="difftune.data.config"):
        (spec,) = load(tmp_path, {"general": {"image_dir": None}, "datasets": [{"subsets": [subset]}]})
    assert spec.subsets == [Subset(Path("/a"), 1, None, ".caption", CaptionOptions(), augment=Augment())]
    assert caplog.records == []


def test_keys_without_effect_are_noted_once_each(tmp_path, caplog):
    text = {
        "general": {"cache_info": True},
        "datasets": [
            {"subsets": [{"image_dir": "/a", "custom_attributes": {"x": 1}, "cache_info": False}]},
            {"custom_attributes": {}, "subsets": [{"image_dir": "/b"}]},
        ],
    }
    with caplog.at_level(logging.INFO, logger="difftune.data.config"):
        load(tmp_path, text)
    path = tmp_path / "data.json"
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, f"--dataset_config {path}: cache_info has no effect here (kohya's image-info cache: our scan "
                       "cache (--cache_dir) records image sizes already)"),
        (logging.INFO, f"--dataset_config {path}: custom_attributes has no effect here (extra per-subset values read "
                       "only by kohya's own model-specific trainers)"),
    ]  # fmt: skip


# --- values: kohya's types and ranges, at their edges ---

ACCEPTED = [
    ("num_repeats", "0", ("repeats", 0)),
    ("keep_tokens", "0", ("keep_tokens", 0)),
    ("caption_dropout_rate", "0", ("dropout_rate", 0.0)),
    ("caption_dropout_rate", "1", ("dropout_rate", 1.0)),
    ("caption_tag_dropout_rate", "1.0", ("tag_dropout_rate", 1.0)),
    ("token_warmup_step", "0", ("token_warmup_step", 0.0)),
    ("token_warmup_step", "1e9", ("token_warmup_step", 1e9)),
    ("face_crop_aug_range", "[1, 1]", ("face_crop_range", (1.0, 1.0))),
    ("face_crop_aug_range", "[0.5, 3]", ("face_crop_range", (0.5, 3.0))),
    ("caption_extension", '""', ("caption_extension", "")),
    ("caption_extension", '".cap"', ("caption_extension", ".cap")),
    ("caption_extension", '"cap"', ("caption_extension", ".cap")),
    ("resize_interpolation", '"lanczos"', ("interpolation", "lanczos")),
    ("resize_interpolation", '"box"', ("interpolation", "box")),
    ("class_tokens", '""', ("class_tokens", "")),
]


def subset_value(subset: Subset, name: str):
    for holder in (subset, subset.options, subset.augment):
        if hasattr(holder, name):
            return getattr(holder, name)
    raise AssertionError(name)


@pytest.mark.parametrize(("key", "value", "expected"), ACCEPTED)
def test_values_at_the_edge_of_their_range_are_accepted(tmp_path, key, value, expected):
    (spec,) = load(tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "/a"\n{key} = {value}\n')
    name, wanted = expected
    got = subset_value(spec.subsets[0], name)
    assert got == wanted and type(got) is type(wanted)


@pytest.mark.parametrize(
    ("value", "resolution"),
    [("8", (8, 8)), ("64", (64, 64)), ("[8, 16]", (16, 8)), ("[1024, 768]", (768, 1024))],
)
def test_a_resolution_is_one_side_or_width_and_height(tmp_path, value, resolution):
    (spec,) = load(tmp_path, f'[[datasets]]\nresolution = {value}\n[[datasets.subsets]]\nimage_dir = "/a"\n')
    assert spec.resolution == resolution


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("validation_split", "0", 0.0),
        ("validation_split", "0.999", 0.999),
        ("validation_seed", "-3", -3),
        ("batch_size", "1", 1),
        ("min_bucket_reso", "1", 1),
        ("bucket_reso_steps", "1", 1),
    ],
)
def test_data_set_values_at_their_edges_are_accepted(tmp_path, key, value, expected):
    (spec,) = load(tmp_path, f'[[datasets]]\n{key} = {value}\n[[datasets.subsets]]\nimage_dir = "/a"\n')
    assert getattr(spec, key) == expected and type(getattr(spec, key)) is type(expected)


REFUSED = [
    ("flip_aug", "1", "flip_aug = 1 must be true or false"),
    ("flip_aug", '"yes"', "flip_aug = 'yes' must be true or false"),
    ("num_repeats", "-1", "num_repeats = -1 must be >= 0"),
    ("num_repeats", "true", "num_repeats = True must be an integer"),
    ("num_repeats", "1.0", "num_repeats = 1.0 must be an integer"),
    ("keep_tokens", '"1"', "keep_tokens = '1' must be an integer"),
    ("token_warmup_min", "-1", "token_warmup_min = -1 must be >= 0"),
    ("caption_dropout_every_n_epochs", "-2", "caption_dropout_every_n_epochs = -2 must be >= 0"),
    ("caption_dropout_rate", "1.5", "caption_dropout_rate = 1.5 must be in [0, 1]"),
    ("caption_dropout_rate", "-0.1", "caption_dropout_rate = -0.1 must be in [0, 1]"),
    ("caption_tag_dropout_rate", "1.0001", "caption_tag_dropout_rate = 1.0001 must be in [0, 1]"),
    ("caption_tag_dropout_rate", "true", "caption_tag_dropout_rate = True must be a number"),
    ("caption_tag_dropout_rate", '"0.5"', "caption_tag_dropout_rate = '0.5' must be a number"),
    ("caption_dropout_rate", "nan", "caption_dropout_rate = nan must be a number"),
    ("token_warmup_step", "inf", "token_warmup_step = inf must be a number"),
    ("token_warmup_step", "-0.5", "token_warmup_step = -0.5 must be in [0, None]"),
    ("class_tokens", "1", "class_tokens = 1 must be a string"),
    ("caption_prefix", "[]", "caption_prefix = [] must be a string"),
    ("caption_extension", "1", "caption_extension = 1 must be a string"),
    ("resize_interpolation", '"bilinearx"',
     "resize_interpolation = 'bilinearx' must be one of lanczos, nearest, bilinear, linear, bicubic, cubic, area, box"),
    ("custom_attributes", "1", "custom_attributes = 1 must be a table"),
    ("face_crop_aug_range", "[0, 1]", "face_crop_aug_range = [0, 1] must satisfy 0 < low <= high"),
    ("face_crop_aug_range", "[2, 1.5]", "face_crop_aug_range = [2, 1.5] must satisfy 0 < low <= high"),
    ("face_crop_aug_range", "[-1, 1]", "face_crop_aug_range = [-1, 1] must satisfy 0 < low <= high"),
    ("face_crop_aug_range", "[1, 2, 3]", "face_crop_aug_range = [1, 2, 3] must be [low, high], two numbers"),
    ("face_crop_aug_range", "[1]", "face_crop_aug_range = [1] must be [low, high], two numbers"),
    ("face_crop_aug_range", "[1, true]", "face_crop_aug_range = [1, True] must be [low, high], two numbers"),
    ("face_crop_aug_range", '[1, "2"]', "face_crop_aug_range = [1, '2'] must be [low, high], two numbers"),
    ("face_crop_aug_range", '"1,2"', "face_crop_aug_range = '1,2' must be [low, high], two numbers"),
    ("is_reg", '"no"', "is_reg = 'no' must be true or false"),
    ("alpha_mask", "0", "alpha_mask = 0 must be true or false"),
]  # fmt: skip


@pytest.mark.parametrize(("key", "value", "message"), REFUSED)
def test_a_subset_value_kohya_would_not_take_is_refused_with_what_it_must_be(tmp_path, key, value, message):
    text = f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "/a"\n{key} = {value}\n'
    assert refusal(tmp_path, text) == f"[[datasets]] #1 [[datasets.subsets]] #1: {message}"


RESOLUTION = "must be a positive multiple of 8, or [width, height] of them"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("batch_size", "0", "batch_size = 0 must be >= 1"),
        ("bucket_reso_steps", "0", "bucket_reso_steps = 0 must be >= 1"),
        ("min_bucket_reso", "0", "min_bucket_reso = 0 must be >= 1"),
        ("max_bucket_reso", "0", "max_bucket_reso = 0 must be >= 1"),
        ("validation_seed", "1.5", "validation_seed = 1.5 must be an integer"),
        ("validation_split", "1", "validation_split = 1 must be in [0, 1)"),
        ("validation_split", "-0.5", "validation_split = -0.5 must be in [0, 1)"),
        ("enable_bucket", '"true"', "enable_bucket = 'true' must be true or false"),
        ("network_multiplier", "nan", "network_multiplier = nan must be a number"),
        ("resolution", "0", f"resolution = 0 {RESOLUTION}"),
        ("resolution", "-8", f"resolution = -8 {RESOLUTION}"),
        ("resolution", "12", f"resolution = 12 {RESOLUTION}"),
        ("resolution", "true", f"resolution = True {RESOLUTION}"),
        ("resolution", "64.0", f"resolution = 64.0 {RESOLUTION}"),
        ("resolution", '"64"', f"resolution = '64' {RESOLUTION}"),
        ("resolution", "[64]", f"resolution = [64] {RESOLUTION}"),
        ("resolution", "[64, 64, 64]", f"resolution = [64, 64, 64] {RESOLUTION}"),
        ("resolution", "[64, 60]", f"resolution = [64, 60] {RESOLUTION}"),
        ("resolution", "[0, 64]", f"resolution = [0, 64] {RESOLUTION}"),
        ("resolution", "[64, true]", f"resolution = [64, True] {RESOLUTION}"),
        ("resolution", "[64.0, 64]", f"resolution = [64.0, 64] {RESOLUTION}"),
    ],
)
def test_a_data_set_value_kohya_would_not_take_is_refused(tmp_path, key, value, message):
    text = f'[[datasets]]\n{key} = {value}\n[[datasets.subsets]]\nimage_dir = "/a"\n'
    assert refusal(tmp_path, text) == f"[[datasets]] #1: {message}"


@pytest.mark.parametrize(("multiplier", "shown"), [("0.5", "0.5"), ("2", "2.0"), ("0", "0.0")])
def test_a_network_multiplier_other_than_one_is_refused(tmp_path, multiplier, shown):
    text = f'[general]\nnetwork_multiplier = {multiplier}\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "/a"\n'
    with pytest.raises(UserError) as caught:
        load(tmp_path, text)
    assert str(caught.value) == (
        f"network_multiplier = {shown}: kohya scales a data set's network output with it; difftune trains every "
        "data set at 1.0 (remove the key)"
    )


# --- the file's structure, misplaced keys, every problem in one line ---

DB = "a data set without metadata_file (DreamBooth style)"


@pytest.mark.parametrize(
    ("text", "problems"),
    [
        ("[[datasets]]\nclass_tokens = 'x'\n", ["[[datasets]] #1: has no [[datasets.subsets]]"]),
        ("[general]\nbatch_size = 2\n", ["file: has no [[datasets]]"]),
        ("", ["file: has no [[datasets]]"]),
        ("datasets = 5\n", ["datasets: must be an array of tables ([[datasets]])", "file: has no [[datasets]]"]),
        ("general = 5\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n", ["[general]: must be a table"]),
        ({"datasets": [5]}, ["[[datasets]] #1: must be a table", "[[datasets]] #1: has no [[datasets.subsets]]"]),
        ({"datasets": [{"subsets": 5}]}, ["[[datasets]] #1: has no [[datasets.subsets]]"]),
        ({"datasets": [{"subsets": [{"image_dir": "a"}, 5]}]}, [
            "[[datasets]] #1 [[datasets.subsets]] #2: must be a table",
            "[[datasets]] #1 [[datasets.subsets]] #2: has no image_dir (the folder of its images)",
        ]),
        ("[[datasets]]\n[[datasets.subsets]]\nclass_tokens = 'x'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n"
         "[[datasets.subsets]]\nnum_repeats = 2\n", [
            "[[datasets]] #1 [[datasets.subsets]] #1: has no image_dir (the folder of its images)",
            "[[datasets]] #2 [[datasets.subsets]] #2: has no image_dir (the folder of its images)",
        ]),
        ("[[datasets]]\n[[datasets.subsets]]\nnum_repeats = 1\n[[datasets.subsets]]\nimage_dir = 'a'\n"
         "keep_tokens = -1\n", [
            "[[datasets]] #1 [[datasets.subsets]] #1: has no image_dir (the folder of its images)",
            "[[datasets]] #1 [[datasets.subsets]] #2: keep_tokens = -1 must be >= 0",
        ]),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nmetadata_file = 'm.json'\n[[datasets.subsets]]\n"
         "image_dir = 'b'\n", [
            "[[datasets]] #1: mixes subsets with and without metadata_file (as kohya, split them into two data sets)",
            "unsupported keys (not in kohya's data-set schema): [[datasets]] #1 [[datasets.subsets]] #1 metadata_file",
        ]),
        ("[general]\nimage_dir = 'a'\nmetadata_file = 'm'\nis_reg = true\nalpha_mask = true\n[[datasets]]\n"
         "[[datasets.subsets]]\nimage_dir = 'a'\n", [
            f"[general]: {key} belongs in [[datasets.subsets]], not here"
            for key in ("image_dir", "metadata_file", "is_reg", "alpha_mask")
        ]),
        ("[[datasets]]\nimage_dir = 'a'\nis_reg = true\nmetadata_file = 'm'\n[[datasets.subsets]]\nimage_dir = 'a'\n",
         [f"[[datasets]] #1: {key} belongs in [[datasets.subsets]], not here"
          for key in ("image_dir", "is_reg", "metadata_file")]),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n" + "".join(
            f"{key} = {value}\n" for key, value in (("batch_size", 2), ("resolution", 64), ("enable_bucket", "true"),
                                                    ("min_bucket_reso", 64), ("max_bucket_reso", 64),
                                                    ("bucket_reso_steps", 8), ("bucket_no_upscale", "true"),
                                                    ("validation_split", 0.5), ("validation_seed", 1),
                                                    ("network_multiplier", 1))), [
            f"[[datasets]] #1 [[datasets.subsets]] #1: {key} belongs in [[datasets]] or [general], not here"
            for key in ("batch_size", "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                        "bucket_reso_steps", "bucket_no_upscale", "validation_split", "validation_seed",
                        "network_multiplier")
        ]),
        ("[[datasets]]\nclass_tokens = 'x'\ncaption_extension = '.txt'\ncache_info = true\nis_reg = true\n"
         "[[datasets.subsets]]\nmetadata_file = 'm'\nclass_tokens = 'y'\nis_reg = false\ncaption_extension = 't'\n"
         "cache_info = false\n", [
            *(f"[[datasets]] #1: {key} belongs in {DB}, not here"
              for key in ("class_tokens", "caption_extension", "cache_info", "is_reg")),
            *(f"[[datasets]] #1 [[datasets.subsets]] #1: {key} belongs in {DB}, not here"
              for key in ("class_tokens", "is_reg", "caption_extension", "cache_info")),
        ]),
        ("[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\nconditioning_data_dir = 'c'\n", [
            "[[datasets]] #1 [[datasets.subsets]] #1: conditioning_data_dir is for ControlNet training's conditioning "
            "images, which difftune does not train: remove it"
        ]),
        ("extra = 1\n[general]\ncolour_aug = true\n[[datasets]]\nimages = 'a'\n[[datasets.subsets]]\nimage_dir = 'a'\n"
         "repeats = 2\n", [
            "unsupported keys (not in kohya's data-set schema): top-level extra, [general] colour_aug, "
            "[[datasets]] #1 images, [[datasets]] #1 [[datasets.subsets]] #1 repeats"
        ]),
    ],
)  # fmt: skip
def test_every_problem_of_the_file_in_one_line(tmp_path, text, problems):
    count = f"{len(problems)} problems: " if len(problems) > 1 else ""
    assert refusal(tmp_path, text) == count + "; ".join(problems)


def test_problems_are_counted_and_joined_in_file_order(tmp_path):
    text = """
[general]
flip_aug = "yes"
colour_aug = true
[[datasets]]
batch_size = 0
  [[datasets.subsets]]
  image_dir = "x"
  keep_tokens = -1
"""
    assert refusal(tmp_path, text) == (
        "4 problems: [general]: flip_aug = 'yes' must be true or false; [[datasets]] #1: batch_size = 0 must be "
        ">= 1; [[datasets]] #1 [[datasets.subsets]] #1: keep_tokens = -1 must be >= 0; unsupported keys (not in "
        "kohya's data-set schema): [general] colour_aug"
    )


def test_a_fine_tuning_subset_needs_no_image_dir_and_takes_only_its_keys(tmp_path):
    text = "[[datasets]]\n[[datasets.subsets]]\nmetadata_file = 'm'\nalpha_mask = true\nflip_aug = true\n"
    (spec,) = load(tmp_path, text)
    assert spec.fine_tuning and spec.subsets[0].image_dir is None and spec.subsets[0].augment.flip is True


# --- kohya's bucket range assertion ---


def bucket_spec(resolution, low, high, steps, no_upscale=False, enable=True) -> DatasetSpec:
    return DatasetSpec([], resolution, 1, enable, low, high, steps, no_upscale)


@pytest.mark.parametrize(
    "spec",
    [
        bucket_spec((64, 64), 64, 1024, 64),  # min(resolution) == min_bucket_reso
        bucket_spec((64, 64), 100, 1024, 64),  # kohya rounds min_bucket_reso down to a step: 64
        bucket_spec((64, 64), 127, 1024, 64),
        bucket_spec((1024, 512), 256, 1024, 64),  # max(resolution) == max_bucket_reso
        bucket_spec((512, 1024), 256, 1000, 64),  # kohya rounds max_bucket_reso up to a step: 1024
        bucket_spec((64, 4096), 512, 1024, 64, enable=False),  # no buckets: no range
        bucket_spec((64, 4096), 512, 1024, 64, no_upscale=True),  # kohya skips the check without upscaling
    ],
)
def test_a_bucket_range_covering_the_resolution_is_accepted(spec):
    config.check_spec(spec, "--dataset_config c.toml")


@pytest.mark.parametrize(
    ("spec", "shown"),
    [
        (bucket_spec((56, 64), 64, 1024, 64), "64x56 is outside min_bucket_reso 64 .. max_bucket_reso 1024"),
        (bucket_spec((64, 128), 128, 1024, 64), "128x64 is outside min_bucket_reso 128 .. max_bucket_reso 1024"),
        (bucket_spec((64, 64), 129, 1024, 64), "64x64 is outside min_bucket_reso 129 .. max_bucket_reso 1024"),
        (bucket_spec((1040, 512), 256, 1000, 64), "512x1040 is outside min_bucket_reso 256 .. max_bucket_reso 1000"),
        (bucket_spec((512, 1032), 256, 1024, 64), "1032x512 is outside min_bucket_reso 256 .. max_bucket_reso 1024"),
    ],
)
def test_a_bucket_range_not_covering_the_resolution_is_refused(spec, shown):
    with pytest.raises(UserError) as caught:
        config.check_spec(spec, "--dataset_config c.toml")
    assert str(caught.value) == f"--dataset_config c.toml: resolution {shown}: widen the bucket range"


def test_a_config_whose_buckets_miss_the_resolution_is_refused(tmp_path):
    text = "[[datasets]]\nenable_bucket = true\nresolution = 128\nmin_bucket_reso = 192\n[[datasets.subsets]]\n"
    text += "image_dir = 'a'\n"
    with pytest.raises(UserError) as caught:
        load(tmp_path, text)
    assert str(caught.value) == (
        f"--dataset_config {tmp_path / 'data.toml'}: resolution 128x128 is outside min_bucket_reso 192 .. "
        "max_bucket_reso 1024: widen the bucket range"
    )


def test_a_spec_summary_without_buckets_or_split():
    spec = DatasetSpec([Subset(Path("/a"), 2, "tok")], (64, 128), 2, False, 320, 640, 32, True, 0.0, 5)
    assert spec.summary() == {
        "resolution": [128, 64],
        "batch_size": 2,
        "subsets": [{"image_dir": "/a", "num_repeats": 2, "class_tokens": "tok", "caption_extension": ".txt",
                     "is_reg": False, "alpha_mask": False}],
    }  # fmt: skip


# --- kohya's `<repeats>_<class tokens>` folders ---


def folders(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).mkdir(parents=True)
    return root


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (("10_sks dog",), True),
        (("plain", "3_x"), True),
        (("10",), True),  # kohya: 10 repeats, empty class tokens
        (("plain",), False),
        (("_x",), False),
        (("x_10",), False),
        ((), False),
    ],
)
def test_a_kohya_root_has_a_repeats_subfolder(tmp_path, names, expected):
    assert config.kohya_root(folders(tmp_path / "train", *names) if names else tmp_path) is expected


def test_a_file_named_like_a_subfolder_or_a_metadata_file_is_not_kohyas_layout(tmp_path):
    (tmp_path / "10_sks.png").write_bytes(b"x")
    assert config.kohya_root(tmp_path) is False
    assert config.kohya_root(tmp_path / "10_sks.png") is False
    assert config.kohya_root(None) is False
    assert config.kohya_root(tmp_path / "missing") is False
    folders(tmp_path, "10_sks")
    assert config.kohya_root(tmp_path) is True
    (tmp_path / "metadata.jsonl").write_text("")
    assert config.kohya_root(tmp_path) is False


def test_plain_folders_are_not_kohya_specs_and_reg_needs_kohya_train(tmp_path):
    plain = folders(tmp_path / "plain", "images")
    assert config.specs_from_folders(flags(train_data_dir=str(plain))) is None
    assert config.specs_from_folders(flags()) is None
    with pytest.raises(UserError) as caught:
        config.specs_from_folders(flags(train_data_dir=str(plain), reg_data_dir=str(tmp_path)))
    assert str(caught.value) == (
        f"--reg_data_dir is kohya's form and needs --train_data_dir in it too: put the training images of {plain} in "
        "'<repeats>_<class tokens>' subfolders (e.g. '10_sks dog')"
    )


def test_kohya_folders_become_one_data_set_with_the_flags(tmp_path, caplog):
    train = folders(tmp_path / "train", "3_sks dog", "1_cat")
    (train / "loose.png").write_bytes(b"x")  # kohya ignores images directly in --train_data_dir
    reg = folders(tmp_path / "reg", "2_dog")
    (reg / "loose.png").write_bytes(b"x")
    args = flags(train_data_dir=str(train), reg_data_dir=str(reg), keep_tokens=1, **ALL_FLAGS)
    with caplog.at_level(logging.WARNING, logger="difftune.data.folders"):
        (spec,) = config.specs_from_folders(args)
    assert [r.getMessage() for r in caplog.records] == [
        f"{flag} {folder}: its own images are not trained (as in kohya): only its '<repeats>_<class tokens>' subfolders"
        for flag, folder in (("--train_data_dir", train), ("--reg_data_dir", reg))
    ]
    options = CaptionOptions(keep_tokens=1, keep_tokens_separator="|||", secondary_separator=";;;",
                             enable_wildcard=True, dropout_every_n_epochs=3, token_warmup_min=2,
                             token_warmup_step=0.5)  # fmt: skip
    augment = Augment(True, True, True, (1.5, 2.5), "area")
    assert spec == DatasetSpec(
        [
            Subset(train / "1_cat", 1, "cat", ".txt", options, alpha_mask=True, augment=augment),
            Subset(train / "3_sks dog", 3, "sks dog", ".txt", options, alpha_mask=True, augment=augment),
            Subset(reg / "2_dog", 2, "dog", ".txt", options, alpha_mask=True, is_reg=True, augment=augment),
        ],
        (512, 512), 4, True, 320, 2048, 32, True, 0.25, None, False,
    )  # fmt: skip


def test_kohya_folders_with_defaults_and_without_reg(tmp_path):
    train = folders(tmp_path / "train", "5_x")
    (spec,) = config.specs_from_folders(flags(train_data_dir=str(train)))
    assert spec == DatasetSpec(
        [Subset(train / "5_x", 5, "x", ".caption", CaptionOptions(), augment=Augment())],
        (64, 64), 1, False, 256, 1024, 64, False, 0.0, None, False,
    )  # fmt: skip


def test_kohya_folders_whose_buckets_miss_the_resolution_are_refused(tmp_path):
    train = folders(tmp_path / "train", "5_x")
    args = flags(train_data_dir=str(train), aspect_ratio_buckets=True, min_bucket_reso=128)
    with pytest.raises(UserError) as caught:
        config.specs_from_folders(args)
    assert str(caught.value) == (
        "--train_data_dir: resolution 64x64 is outside --min_bucket_reso 128 .. --max_bucket_reso 1024: widen the "
        "bucket range"
    )  # (the range came from the flags: no --dataset_config was given)


# --- the file: TOML unless its name says JSON or YAML (as kohya decides) ---


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("data", "[[datasets]]\n[[datasets.subsets]]\nimage_dir = '/a'\n"),
        ("data.cfg", "[[datasets]]\n[[datasets.subsets]]\nimage_dir = '/a'\n"),
        ("data.JSON", '{"datasets": [{"subsets": [{"image_dir": "/a"}]}]}'),
        ("data.yaml", "datasets:\n  - subsets:\n      - image_dir: /a\n"),
    ],
)
def test_a_config_is_toml_unless_named_json_or_yaml(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    (spec,) = config.load_dataset_config(str(tmp_path / name), flags())
    assert [s.image_dir for s in spec.subsets] == [Path("/a")]


def test_a_missing_config_is_named_with_its_flag(tmp_path):
    with pytest.raises(UserError) as caught:
        config.load_dataset_config(tmp_path / "none.toml", flags())
    assert str(caught.value) == f"--dataset_config {tmp_path / 'none.toml'} does not exist"


# --- the value checks the schema builds (called here, as the schema's were built at import) ---

INTERPOLATION_NAMES = "lanczos, nearest, bilinear, linear, bicubic, cubic, area, box"


@pytest.mark.parametrize(
    ("check", "value", "expected"),
    [
        (lambda: config._int(0), 0, 0),
        (lambda: config._int(0), 7, 7),
        (lambda: config._int(1), 1, 1),
        (lambda: config._int(), -(10**9), -(10**9)),
        (lambda: config._int(), 0, 0),
        (lambda: config._number(0, 1), 0, 0.0),
        (lambda: config._number(0, 1), 1, 1.0),
        (lambda: config._number(0, 1), 0.5, 0.5),
        (lambda: config._number(0, 1, high_open=True), 0, 0.0),
        (lambda: config._number(0, 1, high_open=True), 0.999, 0.999),
        (lambda: config._number(0), 1e300, 1e300),
        (lambda: config._number(), -5, -5.0),
        (lambda: config._number(), 0.0, 0.0),
        (lambda: config._one_of(config.INTERPOLATIONS), "lanczos", "lanczos"),
        (lambda: config._one_of(config.INTERPOLATIONS), "box", "box"),
        (lambda: config._one_of(("a", "b")), "b", "b"),
    ],
)
def test_a_check_returns_the_value_to_use(check, value, expected):
    got = check()(value)
    assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize(
    ("check", "value", "message"),
    [
        (lambda: config._int(0), -1, "must be >= 0"),
        (lambda: config._int(1), 0, "must be >= 1"),
        (lambda: config._int(1), -5, "must be >= 1"),
        (lambda: config._int(0), True, "must be an integer"),
        (lambda: config._int(), False, "must be an integer"),
        (lambda: config._int(), 1.0, "must be an integer"),
        (lambda: config._int(), "1", "must be an integer"),
        (lambda: config._int(), None, "must be an integer"),
        (lambda: config._number(0, 1), 1.0000001, "must be in [0, 1]"),
        (lambda: config._number(0, 1), -1e-9, "must be in [0, 1]"),
        (lambda: config._number(0, 1, high_open=True), 1, "must be in [0, 1)"),
        (lambda: config._number(0, 1, high_open=True), 1.5, "must be in [0, 1)"),
        (lambda: config._number(0, 1, high_open=True), -0.5, "must be in [0, 1)"),
        (lambda: config._number(0), -0.1, "must be in [0, None]"),
        (lambda: config._number(None, 2), 3, "must be in [None, 2]"),
        (lambda: config._number(), True, "must be a number"),
        (lambda: config._number(), float("nan"), "must be a number"),
        (lambda: config._number(), float("inf"), "must be a number"),
        (lambda: config._number(), float("-inf"), "must be a number"),
        (lambda: config._number(0, 1), "0.5", "must be a number"),
        (lambda: config._number(0, 1), None, "must be a number"),
        (lambda: config._one_of(config.INTERPOLATIONS), "Lanczos", f"must be one of {INTERPOLATION_NAMES}"),
        (lambda: config._one_of(config.INTERPOLATIONS), "", f"must be one of {INTERPOLATION_NAMES}"),
        (lambda: config._one_of(("a", "b")), "c", "must be one of a, b"),
    ],
)
def test_a_check_refuses_with_what_the_value_must_be(check, value, message):
    with pytest.raises(ValueError) as caught:
        check()(value)
    assert str(caught.value) == message


def test_a_subset_from_settings_without_the_flags_level_takes_kohyas_defaults():
    assert config.subset_from({"image_dir": "~/a"}, Path("c.toml")) == Subset(
        HOME / "a", 1, None, ".caption", CaptionOptions(), alpha_mask=False, is_reg=False, augment=Augment()
    )
    level = {"resolution": (64, 64), "batch_size": 1, "enable_bucket": False, "min_bucket_reso": 256,
             "max_bucket_reso": 1024, "bucket_reso_steps": 64, "bucket_no_upscale": False}  # fmt: skip
    spec = config.spec_from([], level, False)
    assert (spec.validation_split, spec.validation_seed) == (0.0, None) and type(spec.validation_split) is float
