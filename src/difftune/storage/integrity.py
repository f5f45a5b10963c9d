"""Damaged files: size + checksum manifests for checkpoints and caches, and a full disk.

A checkpoint's manifest.json lists every file it holds (relative path -> size, XXH3-128 checksum), written last
before the checkpoint is renamed into place; a cache's complete.json carries the same for its shards.
Verifying reads each file once. A checkpoint without a manifest (written before manifests existed)
is taken as it is.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from difftune.cli.errors import UserError

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CHECKSUM = "xxh3_128"
CHUNK = 8 << 20


def digest(path: Path) -> dict:
    """{"size": bytes, "xxh3_128": hex} of a file, read once. XXH3 (xxhash, which datasets needs) finds
    damage as well as sha256 for a fraction of its time: it is not a defence against tampering."""
    import xxhash

    checksum, size = xxhash.xxh3_128(), 0
    with open(path, "rb", buffering=0) as handle:
        buffer = bytearray(min(CHUNK, os.fstat(handle.fileno()).st_size + 1))
        view = memoryview(buffer)
        while read := handle.readinto(buffer):
            checksum.update(view[:read])
            size += read
    return {"size": size, CHECKSUM: checksum.hexdigest()}


def digests(directory: Path, names: list[str]) -> dict[str, dict]:
    """Each file's digest, by its path relative to `directory`."""
    return {name: digest(Path(directory) / name) for name in names}


def files_in(directory: Path) -> list[str]:
    """Every file under `directory` but its manifest, relative, sorted."""
    directory = Path(directory)
    found = (p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())
    return sorted(name for name in found if name != MANIFEST)


def write_manifest(directory: Path) -> None:
    """Record every file of a finished checkpoint (call it last, before the rename)."""
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps(digests(directory, files_in(directory)), indent=1, sort_keys=True) + "\n")


def first_bad(directory: Path, expected: dict[str, dict]) -> str | None:
    """The first file of `expected` (name -> digest) that is missing or differs, described; None if all hold."""
    for name, want in sorted(expected.items()):
        path = Path(directory) / name
        if not path.is_file():
            return f"{path} is missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{path} has {size} bytes, {want['size']} were written"
        if digest(path)[CHECKSUM] != want[CHECKSUM]:
            return f"{path} has changed since it was written (checksum differs)"
    return None


def damaged_checkpoint(directory: Path) -> str | None:
    """What is wrong with a checkpoint's files (None if its manifest verifies, or it has none)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        expected = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{path} is unreadable"
    entries = expected.values() if isinstance(expected, dict) else [None]
    if not all(isinstance(want, dict) and {"size", CHECKSUM} <= set(want) for want in entries):
        return f"{path} is unreadable"  # (JSON, but not name -> digest: damaged all the same)
    return first_bad(directory, expected)


def read_state(path: Path) -> dict:
    """A checkpoint's training_state.json, or {} (with a warning naming it) when it is damaged: one damaged
    file in an older checkpoint must not stop pruning or the model card."""
    try:
        state = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        logger.warning("skipping damaged %s (%s)", path, error)
        return {}
    if not isinstance(state, dict):
        logger.warning("skipping damaged %s (not a JSON object)", path)
        return {}
    return state


def warn_unfinished(output_dir: Path, state_file: str) -> None:
    """A warning naming each step<N> folder of `output_dir` without its `state_file`: `latest` passes it over
    (a checkpoint is renamed into place only once complete, so its state file was lost or removed since)."""
    folders = Path(output_dir).glob("step*") if Path(output_dir).is_dir() else []
    for path in sorted(p for p in folders if re.fullmatch(r"step\d+", p.name) and p.is_dir()):
        if not (path / state_file).is_file():
            logger.warning("skipping checkpoint %s: it has no %s (it cannot be resumed)", path, state_file)


def check_checkpoint(directory: Path, flag: str) -> None:
    """Stop (one line) when the checkpoint named by `flag` does not verify."""
    bad = damaged_checkpoint(directory)
    if bad is not None:
        raise UserError(f"{flag} {directory} is damaged: {bad}. Pick another checkpoint")


def newest_sound(found: list[tuple[int, Path]]) -> Path:
    """The newest of the checkpoints `found` (oldest first) that verifies, warning about each damaged one
    passed over; stops when none does."""
    for _, path in reversed(found):
        bad = damaged_checkpoint(path)
        if bad is None:
            return path
        logger.warning("skipping damaged checkpoint %s: %s", path, bad)
    raise UserError(
        f"--resume_from_checkpoint latest: every checkpoint in {found[-1][1].parent} is damaged (see the warnings "
        "above): restore one from a backup, or start afresh with --overwrite_output_dir"
    )


FULL_MARKS = (
    "No space left on device", "StorageFull", "os error 28", "Disk quota exceeded", "os error 122",
    "File too large", "os error 27",  # EFBIG: a file-size limit (ulimit -f, with SIGXFSZ ignored)
    "unexpected pos", "file write failed", "iostream error",  # torch's zip writer when a write comes up short
)  # fmt: skip


def is_disk_full(error: BaseException) -> bool:
    """A write that found no room: ENOSPC, EDQUOT or EFBIG (a file-size limit), also as torch's serializer and
    safetensors report them (their own exception types, the cause only in the text), or as the cause or
    context of the error raised."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        if any(mark in str(error) for mark in FULL_MARKS):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def disk_full_stops(partial: Path, where: Path, what: str, intact: str) -> Iterator[None]:
    """A full disk while writing `partial` (a folder or a file): remove it, and stop with one line naming
    the folder `where` it was written, `what` was being written, and what is `intact`."""
    try:
        yield
    except Exception as error:
        if not is_disk_full(error):
            raise
        if partial.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
        else:
            partial.unlink(missing_ok=True)
        raise UserError(
            f"no space left on {where} while writing {what}; {intact}; "
            "free space and resume with --resume_from_checkpoint latest"
        ) from None
