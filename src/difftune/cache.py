"""Encodings computed once (VAE latents, image and text embeddings) and reused across runs.

A cache is a folder CACHE_DIR/<kind>-<hash>/ of safetensors shards; the hash covers everything
the encodings depend on (model id and revision, data set fingerprint, resolution, transforms,
dtype), so a change of any of them builds a new cache. complete.json is written last, with each
shard's size and checksum: a cache without it is rebuilt, and so is a shard that no longer verifies
(checked once when the cache is opened, not per read). One run builds a cache at a time (another
waits, then reads it); with several processes each builds its own share of the shards.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from difftune import integrity, runlock
from difftune.data import masks

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
SHARD_SIZE = 256
COMPLETE = "complete.json"
SHARDS = "shards"  # in complete.json: shard file -> size and checksum


def cache_path(cache_dir: Path, kind: str, fields: dict) -> Path:
    """The cache folder for `kind` and the settings in `fields`."""
    digest = hashlib.sha256(json.dumps({**fields, "format": FORMAT_VERSION}, sort_keys=True).encode()).hexdigest()
    return Path(cache_dir) / f"{kind}-{digest[:16]}"


def shard_file(path: Path, shard: int) -> Path:
    return path / f"shard-{shard:05d}.safetensors"


def build(
    accelerator,
    path: Path,
    num_samples: int,
    encode: Callable[[list[int]], dict[str, torch.Tensor]],
    batch_size: int,
    fields: dict,
    desc: str,
    plan: Callable[[list[list[int]]], None] | None = None,
) -> None:
    """Fill the cache at `path` unless it is complete and verifies (one run at a time: another run building
    it is waited for, then read): `encode(indices)` returns tensors keyed "<index>.<name>"; `plan`, if given,
    is told first every index this process will encode, in the order of the calls to `encode`."""
    with runlock.building(path, accelerator.is_main_process):
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            discard_damaged(path)
        accelerator.wait_for_everyone()
        fill(accelerator, path, num_samples, encode, batch_size, fields, desc, plan)


def discard_damaged(path: Path) -> None:
    """A complete cache whose shards do not all verify (size, checksum) loses those shards and its mark of
    completeness, so that they are built again. Caches written before shard checksums are taken as they are."""
    if not (path / COMPLETE).is_file():
        return
    try:
        expected = json.loads((path / COMPLETE).read_text()).get(SHARDS, {})
        damaged = {name: bad for name in expected if (bad := integrity.first_bad(path, {name: expected[name]}))}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        damaged = {COMPLETE: f"{path / COMPLETE} is unreadable"}
    if damaged:
        logger.warning("cache %s is damaged (%s): rebuilding it", path, "; ".join(damaged.values()))
        (path / COMPLETE).unlink()
        for name in damaged:
            (path / name).unlink(missing_ok=True)


def fill(
    accelerator,
    path: Path,
    num_samples: int,
    encode: Callable[[list[int]], dict[str, torch.Tensor]],
    batch_size: int,
    fields: dict,
    desc: str,
    plan: Callable[[list[list[int]]], None] | None = None,
) -> None:
    """Encode the shards `path` lacks (this process's share of them), then mark the cache complete."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    if (path / COMPLETE).is_file():
        logger.info("using cached %s from %s", desc, path)
        return
    path.mkdir(parents=True, exist_ok=True)
    shards = range(accelerator.process_index, math.ceil(num_samples / SHARD_SIZE), accelerator.num_processes)
    todo = [s for s in shards if not shard_file(path, s).is_file()]
    chunks = {s: batched(range(s * SHARD_SIZE, min(num_samples, (s + 1) * SHARD_SIZE)), batch_size) for s in todo}
    if plan is not None:
        plan([chunk for shard in todo for chunk in chunks[shard]])
    total = sum(len(chunk) for shard in todo for chunk in chunks[shard])
    with tqdm(total=total, desc=f"caching {desc}", unit="image", disable=not accelerator.is_main_process) as bar:
        for shard in todo:
            tensors = {}
            with torch.no_grad():
                for chunk in chunks[shard]:
                    tensors.update({k: v.float().cpu().contiguous() for k, v in encode(chunk).items()})
                    bar.update(len(chunk))
            partial = shard_file(path, shard).with_suffix(f".partial-{os.getpid()}")
            what, kept = f"the {desc} cache shard {partial.stem}", "the shards written before it are kept"
            with integrity.disk_full_stops(partial, path, what, kept):
                save_file(tensors, str(partial))
            partial.replace(shard_file(path, shard))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        names = [shard_file(path, s).name for s in range(math.ceil(num_samples / SHARD_SIZE))]
        record = {**fields, "num_samples": num_samples, SHARDS: integrity.digests(path, names)}
        (path / COMPLETE).write_text(json.dumps(record, indent=2, default=str))
    accelerator.wait_for_everyone()


def batched(indices: range, size: int) -> list[list[int]]:
    return [list(indices[start : start + size]) for start in range(0, len(indices), size)]


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
    flips = [False, True] if args.random_flip else [False]
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


class CacheReader:
    """Per-sample tensors from a complete cache (shards opened lazily, memory-mapped)."""

    def __init__(self, path: Path, names: list[str], flips: bool = False) -> None:
        self.path, self.names, self.flips = Path(path), names, flips
        self._open: dict[int, object] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}  # file handles stay in the process that opened them

    def tensor(self, key: str, index: int) -> torch.Tensor:
        from safetensors import safe_open

        shard = index // SHARD_SIZE
        if shard not in self._open:
            self._open[shard] = safe_open(str(shard_file(self.path, shard)), framework="pt")
        return self._open[shard].get_tensor(f"{index}.{key}")

    def sample(self, index: int, flip: bool = False) -> dict[str, torch.Tensor]:
        prefix = "flip." if self.flips and flip else ""
        return {name: self.tensor(prefix + name, index) for name in self.names}
