"""Batches: per-epoch shuffled batches split across processes, epoch lengths, collation."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from difftune.cli.errors import UserError


def collate(examples: list[dict[str, torch.Tensor]]) -> dict:
    """The examples stacked; examples of different shapes (an instance and a class batch from different
    buckets) as {"parts": [one stacked batch per shape, in order of appearance]}."""
    by_shape: dict[tuple, list] = {}
    for example in examples:
        by_shape.setdefault(tuple(tuple(v.shape) for v in example.values()), []).append(example)
    if len(by_shape) > 1:
        return {"parts": [collate(group) for group in by_shape.values()]}
    return {key: torch.stack([e[key] for e in examples]) for key in examples[0]}


def to_device(batch: dict, device: torch.device) -> dict:
    if "parts" in batch:
        return {"parts": [to_device(part, device) for part in batch["parts"]]}
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches, reshuffled each epoch from (seed, epoch), split across processes.

    Each global batch of batch_size * num_processes samples is cut into one batch per process. With `groups`
    (aspect-ratio buckets, data sets) every global batch comes from one group, and `batch_sizes` (one per
    sample) give each group its own batch size (kohya's per-data-set batch_size). A group's last incomplete
    batch is dropped, so every process runs the same number of steps of equal batches; with `keep_partial`
    (kohya's data) it is kept, as kohya keeps it, and shared across processes as evenly as it goes, a
    process short of samples repeating the batch's first ones. `start` skips batches (for resuming mid-epoch).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int,
        num_processes: int = 1,
        process_index: int = 0,
        groups: list | None = None,
        batch_sizes: list[int] | None = None,
        keep_partial: bool = False,
    ) -> None:
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.num_processes, self.process_index = num_processes, process_index
        self.groups, self.batch_sizes, self.keep_partial = groups, batch_sizes, keep_partial
        self.epoch, self.start = 0, 0
        if len(self) == 0:
            raise UserError(
                f"{num_samples} training images cannot fill one batch of {batch_size} per process "
                f"on {num_processes} process(es){' from one aspect-ratio bucket' if groups else ''}: "
                "lower --train_batch_size or add images"
            )

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def group_members(self, order: list[int]) -> list[list[int]]:
        if self.groups is None:
            return [order]
        by_group: dict = {}
        for index in order:
            by_group.setdefault(self.groups[index], []).append(index)
        return list(by_group.values())

    def global_size(self, members: list[int]) -> int:
        batch_size = self.batch_size if self.batch_sizes is None else self.batch_sizes[members[0]]
        return batch_size * self.num_processes

    def cut(self, members: list[int]) -> list[list[int]]:
        """A group's global batches, in order."""
        size = self.global_size(members)
        batches = [members[i : i + size] for i in range(0, len(members) - size + 1, size)]
        rest = members[len(batches) * size :]
        return [*batches, rest] if self.keep_partial and rest else batches

    def global_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        batches = [batch for members in self.group_members(order) for batch in self.cut(members)]
        if self.groups is None:
            return batches
        return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]

    def __len__(self) -> int:
        if not hasattr(self, "_length"):  # (asked every step; the groups never change)
            self._length = sum(len(self.cut(members)) for members in self.group_members(list(range(self.num_samples))))
        return self._length

    def samples_per_epoch(self) -> int:
        """The samples an epoch trains on, over all processes (a dropped incomplete batch's are not)."""
        cut = [batch for members in self.group_members(list(range(self.num_samples))) for batch in self.cut(members)]
        return sum(map(len, cut))

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.start :]:
            yield self.share(batch)

    def share(self, global_batch: list[int]) -> list[int]:
        """This process's part of a global batch (an incomplete one padded by repeating its first samples)."""
        per = math.ceil(len(global_batch) / self.num_processes)
        padded = (global_batch * self.num_processes)[: per * self.num_processes]
        return padded[self.process_index * per : (self.process_index + 1) * per]


class PairedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Prior preservation: each instance batch, then a class batch, as indices of the data set.

    The class batches are `classes`' own shuffled (and bucketed) batches, taken in turn across instance
    batches and epochs: the k-th instance batch of the run is paired with the k-th class batch, a function of
    (seed, epoch, step) only, so resuming is exact; each process takes its share of both global batches.
    """

    def __init__(
        self, instance: EpochBatchSampler, classes: EpochBatchSampler, instance_indices: list[int],
        class_indices: list[int],
    ) -> None:  # fmt: skip
        self.instance, self.classes = instance, classes
        self.instance_indices, self.class_indices = instance_indices, class_indices
        self.epoch, self.start = 0, 0
        self._class_epoch: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.instance.set_epoch(epoch, start)
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return len(self.instance)

    def class_batch(self, position: int) -> list[int]:
        """This process's share of the run's `position`-th class batch."""
        epoch, index = divmod(position, len(self.classes))
        if self._class_epoch is None or self._class_epoch[0] != epoch:
            self.classes.set_epoch(epoch)
            self._class_epoch = (epoch, self.classes.global_batches())
        return self.classes.share(self._class_epoch[1][index])

    def __iter__(self) -> Iterator[list[int]]:
        for position, batch in enumerate(self.instance, start=self.epoch * len(self.instance) + self.start):
            classes = self.class_batch(position)
            yield [self.instance_indices[i] for i in batch] + [self.class_indices[i] for i in classes]


def num_update_steps_per_epoch(batches_per_epoch: int, gradient_accumulation_steps: int) -> int:
    """Optimizer steps per epoch: the last one accumulates what is left (as diffusers' scripts count)."""
    return math.ceil(batches_per_epoch / gradient_accumulation_steps)


def epochs_for(max_train_steps: int, steps_per_epoch: int) -> int:
    return math.ceil(max_train_steps / steps_per_epoch)
