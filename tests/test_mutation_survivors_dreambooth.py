"""Small fast tests written for the mutants `make mutation-auto` found alive in data/dreambooth.py
(docs/mutation.md): each asserts what a user sees (a parsed flag, a refusal, a warning, a caption, a count)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
from PIL import Image

from difftune.cli.errors import UserError
from difftune.data import dreambooth


def picture(path: Path, size: tuple[int, int] = (8, 8), colour: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (colour, 0, 0)).save(path)
    return path


def make_parser() -> argparse.ArgumentParser:
    """The flags check_dreambooth_args reads, as the training scripts declare them."""
    parser = argparse.ArgumentParser(prog="train")
    parser.add_argument("--train_data_dir", default=None)
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--caption_extension", default=None)
    parser.add_argument("--caption_column", default="text")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--seed", type=int, default=0)
    dreambooth.add_dreambooth_args(parser)
    return parser


def checked(*argv: object) -> argparse.Namespace:
    parser = make_parser()
    args = parser.parse_args([str(a) for a in argv])
    dreambooth.check_dreambooth_args(args, parser)
    return args


def refusal(*argv: object) -> str:
    with pytest.raises(UserError) as refused:
        checked(*argv)
    return str(refused.value)


# --- the flags: diffusers' names and defaults (train_dreambooth_lora_sdxl.py) ---


def test_the_flags_default_as_diffusers_dreambooth_script():
    args = make_parser().parse_args([])
    assert args.instance_data_dir is None and args.instance_prompt is None and args.class_prompt is None
    assert args.with_prior_preservation is False and args.class_data_dir is None and args.reg_data_dir is None
    assert args.num_class_images == 100 and args.prior_loss_weight == 1.0 and args.sample_batch_size == 4
    assert args.prior_generation_precision is None
    groups = make_parser()._action_groups
    (group,) = [g for g in groups if any("--class_prompt" in a.option_strings for a in g._group_actions)]
    assert group.title == "DreamBooth (diffusers' names; see docs/dreambooth.md)"


def test_the_flags_parse_their_values():
    argv = ["--with_prior_preservation", "--instance_data_dir", "inst", "--instance_prompt", "a sks dog",
            "--class_data_dir", "cls", "--class_prompt", "a dog", "--num_class_images", "7",
            "--prior_loss_weight", "0.5", "--sample_batch_size", "2", "--prior_generation_precision", "bf16",
            "--reg_data_dir", "reg"]  # fmt: skip
    args = make_parser().parse_args(argv)
    assert args.with_prior_preservation is True
    assert (args.instance_data_dir, args.instance_prompt) == ("inst", "a sks dog")
    assert (args.class_data_dir, args.class_prompt, args.reg_data_dir) == ("cls", "a dog", "reg")
    assert args.num_class_images == 7 and isinstance(args.num_class_images, int)
    assert args.prior_loss_weight == 0.5 and isinstance(args.prior_loss_weight, float)
    assert args.sample_batch_size == 2 and isinstance(args.sample_batch_size, int)
    assert args.prior_generation_precision == "bf16"
    for precision in ("no", "fp32", "fp16"):
        assert make_parser().parse_args(["--prior_generation_precision", precision]).prior_generation_precision == (
            precision
        )
    with pytest.raises(SystemExit):
        make_parser().parse_args(["--prior_generation_precision", "fp8"])


# --- the image count and the flag named in messages ---


def test_count_images_counts_the_image_files_directly_in_the_folder(tmp_path):
    assert dreambooth.count_images(tmp_path / "missing") == 0
    assert dreambooth.count_images(tmp_path) == 0
    picture(tmp_path / "a.png")
    picture(tmp_path / "b.JPG")
    (tmp_path / "a.txt").write_text("a dog")
    picture(tmp_path / "sub" / "c.png")  # in a subfolder: not counted
    assert dreambooth.count_images(tmp_path) == 2
    assert dreambooth.count_images(str(tmp_path)) == 2


def test_the_instance_folder_is_named_by_the_flag_that_gave_it():
    assert dreambooth.instance_folder_flag(argparse.Namespace(instance_data_dir="x")) == "--instance_data_dir"
    assert dreambooth.instance_folder_flag(argparse.Namespace(instance_data_dir=None)) == "--train_data_dir"
    assert dreambooth.instance_folder_flag(argparse.Namespace()) == "--train_data_dir"


def test_class_batches_are_shuffled_with_their_own_fixed_seed():
    # little-endian first 4 bytes of sha256("<seed>:class-batches"): fixed, so a resumed run draws the same batches
    assert dreambooth.class_seed(0) == 0xCF7B0E0E
    assert dreambooth.class_seed(42) == 0xE7C10D7C


# --- check_dreambooth_args: refusals, warnings, and what passes ---


def test_instance_data_dir_is_the_train_data_dir(tmp_path):
    args = checked("--instance_data_dir", tmp_path)
    assert args.train_data_dir == str(tmp_path)
    assert checked("--train_data_dir", tmp_path).train_data_dir == str(tmp_path)
    assert refusal("--instance_data_dir", tmp_path, "--train_data_dir", tmp_path) == (
        "--instance_data_dir and --train_data_dir name the same folder: pass one of them"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--num_class_images", "0"), "--num_class_images and --sample_batch_size must be positive"),
        (("--sample_batch_size", "0"), "--num_class_images and --sample_batch_size must be positive"),
        (("--prior_loss_weight", "-0.5"), "--prior_loss_weight must be >= 0, got -0.5"),
    ],
)
def test_class_settings_out_of_range_are_refused(flags, message):
    assert refusal(*flags) == message


@pytest.mark.parametrize(
    "flags", [("--num_class_images", "1"), ("--sample_batch_size", "1"), ("--prior_loss_weight", "0")]
)
def test_class_settings_at_their_bounds_pass(flags):
    checked(*flags)


def test_a_missing_reg_data_dir_is_refused_and_does_not_mix_with_prior_preservation(tmp_path):
    missing = tmp_path / "reg"
    assert refusal("--reg_data_dir", missing) == (
        f"--reg_data_dir {missing} does not exist: pass a folder of kohya subfolders"
    )
    missing.mkdir()
    checked("--reg_data_dir", missing)
    assert refusal("--reg_data_dir", missing, "--with_prior_preservation", "--class_data_dir", tmp_path) == (
        "--reg_data_dir (kohya: regularisation images in the epoch) and --with_prior_preservation (diffusers: "
        "a class batch with every batch) are two forms of the same thing: pass one of them"
    )


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_class_flags_without_prior_preservation_are_named_unused(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    checked()  # nothing given: no warning, and no refusal for the missing --class_data_dir
    assert warnings_of(caplog) == []
    argv = ["--class_data_dir", tmp_path, "--class_prompt", "a dog", "--num_class_images", "5", "--prior_loss_weight",
            "0.5", "--sample_batch_size", "2", "--prior_generation_precision", "fp16"]  # fmt: skip
    checked(*argv)
    assert warnings_of(caplog) == [
        "--class_data_dir, --class_prompt, --num_class_images, --prior_loss_weight, --sample_batch_size, "
        "--prior_generation_precision: unused without --with_prior_preservation"
    ]


@pytest.mark.parametrize("kohya", ["--reg_data_dir", "--dataset_config"])
def test_prior_loss_weight_weights_kohya_regularisation_images_without_a_warning(tmp_path, caplog, kohya):
    caplog.set_level(logging.WARNING)
    checked(kohya, tmp_path, "--prior_loss_weight", "0.5")
    assert warnings_of(caplog) == []
    checked(kohya, tmp_path, "--prior_loss_weight", "0.5", "--class_prompt", "a dog")
    assert warnings_of(caplog) == ["--class_prompt: unused without --with_prior_preservation"]


def test_prior_preservation_needs_a_class_folder_with_enough_images_or_a_class_prompt(tmp_path):
    assert refusal("--with_prior_preservation") == (
        "--with_prior_preservation needs --class_data_dir (a folder of class images; the missing ones are "
        "generated there with --class_prompt)"
    )
    classes = tmp_path / "class"
    for index in range(3):
        picture(classes / f"{index}.png")
    assert refusal("--with_prior_preservation", "--class_data_dir", classes, "--num_class_images", "4") == (
        f"--class_data_dir {classes} holds 3 images, fewer than --num_class_images 4: give --class_prompt to "
        "generate the rest, or lower --num_class_images"
    )
    # Exactly enough: no --class_prompt needed, and the instance folder is not checked (nothing to generate).
    missing = tmp_path / "missing"
    checked("--with_prior_preservation", "--class_data_dir", classes, "--num_class_images", "3",
            "--train_data_dir", missing)  # fmt: skip


def test_before_generating_class_images_a_missing_instance_folder_is_refused(tmp_path):
    classes, missing = tmp_path / "class", tmp_path / "missing"
    argv = ["--with_prior_preservation", "--class_data_dir", classes, "--class_prompt", "a dog"]
    assert refusal(*argv, "--train_data_dir", missing) == (
        f"--train_data_dir {missing} does not exist: pass a folder of images"
    )
    assert refusal(*argv, "--instance_data_dir", missing) == (
        f"--instance_data_dir {missing} does not exist: pass a folder of images"
    )
    checked(*argv, "--train_data_dir", missing, "--dataset_config", tmp_path / "c.toml")  # the config names the data
    checked(*argv)  # no folder given (--dataset_name): nothing to check


def test_the_instance_folder_check_reads_captions_as_training_will(tmp_path):
    folder = tmp_path / "instance"
    picture(folder / "dog.png")
    (folder / "dog.caption").write_text("a sks dog")
    base = ["--with_prior_preservation", "--class_data_dir", tmp_path / "class", "--class_prompt", "a dog"]
    assert refusal(*base, "--train_data_dir", folder) == (
        f"1 of 1 images in --train_data_dir {folder} have no caption file (.txt), the first {folder / 'dog.png'}: "
        "add caption files, put them in a '<repeats>_<class tokens>' subfolder, give a metadata.jsonl, or "
        "caption them all with --instance_prompt"
    )
    checked(*base, "--train_data_dir", folder, "--caption_extension", ".caption")
    checked(*base, "--train_data_dir", folder, "--instance_prompt", "a sks dog")


# --- the class images as rows ---


def test_caption_strings_become_lists_of_one_alternative():
    import datasets

    images = datasets.Dataset.from_dict({"image": ["a.png", "b.png"], "text": ["a dog", "a cat"]})
    joined = dreambooth.with_caption_lists(images, "text")
    assert joined["text"] == [["a dog"], ["a cat"]] and joined["image"] == ["a.png", "b.png"]
    lists = datasets.Dataset.from_dict({"image": ["a.png"], "text": [["a dog", "a puppy"]]})
    assert dreambooth.with_caption_lists(lists, "text")["text"] == [["a dog", "a puppy"]]


def class_args(tmp_path, **overrides) -> argparse.Namespace:
    values = dict(
        with_prior_preservation=True, class_data_dir=str(tmp_path / "class"), class_prompt="a dog",
        num_class_images=2, caption_extension=None, seed=0,
    )  # fmt: skip
    return argparse.Namespace(**(values | overrides))


def test_class_rows_are_the_first_num_class_images_captioned_by_class_prompt_or_their_file(tmp_path):
    classes = tmp_path / "class"
    for name in ("c.png", "a.png", "b.png"):
        picture(classes / name)
    (classes / "a.txt").write_text("a brown dog")
    (classes / "b.caption").write_text("a black dog")
    rows = dreambooth.class_rows(class_args(tmp_path), ["img", "cap"], (None, 0))
    assert rows.column_names == ["img", "cap", "repeats"]
    assert [Path(r["path"]).name for r in rows["img"]] == ["a.png", "b.png"]
    assert rows["cap"] == [["a brown dog"], ["a dog"]] and rows["repeats"] == [1, 1]
    args = class_args(tmp_path, caption_extension=".caption", num_class_images=3)
    rows = dreambooth.class_rows(args, ["img", "cap"], (None, 0))
    assert rows["cap"] == [["a dog"], ["a black dog"], ["a dog"]]
    assert dreambooth.class_rows(class_args(tmp_path, with_prior_preservation=False), ["img", "cap"], (None, 0)) is None


def test_class_rows_refusals_name_the_class_folder_and_flag(tmp_path):
    classes = tmp_path / "class"
    picture(classes / "a.png")
    args = class_args(tmp_path, class_prompt=None)
    with pytest.raises(UserError) as refused:
        dreambooth.class_rows(args, ["img", "cap"], (None, 0))
    assert str(refused.value) == (
        f"1 of 1 images in --class_data_dir {classes} have no caption file (.txt), the first {classes / 'a.png'}: "
        "add caption files, put them in a '<repeats>_<class tokens>' subfolder, give a metadata.jsonl, or "
        "caption them all with --class_prompt"
    )
    (classes / "a.png").write_bytes(b"not an image")
    with pytest.raises(UserError) as refused:
        dreambooth.class_rows(class_args(tmp_path), ["img", "cap"], (None, 0))
    assert str(refused.value) == f"--class_data_dir {classes} has no readable images"


def test_class_images_are_scanned_into_the_cache_dir_once(tmp_path):
    picture(tmp_path / "class" / "a.png")
    cache = tmp_path / "cache"
    cache.mkdir()
    rows = dreambooth.class_rows(class_args(tmp_path, num_class_images=1), ["img", "cap"], (str(cache), 0))
    assert len(rows) == 1 and [p.name for p in cache.iterdir()] == ["image-scan.json"]
