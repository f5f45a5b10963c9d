"""Small fast tests written for the mutants `make mutation-auto` found alive in data/captions.py (docs/mutation.md):
kohya's caption rules at the edges of their ranges, the flags' defaults and types, and the token ids the text
encoders get. Expected values are kohya's (library/train_util.py's process_caption) and CLIP's."""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import pytest

from difftune.cli.errors import UserError
from difftune.data.captions import (
    CaptionOptions,
    Tokenize,
    add_caption_args,
    check_caption_args,
    choose_wildcards,
    extension_with_dot,
    options_from_args,
    pick_caption,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from tiny_assets.clip import BOS, EOS, byte_to_unicode, clip_tokenizer


class Draws:
    """An RNG whose every draw is `value`: a draw that lands exactly on a rate."""

    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_caption_args(parser)
    return parser.parse_args(argv)


# --- picking one caption of a column ---


def test_one_alternative_is_taken_without_a_draw_and_two_are_drawn():
    rng = random.Random(0)
    assert pick_caption("a cat", rng) == "a cat"
    assert pick_caption(["only"], rng) == "only"
    assert rng.random() == random.Random(0).random(), "a single caption must not use up a draw"
    picks = {pick_caption(["first", "second"], random.Random(seed)) for seed in range(20)}
    assert picks == {"first", "second"}
    assert [pick_caption(["x", "y", "z"], random.Random(s)) for s in range(5)] == [
        random.Random(s).choice(["x", "y", "z"]) for s in range(5)
    ]


@pytest.mark.parametrize("value, named", [([], "list"), (3, "int"), (None, "NoneType")])
def test_a_caption_column_of_other_values_is_refused_naming_their_type(value, named):
    with pytest.raises(UserError, match=rf"^caption column holds {named} values; captions must be strings or lists"):
        pick_caption(value, random.Random(0))


# --- wildcards ---


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a\ue000b {{c}} {d|d}", "a\ue000b {c} d"),  # the caption holds the first parking character
        ("a\ue001b {{c}}", "a\ue001b {c}"),  # the second
        ("\ue000\ue001 {{c}} {e}", "\ue000\ue001 {c} e"),  # both: other parking characters are needed
    ],
)
def test_escaped_braces_survive_captions_that_hold_private_use_characters(caption, expected):
    assert choose_wildcards(caption, random.Random(0)) == expected


# --- dropout, warm-up and tag dropout at their edges (kohya: drop if draw < rate, keep a tag if draw >= rate) ---


def test_a_draw_equal_to_the_rate_keeps_the_caption_and_the_tag():
    assert not CaptionOptions(dropout_rate=0.5).drops(0, Draws(0.5))
    assert CaptionOptions(dropout_rate=0.5).drops(0, Draws(0.49))
    tags = CaptionOptions(tag_dropout_rate=0.25)
    assert tags.apply("a, b, c", Draws(0.25)) == "a, b, c"
    assert tags.apply("a, b, c", Draws(0.24)) == ""


@pytest.mark.parametrize("every, dropped", [(1, [0, 1, 2, 3, 4, 5]), (3, [2, 5]), (0, [])])
def test_every_nth_epoch_counted_from_one_trains_on_empty_captions(every, dropped):
    options = CaptionOptions(dropout_every_n_epochs=every)
    assert [epoch for epoch in range(6) if options.drops(epoch, random.Random(0))] == dropped


def test_a_warm_up_of_one_step_or_more_is_a_step_and_below_one_a_share():
    assert CaptionOptions(token_warmup_step=1).warmup_steps(100) == 1
    assert CaptionOptions(token_warmup_step=1.5).warmup_steps(100) == 1.5
    assert CaptionOptions(token_warmup_step=0.5).warmup_steps(1) == 0
    assert CaptionOptions(token_warmup_step=0.5).warmup_steps(10) == 5
    assert CaptionOptions().warmup_steps(0) == 0
    for max_steps in (0, -1):
        with pytest.raises(ValueError, match=r"^token_warmup_step < 1 is a share of max_steps: pass max_steps to Cap"):
            CaptionOptions(token_warmup_step=0.5).warmup_steps(max_steps)


def test_warm_up_starts_at_step_zero_and_needs_the_step_count_for_a_share():
    caption = ", ".join("abcdefghijk")  # 11 tags
    assert CaptionOptions(token_warmup_step=10).apply(caption, None) == "a"  # step 0: token_warmup_min tags
    with pytest.raises(ValueError):
        CaptionOptions(token_warmup_step=0.5).apply(caption, None)


def test_at_the_warm_up_step_every_tag_is_kept():
    # 49 * (1 / 49) is 0.999...: kohya's expression would drop a tag, but warm-up is over at that step.
    assert CaptionOptions(token_warmup_step=49).apply("a, b", None, step=49) == "a, b"
    assert CaptionOptions(token_warmup_step=49).apply("a, b", None, step=48) == "a"


# --- flags: defaults, types, conversions and refusals ---


def test_omitted_flags_are_kohyas_defaults():
    args = parse([])
    assert options_from_args(args) == CaptionOptions()
    assert (args.caption_extension, args.caption_variants) == (None, 0)
    check_caption_args(args)
    assert args.caption_extension is None


def test_every_flag_reaches_the_caption_options_with_its_type():
    args = parse(
        ["--caption_prefix=p", "--caption_suffix", "s", "--caption_dropout_rate", "0.5", "--caption_separator", ";",
         "--keep_tokens", "2", "--shuffle_caption", "--caption_tag_dropout_rate", "0.25",
         "--keep_tokens_separator", "|||", "--secondary_separator", ";;;", "--enable_wildcard",
         "--caption_dropout_every_n_epochs", "3", "--token_warmup_min", "2", "--token_warmup_step", "0.5",
         "--caption_variants", "4", "--caption_extension", "txt"]
    )  # fmt: skip
    expected = CaptionOptions(
        prefix="p", suffix="s", dropout_rate=0.5, separator=";", keep_tokens=2, shuffle=True, tag_dropout_rate=0.25,
        keep_tokens_separator="|||", secondary_separator=";;;", enable_wildcard=True, dropout_every_n_epochs=3,
        token_warmup_min=2, token_warmup_step=0.5,
    )  # fmt: skip
    assert options_from_args(args) == expected
    types = {name: type(getattr(args, name)) for name in ("keep_tokens", "caption_variants", "token_warmup_min")}
    assert types == dict.fromkeys(types, int)
    assert (
        type(args.caption_dropout_rate) is type(args.caption_tag_dropout_rate) is type(args.token_warmup_step) is float
    )
    check_caption_args(args)
    assert args.caption_extension == ".txt"


@pytest.mark.parametrize("given, read", [("txt", ".txt"), (".txt", ".txt"), ("", ""), (".caption", ".caption")])
def test_a_caption_extension_gets_its_dot_as_kohya(given, read):
    assert extension_with_dot(given) == read


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--caption_dropout_rate", "1.5"], "--caption_dropout_rate must be in [0, 1], got 1.5"),
        (["--caption_tag_dropout_rate", "-0.1"], "--caption_tag_dropout_rate must be in [0, 1], got -0.1"),
        (["--keep_tokens", "-1"], "--keep_tokens must be >= 0, got -1"),
        (["--caption_variants", "-1"], "--caption_variants must be >= 0, got -1"),
        (["--caption_dropout_every_n_epochs", "-2"], "--caption_dropout_every_n_epochs must be >= 0, got -2"),
        (["--token_warmup_min", "0"], "--token_warmup_min must be >= 1, got 0"),
        (["--token_warmup_step", "-0.5"], "--token_warmup_step must be >= 0, got -0.5"),
    ],
)
def test_out_of_range_caption_flags_are_one_line_errors(argv, message):
    with pytest.raises(UserError) as error:
        check_caption_args(parse(argv))
    assert str(error.value) == message


def test_rates_of_exactly_zero_and_one_are_accepted():
    check_caption_args(parse(["--caption_dropout_rate", "1", "--caption_tag_dropout_rate", "0"]))


def test_a_command_without_some_caption_flags_is_checked_on_the_others():
    args = argparse.Namespace(
        caption_dropout_rate=0.0, caption_tag_dropout_rate=0.0, keep_tokens=0, caption_extension=None
    )  # (a command without --caption_variants, --token_warmup_*, ...)
    check_caption_args(args)


# --- token ids for the text encoders (CLIP: BOS 49406, EOS 49407, 77 positions) ---


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """CLIP's tokenizer on CLIP's byte alphabet without merges (one token per letter: quick to build), its start
    and end tokens at CLIP's ids."""
    folder = tmp_path_factory.mktemp("clip")
    alphabet = list(byte_to_unicode().values())
    vocab = {token: i for i, token in enumerate(alphabet + [t + "</w>" for t in alphabet])} | {BOS: 49406, EOS: 49407}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    files = (folder / "vocab.json", folder / "merges.txt")
    return {"one": clip_tokenizer(files, EOS), "two": clip_tokenizer(files, "!")}


def test_captions_become_77_padded_and_truncated_ids_per_tokenizer(tokenizers):
    out = Tokenize(tokenizers)("a b c d e")
    assert set(out) == {"one_input_ids", "two_input_ids"}
    one, two = out["one_input_ids"].tolist(), out["two_input_ids"].tolist()
    assert len(one) == len(two) == 77
    words = one[1 : one.index(49407)]
    assert one[0] == 49406 and len(words) == 5 and one[6:] == [49407] * 71  # the first pads with its end token
    assert two[:7] == one[:7] and two[7:] == [0] * 70  # the second with "!" (id 0)
    long = Tokenize(tokenizers)(" ".join(["c"] * 100))["one_input_ids"].tolist()
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


def test_attention_masks_only_when_asked(tokenizers):
    masks = Tokenize(tokenizers, attention_mask=True)("a b c d e")
    assert masks["one_attention_mask"].tolist() == [1] * 7 + [0] * 70
    assert masks["two_attention_mask"].tolist() == [1] * 7 + [0] * 70
    assert not any("mask" in key for key in Tokenize(tokenizers)("a b"))
