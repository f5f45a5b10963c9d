"""Captions: choosing one of several, and tokenizing for one or more tokenizers."""

from __future__ import annotations

import random

import torch

from difftune.errors import UserError


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


def pick_caption(value, rng: random.Random | None) -> str:
    """A caption column holds a string or a list of strings (then one is chosen at random)."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and value:
        if rng is None:
            raise UserError("--cache_text_embeddings needs one caption per image; this data set has lists of them")
        return rng.choice(value)
    raise UserError(f"caption column holds {type(value).__name__} values; captions must be strings or lists of them")
