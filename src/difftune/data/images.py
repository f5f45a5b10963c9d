"""Images: opening undecoded records, the per-sample RNG, and the crop / flip / normalise transform.

Randomness (crop position, flip, caption choice, shuffle order) is derived from (seed, epoch, sample
index), not from a global RNG, so a resumed run sees exactly the batches an uninterrupted run would have seen.

`ImageTransform(kohya=True)` follows kohya sd-scripts (library/train_util.py): its resize and crop arithmetic,
its draws in its order, its colour augmentation, face crop and resize filters. kohya writes sizes as (width,
height); here they are (height, width) throughout.
"""

from __future__ import annotations

import io
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from difftune.data.config import INTERPOLATIONS


def column(dataset, name: str) -> list:
    """A column of a datasets.Dataset as a list, read through Arrow (iterating rows formats each one: slow)."""
    return dataset.with_format("arrow")[name].to_pylist()


def image_name(record: dict) -> str:
    return record.get("path") or "<image bytes>"


def image_source(record: dict):
    """What PIL opens for an undecoded datasets image record ({"bytes", "path"})."""
    return io.BytesIO(record["bytes"]) if record.get("bytes") else record["path"]


def open_image(record: dict, covering: tuple[int, int] | None = None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an undecoded datasets image record to RGB; returns it with its (height, width) in the file. With
    `covering` (height, width), a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) at which it still
    covers that size once resized to it: a photo much larger than the training size decodes several times
    faster, and the resize that follows starts from a smaller image."""
    image = Image.open(image_source(record))
    original = image.height, image.width
    if covering is not None and image.format == "JPEG":
        scale = max(covering[0] / image.height, covering[1] / image.width)
        image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    image.load()
    return image.convert("RGB"), original


def sample_rng(seed: int, epoch: int, index: int, stream: str = "") -> random.Random:
    """An RNG for one sample in one epoch, independent of what ran before; a named `stream` draws
    apart from the augmentation's, so adding a draw there changes no other."""
    return random.Random(f"{seed}:{epoch}:{index}{':' + stream if stream else ''}")


def draw_flip(rng: random.Random, random_flip: bool) -> bool:
    """The flip decision; with a centre crop (and always with kohya's order) it is the sample's first draw
    (cached and live data agree)."""
    return random_flip and rng.random() < 0.5


# kohya's geometry. difftune.data.buckets (which imports this module, so these cannot live there) re-exports
# cover_size and crop_offsets with the bucket rule they belong to.


def cover_size(height: int, width: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """(height, width) an image is resized to so it covers the (height, width) `bucket`, as kohya computes it:
    matched to the bucket's height when the image is wider than the bucket, else to its width, each side
    rounded half up (int(x + 0.5), not Python's round, which rounds halves to even)."""
    bucket_h, bucket_w = bucket
    scale = bucket_h / height if width / height > bucket_w / bucket_h else bucket_w / width
    return int(height * scale + 0.5), int(width * scale + 0.5)


def crop_offsets(resized: tuple[int, int], bucket: tuple[int, int], rng: random.Random | None) -> tuple[int, int]:
    """(top, left) of the `bucket`-sized crop of an image resized to `resized` (both (height, width)), as kohya
    trims: centred (the excess // 2) without `rng`, else uniform over 0..excess. kohya draws the left before
    the top, and only for a side with excess: the order and count of draws are kept so a seed crops alike."""
    (resized_h, resized_w), (bucket_h, bucket_w) = resized, bucket
    if resized_h < bucket_h or resized_w < bucket_w:
        raise ValueError(f"a {resized_h}x{resized_w} image cannot be cropped to {bucket_h}x{bucket_w}")
    top = left = 0
    if resized_w > bucket_w:
        trim = resized_w - bucket_w
        left = trim // 2 if rng is None else rng.randint(0, trim)
    if resized_h > bucket_h:
        trim = resized_h - bucket_h
        top = trim // 2 if rng is None else rng.randint(0, trim)
    return top, left


def face_info(path: str | os.PathLike | None) -> tuple[int, int, int, int] | None:
    """kohya's face position in a file name: the last four "_" parts of the stem as integers, the face's centre
    x, centre y, width and height in the file's pixels ("photo_512_300_120_140.jpg"). None when the stem has
    fewer than five parts or those four are not integers (where kohya would stop with an error)."""
    if not path:
        return None
    tokens = os.path.splitext(os.path.basename(os.fspath(path)))[0].split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, w, h = (int(token) for token in tokens[-4:])
    except ValueError:
        return None
    return cx, cy, w, h


def face_crop(
    original: tuple[int, int],
    target: tuple[int, int],
    face: tuple[int, int, int, int],
    face_range: tuple[float, float],
    random_crop: bool,
    rng: random.Random | None,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """kohya's crop_target: the (height, width) to resize an image of `original` size to, and the (top, left) of
    its `target`-sized crop around the face, with kohya's draws in kohya's order.

    The scale is drawn so the face's larger side is between 1 / face_range[1] and 1 / face_range[0] of the
    target's shorter side (never enlarging, never below covering the target); the crop centres the face, pushed
    about by two draws per side with random_crop (height first), or jittered by up to 1/20 of the face when the
    range is a range and the face not small; then kept inside the image. kohya stops on an image smaller than
    the target; here it is resized to cover the target instead (the same results on every image kohya takes).
    """
    height, width = original
    target_h, target_w = target
    if (height, width) == (target_h, target_w):
        return (height, width), (0, 0)  # kohya: already the size, no resize and no draws
    cx, cy, face_w, face_h = face
    face_size = max(face_w, face_h)
    shorter = min(target_h, target_w)
    cover = max(target_h / height, target_w / width)
    min_scale = min(1.0, max(cover, shorter / (face_size * face_range[1])))
    max_scale = min(1.0, max(min_scale, shorter / (face_size * face_range[0])))
    min_scale = max(min_scale, cover)  # only differs from kohya where kohya refuses (cover > 1)
    max_scale = max(max_scale, min_scale)
    # kohya jitters a centred crop only for a range that is a range and a face neither tiny nor small in the target
    jitter = face_range[0] != face_range[1] and face_size > shorter // 10 and face_size >= 40
    if rng is None and (min_scale < max_scale or random_crop or jitter):
        raise ValueError("this face crop draws for every sample: it needs an rng (a cache cannot hold it)")
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    resized_h, resized_w = int(height * scale + 0.5), int(width * scale + 0.5)
    offsets = []
    for size, length, centre in (
        (target_h, resized_h, int(cy * scale + 0.5)),
        (target_w, resized_w, int(cx * scale + 0.5)),
    ):
        start = centre - size // 2
        if random_crop:  # more often near the face, sometimes far: two draws per side, a triangular spread
            reach = max(length - centre, centre)
            start += rng.randint(0, reach) + rng.randint(0, reach) - reach
        elif jitter:
            start += rng.randint(-face_size // 20, face_size // 20)  # kohya's (-f) // 20: floored, as written
        offsets.append(max(0, min(start, length - size)))
    return (resized_h, resized_w), (offsets[0], offsets[1])


_FILTERS = {
    "lanczos": Image.Resampling.LANCZOS,
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "linear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "cubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
}


def resize_filter(name: str | None, shrinking: bool) -> Image.Resampling:
    """The PIL filter for kohya's resize_interpolation `name`, for a resize that shrinks both sides or not.

    None is kohya's default: "area" when shrinking both sides, else "lanczos". kohya resizes with PIL for
    "lanczos" and "box" (the same filters here) and with OpenCV for the rest, which PIL approximates: "area"
    (OpenCV's INTER_AREA, which averages the covered source pixels when shrinking) is BOX, PIL's area average,
    when shrinking both sides, and BILINEAR otherwise (INTER_AREA enlarges about bilinearly); "nearest" is
    NEAREST (OpenCV's INTER_NEAREST_EXACT is documented to match PIL); "bilinear"/"linear" and "bicubic"/"cubic"
    are PIL's BILINEAR and BICUBIC, whose kernels widen when shrinking (OpenCV's do not): smoother on large
    reductions than kohya's.
    """
    if name is None:
        name = "area" if shrinking else "lanczos"
    if name == "area":
        return Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    if name not in _FILTERS:
        raise ValueError(f"unknown resize interpolation {name!r}: one of {', '.join(INTERPOLATIONS)}")
    return _FILTERS[name]


# OpenCV's 8-bit HSV tables (hue in 0..180): 12-bit fixed-point reciprocals, rounded half to even as cvRound does.
_SDIV = np.array([0] + [round((255 << 12) / i) for i in range(1, 256)], dtype=np.int64)
_HDIV = np.array([0] + [round((180 << 12) / (6 * i)) for i in range(1, 256)], dtype=np.int64)
HUE_SHIFT_LIMIT = 8  # kohya's, in OpenCV hue units (180 a full turn: 2 degrees each)


def _hue_shifted(pixels: np.ndarray, shift: float) -> np.ndarray:
    """kohya's hue shift: cv2.cvtColor(pixels, COLOR_BGR2HSV), the hue moved by `shift` mod 180, and back with
    COLOR_HSV2BGR, in OpenCV's 8-bit arithmetic written in numpy (we have no OpenCV).

    kohya hands OpenCV its RGB array as if it were BGR: red and blue trade places in the hue formula, which
    mirrors the hue circle, so a positive shift turns the true hue backwards. Reading the array the same way
    keeps that. The forward conversion is OpenCV's integer arithmetic exactly; the way back is its float32
    arithmetic truncated to uint8, as its vectorised path does. OpenCV rounds instead for the few pixels at a
    row's end that do not fill a vector (the width mod 16, 32 or 64 by CPU): there we may be one level lower.
    """
    b, g, r = (pixels[..., channel].astype(np.int64) for channel in range(3))  # the RGB array read as BGR
    v = np.maximum(np.maximum(b, g), r)
    diff = v - np.minimum(np.minimum(b, g), r)
    s = (diff * _SDIV[v] + (1 << 11)) >> 12
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + (1 << 11)) >> 12
    h = np.where(h < 0, h + 180, h)
    # kohya: a negative shift becomes 180 + shift, the sum is taken mod 180 in float64 and stored back into
    # the uint8 array: truncated.
    h = ((h + (180 + shift if shift < 0 else shift)) % 180).astype(np.uint8)

    one = np.float32(1.0)
    hue = h.astype(np.float32) * (np.float32(6.0) / np.float32(180.0))
    sat = s.astype(np.float32) * (one / np.float32(255.0))
    val = v.astype(np.float32) * (one / np.float32(255.0))
    sector = np.trunc(hue)
    hue = hue - sector
    tab = np.stack([val, val * (one - sat), val * (one - sat * hue), val * (one - sat * (one - hue))])
    # which of tab goes to (b, g, r) in each of the six sectors (OpenCV's sector_data)
    order = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])[sector.astype(np.int64)]
    bgr = np.take_along_axis(tab, np.moveaxis(order, -1, 0), axis=0) * np.float32(255.0)
    return np.moveaxis(np.trunc(bgr), 0, -1).astype(np.uint8)


def color_aug(pixels: np.ndarray, rng: random.Random) -> np.ndarray:
    """kohya's AugHelper.color_aug on an (height, width, 3) uint8 RGB array, with its draws: one time in three
    (rng.random() <= 0.33), then even odds (rng.random() > 0.5) of a hue shift by uniform(-8, 8) OpenCV hue
    units (see `_hue_shifted`) or a gamma uniform(0.95, 1.05). The gamma is kohya's: the 0..255 values
    themselves raised to it (not values in [0, 1], so 255 ** 0.95 = 193.3 darkens white to 193 and
    100 ** 1.05 = 125.9 brightens to 125), clipped to 0..255 and truncated to uint8."""
    if rng.random() > 0.33:
        return pixels
    if rng.random() > 0.5:
        return _hue_shifted(pixels, rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT))
    gamma = rng.uniform(0.95, 1.05)
    return np.clip(pixels.astype(np.float64) ** gamma, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class ImageTransform:
    """Resize to cover the target size, crop (centre or random), maybe flip, normalise.

    Returns the tensor, the original (height, width) and the crop's (top, left) in the
    resized image as seen after the flip: what SDXL's micro-conditioning wants.

    With `kohya`, the geometry is kohya's: the resize rounding of `cover_size` (or the size given, as
    BucketRule.select computes it), the crop of `crop_offsets`, kohya's resize filters (`interpolation`, None
    for kohya's default) and kohya's draw order: the flip, then the crop, then `color_aug`'s draws.
    `face_crop_range` turns on kohya's face crop for images whose `face` is given. The crop offsets reported
    are always the true ones (kohya's get_crop_ltrb reports others).
    """

    center_crop: bool
    random_flip: bool
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)
    kohya: bool = False
    color_aug: bool = False
    face_crop_range: tuple[float, float] | None = None
    interpolation: str | None = None

    def __call__(
        self,
        image: Image.Image,
        size: tuple[int, int],
        rng: random.Random | None,
        flip: bool | None = None,
        face: tuple[int, int, int, int] | None = None,
        resized: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """`flip` forces the flip decision (for caching both orientations); else it is drawn from `rng`."""
        return self.with_mask(image, size, rng, flip, face=face, resized=resized)[:3]

    def with_mask(
        self,
        image: Image.Image,
        size: tuple[int, int],
        rng: random.Random | None,
        flip: bool | None = None,
        mask: Image.Image | None = None,
        original: tuple[int, int] | None = None,
        face: tuple[int, int, int, int] | None = None,
        resized: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int], torch.Tensor | None]:
        """As a call, and the `mask` (a grayscale image, stretched to the image's size) through the same
        resize, crop and flip, as a (1, height, width) tensor in [0, 1] (None without one).

        `face` is the image's face_info (in the file's pixels); with face_crop_range set it crops around the
        face (kohya does so only in data sets without buckets: pass it only there). `resized` (with `kohya`)
        is the (height, width) to resize to before the crop, from BucketRule.select: needed with
        bucket_no_upscale, else kohya's cover_size of the file's size, which is what select gives.
        """
        from torchvision.transforms import functional as F

        if rng is None and (self.color_aug or not self.center_crop):
            raise ValueError("a random crop or color_aug draws for every sample: it needs an rng (and no cache)")
        target_h, target_w = size
        original = original or (image.height, image.width)  # (a JPEG decoded smaller: its size in the file)
        if self.kohya and flip is None:
            flip = draw_flip(rng, self.random_flip)  # kohya's first draw
        crop_rng = None if self.center_crop else rng
        if self.face_crop_range is not None and face is not None and face[0] > 0 and max(face[2:]) > 0:
            resized, (top, left) = face_crop(original, size, face, self.face_crop_range, crop_rng is not None, rng)
        elif self.kohya:
            resized = resized or cover_size(*original, size)
            top, left = crop_offsets(resized, size, crop_rng)
        else:
            scale = max(target_h / image.height, target_w / image.width)
            resized_h = max(target_h, round(image.height * scale))
            resized_w = max(target_w, round(image.width * scale))
            if self.center_crop:
                top, left = round((resized_h - target_h) / 2), round((resized_w - target_w) / 2)
            else:
                top, left = rng.randint(0, resized_h - target_h), rng.randint(0, resized_w - target_w)
            resized = resized_h, resized_w
        resized_h, resized_w = resized
        if self.kohya or self.interpolation is not None:
            resample = resize_filter(self.interpolation, image.width >= resized_w and image.height >= resized_h)
        else:
            resample = Image.Resampling.BILINEAR  # torchvision's bilinear on a PIL image, as before
        box = (left, top, left + target_w, top + target_h)
        image = image.resize((resized_w, resized_h), resample).crop(box)
        if mask is not None:  # kohya resizes its alpha mask with its image: the same filter
            mask = mask.resize((resized_w, resized_h), resample).crop(box)
        if flip is None:
            flip = draw_flip(rng, self.random_flip)  # without kohya: after the crop's draws, as before
        if self.color_aug:
            image = Image.fromarray(color_aug(np.asarray(image), rng))
        if flip:
            image, mask = F.hflip(image), None if mask is None else F.hflip(mask)
            left = resized_w - left - target_w
        tensor = F.normalize(F.to_tensor(image), self.mean, self.std)
        return tensor, original, (top, left), None if mask is None else F.to_tensor(mask)
