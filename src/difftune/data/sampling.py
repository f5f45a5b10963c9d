"""Batches: per-epoch shuffled batches split across processes, epoch lengths, collation."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from difftune.errors import UserError


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches, reshuffled each epoch from (seed, epoch), split across processes.

    Each global batch of batch_size * num_processes samples is cut into one batch per
    process; incomplete global batches are dropped so that every process runs the same
    number of steps. With `groups` (e.g. aspect-ratio buckets) every global batch comes from
    one group. `start` skips batches (for resuming mid-epoch).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        num_processes: int = 1,
        process_index: int = 0,
        groups: list | None = None,
    ) -> None:
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.groups = groups
        self.epoch, self.start = 0, 0
        if len(self) == 0:
            raise UserError(
                f"{num_samples} training images cannot fill one batch of {batch_size} per process "
                f"on {num_processes} process(es){' from one aspect-ratio bucket' if groups else ''}: "
                "lower --train_batch_size or add images"
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def global_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        size = self.batch_size * self.num_processes
        if self.groups is None:
            return [order[i : i + size] for i in range(0, len(order) - size + 1, size)]
        by_group: dict = {}
        for index in order:
            by_group.setdefault(self.groups[index], []).append(index)
        batches = [
            members[i : i + size] for members in by_group.values() for i in range(0, len(members) - size + 1, size)
        ]
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __len__(self) -> int:
        size = self.batch_size * self.num_processes
        if self.groups is None:
            return self.num_samples // size
        counts: dict = {}
        for group in self.groups:
            counts[group] = counts.get(group, 0) + 1
        return sum(count // size for count in counts.values())

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.start :]:
            offset = self.process_index * self.batch_size
            yield batch[offset : offset + self.batch_size]


def num_update_steps_per_epoch(batches_per_epoch: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps per epoch: the last one accumulates what is left (as diffusers' scripts count)."""
    return math.ceil(batches_per_epoch / gradient_accumulation_steps)


def epochs_for(max_train_steps: int, steps_per_epoch: int) -> int:
    return math.ceil(max_train_steps / steps_per_epoch)
