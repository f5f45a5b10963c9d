"""Images: opening undecoded records, the per-sample RNG, and the crop / flip / normalise transform.

Randomness (crop position, flip, caption choice, shuffle order) is derived from (seed, epoch, sample
index), not from a global RNG, so a resumed run sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image


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
    """The flip decision; with a centre crop it is the sample's first draw (cached and live data agree)."""
    return random_flip and rng.random() < 0.5


@dataclass(frozen=True)
class ImageTransform:
    """Resize to cover the target size, crop (centre or random), maybe flip, normalise.

    Returns the tensor, the original (height, width) and the crop's (top, left) in the
    resized image as seen after the flip: what SDXL's micro-conditioning wants.
    """

    center_crop: bool
    random_flip: bool
    mean: Sequence[float] = (0.5, 0.5, 0.5)
    std: Sequence[float] = (0.5, 0.5, 0.5)

    def __call__(
        self, image: Image.Image, size: tuple[int, int], rng: random.Random | None, flip: bool | None = None
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """`flip` forces the flip decision (for caching both orientations); else it is drawn from `rng`."""
        return self.with_mask(image, size, rng, flip)[:3]

    def with_mask(
        self,
        image: Image.Image,
        size: tuple[int, int],
        rng: random.Random | None,
        flip: bool | None = None,
        mask: Image.Image | None = None,
        original: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int], torch.Tensor | None]:
        """As a call, and the `mask` (a grayscale image, stretched to the image's size) through the same
        resize, crop and flip, as a (1, height, width) tensor in [0, 1] (None without one)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as F

        target_h, target_w = size
        original = original or (image.height, image.width)  # (a JPEG decoded smaller: its size in the file)
        scale = max(target_h / image.height, target_w / image.width)
        resized_h = max(target_h, round(image.height * scale))
        resized_w = max(target_w, round(image.width * scale))
        image = F.resize(image, [resized_h, resized_w], interpolation=InterpolationMode.BILINEAR, antialias=True)
        if self.center_crop:
            top, left = round((resized_h - target_h) / 2), round((resized_w - target_w) / 2)
        else:
            top, left = rng.randint(0, resized_h - target_h), rng.randint(0, resized_w - target_w)
        image = F.crop(image, top, left, target_h, target_w)
        if mask is not None:
            mask = F.resize(mask, [resized_h, resized_w], interpolation=InterpolationMode.BILINEAR, antialias=True)
            mask = F.crop(mask, top, left, target_h, target_w)
        if draw_flip(rng, self.random_flip) if flip is None else flip:
            image, mask = F.hflip(image), None if mask is None else F.hflip(mask)
            left = resized_w - left - target_w
        tensor = F.normalize(F.to_tensor(image), self.mean, self.std)
        return tensor, original, (top, left), None if mask is None else F.to_tensor(mask)
