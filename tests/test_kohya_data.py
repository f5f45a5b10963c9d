"""kohya's data sets trained as kohya trains them: every config key, the folder rules, the bucket each image
trains at, per-data-set batch sizes, and the differences from our former reading that changed what trained."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import load_script
from helpers import adapter_weights, max_difference, resumed_copy, sdxl_args
from PIL import Image

from difftune import data
from difftune.train import loop


def picture(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A (width, height) image of random pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed))
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(path)
    return path


def dataset_of(tmp_path: Path, config: str, *flags: str, name: str = "data.toml"):
    """The SDXL script's data set for a config text (captions are kept as given: no tokenizer)."""
    path = tmp_path / name
    path.write_text(config)
    args = load_script("train_sdxl_lokr").parse_args(
        ["--dataset_config", str(path), "--resolution", "64", "--seed", "0", *flags]
    )
    return args, data.dataset_from_args(args, data.ImageTransform(False, False), lambda caption: {})


def captions_of(dataset) -> Counter:
    return Counter(dataset.caption(i) for i in range(len(dataset)))


def folder_names(dataset) -> list[str]:
    return [Path(dataset.rows[dataset.row(i)]["image"]["path"]).parent.name for i in range(len(dataset))]


def test_folder_and_caption_rules_as_kohya(tmp_path):
    """Each of these trained otherwise before: empty class tokens, a subset of 0 repeats, the same folder twice,
    an extension without its dot, a multi-line caption file, and the ', ' join of processed tags."""
    for name in ("a", "b"):
        picture(tmp_path / "tagged" / f"{name}.png", (64, 64))
    (tmp_path / "tagged" / "a.txt").write_text("c;a;b;d\nsecond line\n")
    picture(tmp_path / "untagged" / "x.png", (64, 64))
    picture(tmp_path / "skipped" / "y.png", (64, 64))
    config = f"""
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{tmp_path / "tagged"}"
  caption_extension = "txt"
  class_tokens = "fallback"
  caption_separator = ";"
  keep_tokens = 1
  shuffle_caption = true
  [[datasets.subsets]]
  image_dir = "{tmp_path / "untagged"}"
  class_tokens = ""
  [[datasets.subsets]]
  image_dir = "{tmp_path / "tagged"}"
  num_repeats = 5
  [[datasets.subsets]]
  image_dir = "{tmp_path / "skipped"}"
  num_repeats = 0
"""
    _, dataset = dataset_of(tmp_path, config)
    assert Counter(folder_names(dataset)) == {"tagged": 2, "untagged": 1}  # the duplicate and 0 repeats skipped
    names = folder_names(dataset)
    assert [dataset.caption(i) for i in range(len(dataset)) if names[i] == "untagged"] == [""]  # class tokens ''
    processed = set()
    for epoch in range(8):  # the first line only, every epoch
        dataset.set_epoch(epoch)
        processed |= {dataset.caption(i) for i in range(len(dataset)) if names[i] == "tagged"}
    assert "fallback" in processed  # b.png has no caption file: its class tokens
    shuffled = processed - {"fallback"}
    assert len(shuffled) > 1 and shuffled <= {"c, a, b, d", "c, a, d, b", "c, b, a, d", "c, b, d, a",
                                                    "c, d, a, b", "c, d, b, a"}  # fmt: skip


def test_json_config_metadata_file_and_random_crop_default(tmp_path):
    """A .json config; a fine-tuning subset's metadata captions and tags joined as kohya joins them; without a
    random_crop key the crop is centred (kohya's default), though the flags path would crop at random."""
    image = picture(tmp_path / "ft" / "wide.png", (96, 64))
    picture(tmp_path / "ft" / "stem_only.png", (64, 64))
    metadata = {"wide.png": {"caption": "a wide shot", "tags": "red, round"}, "stem_only": {"tags": "blue"}}
    (tmp_path / "meta.json").write_text(json.dumps(metadata))
    config = {
        "datasets": [{"subsets": [{"metadata_file": str(tmp_path / "meta.json"), "image_dir": str(image.parent)}]}]
    }
    _, dataset = dataset_of(tmp_path, json.dumps(config), name="data.json")
    assert captions_of(dataset) == {"a wide shot,red, round": 1, "blue": 1}
    wide = next(i for i in range(len(dataset)) if dataset.rows[dataset.row(i)]["image"]["path"].endswith("wide.png"))
    for epoch in range(3):
        dataset.set_epoch(epoch)
        crop = dataset[wide]["time_ids"][2:4].tolist()
        assert crop == [0.0, 16.0]  # (96 - 64) // 2, every epoch


# kohya's bucket for an image (width x height) at resolution 1024 with the default keys, and at 512 with
# min 256, max 768, steps 32: what kohya's BucketManager.select_bucket gives (bucket, then the resized size).
BUCKETS_1024 = {
    (1920, 1080): (1024, 576), (640, 480): (1024, 768), (1080, 1920): (576, 1024), (800, 800): (1024, 1024),
    (375, 480): (768, 1024), (669, 480): (1024, 768),  # (nearest by plain difference; by log ratio 832 / 704)
}  # fmt: skip
BUCKETS_512 = {(1920, 1080): (672, 384), (300, 900): (256, 768)}


@pytest.mark.parametrize(("keys", "expected"), [("", BUCKETS_1024), ("S", BUCKETS_512)])
def test_each_image_trains_in_kohyas_bucket(tmp_path, keys, expected):
    for number, (width, height) in enumerate(expected):
        picture(tmp_path / "images" / f"{number}.png", (width, height), number)
    keys = "min_bucket_reso = 256\nmax_bucket_reso = 768\nbucket_reso_steps = 32\nresolution = 512" if keys else ""
    config = f"[[datasets]]\nenable_bucket = true\n{keys or 'resolution = 1024'}\n[[datasets.subsets]]\n"
    config += f'image_dir = "{tmp_path / "images"}"\n'
    _, dataset = dataset_of(tmp_path, config)
    trained = {}
    for i in range(len(dataset)):
        number = int(Path(dataset.rows[dataset.row(i)]["image"]["path"]).stem)
        height, width = dataset.target_size(i)
        trained[list(expected)[number]] = (width, height)
    assert trained == expected


def test_data_sets_keep_their_own_batch_size_and_smaller_last_batches(tmp_path):
    """Two data sets, batch sizes 3 and 1: 5 + 2 samples give batches 3, 2 (kohya keeps it) and 1, 1."""
    for number in range(5):
        picture(tmp_path / "big" / f"{number}.png", (64, 64), number)
    for number in range(2):
        picture(tmp_path / "small" / f"{number}.png", (64, 64), 10 + number)
    config = (
        f'[[datasets]]\nbatch_size = 3\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "big"}"\nclass_tokens = "b"\n'
        f'[[datasets]]\nbatch_size = 1\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "small"}"\nclass_tokens = "s"\n'
    )
    args, dataset = dataset_of(tmp_path, config)
    from test_dreambooth import paired_batches

    batches = paired_batches(args, dataset)
    sizes = sorted((folder_names(dataset)[batch[0]], len(batch)) for batch in batches)
    assert sizes == [("big", 2), ("big", 3), ("small", 1), ("small", 1)]
    assert all(len({folder_names(dataset)[i] for i in batch}) == 1 for batch in batches)


EVERY_KEY = """
[general]
caption_extension = "txt"
keep_tokens_separator = "|||"
secondary_separator = ";;;"
enable_wildcard = true
caption_dropout_every_n_epochs = 3
token_warmup_min = 1
token_warmup_step = 0.5
cache_info = true
resize_interpolation = "lanczos"

[[datasets]]
resolution = [64, 64]
batch_size = 2
enable_bucket = true
min_bucket_reso = 64
max_bucket_reso = 128
bucket_reso_steps = 64
bucket_no_upscale = false
validation_split = 0.25
validation_seed = 7
network_multiplier = 1.0

  [[datasets.subsets]]
  image_dir = "{train}"
  num_repeats = 2
  class_tokens = "sks shape"
  shuffle_caption = true
  keep_tokens = 1
  caption_separator = ","
  caption_prefix = "photo of"
  caption_suffix = "done"
  caption_dropout_rate = 0.1
  caption_tag_dropout_rate = 0.2
  flip_aug = true
  color_aug = true
  random_crop = true
  alpha_mask = false
  custom_attributes = {{ note = "kept" }}

  [[datasets.subsets]]
  image_dir = "{reg}"
  class_tokens = "shape"
  is_reg = true

[[datasets]]
resolution = 64
batch_size = 1
face_crop_aug_range = [1.0, 2.0]

  [[datasets.subsets]]
  metadata_file = "{metadata}"
  image_dir = "{train}"
"""


def test_a_config_with_every_key_trains_and_resumes_exactly(assets, tmp_path, run_main):
    images = sorted((assets / "data").glob("*.png"))
    for number, source in enumerate(images[:4]):
        Image.open(source).resize((64 + 32 * (number % 2), 64)).save(tmp_path / f"t{number}.png")
        (tmp_path / f"t{number}.txt").write_text(f"{{red|blue}} shape|||round;;;flat, tag{number}, small\nline two")
    (tmp_path / "reg").mkdir()
    for source in images[4:6]:
        Image.open(source).save(tmp_path / "reg" / source.name)
    (tmp_path / "meta.json").write_text(json.dumps({"t0.png": {"caption": "meta caption", "tags": "a, b"}}))
    config = tmp_path / "every.toml"
    config.write_text(EVERY_KEY.format(train=tmp_path, reg=tmp_path / "reg", metadata=tmp_path / "meta.json"))

    def argv(out: Path, *extra: str) -> list:
        flags = sdxl_args(assets, out, "--dataset_config", config, "--prior_loss_weight", "0.5", *extra, steps=6,
                          checkpointing_steps=3)  # fmt: skip
        return [*flags[: flags.index("--train_data_dir")], *flags[flags.index("--train_data_dir") + 2 :]]

    assert run_main("train_sdxl_lokr", argv(tmp_path / "full")) == 0
    recorded = json.loads((tmp_path / "full" / "step6" / "args.json").read_text())
    assert [d["resolution"] for d in recorded["datasets"]] == [[64, 64], [64, 64]]
    assert recorded["datasets"][0]["min_bucket_reso"] == 64 and recorded["trained_size"] == [64, 64]
    card = (tmp_path / "full" / "README.md").read_text()
    assert "| data set 1 | 64x64, batch 2, buckets 64-128 in steps of 64" in card
    resumed = tmp_path / "resumed"
    resumed_copy(tmp_path / "full" / "step3", resumed)
    assert run_main("train_sdxl_lokr", argv(resumed, "--resume_from_checkpoint", "latest")) == 0
    assert max_difference(adapter_weights(resumed / "step6"), adapter_weights(tmp_path / "full" / "step6")) <= 1e-6


def test_token_warmup_follows_the_step_each_sample_trains_at(tmp_path):
    """Token warm-up needs each sample's optimizer step: the loop gives the data set the epoch's steps."""
    for number in range(4):
        picture(tmp_path / "images" / f"{number}.png", (64, 64), number)
        (tmp_path / "images" / f"{number}.caption").write_text("a, b, c, d, e")
    config = "[general]\ntoken_warmup_step = 4\n[[datasets]]\nbatch_size = 1\n[[datasets.subsets]]\n"
    config += f'image_dir = "{tmp_path / "images"}"\n'
    args, dataset = dataset_of(tmp_path, config)
    from types import SimpleNamespace

    run = SimpleNamespace(args=args, dataset=dataset, accum=1, max_steps=8)
    run.accelerator = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    loop.TrainingRun.build_data(run)
    run.sampler.set_epoch(0)
    steps = loop.TrainingRun.sample_steps(run, 0)
    dataset.set_epoch(0, steps)
    order = [batch[0] for batch in run.sampler]
    # kohya: floor(step * (5 - 1) / 4) + 1 free tags at steps 0..3 (a has no keep_tokens: all tags are free).
    assert [dataset.caption(i) for i in order] == ["a", "a, b", "a, b, c", "a, b, c, d"]


def test_cached_latents_train_like_live_images_with_buckets_and_flip_aug(assets, tmp_path, run_main, monkeypatch):
    """A config's buckets, kohya's resize and crop, and flip_aug (without --random_flip): the latent cache holds
    both orientations of what live loading gives, so both runs see the same losses."""
    from test_cache_buckets import losses_of

    images = sorted((assets / "data").glob("*.png"))
    for number, source in enumerate(images[:6]):
        Image.open(source).resize((64 + 24 * (number % 3), 64 + 16 * (number % 2))).save(tmp_path / f"{number}.png")
    config = tmp_path / "data.toml"
    config.write_text(
        "[general]\nflip_aug = true\nclass_tokens = 'a shape'\n[[datasets]]\nresolution = 64\nenable_bucket = true\n"
        f'min_bucket_reso = 64\nmax_bucket_reso = 128\n[[datasets.subsets]]\nimage_dir = "{tmp_path}"\n'
    )

    def argv(out: str, *extra: str) -> list:
        flags = sdxl_args(assets, tmp_path / out, "--dataset_config", config, "--cache_dir", tmp_path / "c", *extra)
        return [*flags[: flags.index("--train_data_dir")], *flags[flags.index("--train_data_dir") + 2 :]]

    live = losses_of(run_main, monkeypatch, "train_sdxl_lokr", argv("live"))
    cached = losses_of(run_main, monkeypatch, "train_sdxl_lokr", argv("cached", "--cache_latents"))
    assert len(live) == len(cached) == 4
    assert torch.allclose(torch.tensor(live), torch.tensor(cached), rtol=1e-4), (live, cached)
