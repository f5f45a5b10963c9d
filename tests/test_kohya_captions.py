"""Caption processing and caption files hold kohya sd-scripts' rules.

Every expected string is a literal: what kohya's `process_caption` returns after `random.seed(seed)` (worked
out once with kohya's own code), so our processing with `random.Random(seed)` must draw as kohya draws.
"""

from __future__ import annotations

import argparse
import random
import shlex

import pytest

from difftune.cli.errors import UserError
from difftune.data.captions import (
    CaptionOptions,
    add_caption_args,
    check_caption_args,
    options_from_args,
    pick_caption,
)
from difftune.data.folders import caption_file_for, read_caption_file

TAGS = "a, b, c, d, e, f"


def processed(options: CaptionOptions, caption: str, seed: int, epoch: int = 0, step: int = 0, max_steps: int = 0):
    """kohya's process_caption: the dropout decision, then the processing, drawing from one RNG."""
    rng = random.Random(seed)
    return "" if options.drops(epoch, rng) else options.apply(caption, rng, step=step, max_steps=max_steps)


@pytest.mark.parametrize(
    ("options", "caption", "seed", "expected"),
    [
        # kohya joins processed tags with ", " whatever the separator; untouched captions keep theirs.
        (CaptionOptions(shuffle=True, separator=";"), "a;b;c;d", 0, "c, a, b, d"),
        (CaptionOptions(separator=";"), "a;b; c", 0, "a;b; c"),
        (CaptionOptions(shuffle=True, keep_tokens=1), "sks, a, b, c, d", 1, "sks, d, a, c, b"),
        # keep_tokens_separator: fixed tags before it, a fixed suffix after a second one (keep_tokens unused).
        (
            CaptionOptions(shuffle=True, keep_tokens_separator="|||", keep_tokens=5),
            "sks dog, 1girl ||| a, b, c, d ||| best quality, 4k",
            2,
            "sks dog, 1girl, b, c, d, a, best quality, 4k",
        ),
        (CaptionOptions(shuffle=True, keep_tokens_separator="|||"), "sks ||| a, , b, c", 3, "sks, b, c, a"),
        # The secondary separator keeps "b^c" one tag, then becomes the separator (in or out of the tag branch).
        (CaptionOptions(shuffle=True, secondary_separator="^"), "a, b^c, d, e", 4, "d, a, e, b,c"),
        (CaptionOptions(secondary_separator="^"), "a^b, c", 4, "a,b, c"),
        (
            CaptionOptions(enable_wildcard=True),
            "a {red|blue|green} ball, {{literal}}, {x|y}",
            5,
            "a green ball, {literal}, y",
        ),
        (CaptionOptions(), "a {red|blue} ball", 5, "a {red|blue} ball"),
        (CaptionOptions(enable_wildcard=True, shuffle=True), "x, {{a}}, y", 0, "x, y, {a}"),
        (CaptionOptions(tag_dropout_rate=0.5, keep_tokens=1), TAGS, 6, "a, b, c"),
        (CaptionOptions(tag_dropout_rate=0.3, shuffle=True), TAGS, 7, "a, f, b"),
        (
            CaptionOptions(prefix="photo of", suffix="end", keep_tokens=1, shuffle=True),
            "sks, a, b, c",
            9,
            "photo of sks, a, c end, b",
        ),
        (CaptionOptions(prefix="photo of", suffix="end", separator=";"), "a;b", 9, "photo of a;b end"),
        # The caption dropout draw (rate > 0 only) comes before the shuffle's: it changes the order.
        (CaptionOptions(dropout_rate=0.1, shuffle=True), "a, b, c, d", 10, "c, a, b, d"),
        (CaptionOptions(shuffle=True), "a, b, c, d", 10, "d, c, b, a"),
        (CaptionOptions(dropout_rate=0.5), "a, b", 1, ""),
        (CaptionOptions(dropout_rate=0.5), "a, b", 2, "a, b"),
    ],
)
def test_processing_matches_kohya(options, caption, seed, expected):
    assert processed(options, caption, seed) == expected


@pytest.mark.parametrize(
    ("options", "caption", "step", "max_steps", "expected"),
    [
        # From token_warmup_min free tags at step 0 to all at token_warmup_step: floor(step * (n - min) / w) + min.
        (CaptionOptions(token_warmup_step=10), TAGS, 0, 0, "a"),
        (CaptionOptions(token_warmup_step=10), TAGS, 5, 0, "a, b, c"),
        (CaptionOptions(token_warmup_step=10), TAGS, 9, 0, "a, b, c, d, e"),
        (CaptionOptions(token_warmup_step=10), TAGS, 10, 0, TAGS),
        (CaptionOptions(token_warmup_step=10, token_warmup_min=2, keep_tokens=1), "k, " + TAGS, 3, 0, "k, a, b, c"),
        # A token_warmup_step < 1 is that share of the training's steps (floor): 0.5 of 20 is 10.
        (CaptionOptions(token_warmup_step=0.5), TAGS, 5, 20, "a, b, c"),
        (CaptionOptions(token_warmup_step=0.5), TAGS, 10, 20, TAGS),
        (CaptionOptions(token_warmup_step=10, shuffle=True), TAGS, 4, 0, "c, b, a"),  # truncated, then shuffled
    ],
)
def test_token_warmup_matches_kohya(options, caption, step, max_steps, expected):
    seed = 8 if options.shuffle else 0
    assert processed(options, caption, seed, step=step, max_steps=max_steps) == expected
    assert options.depends_on_step and not CaptionOptions(shuffle=True).depends_on_step


def test_dropout_every_n_epochs_counts_epochs_from_one():
    options = CaptionOptions(dropout_every_n_epochs=2)
    # Our epochs 1 and 3 are kohya's 2 and 4.
    assert [processed(options, "a, b", 0, epoch=epoch) for epoch in range(5)] == ["a, b", "", "a, b", "", "a, b"]


def test_wildcard_lines_are_picked_before_the_wildcards():
    options = CaptionOptions(enable_wildcard=True)
    rng = random.Random(0)
    assert not options.drops(0, rng)
    assert options.apply(pick_caption(["a {b|c}", "d {e|f}", "g"], rng), rng) == "d f"
    assert options.is_random and not CaptionOptions(token_warmup_step=10).is_random


def test_caption_flags():
    parser = argparse.ArgumentParser()
    add_caption_args(parser)
    args = parser.parse_args(
        shlex.split(
            "--caption_extension txt --keep_tokens_separator ||| --secondary_separator ^ --enable_wildcard "
            "--caption_dropout_every_n_epochs 3 --token_warmup_min 2 --token_warmup_step 0.25"
        )
    )
    check_caption_args(args)
    assert args.caption_extension == ".txt"  # kohya's normalisation
    assert options_from_args(args) == CaptionOptions(
        keep_tokens_separator="|||",
        secondary_separator="^",
        enable_wildcard=True,
        dropout_every_n_epochs=3,
        token_warmup_min=2,
        token_warmup_step=0.25,
    )
    for flag, value in (("--token_warmup_min", "0"), ("--caption_dropout_every_n_epochs", "-1")):
        with pytest.raises(UserError, match=f"{flag} must be >= "):
            check_caption_args(parser.parse_args([flag, value]))


def test_caption_files_read_as_kohya(tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text(" first, line \n\nsecond\r\nthird\n", encoding="utf-8")
    assert read_caption_file(lines) == ["first, line"]
    assert read_caption_file(lines, all_lines=True) == ["first, line", "second", "third"]
    blank_first = tmp_path / "blank_first.txt"
    blank_first.write_text("\nsecond\n", encoding="utf-8")
    assert read_caption_file(blank_first) == [""]  # kohya: lines[0].strip()
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffsks dog\n".encode())
    assert read_caption_file(bom) == ["sks dog"]
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match=r"empty.txt is empty: write a caption in it or delete it"):
        read_caption_file(empty)


def test_face_crop_images_share_their_source_caption():
    names = {"photo.txt", "my_photo.txt", "photo_1_2_3_4.txt", "a.txt"}
    assert caption_file_for(names, "photo_1_2_3_4.png", ".txt") == "photo_1_2_3_4.txt"  # its own file first
    assert caption_file_for(names, "photo_0_0_64_64.png", ".txt") == "photo.txt"
    assert caption_file_for(names, "my_photo_0_0_64_64.jpg", ".txt") == "my_photo.txt"
    assert caption_file_for(names, "a_b_c_d.png", ".txt") is None  # 4 parts: not a face crop
    assert caption_file_for(names, "a.png", ".caption") is None
