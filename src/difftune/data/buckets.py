"""Aspect-ratio buckets: the bucket sizes and each image's bucket."""

from __future__ import annotations

import math

from PIL import Image

from difftune.data.images import column, image_source
from difftune.data.scan import known_size


def make_buckets(
    resolution: int, multiple: int = 64, max_ratio: float = 4.0, min_area: float = 0.75
) -> list[tuple[int, int]]:
    """(height, width) buckets with sides in steps of `multiple`, between min_area and 1 times resolution^2 pixels."""
    area = resolution * resolution
    buckets = set()
    for side in range(multiple, int(resolution * max_ratio) + 1, multiple):
        other = (area // side) // multiple * multiple
        if other >= multiple and max(side, other) / min(side, other) <= max_ratio and side * other >= min_area * area:
            buckets.update({(side, other), (other, side)})
    return sorted(buckets)


def closest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket of the closest aspect ratio (log scale), then the larger area."""
    ratio = math.log(height / width)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def image_size(record: dict) -> tuple[int, int]:
    """(height, width) of an undecoded image record: from the scan, else from its header."""
    known = known_size(record)
    if known is not None:
        return known
    with Image.open(image_source(record)) as image:
        return image.height, image.width


def assign_buckets(dataset, buckets: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Each sample's bucket: its image's closest_bucket."""
    by_size: dict[tuple[int, int], tuple[int, int]] = {}  # images share a few sizes: each is matched once
    sizes = []
    for record in column(dataset.rows, dataset.image_column):
        size = image_size(record)
        if size not in by_size:
            by_size[size] = closest_bucket(*size, buckets)
        sizes.append(by_size[size])
    return [sizes[dataset.row(index)] for index in range(len(dataset))]
