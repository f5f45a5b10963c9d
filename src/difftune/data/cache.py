"""A data set's encodings computed once (VAE latents, image and text embeddings) and reused across runs.

The key of an image cache covers the data, its selection and the image transforms (and the masks); a text
cache's covers the texts themselves. The caches are stores of difftune.storage.shards; the data set reads its
samples from them once they are built.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Callable

import torch

from difftune.data import masks
from difftune.storage.shards import CacheReader, build, cache_path


def data_fields(args, dataset) -> dict:
    """What every image cache of a run depends on: the data, its selection and the image transforms (and with
    --masked_loss, the masks: each row's source and each mask file's size and time)."""
    fields = {
        "data": dataset.fingerprint,
        "resolution": args.resolution,
        "center_crop": args.center_crop,
        "random_flip": args.random_flip,
        "buckets": getattr(args, "aspect_ratio_buckets", False),
    }
    if dataset.mask_sources is not None:  # (unmasked caches keep their former keys)
        fields["masks"] = masks.fingerprint(dataset.mask_sources)
    return fields


def cache_images(
    accelerator,
    args,
    dataset,
    kind: str,
    fields: dict,
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    names: list[str],
    desc: str,
) -> None:
    """Encode every image once (both orientations with --random_flip) and point the dataset at the cache.

    `encode(pixels)` maps a batch of equally sized images to batched tensors named as in `names`;
    each sample's SDXL size conditioning (time_ids) is kept beside them, and with --masked_loss its mask,
    reduced to the grid of the first encoding.
    """
    flipping = args.random_flip or any(t.random_flip for t in dataset.transforms or [])  # (kohya: flip_aug)
    flips = [False, True] if flipping else [False]
    chunks, batches = ChunkImages(dataset, flips), iter(())

    def start(order: list[list[int]]) -> None:
        # Worker processes decode, resize and stack each call's images (one message per call: on a CPU the
        # workers share the encoder's cores), two calls ahead in all so that the encoder never waits.
        nonlocal batches
        workers = args.dataloader_num_workers or min(4, os.cpu_count() or 1)
        loader = torch.utils.data.DataLoader(
            chunks, batch_size=None, sampler=order, num_workers=workers, prefetch_factor=math.ceil(2 / workers),
            generator=torch.Generator(),  # its workers' seed: not drawn from the training's global RNG
        )  # fmt: skip
        batches = iter(loader)

    def encode_indices(indices: list[int]) -> dict[str, torch.Tensor]:
        rows, per_flip = next(batches)
        assert rows == indices, "the cache build read rows out of order"
        out = {}
        for flip, groups in zip(flips, per_flip, strict=True):
            prefix = "flip." if flip else ""
            for group in groups:
                encoded = encode(group["pixel_values"])
                for position, i in enumerate(group["rows"]):
                    out.update({f"{i}.{prefix}{name}": encoded[name][position] for name in names})
                    out[f"{i}.{prefix}time_ids"] = group["time_ids"][position]
                if "mask" in group:
                    grid = encoded[names[0]].shape[-2:]
                    for position, mask in enumerate(masks.on_grid(group["mask"], grid)):
                        out[f"{group['rows'][position]}.{prefix}mask"] = mask
        return out

    fields = {**fields, **data_fields(args, dataset)}
    path = cache_path(args.cache_dir, kind, fields)
    try:
        build(accelerator, path, dataset.num_rows, encode_indices, args.train_batch_size, fields, desc, start)
    finally:
        batches = iter(())  # the workers stop
    extra = ["time_ids"] + (["mask"] if dataset.mask_sources is not None else [])
    dataset.image_cache = CacheReader(path, [*names, *extra], flips=len(flips) > 1)


class ChunkImages(torch.utils.data.Dataset):
    """For DataLoader workers: a list of rows -> (rows, per orientation the rows' samples stacked by size, as
    groups {"rows", "pixel_values", "time_ids"[, "mask"]}). Holds a copy of the data set without its
    tokenizer, caches and caption column, so that it pickles cheaply."""

    def __init__(self, dataset, flips: list[bool]) -> None:
        view = copy.copy(dataset)
        view.rows = dataset.rows.select_columns([dataset.image_column])
        view.tokenize, view.image_cache, view.text_cache, view.text_ids = None, None, None, {}
        view.unreadable = set()
        view.first_sample(0)  # built once, here
        self.dataset, self.flips = view, flips

    def __len__(self) -> int:
        return self.dataset.num_rows

    def __getitem__(self, rows: list[int]) -> tuple[list[int], list[list[dict]]]:
        per_flip = []
        for flip in self.flips:
            by_size: dict[tuple, list] = {}  # bucketed images differ in size: each size is encoded apart
            for row in rows:
                sample = self.dataset.load_row(row, flip)
                by_size.setdefault(tuple(sample["pixel_values"].shape), []).append((row, sample))
            groups = []
            for members in by_size.values():
                group = {"rows": [row for row, _ in members]}
                for key in members[0][1]:
                    group[key] = torch.stack([sample[key] for _, sample in members])
                groups.append(group)
            per_flip.append(groups)
        return rows, per_flip


def cache_texts(
    accelerator,
    args,
    dataset,
    kind: str,
    fields: dict,
    encode: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
    names: list[str],
) -> None:
    """Encode every text the data set can train on (dataset.texts()) once and point the dataset at the
    cache; `encode` maps a batch of the dataset's token tensors to batched embeddings named as in `names`.
    The key covers the texts themselves: the caption column or files, class tokens, processing, variants."""
    texts = dataset.texts()

    def encode_indices(indices: list[int]) -> dict[str, torch.Tensor]:
        tokens = [dataset.tokenize(texts[i]) for i in indices]
        batch = {key: torch.stack([t[key] for t in tokens]).to(accelerator.device) for key in tokens[0]}
        encoded = encode(batch)
        return {f"{i}.{name}": encoded[name][row] for name in names for row, i in enumerate(indices)}

    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    fields = {**fields, "texts": digest}
    path = cache_path(args.cache_dir, kind, fields)
    build(accelerator, path, len(texts), encode_indices, args.train_batch_size, fields, "text embeddings")
    dataset.text_cache = CacheReader(path, names)
    dataset.text_ids = {text: i for i, text in enumerate(texts)}
