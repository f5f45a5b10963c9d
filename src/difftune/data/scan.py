"""One scan of the images (size and readability), in parallel, kept beside the caches.

What a start needs of an image is its size (the buckets) and whether it can be read. The size is in the
header. Readability: the common damage is a file cut short (a copy or download that stopped), and a JPEG or
PNG shows it at its tail, which must end with the end-of-image marker (JPEG) or the IEND chunk (PNG). So a
JPEG or PNG whose header opens and whose tail is complete counts as readable without decoding its pixels
(a file damaged in the middle can still fail later: the sample then trains on the next readable image of its
size, with a warning, see CaptionedImageDataset.open_or_substitute). Other formats, and files whose tail is
not the expected marker (a JPEG with trailing data, for one), are decoded (JPEGs at 1/8 scale), once. A PNG is
verified whole instead (Pillow's verify: every chunk's CRC, the pixel data's included, without decoding), so
damage anywhere in it is found here; a JPEG has no checksum and Pillow reports none of libjpeg's warnings
("Corrupt JPEG data"), so a JPEG damaged in the middle that still decodes is not found by any scan.
The scan runs in a thread pool and its result is kept in CACHE_DIR/image-scan.json keyed by path, file size
and modification time: an unchanged data set then starts without opening any image. Only the main process
scans; the others wait for it and read its result.
"""

from __future__ import annotations

import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

from PIL import Image

from difftune.data.images import column, image_name, image_source
from difftune.storage import integrity

logger = logging.getLogger(__name__)

SCAN_FILE = "image-scan.json"
SIZES: dict[str, tuple[int, int]] = {}  # this process's scanned sizes by path, for the buckets


TAILS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}  # how a complete file of the format ends


def probe(record: dict) -> tuple[int, int] | str:
    """(height, width) of a readable image, or why it cannot be read."""
    try:
        with Image.open(image_source(record)) as image:
            size = image.height, image.width
            if image.format == "PNG" and getattr(image, "n_frames", 1) == 1:
                image.verify()  # every chunk's CRC, the pixel data's included: damage anywhere in the file
            elif not complete_tail(image):
                if image.format == "JPEG":
                    image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))  # all of it, at 1/8
                image.load()
        return size
    except Exception as error:  # noqa: BLE001 - any decode failure means unreadable
        return str(error) or type(error).__name__


def complete_tail(image: Image.Image) -> bool:
    """Whether an opened single-frame JPEG or PNG ends as a complete file does (False: decode it to know)."""
    tail = TAILS.get(image.format)
    if tail is None or getattr(image, "n_frames", 1) != 1:
        return False
    fp, position = image.fp, image.fp.tell()
    try:
        if fp.seek(0, os.SEEK_END) < len(tail):
            return False
        fp.seek(-len(tail), os.SEEK_END)
        return fp.read(len(tail)) == tail
    finally:
        fp.seek(position)


def file_key(record: dict, stat: tuple[int, int] | None = None) -> str | None:
    """path|size|mtime of an image file, from `stat` (size, mtime_ns) when the caller has it (None for images
    held as bytes: those are probed every time)."""
    path = record.get("path")
    if record.get("bytes") or not path:
        return None
    if stat is None:
        try:
            result = os.stat(path)
        except OSError:
            return None
        stat = result.st_size, result.st_mtime_ns
    return f"{os.path.abspath(path)}|{stat[0]}|{stat[1]}"


def main_process_first():
    """The main process runs the block first, then the others (when accelerate is running several)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # one process: no accelerate state needed
        return nullcontext()
    from accelerate import PartialState

    return PartialState().main_process_first()


def scan_images(
    records: list[dict], cache_dir: str | Path | None, workers: int = 0, stats: list[tuple[int, int]] | None = None
) -> list[tuple[int, int] | str]:
    """Each record's (height, width), or the reason it is unreadable; known files come from the scan file.
    `stats`: each file's (size, mtime_ns), when the caller has them (else each file is stat'ed)."""
    from tqdm.auto import tqdm

    path = Path(cache_dir) / SCAN_FILE if cache_dir else None
    with main_process_first():
        known = read_scan(path)
        keys = [file_key(record, stat) for record, stat in zip(records, stats or [None] * len(records), strict=True)]
        todo = [i for i, key in enumerate(keys) if key is None or key not in known]
        results = {i: tuple(known[key]) if isinstance(known[key], list) else known[key] for i, key in enumerate(keys)
                   if key is not None and key in known}  # fmt: skip
        if todo:
            workers = workers or min(8, os.cpu_count() or 1)
            with (
                ThreadPoolExecutor(workers) as pool,
                tqdm(total=len(todo), desc="scanning images", unit="image") as bar,
            ):
                for i, result in zip(todo, pool.map(probe, (records[i] for i in todo)), strict=True):
                    results[i] = result
                    bar.update(1)
            if path is not None:
                known.update({keys[i]: results[i] for i in todo if keys[i] is not None})
                write_scan(path, known)
    SIZES.update({records[i]["path"]: size for i, size in results.items() if keys[i] and isinstance(size, tuple)})
    return [results[i] for i in range(len(records))]


def known_size(record: dict) -> tuple[int, int] | None:
    """The scanned (height, width) of an image file, if this process scanned (or read the scan of) it (by path:
    the scan was this start's, moments ago)."""
    return None if record.get("bytes") else SIZES.get(record.get("path"))


def read_scan(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged scan file is rebuilt
    return known if isinstance(known, dict) else {}  # ([] or null: as damaged)


def write_scan(path: Path, known: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".partial-{os.getpid()}")
    with integrity.disk_full_stops(partial, path.parent, f"the image scan {path.name}", "nothing was trained yet"):
        partial.write_text(json.dumps(known))
    partial.replace(path)


def readable_rows(
    dataset, image_column: str, cache_dir=None, workers: int = 0
) -> tuple[list[int], list[tuple[int, int]]]:
    """The rows whose images are readable (a warning naming each other one) and their (height, width)."""
    records = column(dataset, image_column) if len(dataset) else []
    stats = None  # a folder's rows hold each file's size and mtime, read as the folder was listed
    if records and {"size", "mtime"} <= set(dataset.column_names):
        stats = list(zip(column(dataset, "size"), column(dataset, "mtime"), strict=True))
    good, sizes = [], []
    for index, result in enumerate(scan_images(records, cache_dir, workers, stats)):
        if isinstance(result, str):
            logger.warning("skipping unreadable image %s (%s)", image_name(records[index]), result)
            continue
        good.append(index)
        sizes.append(result)
    return good, sizes
