"""Masked loss (--masked_loss): the mask follows its image's crop and flip, weights the element loss as kohya's
apply_masked_loss does, is cached with the latents, and a black mask trains nothing."""

import argparse
import json
import logging
import os
from pathlib import Path

import datasets
import pytest
import torch
from helpers import one_line_error, sdxl_args, spy_on_training, wuerstchen_args
from PIL import Image

from difftune import data
from difftune.cli.parsing import ErrorOnlyParser
from difftune.data import cache, masks
from difftune.train import args as flags
from difftune.train import objectives

REAL_DRAW_LOSS = objectives.Draw.loss


def write_masks(assets: Path, folder: Path, value, skip: int = 0) -> Path:
    """A mask per training image (its size, same stem): value(x, width) in 0..255 per column; the first
    `skip` images get none."""
    folder.mkdir()
    for image in sorted((assets / "data").glob("*.png"))[skip:]:
        width, height = Image.open(image).size
        row = bytes(value(x, width) for x in range(width))
        Image.frombytes("L", (width, height), row * height).save(folder / image.name)
    return folder


def block_mean(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(batch, 1, H, W) averaged over the blocks of an height x width grid (H, W multiples of it)."""
    b, _, big_h, big_w = mask.shape
    return mask.float().reshape(b, 1, height, big_h // height, width, big_w // width).mean(dim=(3, 5))


def expected_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """kohya's masked loss written out: (pred - target)^2 * mask on the latent grid, mean per sample, mean."""
    grid = block_mean(mask, *pred.shape[-2:])
    return ((pred.double() - target.double()) ** 2 * grid).mean(dim=(1, 2, 3)).mean()


def record_losses(monkeypatch) -> list[dict]:
    """Each training loss with what it was computed from (epsilon prediction: the target is the noise)."""
    calls = []

    def loss(draw, pred, x0, batch=None):
        out = REAL_DRAW_LOSS(draw, pred, x0, batch)
        mask = batch["mask"]
        calls.append({"pred": pred.detach(), "target": draw.noise, "mask": mask, "loss": out.item()})
        return out

    monkeypatch.setattr(objectives.Draw, "loss", loss)
    return calls


def test_mask_follows_the_crop_and_the_flip(tmp_path):
    """Image columns carry their own index (red = x): wherever a crop and a flip put a column, its mask value
    (white left of x = 64) must come along; a left-half-white square flipped is right-half-white on the grid."""
    wide = Image.merge(
        "RGB", [Image.frombytes("L", (128, 64), bytes(range(128)) * 64)] + [Image.new("L", (128, 64))] * 2
    )
    wide.save(tmp_path / "wide.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "square.png")
    for name, width in (("wide", 128), ("square", 64)):
        half = bytes(255 if x < 64 * width // 128 else 0 for x in range(width))
        Image.frombytes("L", (width, 64), half * 64).save(tmp_path / f"{name}-mask.png")
    rows = datasets.Dataset.from_dict({
        "image": [{"bytes": None, "path": str(tmp_path / f"{n}.png")} for n in ("wide", "square")], "text": ["a", "b"],
    }).cast_column("image", datasets.Image(decode=False))  # fmt: skip
    dataset = data.CaptionedImageDataset(rows, "image", "text", data.ImageTransform(False, True), None, 64, seed=0)
    dataset.mask_sources = [str(tmp_path / "wide-mask.png"), str(tmp_path / "square-mask.png")]

    seen = set()
    for epoch in range(12):
        dataset.set_epoch(epoch)
        sample = dataset.load(0, rng=data.sample_rng(0, epoch, 0))
        columns = torch.round((sample["pixel_values"][0] * 0.5 + 0.5) * 255)  # each pixel's source column
        expected = (columns < 64).float()[None, None]
        assert torch.equal(sample["mask"][None], expected)
        assert torch.allclose(masks.on_grid(sample["mask"][None], (8, 8)), block_mean(expected, 8, 8), atol=1e-6)
        seen.add((int(columns[0, 0]), bool(columns[0, 0] > columns[0, -1])))
    assert len({left for left, _ in seen}) > 3 and {flipped for _, flipped in seen} == {True, False}

    flipped = masks.on_grid(dataset.load(1, flip=True, rng=data.sample_rng(0, 0, 1))["mask"][None], (8, 8))[0, 0]
    assert torch.equal(flipped, torch.tensor([0.0] * 4 + [1.0] * 4).expand(8, 8))

    # The latent cache's key follows the masks: masking on or off, a mask file changed.
    args = argparse.Namespace(resolution=64, center_crop=False, random_flip=True)
    keys = [cache.data_fields(args, dataset)]
    Image.new("L", (64, 64), 128).save(tmp_path / "square-mask.png")
    os.utime(tmp_path / "square-mask.png", ns=(1, 1))
    keys.append(cache.data_fields(args, dataset))
    dataset.mask_sources = None
    keys.append(cache.data_fields(args, dataset))
    assert len({json.dumps(key) for key in keys}) == 3


def test_black_masks_train_nothing_and_the_loss_is_kohyas(assets, tmp_path, run_main, monkeypatch, caplog):
    """All-black masks: the adapter stays as it was (no weight decay), while unmasked it moves. Grey masks
    (a ramp, three images without one): each step's loss is the formula, live and cached, with the same masks."""
    black = write_masks(assets, tmp_path / "black", lambda x, width: 0)
    base = ["--adam_weight_decay", "0", "--center_crop", "--random_flip", "--cache_dir", tmp_path / "cache"]
    for extra, changes in (([], True), (["--masked_loss", "--mask_dir", black], False)):
        spy = spy_on_training(monkeypatch.setattr, adapter="unet")
        assert run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / f"out{changes}", *base, *extra, steps=1)) == 0
        moved = any(not torch.equal(spy["before"][n], spy["after"][n]) for n in spy["before"] if "lokr" in n)
        assert moved == changes

    ramp = write_masks(assets, tmp_path / "ramp", lambda x, width: 255 * x // (width - 1), skip=3)
    runs = {}
    for name, extra in (("live", []), ("cached", ["--cache_latents"])):
        calls = record_losses(monkeypatch)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            argv = sdxl_args(assets, tmp_path / name, *base, "--masked_loss", "--mask_dir", ramp, *extra, steps=1)
            assert run_main("train_sdxl_lokr", argv) == 0
        assert "3 of 20 training images have no mask (no file in --mask_dir" in caplog.text
        assert len(calls) == 1
        for call in calls:
            assert call["loss"] == pytest.approx(expected_loss(call["pred"], call["target"], call["mask"]).item(), 1e-5)
        grids = [block_mean(call["mask"], 8, 8) for call in calls]
        assert all(0 < g.mean() < 0.9 for g in grids)  # grey, neither ones nor zeros
        runs[name] = grids
    for live, cached in zip(runs["live"], runs["cached"], strict=True):
        assert torch.allclose(live, cached, atol=1e-6)


def test_wuerstchen_masks_reach_the_efficientnet_grid(assets, tmp_path, run_main, monkeypatch):
    """Alpha masks on the Wuerstchen prior (cached image embeddings): the loss is the formula on the
    embedding grid, with the image's alpha averaged over each embedding's pixels."""
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(4):
        image = Image.new("RGBA", (128, 128), (200, 50 * i, 30, 255))
        image.putalpha(
            Image.frombytes("L", (128, 128), bytes(255 if x < 32 * (i + 1) else 0 for x in range(128)) * 128)
        )
        image.save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"shape {i}")
    calls = record_losses(monkeypatch)
    argv = wuerstchen_args(assets, tmp_path / "out", "--masked_loss", "--alpha_mask", "--center_crop",
                           "--cache_image_embeddings", "--cache_dir", tmp_path / "cache", steps=2)  # fmt: skip
    argv[argv.index("--train_data_dir") + 1] = str(folder)
    assert run_main("train_wuerstchen_lora", argv) == 0
    for call in calls:
        grid = call["mask"]
        assert grid.shape[-2:] == call["pred"].shape[-2:] and grid.shape[-1] > 1
        assert call["loss"] == pytest.approx(expected_loss(call["pred"], call["target"], grid).item(), 1e-5)
    cover = sorted(round(g.mean().item() * 4) for call in calls for g in call["mask"])
    assert cover == [1, 2, 3, 4]  # each image's share of opaque columns, one per image


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--alpha_mask"], "--alpha_mask gives loss masks but the loss is not masked: add --masked_loss"),
        (["--masked_loss", "--alpha_mask", "--mask_dir", "."], "--alpha_mask and --mask_dir both give the loss masks"),
        (["--masked_loss"], "--masked_loss needs masks: add --alpha_mask"),
        (["--masked_loss", "--mask_dir", "missing"], "--mask_dir missing does not exist"),
    ],
)
def test_mask_flags_that_mean_nothing_are_one_line_errors(run_main, capsys, tmp_path, flags, message):
    assert run_main("train_sdxl_lokr", sdxl_args(tmp_path / "no-assets", tmp_path / "out", *flags)) == 2
    assert message in one_line_error(capsys)


def test_a_dataset_config_subset_takes_its_masks_from_alpha(tmp_path, caplog):
    """kohya's `alpha_mask = true` on one subset: its images' alpha is their mask; one without alpha trains
    unmasked, and so does the other subset's transparent image (both counted in the warning)."""
    for folder, name, alpha in (("a", "0", 128), ("a", "1", None), ("b", "2", 0)):
        (tmp_path / folder).mkdir(exist_ok=True)
        image = Image.new("RGB", (64, 64), (200, 40, 40))
        if alpha is not None:
            image.putalpha(Image.frombytes("L", (64, 64), bytes(255 if x < alpha // 4 else 0 for x in range(64)) * 64))
        image.save(tmp_path / folder / f"{name}.png")
        (tmp_path / folder / f"{name}.txt").write_text("a shape")
    config = tmp_path / "data.toml"
    config.write_text(
        '[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 64\n'
        f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "a"}"\nalpha_mask = true\n'
        f'[[datasets.subsets]]\nimage_dir = "{tmp_path / "b"}"\n'
    )
    parser = ErrorOnlyParser()
    flags.add_data_args(parser, resolution=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train_batch_size", type=int, default=1)
    args = parser.parse_args(["--dataset_config", str(config), "--masked_loss"])
    with caplog.at_level(logging.WARNING):
        dataset = data.dataset_from_args(args, data.ImageTransform(True, False), lambda caption: {})
    assert "2 of 3 training images have no mask" in caplog.text
    covered = [dataset.load(row, flip=False)["mask"].mean().item() for row in range(3)]
    assert covered == [0.5, 1.0, 1.0]
