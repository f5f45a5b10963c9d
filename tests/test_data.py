"""Data: SDXL size conditioning for cropped and flipped images, and the epoch batch sampler."""

import random

import pytest
import torch
from PIL import Image, ImageFile
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from difftune.cli.errors import UserError
from difftune.data import EpochBatchSampler, ImageTransform


def gradient_image(width: int, height: int) -> Image.Image:
    x = torch.linspace(0, 255, width).expand(height, width)
    y = torch.linspace(0, 255, height)[:, None].expand(height, width)
    array = torch.stack([x, y, 255 - x], dim=-1).to(torch.uint8).numpy()
    return Image.fromarray(array)


def flipped_rng() -> random.Random:
    """An RNG whose crop is off-centre and whose flip happens, found by search (not hard-coded)."""
    for seed in range(1000):
        rng = random.Random(seed)
        rng.randint(0, 0)  # the crop's top: the resized height is the crop's
        left = rng.randint(0, 107 - 64)
        if rng.random() < 0.5 and left not in (0, 21, 43):
            return random.Random(seed)
    raise AssertionError("no seed found")


def test_time_ids_for_random_crop_and_flip():
    image = gradient_image(200, 120)  # landscape: resized to 107 x 64 for a 64 px square crop
    transform = ImageTransform(center_crop=False, random_flip=True)
    pixels, original, (top, left) = transform(image, (64, 64), flipped_rng())
    assert original == (120, 200)
    resized = F.resize(image, [64, 107], interpolation=InterpolationMode.BILINEAR, antialias=True)
    resized_w = resized.width
    assert top == 0 and 0 <= left <= resized_w - 64
    # The crop, seen after the flip, starts at `left`: so the unflipped crop started at W - left - 64.
    unflipped_left = resized_w - left - 64
    expected = F.normalize(F.to_tensor(F.hflip(F.crop(resized, 0, unflipped_left, 64, 64))), [0.5] * 3, [0.5] * 3)
    assert torch.allclose(pixels, expected)
    assert left != unflipped_left


def test_center_crop_of_portrait_image():
    image = gradient_image(90, 160)
    pixels, original, crop = ImageTransform(center_crop=True, random_flip=False)(image, (64, 64), random.Random(0))
    assert original == (160, 90) and pixels.shape == (3, 64, 64)
    assert crop == (round((114 - 64) / 2), 0)


def test_time_ids_in_a_landscape_bucket():
    # 400 x 100 into a 192 x 64 bucket: resized to 256 x 64 (height fits), so the centre crop starts at x = 32.
    image = gradient_image(400, 100)
    pixels, original, crop = ImageTransform(center_crop=True, random_flip=False)(image, (64, 192), None)
    assert original == (100, 400) and crop == (0, 32)
    resized = F.resize(image, [64, 256], interpolation=InterpolationMode.BILINEAR, antialias=True)
    expected = F.normalize(F.to_tensor(F.center_crop(resized, [64, 192])), [0.5] * 3, [0.5] * 3)
    assert torch.allclose(pixels, expected)
    assert not torch.allclose(pixels, F.normalize(F.to_tensor(F.crop(resized, 0, 0, 64, 192)), [0.5] * 3, [0.5] * 3))


def test_sampler_shards_and_reshuffles():
    shards = [EpochBatchSampler(10, 2, seed=3, num_processes=2, process_index=i) for i in range(2)]
    epoch0 = [list(s) for s in shards]
    assert len(epoch0[0]) == len(epoch0[1]) == 2  # 10 samples, global batch 4: two full batches
    flat = [i for shard in epoch0 for batch in shard for i in batch]
    assert len(set(flat)) == 8
    for s in shards:
        s.set_epoch(1)
    assert [list(s) for s in shards] != epoch0
    resumed = EpochBatchSampler(10, 2, seed=3, num_processes=2, process_index=0)
    resumed.set_epoch(0, start=1)
    assert list(resumed) == epoch0[0][1:]


def test_sampler_refuses_too_few_samples():
    with pytest.raises(UserError, match="cannot fill one batch"):
        EpochBatchSampler(3, 4, seed=0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_scan_finds_cut_files_without_decoding_whole_ones(tmp_path, fmt, monkeypatch):
    from difftune.data import scan

    pixels = torch.randint(0, 255, (48, 40, 3), dtype=torch.uint8).numpy()
    whole, cut = tmp_path / f"whole.{fmt.lower()}", tmp_path / f"cut.{fmt.lower()}"
    Image.fromarray(pixels).save(whole, format=fmt)
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 3 // 4])  # a copy that stopped: header intact
    with Image.open(cut) as image:
        assert image.size == (40, 48)  # the header alone does not show the damage
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self) or real_load(self))
    assert scan.probe({"path": str(whole), "bytes": None}) == (48, 40)
    assert decoded == []  # a complete file is not decoded
    assert isinstance(scan.probe({"path": str(cut), "bytes": None}), str)


def test_a_large_jpeg_decodes_small_but_keeps_its_size_in_the_conditioning(tmp_path, monkeypatch):
    import datasets

    from difftune.data import CaptionedImageDataset

    path = tmp_path / "photo.jpg"
    gradient_image(1000, 640).save(path, quality=95)
    rows = datasets.Dataset.from_dict({"image": [{"path": str(path), "bytes": None}], "text": ["a photo"]})
    data = CaptionedImageDataset(rows, "image", "text", ImageTransform(True, False), lambda text: {}, 64, 0)
    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    sample = data.load(0, flip=False)
    assert decoded[0][0] <= 1000 // 4  # 640 x 1000 covering 64 x 64 (resized to 64 x 100): decoded at 1/8 scale
    assert sample["time_ids"].tolist() == [640, 1000, 0, 18, 64, 64]  # the file's size, the crop, the target
    with Image.open(path) as image:  # a full decode, resized and cropped alike
        full, *_ = ImageTransform(True, False)(image.convert("RGB"), (64, 64), None)
    difference = (sample["pixel_values"] - full).abs()
    assert difference.mean() < 0.02 and difference.max() < 0.2  # in [-1, 1]: a DCT-scaled decode, then the resize
