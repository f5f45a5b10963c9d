"""A cache of per-sample tensors on disk: a folder of checksummed safetensors shards, built once, read lazily.

A cache is a folder CACHE_DIR/<kind>-<hash>/ of safetensors shards; the hash covers everything
the tensors depend on (difftune.data.cache says what that is for a data set's encodings), so a change
of any of them builds a new cache. complete.json is written last, with each
shard's size and checksum: a cache without it is rebuilt, and so is a shard that no longer verifies
(checked once when the cache is opened, not per read). Each shard's checksum is also recorded when it is
written, in its own sidecar (shard-N.safetensors.json): a shard left by an interrupted build is reused only
once it verifies against it, and complete.json is made from those verified checksums. One run builds a
cache at a time (another waits, then reads it); with several processes each builds its own share of the shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from difftune.storage import checkpoints, integrity, runlock

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


def sidecar(shard: Path) -> Path:
    """Where a shard's size and checksum are recorded when it is written."""
    return shard.with_name(shard.name + ".json")


def verified(shard: Path) -> dict | None:
    """The shard's recorded digest if the shard verifies against it; None (with a warning when a shard is
    there) if it is missing, has no readable sidecar, or differs from what was written."""
    if not shard.is_file():
        return None
    try:
        recorded = json.loads(sidecar(shard).read_text())
        bad = integrity.first_bad(shard.parent, {shard.name: recorded})
    except FileNotFoundError:
        bad = f"{shard} has no recorded checksum (left by an interrupted build)"
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, KeyError, TypeError):
        bad = f"{sidecar(shard)} is unreadable"
    if bad is None:
        return recorded
    logger.warning("cache shard %s is not sound (%s): rebuilding it", shard, bad)
    return None


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
            sidecar(path / name).unlink(missing_ok=True)


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
    todo = [s for s in shards if verified(shard_file(path, s)) is None]  # each shard read once here
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
                checkpoints.honour_umask(partial)  # (safetensors writes 0600)
                # The checksum of what was written, recorded before the shard takes its name.
                checkpoints.write_json(sidecar(shard_file(path, shard)), integrity.digest(partial))
            checkpoints.commit_file(partial, shard_file(path, shard))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = [shard_file(path, s) for s in range(math.ceil(num_samples / SHARD_SIZE))]
        # Each shard was verified against its sidecar (or written) by the process that owns it, above.
        record = {**fields, "num_samples": num_samples, SHARDS: {f.name: recorded(f) for f in files}}
        checkpoints.write_json(path / COMPLETE, record)
    accelerator.wait_for_everyone()


def recorded(shard: Path) -> dict:
    """The digest recorded in a shard's sidecar."""
    return json.loads(sidecar(shard).read_text())


def batched(indices: range, size: int) -> list[list[int]]:
    return [list(indices[start : start + size]) for start in range(0, len(indices), size)]


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
