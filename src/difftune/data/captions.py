"""Captions: choosing one of several, kohya's caption processing, and tokenizing for the text encoders.

Processing is kohya sd-scripts' `process_caption`, step for step and draw for draw (each draw from an RNG
the caller derives from (seed, epoch, sample index) or from a caption variant, in the order kohya draws
from the global `random`): the whole caption dropped (`CaptionOptions.drops`), else (`CaptionOptions.apply`)
prefix and suffix added with a space, `{a|b}` wildcards chosen, and, when tags are shuffled, dropped or
warmed up, the caption split on `separator` into fixed and free tags, the free ones truncated, shuffled
and dropped, and all joined with ", " (always, as kohya); last the secondary separator becomes `separator`.

`CaptionOptions.apply` works on one line: a caption file's lines are alternatives only with
`enable_wildcard` (else the first line is the caption), and `pick_caption` chooses one.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from difftune.cli.errors import UserError

if TYPE_CHECKING:  # (the flags import this module: --help must not load torch)
    import torch


class Tokenize:
    """Captions to fixed-length token ids for one or more tokenizers (picklable for workers)."""

    def __init__(self, tokenizers: dict[str, object], attention_mask: bool = False) -> None:
        self.tokenizers = tokenizers
        self.attention_mask = attention_mask

    def __call__(self, caption: str) -> dict[str, torch.Tensor]:
        out = {}
        for name, tokenizer in self.tokenizers.items():
            tokens = tokenizer(
                caption,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            out[f"{name}_input_ids"] = tokens.input_ids[0]
            if self.attention_mask:
                out[f"{name}_attention_mask"] = tokens.attention_mask[0]
        return out


def pick_caption(value, rng: random.Random) -> str:
    """A caption column holds a string or a list of strings (alternatives: one is chosen with `rng`)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value:
        return value[0] if len(value) == 1 else rng.choice(value)
    raise UserError(f"caption column holds {type(value).__name__} values; captions must be strings or lists of them")


# kohya's wildcard: `{a|b|c}` is one of a, b, c; `{{` and `}}` are literal braces.
WILDCARD = re.compile(r"\{([^}]+)\}")


def choose_wildcards(caption: str, rng: random.Random) -> str:
    """`caption` with each `{a|b|...}` replaced by one alternative, left to right (one draw each)."""
    # Escaped braces are parked in characters the caption lacks while the wildcards are replaced.
    open_mark, close_mark = "\ue000", "\ue001"
    while open_mark in caption or close_mark in caption:
        open_mark, close_mark = open_mark + "\ue000", close_mark + "\ue001"
    caption = caption.replace("{{", open_mark).replace("}}", close_mark)
    caption = WILDCARD.sub(lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(open_mark, "{").replace(close_mark, "}")


@dataclass(frozen=True)
class CaptionOptions:
    """How a caption is processed before tokenizing (flags --caption_* / --keep_tokens / --shuffle_caption /
    --token_warmup_* / ..., or a --dataset_config subset's keys), with kohya's meanings and defaults."""

    prefix: str = ""
    suffix: str = ""
    dropout_rate: float = 0.0
    separator: str = ","
    keep_tokens: int = 0
    shuffle: bool = False
    tag_dropout_rate: float = 0.0
    # Text before its first occurrence is fixed tags, after a second one fixed suffix tags (keep_tokens unused).
    keep_tokens_separator: str = ""
    secondary_separator: str = ""  # becomes `separator` after the tag operations (a tag that holds separators)
    enable_wildcard: bool = False  # `{a|b}` is a drawn choice; a caption file's lines are alternatives
    # kohya's caption_dropout_every_n_epochs: every n-th epoch trains on "" (epochs counted from 1).
    dropout_every_n_epochs: int = 0
    # Token warm-up: the free tags kept grow linearly from token_warmup_min at step 0 to all of them at step
    # token_warmup_step (a value < 1: that share of the training's steps).
    token_warmup_min: int = 1
    token_warmup_step: float = 0

    @property
    def is_random(self) -> bool:
        """Whether the processed text depends on a draw (and so needs caption variants to be cached)."""
        return self.shuffle or self.tag_dropout_rate > 0 or self.enable_wildcard

    @property
    def depends_on_step(self) -> bool:
        """Whether the processed text depends on the training step (token warm-up: it cannot be cached)."""
        return self.token_warmup_step > 0

    def drops(self, epoch: int, rng: random.Random) -> bool:
        """Whether the whole caption trains as "" in this 0-based `epoch` (kohya's epoch is ours + 1: its
        training loops set current_epoch to epoch + 1). Draws once, and only when dropout_rate > 0, as kohya."""
        if self.dropout_rate > 0 and rng.random() < self.dropout_rate:
            return True
        return self.dropout_every_n_epochs > 0 and (epoch + 1) % self.dropout_every_n_epochs == 0

    def warmup_steps(self, max_steps: int) -> float:
        """The step at which token warm-up ends (0: no warm-up); a share < 1 needs the training's `max_steps`."""
        if self.token_warmup_step >= 1:
            return self.token_warmup_step
        if self.token_warmup_step > 0 and max_steps <= 0:
            raise ValueError("token_warmup_step < 1 is a share of max_steps: pass max_steps to CaptionOptions.apply")
        return math.floor(self.token_warmup_step * max_steps)

    def apply(self, caption: str, rng: random.Random | None, step: int = 0, max_steps: int = 0) -> str:
        """The caption processed as kohya's process_caption after its dropout decision (see `drops`), at
        optimizer step `step` of `max_steps`; `rng` may be None when `is_random` is False."""
        if self.prefix:
            caption = f"{self.prefix} {caption}"
        if self.suffix:
            caption = f"{caption} {self.suffix}"
        if self.enable_wildcard:
            caption = choose_wildcards(caption, rng)
        if self.shuffle or self.tag_dropout_rate > 0 or self.token_warmup_step > 0:
            caption = self.process_tags(caption, rng, step, max_steps)
        if self.secondary_separator:
            caption = caption.replace(self.secondary_separator, self.separator)
        return caption

    def process_tags(self, caption: str, rng: random.Random | None, step: int, max_steps: int) -> str:
        """kohya's tag operations: fixed tags, warm-up, shuffle, then tag dropout, joined with ", "."""
        fixed, free, fixed_suffix = self.split_tags(caption)
        warmup = self.warmup_steps(max_steps)
        if warmup and step < warmup:
            # kohya's float expression, in its order, so the count rounds as kohya's does.
            free = free[: math.floor(step * ((len(free) - self.token_warmup_min) / warmup)) + self.token_warmup_min]
        if self.shuffle:
            rng.shuffle(free)
        if self.tag_dropout_rate > 0:
            free = [tag for tag in free if rng.random() >= self.tag_dropout_rate]
        return ", ".join(fixed + free + fixed_suffix)

    def split_tags(self, caption: str) -> tuple[list[str], list[str], list[str]]:
        """The caption's fixed, free and fixed-suffix tags."""
        marker = self.keep_tokens_separator
        if marker and marker in caption:
            # Here empty tags are left out; the keep_tokens form below keeps them, as kohya does.
            fixed_part, free_part = caption.split(marker, 1)
            free_part, _, suffix_part = free_part.partition(marker)
            return self.tags_of(fixed_part), self.tags_of(free_part), self.tags_of(suffix_part)
        tags = [tag.strip() for tag in caption.strip().split(self.separator)]
        return tags[: self.keep_tokens], tags[self.keep_tokens :], []

    def tags_of(self, text: str) -> list[str]:
        return [tag.strip() for tag in text.split(self.separator) if tag.strip()]


def options_from_args(args) -> CaptionOptions:
    """The caption processing the command-line flags ask for (flags a command lacks keep kohya's defaults)."""
    return CaptionOptions(
        prefix=args.caption_prefix,
        suffix=args.caption_suffix,
        dropout_rate=args.caption_dropout_rate,
        separator=args.caption_separator,
        keep_tokens=args.keep_tokens,
        shuffle=args.shuffle_caption,
        tag_dropout_rate=args.caption_tag_dropout_rate,
        keep_tokens_separator=getattr(args, "keep_tokens_separator", ""),
        secondary_separator=getattr(args, "secondary_separator", ""),
        enable_wildcard=getattr(args, "enable_wildcard", False),
        dropout_every_n_epochs=getattr(args, "caption_dropout_every_n_epochs", 0),
        token_warmup_min=getattr(args, "token_warmup_min", 1),
        token_warmup_step=getattr(args, "token_warmup_step", 0),
    )


def variant_rng(seed: int, caption: str, variant: int) -> random.Random:
    """The RNG of a caption's `variant`-th processed form (--caption_variants): the same for every sample
    with this caption, so the variants can be encoded once."""
    return random.Random(f"{seed}:variant:{variant}:{caption}")


def add_caption_args(parser) -> None:
    """Caption files and kohya's caption processing (also the keys of a --dataset_config subset)."""
    group = parser.add_argument_group("captions (kohya's semantics, in this order)")
    group.add_argument(
        "--caption_extension",
        default=None,
        help="Caption files beside the images: <stem><ext>; default .txt (.caption in a --dataset_config, as kohya).",
    )
    group.add_argument("--caption_prefix", default="", help="Put before every caption (with a space).")
    group.add_argument("--caption_suffix", default="", help="Put after every caption (with a space).")
    group.add_argument("--caption_dropout_rate", type=float, default=0.0, help="Train this share of samples as ''.")
    group.add_argument(
        "--caption_separator",
        default=",",
        help="What separates a caption's tags (processed tags are joined with ', ', as kohya).",
    )
    group.add_argument("--keep_tokens", type=int, default=0, help="The first N tags stay in place.")
    group.add_argument("--shuffle_caption", action="store_true", help="Shuffle the other tags per sample and epoch.")
    group.add_argument("--caption_tag_dropout_rate", type=float, default=0.0, help="Drop each other tag this often.")
    group.add_argument(
        "--keep_tokens_separator",
        default="",
        help="Tags before it stay in place (instead of --keep_tokens); after a second one, a fixed suffix.",
    )
    group.add_argument(
        "--secondary_separator", default="", help="Becomes --caption_separator after shuffling (keeps tags together)."
    )
    group.add_argument(
        "--enable_wildcard",
        action="store_true",
        help="{a|b|c} is a random choice ({{ and }} are braces); each line of a caption file is an alternative.",
    )
    group.add_argument(
        "--caption_dropout_every_n_epochs",
        type=int,
        default=0,
        help="Train every caption as '' in every N-th epoch (epochs counted from 1).",
    )
    group.add_argument(
        "--token_warmup_min", type=int, default=1, help="Token warm-up: the other tags kept at step 0 (>= 1)."
    )
    group.add_argument(
        "--token_warmup_step",
        type=float,
        default=0,
        help="Token warm-up: all tags kept from this step on (< 1: that share of the training's steps); 0: off.",
    )
    group.add_argument(
        "--caption_variants",
        type=int,
        default=0,
        help="K seeded processed forms per caption, one drawn per sample and epoch (needed to cache text "
        "embeddings with shuffling or tag dropout).",
    )


def extension_with_dot(extension: str) -> str:
    """A caption extension as kohya reads it: `txt` is `.txt` (an empty one stays empty)."""
    return extension if not extension or extension.startswith(".") else f".{extension}"


def check_caption_args(args) -> None:
    """One-line errors for out-of-range caption flags; `--caption_extension txt` becomes `.txt`, as kohya."""
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UserError(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    for name, low in (
        ("keep_tokens", 0),
        ("caption_variants", 0),
        ("caption_dropout_every_n_epochs", 0),
        ("token_warmup_min", 1),
        ("token_warmup_step", 0),
    ):
        if getattr(args, name, low) < low:
            raise UserError(f"--{name} must be >= {low}, got {getattr(args, name)}")
    if args.caption_extension is not None:
        args.caption_extension = extension_with_dot(args.caption_extension)
