"""Aspect-ratio buckets, by kohya sd-scripts' rules: the bucket sizes, each image's bucket and resize, the crop.

kohya writes sizes as (width, height); this codebase writes (height, width). The public functions here take
and return (height, width), except `kohya_bucket_list`, which is kohya's list as kohya writes it; the
conversions happen inside, next to the kohya arithmetic they serve.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from functools import cached_property

from PIL import Image

from difftune.cli.errors import UserError
from difftune.data.images import column, cover_size, crop_offsets, image_source
from difftune.data.scan import known_size

logger = logging.getLogger(__name__)

# kohya's resize and crop arithmetic lives with the transform (difftune.data.images, below this module)
__all__ = [
    "KOHYA_MAX_RESO", "KOHYA_MIN_RESO", "KOHYA_STEPS", "BucketRule", "assign_buckets", "closest_bucket",
    "cover_size", "crop_offsets", "image_size", "kohya_bucket_list", "make_buckets",
]  # fmt: skip

# kohya's defaults for min_bucket_reso, max_bucket_reso and bucket_reso_steps.
KOHYA_MIN_RESO, KOHYA_MAX_RESO, KOHYA_STEPS = 256, 1024, 64


def kohya_bucket_list(
    width: int, height: int, min_reso: int = KOHYA_MIN_RESO, max_reso: int = KOHYA_MAX_RESO, steps: int = KOHYA_STEPS
) -> list[tuple[int, int]]:
    """kohya's make_bucket_resolutions, as (width, height) pairs in kohya's order (sorted by width, then height).

    The square of the resolution's area (floored to `steps`), and for every width from `min_reso` to
    `max_reso` in `steps`, the tallest height in `steps` that keeps within the area, capped at `max_reso`
    (so at 1024 px with the default max, every bucket has a side of 1024), both ways round; heights below
    `min_reso` are left out.
    """
    area = width * height
    side = int(math.sqrt(area) // steps) * steps
    buckets = {(side, side)}
    for bucket_w in range(min_reso, max_reso + 1, steps):
        bucket_h = min(max_reso, area // bucket_w // steps * steps)
        if bucket_h >= min_reso:
            buckets.update({(bucket_w, bucket_h), (bucket_h, bucket_w)})
    return sorted(buckets)


def make_buckets(resolution: int) -> list[tuple[int, int]]:
    """(height, width) buckets for a square `resolution` with kohya's default keys (min 256, max 1024, steps 64),
    in kohya's order; the max is raised to the resolution above 1024, and below 256, where kohya would refuse
    its own default minimum, the minimum is one step (64), so small runs still get a few shapes."""
    min_reso = KOHYA_MIN_RESO if resolution >= KOHYA_MIN_RESO else KOHYA_STEPS
    buckets = kohya_bucket_list(resolution, resolution, min_reso, max(KOHYA_MAX_RESO, resolution), KOHYA_STEPS)
    return [(h, w) for w, h in buckets]


def closest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """kohya's choice among (height, width) `buckets`: the image's own size if it is one, else the bucket whose
    width / height is nearest to the image's by plain difference (not on a log scale), the first in kohya's
    (width, height) order on ties."""
    if (height, width) in buckets:
        return height, width
    ratio = width / height
    in_kohya_order = sorted(buckets, key=lambda b: (b[1], b[0]))
    return min(in_kohya_order, key=lambda b: abs(b[1] / b[0] - ratio))  # min keeps the first of equals: argmin


@dataclass(frozen=True)
class BucketRule:
    """How a data set buckets its images, as kohya's dataset keys say. Build it with `checked`.

    `resolution` is (height, width); `min_reso`, `max_reso`, `steps` are kohya's min_bucket_reso,
    max_bucket_reso and bucket_reso_steps (used only with `enable_bucket`, and min / max not with
    `no_upscale`, as in kohya).
    """

    resolution: tuple[int, int]
    enable_bucket: bool = True
    min_reso: int = KOHYA_MIN_RESO
    max_reso: int = KOHYA_MAX_RESO
    steps: int = KOHYA_STEPS
    no_upscale: bool = False

    @classmethod
    def checked(
        cls,
        resolution: int | tuple[int, int],
        enable_bucket: bool = True,
        min_reso: int = KOHYA_MIN_RESO,
        max_reso: int = KOHYA_MAX_RESO,
        steps: int = KOHYA_STEPS,
        no_upscale: bool = False,
    ) -> BucketRule:
        """A rule from the user's keys, as kohya takes them: with buckets, min_bucket_reso rounded down and
        max_bucket_reso rounded up to bucket_reso_steps (with a warning), then refused (a UserError) when the
        min is above the resolution's shorter side or the max below its longer side."""
        resolution = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        if enable_bucket:
            if steps < 1:
                raise UserError(f"bucket_reso_steps is {steps}: it must be a positive number of pixels (kohya: 64)")
            if min_reso % steps:
                adjusted = min_reso - min_reso % steps
                logger.warning("min_bucket_reso %d is rounded down to %d, a multiple of bucket_reso_steps %d",
                               min_reso, adjusted, steps)  # fmt: skip
                min_reso = adjusted
            if max_reso % steps:
                adjusted = max_reso + steps - max_reso % steps
                logger.warning("max_bucket_reso %d is rounded up to %d, a multiple of bucket_reso_steps %d",
                               max_reso, adjusted, steps)  # fmt: skip
                max_reso = adjusted
            shorter, longer = min(resolution), max(resolution)
            if min_reso > shorter:
                raise UserError(
                    f"min_bucket_reso {min_reso} is above the resolution's shorter side {shorter}: "
                    f"set min_bucket_reso to at most {shorter}, or raise the resolution"
                )
            if max_reso < longer:
                raise UserError(
                    f"max_bucket_reso {max_reso} is below the resolution's longer side {longer}: "
                    f"set max_bucket_reso to at least {longer}, or lower the resolution"
                )
        return cls(resolution, enable_bucket, min_reso, max_reso, steps, no_upscale)

    @classmethod
    def from_spec(cls, spec) -> BucketRule:
        """`checked` on a data set's keys: anything with kohya's attribute names (a config.DatasetSpec)."""
        return cls.checked(
            spec.resolution, spec.enable_bucket, spec.min_bucket_reso, spec.max_bucket_reso,
            spec.bucket_reso_steps, spec.bucket_no_upscale,
        )  # fmt: skip

    @cached_property
    def buckets(self) -> list[tuple[int, int]]:
        """The predefined (height, width) buckets in kohya's order: kohya's list, or without buckets the
        resolution alone (empty with no_upscale: each image's bucket comes from its own size)."""
        res_h, res_w = self.resolution
        if not self.enable_bucket:
            return [(res_h, res_w)]
        if self.no_upscale:
            return []
        return [(h, w) for w, h in kohya_bucket_list(res_w, res_h, self.min_reso, self.max_reso, self.steps)]

    def select(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """kohya's select_bucket for an image of (height, width): its (height, width) bucket and the (height,
        width) it is resized to before the crop (covering the bucket; with no_upscale, at most the
        resolution's area and never enlarged)."""
        if self.enable_bucket and self.no_upscale:
            return self._shrunk(height, width)
        bucket = closest_bucket(height, width, self.buckets)
        return bucket, cover_size(height, width, bucket)

    def _round_to_steps(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps

    def _shrunk(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """no_upscale: an image above the resolution's area is shrunk to that area keeping its aspect ratio, its
        height or width put on a step (whichever then keeps the aspect ratio better); the bucket is the
        resized size floored to steps, so the crop trims at most a step less a pixel from each side."""
        aspect = width / height
        max_area = self.resolution[0] * self.resolution[1]
        if width * height > max_area:
            shrunk_w = math.sqrt(max_area * aspect)
            shrunk_h = max_area / shrunk_w
            # kohya divides by these roundings and stops on a 0; here that choice loses (a 0-sized bucket is
            # refused below)
            width_on_step = self._round_to_steps(shrunk_w)
            height_then = self._round_to_steps(width_on_step / aspect)
            aspect_width_on_step = width_on_step / height_then if height_then else math.inf
            height_on_step = self._round_to_steps(shrunk_h)
            width_then = self._round_to_steps(height_on_step * aspect)
            aspect_height_on_step = width_then / height_on_step if height_on_step else math.inf
            if abs(aspect_width_on_step - aspect) < abs(aspect_height_on_step - aspect):
                resized = int(width_on_step / aspect + 0.5), width_on_step
            else:
                resized = height_on_step, int(height_on_step * aspect + 0.5)
        else:
            resized = height, width
        bucket = resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps
        if min(bucket) == 0:
            raise UserError(
                f"an image of {height}x{width} (height x width) gets a {bucket[0]}x{bucket[1]} bucket with "
                f"bucket_no_upscale and bucket_reso_steps {self.steps}: remove the image, or unset bucket_no_upscale"
            )
        return bucket, resized


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
