"""Captions: choosing one of several, kohya's caption processing, and tokenizing for the text encoders.

Processing follows kohya's order: prefix and suffix added (each with a space), the caption dropped
whole at `dropout_rate`, else split on `separator`; the first `keep_tokens` tags stay in place, the rest
are shuffled (`shuffle`) and each dropped at `tag_dropout_rate`; the tags are joined with separator + space.
Every draw comes from an RNG the caller derives from (seed, epoch, sample index) or from a caption variant.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from difftune.cli.errors import UserError


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


@dataclass(frozen=True)
class CaptionOptions:
    """How a caption is processed before tokenizing (flags --caption_* / --keep_tokens / --shuffle_caption,
    or a --dataset_config subset's keys)."""

    prefix: str = ""
    suffix: str = ""
    dropout_rate: float = 0.0
    separator: str = ","
    keep_tokens: int = 0
    shuffle: bool = False
    tag_dropout_rate: float = 0.0

    @property
    def is_random(self) -> bool:
        """Whether the tags' order or presence is drawn (and so needs caption variants to be cached)."""
        return self.shuffle or self.tag_dropout_rate > 0

    def apply(self, caption: str, rng: random.Random | None) -> str:
        """The caption with prefix, suffix and the tag operations (the whole-caption dropout is the caller's)."""
        if self.prefix:
            caption = f"{self.prefix} {caption}"
        if self.suffix:
            caption = f"{caption} {self.suffix}"
        if not self.is_random:
            return caption
        tags = [tag.strip() for tag in caption.strip().split(self.separator)]
        fixed, free = tags[: self.keep_tokens], tags[self.keep_tokens :]
        if self.shuffle:
            rng.shuffle(free)
        if self.tag_dropout_rate > 0:
            free = [tag for tag in free if rng.random() >= self.tag_dropout_rate]
        return f"{self.separator} ".join(fixed + free)


def options_from_args(args) -> CaptionOptions:
    """The caption processing the command-line flags ask for."""
    return CaptionOptions(
        prefix=args.caption_prefix,
        suffix=args.caption_suffix,
        dropout_rate=args.caption_dropout_rate,
        separator=args.caption_separator,
        keep_tokens=args.keep_tokens,
        shuffle=args.shuffle_caption,
        tag_dropout_rate=args.caption_tag_dropout_rate,
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
    group.add_argument("--caption_separator", default=",", help="What separates a caption's tags.")
    group.add_argument("--keep_tokens", type=int, default=0, help="The first N tags stay in place.")
    group.add_argument("--shuffle_caption", action="store_true", help="Shuffle the other tags per sample and epoch.")
    group.add_argument("--caption_tag_dropout_rate", type=float, default=0.0, help="Drop each other tag this often.")
    group.add_argument(
        "--caption_variants",
        type=int,
        default=0,
        help="K seeded processed forms per caption, one drawn per sample and epoch (needed to cache text "
        "embeddings with shuffling or tag dropout).",
    )


def check_caption_args(args) -> None:
    for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise UserError(f"--{name} must be in [0, 1], got {getattr(args, name)}")
    if args.keep_tokens < 0 or args.caption_variants < 0:
        raise UserError("--keep_tokens and --caption_variants must be >= 0")
    if args.caption_extension is not None and not args.caption_extension.startswith("."):
        raise UserError(f"--caption_extension {args.caption_extension} must start with a dot, e.g. .txt")
