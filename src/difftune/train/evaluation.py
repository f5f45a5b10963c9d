"""A held-out evaluation loss (--validation_split or --eval_data_dir): the same numbers for the same weights.

A seeded share of the training data, or the images of --eval_data_dir, are held out and never
trained on. Their loss is the plain MSE denoising loss, averaged over every held-out sample at
EVAL_TIMESTEPS fixed fractions of the noise schedule, (k + 0.5) / EVAL_TIMESTEPS; the noise for the
j-th held-out sample (in index order) at the k-th fraction comes from
torch.manual_seed(seed + j * EVAL_TIMESTEPS + k).
Samples are read as in epoch 0 (fixed crops and flips, no caption dropout), adapters in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from difftune.cli.errors import UserError
from difftune.data import collate, to_device

EVAL_TIMESTEPS = 4


def held_out_split(dataset, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices): the data set's --eval_data_dir rows, or a seeded `fraction`."""
    fixed = getattr(dataset, "held_out_indices", None)
    if fixed is not None:  # (a kohya data set chose its own, maybe none: its validation_split is applied)
        held = set(fixed)
        return [i for i in range(len(dataset)) if i not in held], sorted(held)
    sample_rows = getattr(dataset, "sample_rows", None)
    if sample_rows is not None and fraction > 0:  # repeated images: hold out whole images, each evaluated once
        _, held_rows = split_indices(dataset.num_rows, fraction, seed)
        held = set(held_rows)
        return [i for i, row in enumerate(sample_rows) if row not in held], [dataset.first_sample(r) for r in held_rows]
    return split_indices(len(dataset), fraction, seed)


def split_indices(size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training indices, held-out indices): a seeded random `fraction` of range(size), at least one each."""
    if fraction <= 0:
        return list(range(size)), []
    if size < 2:
        raise UserError(
            f"--validation_split {fraction} cannot hold out part of {size} sample: add images, "
            "or give held-out images with --eval_data_dir"
        )
    held = min(max(1, round(size * fraction)), size - 1)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[held:]), sorted(order[:held])


def timestep_fractions() -> list[float]:
    return [(k + 0.5) / EVAL_TIMESTEPS for k in range(EVAL_TIMESTEPS)]


@torch.no_grad()
def evaluation_loss(
    compute_loss: Callable[..., torch.Tensor],
    adapters: dict[str, nn.Module],
    dataset,
    indices: list[int],
    seed: int,
    device: torch.device,
) -> float:
    """The mean held-out loss of the adapters as they are now (see the module docstring); `dataset` is the
    training data's evaluation_view()."""
    total = 0.0
    with eval_mode(adapters):
        for j, index in enumerate(indices):
            batch = to_device(collate([dataset[index]]), device)
            for k, fraction in enumerate(timestep_fractions()):
                torch.manual_seed(seed + j * EVAL_TIMESTEPS + k)
                fractions = torch.tensor([fraction], device=device)
                total += compute_loss(batch, adapters, fractions=fractions).float().item()
    return total / (len(indices) * EVAL_TIMESTEPS)


@contextmanager
def eval_mode(adapters: dict[str, nn.Module]):
    """The adapters in eval mode (no dropout) for a while, then back in training mode."""
    for model in adapters.values():
        model.eval()
    try:
        yield
    finally:
        for model in adapters.values():
            model.train()
