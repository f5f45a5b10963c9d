"""kohya sd-scripts' bucket rules and image augmentations, against values worked out from kohya's code.

Every expected value is a literal (from kohya's make_bucket_resolutions / select_bucket run once by hand, or
from the arithmetic written beside it), never computed by the code under test. Sizes written "WxH" are
kohya's (width, height); our API speaks (height, width).
"""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from difftune.cli.errors import UserError
from difftune.data.buckets import BucketRule, closest_bucket, crop_offsets, kohya_bucket_list, make_buckets
from difftune.data.images import INTERPOLATIONS, ImageTransform, color_aug, face_crop, face_info, resize_filter


def wh_list(text: str) -> list[tuple[int, int]]:
    """ "256x1024 320x1024" -> [(256, 1024), (320, 1024)]: (width, height) as kohya writes them."""
    return [tuple(int(side) for side in item.split("x")) for item in text.split()]


# kohya's make_bucket_resolutions((r, r)) with its default keys (min 256, max 1024, steps 64), in its order.
KOHYA_512 = wh_list(
    "256x832 256x896 256x960 256x1024 320x704 320x768 384x640 448x576 512x512 576x448 640x384 704x320 768x320 "
    "832x256 896x256 960x256 1024x256"
)
KOHYA_768 = wh_list(
    "256x1024 320x1024 384x1024 448x1024 512x1024 576x960 576x1024 640x896 704x832 768x768 832x704 896x640 "
    "960x576 1024x256 1024x320 1024x384 1024x448 1024x512 1024x576"
)
KOHYA_1024 = wh_list(
    "256x1024 320x1024 384x1024 448x1024 512x1024 576x1024 640x1024 704x1024 768x1024 832x1024 896x1024 960x1024 "
    "1024x256 1024x320 1024x384 1024x448 1024x512 1024x576 1024x640 1024x704 1024x768 1024x832 1024x896 "
    "1024x960 1024x1024"
)
# The same at 1024 with min_bucket_reso 512, max_bucket_reso 2048, bucket_reso_steps 32.
KOHYA_1024_512_2048_32 = wh_list(
    "512x1952 512x1984 512x2016 512x2048 544x1824 544x1856 544x1888 544x1920 576x1728 576x1760 576x1792 608x1664 "
    "608x1696 640x1568 640x1600 640x1632 672x1504 672x1536 704x1440 704x1472 736x1376 736x1408 768x1312 768x1344 "
    "800x1280 832x1216 832x1248 864x1184 896x1152 928x1120 960x1088 992x1056 1024x1024 1056x992 1088x960 "
    "1120x928 1152x896 1184x864 1216x832 1248x832 1280x800 1312x768 1344x768 1376x736 1408x736 1440x704 "
    "1472x704 1504x672 1536x672 1568x640 1600x640 1632x640 1664x608 1696x608 1728x576 1760x576 1792x576 "
    "1824x544 1856x544 1888x544 1920x544 1952x512 1984x512 2016x512 2048x512"
)
# A non-square resolution, 1024 wide x 768 high.
KOHYA_1024x768 = wh_list(
    "256x1024 320x1024 384x1024 448x1024 512x1024 576x1024 640x1024 704x1024 768x960 768x1024 832x832 832x896 "
    "896x832 960x768 1024x256 1024x320 1024x384 1024x448 1024x512 1024x576 1024x640 1024x704 1024x768"
)


@pytest.mark.parametrize(
    ("size", "keys", "expected"),
    [
        ((512, 512), (), KOHYA_512),
        ((768, 768), (), KOHYA_768),
        ((1024, 1024), (), KOHYA_1024),
        ((1024, 1024), (512, 2048, 32), KOHYA_1024_512_2048_32),
        ((1024, 768), (), KOHYA_1024x768),
    ],
)
def test_bucket_lists_are_kohyas(size, keys, expected):
    assert kohya_bucket_list(*size, *keys) == expected
    height, width = size[1], size[0]
    rule = BucketRule.checked((height, width), True, *keys)
    assert rule.buckets == [(h, w) for w, h in expected]  # ours: (height, width), kohya's order


def test_make_buckets_is_kohyas_list_at_default_keys():
    assert make_buckets(1024) == [(h, w) for w, h in KOHYA_1024]
    assert make_buckets(512) == [(h, w) for w, h in KOHYA_512]
    assert (2048, 2048) in make_buckets(2048)  # the max rises to the resolution
    assert make_buckets(128) == [(192, 64), (256, 64), (128, 128), (64, 192), (64, 256)]  # min one step below 256


# (image WxH) -> (bucket WxH, resized WxH), from kohya's select_bucket at square resolutions with default keys.
SELECTED_1024 = {
    "1920x1080": ("1024x576", "1024x576"),
    "640x480": ("1024x768", "1024x768"),
    "1080x1920": ("576x1024", "576x1024"),  # portrait
    "1000x1000": ("1024x1024", "1024x1024"),  # square, enlarged
    "1023x1025": ("1024x1024", "1024x1026"),
    "3000x500": ("1024x256", "1536x256"),  # panorama: the widest bucket, cropped
    "500x3000": ("256x1024", "256x1536"),
    "10000x100": ("1024x256", "25600x256"),  # extreme panorama
    "64x48": ("1024x768", "1024x768"),  # tiny: enlarged 16 times
    "100x100": ("1024x1024", "1024x1024"),
    "1024x576": ("1024x576", "1024x576"),  # a bucket's own size
    "4000x3000": ("1024x768", "1024x768"),
    "1234x567": ("1024x448", "1024x471"),
    "800x1200": ("704x1024", "704x1056"),
    "700x300": ("1024x448", "1045x448"),
    "375x480": ("768x1024", "800x1024"),  # plain difference 0.0313 vs 0.0521; by log ratio: 832x1024
    "669x480": ("1024x768", "1070x768"),  # by log ratio: 1024x704
    "2048x1153": ("1024x576", "1024x577"),  # 1153 / 2 = 576.5: int(x + 0.5) = 577, round() = 576
    "1153x2048": ("576x1024", "577x1024"),
}
SELECTED_512 = {
    "1920x1080": ("640x384", "683x384"),
    "640x480": ("576x448", "597x448"),
    "1080x1920": ("384x640", "384x683"),
    "3000x500": ("1024x256", "1536x256"),  # max_bucket_reso 1024 above the 512 resolution
    "1234x567": ("704x320", "704x323"),
    "410x600": ("384x640", "437x640"),  # by log ratio: 448x576
    "424x480": ("448x576", "509x576"),
}


def hw(text: str) -> tuple[int, int]:
    width, height = (int(side) for side in text.split("x"))
    return height, width


@pytest.mark.parametrize(("resolution", "table"), [(1024, SELECTED_1024), (512, SELECTED_512)])
def test_each_image_lands_in_kohyas_bucket_at_kohyas_size(resolution, table):
    rule = BucketRule.checked(resolution)
    for image, (bucket, resized) in table.items():
        assert rule.select(*hw(image)) == (hw(bucket), hw(resized)), image
        assert closest_bucket(*hw(image), rule.buckets) == hw(bucket), image


def test_non_default_keys_and_no_buckets():
    rule = BucketRule.checked(1024, True, 512, 2048, 32)
    assert rule.select(*hw("1920x1080")) == (hw("1344x768"), hw("1365x768"))
    assert rule.select(*hw("3000x500")) == (hw("2048x512"), hw("3072x512"))
    assert rule.select(*hw("640x480")) == (hw("1184x864"), hw("1184x888"))
    single = BucketRule.checked((768, 1024), enable_bucket=False, min_reso=2000)  # keys unused without buckets
    assert single.buckets == [(768, 1024)]
    assert single.select(*hw("1920x1080")) == (hw("1024x768"), hw("1365x768"))
    assert single.select(*hw("500x3000")) == (hw("1024x768"), hw("1024x6144"))


def test_no_upscale_shrinks_only_images_above_the_area():
    rule = BucketRule.checked(1024, no_upscale=True)
    assert rule.select(*hw("4000x3000")) == (hw("1088x832"), hw("1109x832"))  # above 1024^2: shrunk
    assert rule.select(*hw("1920x1080")) == (hw("1344x768"), hw("1365x768"))
    assert rule.select(*hw("3000x500")) == (hw("2304x384"), hw("2304x384"))
    assert rule.select(*hw("1030x1030")) == (hw("1024x1024"), hw("1024x1024"))
    assert rule.select(*hw("900x700")) == (hw("896x640"), hw("900x700"))  # below: kept, cropped to steps
    assert rule.select(*hw("1000x1000")) == (hw("960x960"), hw("1000x1000"))
    assert rule.select(*hw("100x70")) == (hw("64x64"), hw("100x70"))
    with pytest.raises(UserError, match="bucket_no_upscale"):
        rule.select(*hw("50x40"))  # a bucket of 0 x 0: kohya would train on an empty image


def test_closest_bucket_takes_the_exact_size_then_kohyas_first_on_ties():
    # image ratio 1.0: w/h 0.5 and 1.5 are both 0.5 away; kohya's order (by width) puts 256x512 first
    assert closest_bucket(400, 400, [(256, 384), (512, 256)]) == (512, 256)
    # the same aspect ratio twice: the image's own size wins, though the other comes first
    assert closest_bucket(1152, 2048, [(576, 1024), (1152, 2048)]) == (1152, 2048)
    assert closest_bucket(1152, 2049, [(576, 1024), (1152, 2048)]) == (576, 1024)


def test_min_and_max_are_put_on_steps_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        rule = BucketRule.checked(1024, True, 300, 1000, 64)
    assert (rule.min_reso, rule.max_reso) == (256, 1024)  # 300 - 300 % 64, 1000 + 64 - 1000 % 64
    messages = " / ".join(record.getMessage() for record in caplog.records)
    assert "min_bucket_reso 300 is rounded down to 256" in messages
    assert "max_bucket_reso 1000 is rounded up to 1024" in messages
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert BucketRule.checked(512, True, 520, 1024).min_reso == 512  # rounded, then within the resolution
    assert len(caplog.records) == 1


def test_min_above_or_max_below_the_resolution_is_refused():
    with pytest.raises(UserError) as error:
        BucketRule.checked(512, True, 640, 1024)
    message = str(error.value)
    assert "min_bucket_reso 640" in message and "512" in message and "\n" not in message
    with pytest.raises(UserError) as error:
        BucketRule.checked((512, 1536), True, 256, 1024)  # (height, width): the longer side is 1536
    message = str(error.value)
    assert "max_bucket_reso 1024" in message and "1536" in message and "\n" not in message
    with pytest.raises(UserError, match="max_bucket_reso 1280"):
        BucketRule.checked(1344, True, 256, 1216, 128)  # rounded up to 1280 first, still below 1344
    BucketRule.checked(512, False, 640, 256)  # without buckets the keys are not used: no refusal


def test_centred_crop_is_half_the_excess_floored():
    # odd excesses: 1 -> 0, 3 -> 1 (round() would give 2), 5 -> 2, 7 -> 3 (round(): 4), 49 -> 24
    for excess, half in ((1, 0), (3, 1), (5, 2), (7, 3), (49, 24)):
        assert crop_offsets((512 + excess, 512), (512, 512), None) == (half, 0)
        assert crop_offsets((512, 768 + excess), (512, 768), None) == (0, half)
    assert crop_offsets((1026, 1027), (1024, 1024), None) == (1, 1)


def test_random_crop_draws_the_left_then_the_top_and_only_where_there_is_excess():
    expected_rng = random.Random(7)
    left = expected_rng.randint(0, 388)  # 900 - 512: kohya trims the width first
    top = expected_rng.randint(0, 188)  # 700 - 512
    other_rng = random.Random(7)
    assert (other_rng.randint(0, 188), other_rng.randint(0, 388)) != (top, left)  # the order shows
    assert crop_offsets((700, 900), (512, 512), random.Random(7)) == (top, left)
    rng = random.Random(7)
    state = rng.getstate()
    assert crop_offsets((512, 512), (512, 512), rng) == (0, 0)
    assert rng.getstate() == state  # no excess, no draw (randint(0, 0) would consume one)


class Script:
    """An RNG that returns scripted values and records what was asked of it."""

    def __init__(self, *values) -> None:
        self.values, self.calls = list(values), []

    def random(self):
        self.calls.append(("random",))
        return self.values.pop(0)

    def uniform(self, low, high):
        self.calls.append(("uniform", low, high))
        return self.values.pop(0)

    def randint(self, low, high):
        self.calls.append(("randint", low, high))
        return self.values.pop(0)


PIXELS = np.array([[[0, 1, 2], [50, 100, 128], [200, 250, 255]]], dtype=np.uint8)


def test_color_aug_gamma_is_on_the_0_to_255_values_truncated():
    rng = Script(0.2, 0.4, 0.95)  # applied (<= 0.33), gamma (<= 0.5), gamma 0.95
    out = color_aug(PIXELS, rng)
    assert rng.calls == [("random",), ("random",), ("uniform", 0.95, 1.05)]
    # 2 ** 0.95 = 1.93, 50 ** 0.95 = 41.1, 100 ** 0.95 = 79.4, 128 ** 0.95 = 100.4, 200 ** 0.95 = 153.5,
    # 250 ** 0.95 = 189.7, 255 ** 0.95 = 193.3
    assert out.tolist() == [[[0, 1, 1], [41, 79, 100], [153, 189, 193]]]
    out = color_aug(PIXELS, Script(0.33, 0.5, 1.05))  # 0.33 still applies; 0.5 is still gamma
    # 2 ** 1.05 = 2.07, 50 ** 1.05 = 60.8, 100 ** 1.05 = 125.9, 128 ** 1.05 = 163.1; 200 ** 1.05 = 260.7 -> 255
    assert out.tolist() == [[[0, 1, 2], [60, 125, 163], [255, 255, 255]]]
    rng = Script(0.3301)
    assert color_aug(PIXELS, rng) is PIXELS and rng.calls == [("random",)]  # two times in three: untouched


def test_color_aug_hue_shift_is_kohyas_mirrored_opencv_hue():
    rng = Script(0.1, 0.6, 8.0)  # applied, hue (> 0.5), +8 OpenCV units (16 degrees)
    red = np.array([[[255, 0, 0]]], dtype=np.uint8)
    out = color_aug(red, rng)
    assert rng.calls == [("random",), ("random",), ("uniform", -8, 8)]
    # kohya's RGB array read as BGR: red is OpenCV's blue (hue 120), +8 -> 128 = 256 degrees; back as RGB that
    # is red turned 16 degrees the other way: (255, 0, 255 * 16 / 60 = 68), give or take a level
    r, g, b = out[0, 0].tolist()
    assert r == 255 and g == 0 and abs(b - 68) <= 1
    grey = np.full((2, 3, 3), 77, dtype=np.uint8)
    assert np.array_equal(color_aug(grey, Script(0.1, 0.9, -5.5)), grey)  # no saturation: no hue to turn


def gradient(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def normalised(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def test_kohya_transform_resizes_as_kohya_and_crops_the_centre():
    image = gradient(1234, 567)  # bucket 1024x448, resized 1024x471
    pixels, original, crop = ImageTransform(True, False, kohya=True)(image, (448, 1024), None)
    assert original == (567, 1234) and crop == (11, 0)  # (471 - 448) // 2 = 11
    expected = image.resize((1024, 471), Image.Resampling.BOX).crop((0, 11, 1024, 459))  # kohya: area on shrink
    assert torch.allclose(pixels, normalised(expected), atol=1e-6)
    image = gradient(2048, 1153)
    _, _, crop = ImageTransform(True, False, kohya=True)(image, (576, 1024), None)
    assert crop == (0, 0)  # resized to 1024x577, (577 - 576) // 2 = 0
    small = gradient(64, 48)  # enlarged: kohya's lanczos
    pixels, _, crop = ImageTransform(True, False, kohya=True)(small, (768, 1024), None)
    assert crop == (0, 0)
    assert torch.allclose(pixels, normalised(small.resize((1024, 768), Image.Resampling.LANCZOS)), atol=1e-6)


def test_kohya_transform_uses_the_given_resized_size_and_filter():
    image = gradient(900, 700)  # no_upscale: kept at 900x700, cropped to 896x640
    pixels, _, crop = ImageTransform(True, False, kohya=True, interpolation="bicubic")(
        image, (640, 896), None, resized=(700, 900)
    )
    assert crop == (30, 2)  # (700 - 640) // 2, (900 - 896) // 2
    assert torch.allclose(pixels, normalised(image.crop((2, 30, 898, 670))), atol=1e-6)  # same size: no resize
    assert resize_filter(None, True) == Image.Resampling.BOX and resize_filter(None, False) == Image.Resampling.LANCZOS
    assert resize_filter("area", False) == Image.Resampling.BILINEAR and resize_filter("cubic", True) == (
        Image.Resampling.BICUBIC
    )
    assert set(INTERPOLATIONS) == {"lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"}


def test_kohya_draw_order_is_flip_then_crop_then_color():
    image = gradient(900, 700)  # wider than the 512 square: scale 512 / 700, resized 658x512 (900 * 0.7314 = 658.3)
    rng = Script(0.1, 100, 0.9)  # flip (0.1 < 0.5), left 100 of 0..146, colour not applied (0.9 > 0.33)
    transform = ImageTransform(False, True, kohya=True, color_aug=True)
    _, _, crop = transform(image, (512, 512), rng)
    assert rng.calls == [("random",), ("randint", 0, 146), ("random",)]
    assert crop == (0, 658 - 100 - 512)  # the true crop, mirrored: the flipped image's left is 46
    forced = Script(100, 0.9)  # a forced flip draws nothing
    transform(image, (512, 512), forced, flip=False)
    assert forced.calls == [("randint", 0, 146), ("random",)]
    old = Script(0, 100, 0.1)  # without kohya, as before: the crop's draws (the top's first), then the flip
    _, _, crop = ImageTransform(False, True)(image, (512, 512), old)
    assert old.calls == [("randint", 0, 0), ("randint", 0, 146), ("random",)] and crop == (0, 46)


def test_masks_follow_the_kohya_resize_crop_and_flip_without_color():
    image = gradient(900, 700)
    mask = Image.fromarray(np.tile(np.arange(900)[None, :] % 251, (700, 1)).astype(np.uint8))
    transform = ImageTransform(False, True, kohya=True, color_aug=True)
    _, _, crop, out = transform.with_mask(image, (512, 512), Script(0.1, 100, 0.2, 0.4, 1.05), mask=mask)
    expected = mask.resize((658, 512), Image.Resampling.BOX).crop((100, 0, 612, 512))
    expected = torch.from_numpy(np.asarray(expected)[:, ::-1].copy()).float()[None] / 255
    assert crop == (0, 46) and torch.allclose(out, expected)  # gamma 1.05 drawn, the mask untouched


def test_face_info_reads_kohyas_file_names():
    assert face_info("data/photo_512_300_120_140.jpg") == (512, 300, 120, 140)
    assert face_info("x_1_2_3_4.png") == (1, 2, 3, 4)
    assert face_info("1_2_3_4.png") is None  # four parts: kohya wants at least five
    assert face_info("my_photo_a_2_3_4.png") is None  # not integers
    assert face_info("<image bytes>") is None and face_info(None) is None


def test_face_crop_scales_and_centres_the_face_with_kohyas_draws():
    # 2000x1600 image, face 800 px at (1200, 600), target 512x512, face_crop_aug_range (1, 2):
    # cover 0.32; min scale = max(0.32, 512 / (800 * 2)) = 0.32; max = min(1, 512 / 800) = 0.64
    rng = Script(0.5, 10, -20)  # the scale, then the jitter of the top, then of the left
    resized, crop = face_crop((1600, 2000), (512, 512), (1200, 600, 800, 800), (1.0, 2.0), False, rng)
    assert rng.calls == [("uniform", 0.32, 0.64), ("randint", -40, 40), ("randint", -40, 40)]
    # scale 0.5: 800x1000, face at (600, 300); top 300 - 256 + 10, left 600 - 256 - 20
    assert resized == (800, 1000) and crop == (54, 324)
    rng = Script(0.5, 400, 300, 350, 250)  # random crop: two draws per side, the top's first
    resized, crop = face_crop((1600, 2000), (512, 512), (1200, 600, 800, 800), (1.0, 2.0), True, rng)
    assert rng.calls[1:] == [("randint", 0, 500), ("randint", 0, 500), ("randint", 0, 600), ("randint", 0, 600)]
    assert crop == (244, 344)  # 44 + 700 - 500, 344 + 600 - 600
    rng = Script()
    resized, crop = face_crop((1600, 2000), (512, 512), (1200, 600, 800, 800), (2.0, 2.0), False, rng)
    # one scale (0.32, covering), no jitter: 512x640, the face at (int(384.5), int(192.5)) = (384, 192);
    # top 192 - 256 kept in the image (0), left 384 - 256 = 128 (at most 640 - 512 = 128)
    assert rng.calls == [] and resized == (512, 640) and crop == (0, 128)
    assert face_crop((1600, 2000), (512, 512), (1200, 600, 800, 800), (2.0, 2.0), False, None)[1] == (0, 128)
    with pytest.raises(ValueError, match="needs an rng"):  # a drawn scale cannot be cached
        face_crop((1600, 2000), (512, 512), (1200, 600, 800, 800), (1.0, 2.0), False, None)


def test_face_crop_through_the_transform():
    image = gradient(2000, 1600)
    transform = ImageTransform(True, False, kohya=True, face_crop_range=(1.0, 2.0))
    pixels, original, crop = transform(image, (512, 512), Script(0.5, 10, -20), face=(1200, 600, 800, 800))
    assert original == (1600, 2000) and crop == (54, 324)
    expected = image.resize((1000, 800), Image.Resampling.BOX).crop((324, 54, 836, 566))
    assert torch.allclose(pixels, normalised(expected), atol=1e-6)
    _, _, crop = transform(image, (512, 512), None, face=None)  # no face in the name: kohya's usual crop
    assert crop == (0, 64)  # scale 512 / 1600: resized 640x512, (640 - 512) // 2
