"""Caching (latents, image and text embeddings) and SDXL aspect-ratio buckets."""

import json
import math
import random
import types

import pytest
from conftest import launch
from helpers import adapter_weights, cascade_args, max_difference, sdxl_args, spy_on_training, wuerstchen_args

from difftune.data import EpochBatchSampler

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


def test_bucketed_batches_come_from_one_bucket():
    groups = [random.Random(i).choice(["a", "b", "c"]) for i in range(60)]
    for rank in (0, 1):
        sampler = EpochBatchSampler(60, 3, seed=0, num_processes=2, process_index=rank, groups=groups)
        batches = list(sampler)
        assert len(batches) == len(sampler) > 0
        assert all(len({groups[i] for i in batch}) == 1 for batch in batches)


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
    assert proc.stderr.count("scanning images:   0%") == 1  # the main process scans, the other reads its result
    from safetensors.torch import load_file

    from difftune.storage import checkpoints

    # Both caches complete (each process built its share): every image's latents once, of several shapes, and
    # every distinct caption's text encoding once.
    lines = (assets / "data" / "metadata.jsonl").read_text().splitlines()
    expected = {"sdxl-latents": 20, "sdxl-text": len({json.loads(line)["text"] for line in lines})}
    for kind, names in (("sdxl-latents", ("latent_mean", "latent_std")), ("sdxl-text", ("prompt_embeds",))):
        path = next((tmp_path / "cache").glob(f"{kind}-*"))
        assert json.loads((path / "complete.json").read_text())["num_samples"] == expected[kind]
        tensors = {}
        for shard in path.glob("shard-*.safetensors"):
            tensors.update(load_file(shard))
        for name in names:
            indices = sorted(int(k.split(".")[0]) for k in tensors if k.endswith(f".{name}") and "flip" not in k)
            assert indices == list(range(expected[kind])), (kind, name, indices)
        if kind == "sdxl-latents":
            shapes = {tuple(v.shape[-2:]) for k, v in tensors.items() if k.endswith(".latent_mean")}
            assert len(shapes) >= 2 and any(h != w for h, w in shapes), shapes
    # Four steps on two processes, trained: checkpoints at 2 and 4 differ, the scheduler stepped 4 times.
    out = tmp_path / "o"
    state = checkpoints.read_json(out / "step4" / checkpoints.STATE_FILE)
    assert (state["global_step"], state["num_processes"]) == (4, 2)
    assert max_difference(adapter_weights(out / "step2"), adapter_weights(out / "step4")) > 1e-4
    assert checkpoints.load_torch_state(out / "step4" / checkpoints.SCHEDULER_FILE)["last_epoch"] == 4


def test_image_cache_holds_what_live_loading_gives(assets, tmp_path, monkeypatch):
    """Built by DataLoader workers (the default number of them), shard by shard: each row's own images."""
    import torch

    from difftune import data
    from difftune.cli.parsing import ErrorOnlyParser
    from difftune.data import cache
    from difftune.storage import shards
    from difftune.train import args as flags

    monkeypatch.setattr(shards, "SHARD_SIZE", 7)  # several shards, the last one short
    parser = ErrorOnlyParser()
    flags.add_data_args(parser, resolution=128)
    flags.add_cache_args(parser, "--cache_latents", "")
    args = parser.parse_args(
        ["--train_data_dir", str(assets / "data"), "--center_crop", "--random_flip", "--dataloader_num_workers", "0"]
    )  # fmt: skip
    args.seed, args.train_batch_size, args.cache_dir = 0, 3, tmp_path / "cache"
    args.aspect_ratio_buckets = True  # (an SDXL flag)
    dataset = data.dataset_from_args(args, data.ImageTransform(True, True), lambda caption: {})
    dataset.target_sizes = data.assign_buckets(dataset, data.make_buckets(128))
    accelerator = types.SimpleNamespace(process_index=0, num_processes=1, is_main_process=True,
                                        device=torch.device("cpu"), wait_for_everyone=lambda: None)  # fmt: skip

    def encode(pixels):
        return {"pooled": torch.nn.functional.avg_pool2d(pixels, 16)}

    cache.cache_images(accelerator, args, dataset, "test", {}, encode, ["pooled"], "test images")
    assert dataset.num_rows == 20 and len({dataset.target_size(i) for i in range(20)}) > 1
    for row in range(dataset.num_rows):
        for flip in (False, True):
            live, cached = dataset.load_row(row, flip), dataset.image_cache.sample(row, flip)
            assert torch.equal(cached["pooled"], encode(live["pixel_values"][None])["pooled"][0]), (row, flip)
            assert torch.equal(cached["time_ids"], live["time_ids"]), (row, flip)
