"""Caching (latents, image and text embeddings) and SDXL aspect-ratio buckets."""

import json
import math
import random

import pytest
import torch
from conftest import launch
from helpers import cascade_args, sdxl_args, spy_on_training, wuerstchen_args
from PIL import Image

from difftune.data import EpochBatchSampler, ImageTransform, make_buckets

SDXL_CACHES = ("--cache_latents", "--cache_text_embeddings")
WUERSTCHEN_CACHES = ("--cache_image_embeddings", "--cache_text_embeddings")


def losses_of(run_main, monkeypatch, script, argv) -> list[float]:
    """Run a script in-process, recording the loss of every micro-batch."""
    losses = []

    def record(compute_loss):
        def recorded(batch, models):
            loss = compute_loss(batch, models)
            losses.append(loss.item())
            return loss

        return recorded

    spy_on_training(monkeypatch.setattr, wrap_loss=record)
    assert run_main(script, argv) == 0
    return losses


@pytest.mark.parametrize(
    ("script", "make", "caches"),
    [
        ("train_sdxl_lokr", sdxl_args, SDXL_CACHES),
        ("train_wuerstchen_lora", wuerstchen_args, WUERSTCHEN_CACHES),
        ("train_wuerstchen_lora", cascade_args, WUERSTCHEN_CACHES),
    ],
)
def test_cached_training_gives_the_same_losses(assets, tmp_path, run_main, monkeypatch, script, make, caches):
    # Caption dropout too: the cached empty prompt must encode as the live one does.
    common = ("--center_crop", "--random_flip", "--cache_dir", tmp_path / "cache", "--proportion_empty_prompts", "0.5")
    common += ("--input_perturbation", "0.1", "--multires_noise_iterations", "2", "--loss_type", "huber")
    live = losses_of(run_main, monkeypatch, script, make(assets, tmp_path / "live", *common, steps=4))
    cached = losses_of(run_main, monkeypatch, script, make(assets, tmp_path / "cached", *common, *caches, steps=4))
    assert len(live) == len(cached) == 4
    for a, b in zip(live, cached, strict=True):
        assert math.isclose(a, b, rel_tol=1e-4), (live, cached)
    caches = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # (beside them: the image scan)
    assert len(caches) == 2 and all((p / "complete.json").is_file() for p in caches)


def test_cache_is_reused_and_rebuilt_when_settings_change(assets, tmp_path, run_main, caplog):
    cache = tmp_path / "cache"
    common = ("--center_crop", "--cache_latents", "--cache_dir", cache)
    assert run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "a", *common, steps=1)) == 0
    first = {p: p.stat().st_mtime_ns for p in cache.rglob("shard-*.safetensors")}
    with caplog.at_level("INFO"):
        assert run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "b", *common, steps=1)) == 0
    assert any("using cached latents" in r.message for r in caplog.records)
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("shard-*.safetensors")} == first
    assert run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "c", *common, steps=1, resolution=128)) == 0
    assert (
        run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "d", *common, "--max_train_samples", "8", steps=1))
        == 0
    )
    assert run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "e", *common, "--random_flip", steps=1)) == 0
    assert len([p for p in cache.iterdir() if p.is_dir()]) == 4  # 64 px, 128 px, 8 samples, with flips


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--cache_latents",), "--cache_latents needs --center_crop"),
        (("--cache_text_embeddings", "--train_text_encoder"), "cannot be used with --train_text_encoder"),
    ],
)
def test_uncacheable_settings_are_refused(assets, tmp_path, run_main, capsys, extra, message):
    assert run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "o", *extra)) == 2
    assert message in capsys.readouterr().err


def test_buckets_are_multiples_of_64_near_the_area():
    for resolution in (512, 1024):
        buckets = make_buckets(resolution)
        assert (resolution, resolution) in buckets
        for h, w in buckets:
            assert h % 64 == 0 and w % 64 == 0
            assert 0.75 * resolution**2 <= h * w <= resolution**2
            assert max(h, w) / min(h, w) <= 4


def test_bucketed_batches_come_from_one_bucket():
    groups = [random.Random(i).choice(["a", "b", "c"]) for i in range(60)]
    for rank in (0, 1):
        sampler = EpochBatchSampler(60, 3, seed=0, num_processes=2, process_index=rank, groups=groups)
        batches = list(sampler)
        assert len(batches) == len(sampler) > 0
        assert all(len({groups[i] for i in batch}) == 1 for batch in batches)


def test_time_ids_in_a_landscape_bucket():
    image = Image.new("RGB", (300, 100))
    transform = ImageTransform(center_crop=True, random_flip=False)
    pixels, original, (top, left) = transform(image, (64, 192), None)
    assert pixels.shape == (3, 64, 192) and original == (100, 300)
    assert (top, left) == (0, round((192 - 192) / 2))


def test_bucketed_run_with_cache_uses_non_square_latents(assets, tmp_path, run_main, monkeypatch):
    shapes = set()

    def record(compute_loss):
        def recorded(batch, models):
            shapes.add(tuple(batch["latent_mean"].shape[-2:]))
            assert len({tuple(t.tolist()[-2:]) for t in batch["time_ids"]}) == 1  # one bucket per batch
            return compute_loss(batch, models)

        return recorded

    spy_on_training(monkeypatch.setattr, wrap_loss=record)
    argv = sdxl_args(
        assets, tmp_path / "o", "--aspect_ratio_buckets", "--center_crop", "--cache_latents",
        "--cache_dir", tmp_path / "cache", "--train_batch_size", "1", steps=12, resolution=128,
    )  # fmt: skip
    assert run_main("train_sdxl_lokr", argv) == 0
    assert (16, 16) in shapes and any(h != w for h, w in shapes)


@pytest.mark.slow
def test_two_processes_with_buckets_and_caches(assets, tmp_path):
    args = sdxl_args(
        assets, tmp_path / "o", "--aspect_ratio_buckets", "--center_crop", "--random_flip", *SDXL_CACHES,
        "--cache_dir", tmp_path / "cache", "--train_batch_size", "1", steps=4, resolution=128,
    )  # fmt: skip
    proc = launch("train_sdxl_lokr", args, processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    latents = next((tmp_path / "cache").glob("sdxl-latents-*"))
    assert json.loads((latents / "complete.json").read_text())["num_samples"] == 20
    assert (tmp_path / "o" / "step4" / "unet" / "adapter_model.safetensors").is_file()
    assert torch.load(tmp_path / "o" / "step4" / "lr_scheduler.pt", weights_only=True)
