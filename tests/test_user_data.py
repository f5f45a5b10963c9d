"""Data as users keep it: caption files beside the images, kohya `<repeats>_<class tokens>` folders,
kohya's caption processing, and a text cache whose key follows the captions."""

from __future__ import annotations

import json
import random
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import (
    adapter_weights,
    max_difference,
    one_line_error,
    resumed_copy,
    sdxl_args,
    spy_on_training,
    wuerstchen_args,
)
from PIL import Image
from test_cache_buckets import losses_of

from difftune import data
from difftune.cli.errors import UserError
from difftune.cli.parsing import ErrorOnlyParser
from difftune.data import cache
from difftune.data.captions import CaptionOptions
from difftune.train import args as flags


def image(path: Path, seed: int, size: tuple[int, int] = (72, 64)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(size[1], size[0], 3, generator=generator) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path)


def kohya_folder(root: Path) -> Path:
    """7 samples per epoch, as kohya counts them: '2_sks dog' (one captioned, one not) twice, '3_cat' (a two-line
    caption file: its first line) three times; the top-level image is not trained and 'notes', without a repeat
    count, is skipped (both as kohya)."""
    image(root / "e.png", 0)
    (root / "e.txt").write_text("top level\n")
    image(root / "2_sks dog" / "a.png", 1)
    (root / "2_sks dog" / "a.txt").write_text("a dog, on grass")
    image(root / "2_sks dog" / "b.png", 2)
    image(root / "3_cat" / "c.jpg", 3)
    (root / "3_cat" / "c.txt").write_text("one cat\n\nsecond cat\n")
    image(root / "notes" / "d.png", 4)
    return root


def tagged_folder(root: Path, count: int = 4) -> Path:
    for i in range(count):
        image(root / f"{i}.png", 10 + i)
        (root / f"{i}.txt").write_text(f"sks{i}, red, round, small, shiny, tag{i}")
    return root


def with_data(argv: list, folder: Path, *extra) -> list:
    argv = list(argv)
    argv[argv.index("--train_data_dir") + 1] = str(folder)
    return [*argv, *map(str, extra)]


@pytest.fixture
def captions_seen(monkeypatch) -> list[str]:
    """Every caption handed to the tokenizers."""
    seen, real = [], data.Tokenize.__call__

    def spy(self, caption):
        seen.append(caption)
        return real(self, caption)

    monkeypatch.setattr(data.Tokenize, "__call__", spy)
    return seen


def test_kohya_folder_trains_one_epoch_with_repeats(assets, tmp_path, run_main, captions_seen, caplog):
    folder = kohya_folder(tmp_path / "data")
    argv = sdxl_args(assets, tmp_path / "out", checkpointing_steps=100)
    argv = with_data(argv[: argv.index("--max_train_steps")] + argv[argv.index("--max_train_steps") + 2 :], folder)
    with caplog.at_level("WARNING"):
        assert run_main("train_sdxl_lokr", [*argv, "--num_train_epochs", "1", "--caption_extension", "txt"]) == 0
    # One epoch is 7 samples (repeats counted) in batches of 2, the last one smaller (kohya keeps it): 4 steps.
    assert sorted(p.name for p in (tmp_path / "out").glob("step*")) == ["step4"]
    assert "7 samples per epoch" in (tmp_path / "out" / "README.md").read_text()
    assert any("notes" in r.message and "skipping" in r.message for r in caplog.records)
    assert any("own images are not trained" in r.message for r in caplog.records)
    assert any("1 of 2 images" in r.message and "class tokens 'sks dog'" in r.message for r in caplog.records)
    assert Counter(captions_seen) == Counter({"one cat": 3, "a dog, on grass": 2, "sks dog": 2})


def test_caption_files_train_wuerstchen(assets, tmp_path, run_main, captions_seen):
    folder = tmp_path / "data"
    for i in range(2):
        image(folder / f"{i}.png", i, (128, 128))
        (folder / f"{i}.caption").write_text(f"caption {i}\n")
        (folder / f"{i}.txt").write_text("not the extension asked for")
    argv = with_data(wuerstchen_args(assets, tmp_path / "out", steps=1), folder, "--caption_extension", ".caption")
    assert run_main("train_wuerstchen_lora", argv) == 0
    assert sorted(captions_seen) == ["caption 0", "caption 1"]


def test_metadata_file_wins_over_caption_files(assets, tmp_path, caplog):
    folder = tmp_path / "data"
    image(folder / "a.png", 0)
    (folder / "a.txt").write_text("from the caption file")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "from the metadata"}) + "\n")
    with caplog.at_level("WARNING"):
        rows = data.load_captioned_images(None, None, str(folder), "image", "text", None, 0)
    assert rows["text"] == ["from the metadata"]
    assert any("metadata.jsonl: its captions win" in r.message for r in caplog.records)


def fake_accelerator():
    return types.SimpleNamespace(
        process_index=0,
        num_processes=1,
        is_main_process=True,
        device=torch.device("cpu"),
        wait_for_everyone=lambda: None,
    )


def test_text_cache_key_follows_the_caption_column(tmp_path):
    """A second run on the same data with another --caption_column must not reuse the first one's embeddings."""
    folder = tmp_path / "data"
    image(folder / "a.png", 0)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "red", "tags": "blue"}) + "\n")

    def tokenize(caption: str) -> dict[str, torch.Tensor]:
        return {"ids": torch.tensor([float(len(caption)), float(ord(caption[0]))])}

    def cached_embedding(column: str) -> torch.Tensor:
        parser = ErrorOnlyParser()
        flags.add_data_args(parser, resolution=64)
        parser.add_argument("--seed", type=int, default=0)
        args = parser.parse_args(["--train_data_dir", str(folder), "--caption_column", column])
        args.cache_dir, args.train_batch_size = tmp_path / "cache", 1
        dataset = data.dataset_from_args(args, data.ImageTransform(True, False), tokenize)
        cache.cache_texts(fake_accelerator(), args, dataset, "text", {"model": "m"}, lambda t: t, ["ids"])
        return dataset[0]["ids"]

    assert torch.equal(cached_embedding("text"), tokenize("red")["ids"])
    assert torch.equal(cached_embedding("tags"), tokenize("blue")["ids"])


def test_caption_processing_follows_kohya():
    tags = ["sks", "a", "b", "c", "d"]
    keep = CaptionOptions(prefix="photo of", suffix="end", keep_tokens=1, shuffle=True)
    outputs = {keep.apply(", ".join(tags), random.Random(seed)) for seed in range(30)}
    for out in outputs:
        first, *rest = out.split(", ")
        assert first == "photo of sks" and sorted(rest) == ["a", "b", "c", "d end"]
    assert len(outputs) > 5  # shuffled
    drop = CaptionOptions(keep_tokens=2, tag_dropout_rate=0.5, separator=";")
    kept = [drop.apply("x;y; p ;q;r;s", random.Random(seed)).split(", ") for seed in range(400)]
    assert all(k[:2] == ["x", "y"] and k[2:] == [t for t in "pqrs" if t in k[2:]] for k in kept)  # order kept
    share = sum(len(k) - 2 for k in kept) / (4 * len(kept))
    assert 0.45 < share < 0.55


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({"0_dog/a.png": None}, "holds no usable image"),  # (kohya skips a folder of 0 repeats)
        ({"a.png": None, "a.txt": b"caf\xe9"}, "a.txt is not UTF-8 text"),
        ({}, "holds no usable image"),
        ({"a.png": None, "b.png": None, "c.png": None, "c.txt": b"ok"}, "2 of 3 images in --train_data_dir"),
    ],
)
def test_bad_folders_are_one_line_errors(assets, tmp_path, run_main, capsys, layout, message):
    folder = tmp_path / "data"
    folder.mkdir()
    for name, content in layout.items():
        if content is None:
            image(folder / name, 0)
        else:
            (folder / name).write_bytes(content)
    earlier = tmp_path / "out" / "step2"
    earlier.mkdir(parents=True)
    (earlier / "marker").write_text("an earlier checkpoint")
    argv = with_data(sdxl_args(assets, tmp_path / "out"), folder, "--resume_from_checkpoint", "latest")
    assert run_main("train_sdxl_lokr", argv) == 2
    assert message in one_line_error(capsys)
    assert (earlier / "marker").read_text() == "an earlier checkpoint"


SHUFFLED = ("--shuffle_caption", "--keep_tokens", "1", "--caption_tag_dropout_rate", "0.3")


def test_resume_with_shuffled_captions_equals_the_uninterrupted_run(assets, tmp_path, run_main, captions_seen):
    folder = tagged_folder(tmp_path / "data")  # 4 images, batch 2: 2 steps per epoch
    full = tmp_path / "full"
    assert (
        run_main("train_sdxl_lokr", with_data(sdxl_args(assets, full, checkpointing_steps=3), folder, *SHUFFLED)) == 0
    )
    assert len(set(captions_seen)) > 6  # the captions were shuffled and thinned
    resumed = tmp_path / "resumed"
    resumed_copy(full / "step3", resumed)
    argv = with_data(sdxl_args(assets, resumed), folder, *SHUFFLED, "--resume_from_checkpoint", "latest")
    assert run_main("train_sdxl_lokr", argv) == 0
    assert max_difference(adapter_weights(resumed / "step4"), adapter_weights(full / "step4")) <= 1e-6


def test_cached_and_live_losses_agree_with_caption_variants(assets, tmp_path, run_main, monkeypatch, captions_seen):
    folder = tagged_folder(tmp_path / "data")
    common = (*SHUFFLED, "--caption_variants", "3", "--center_crop", "--cache_dir", tmp_path / "cache")
    live = losses_of(
        run_main, monkeypatch, "train_sdxl_lokr", with_data(sdxl_args(assets, tmp_path / "l"), folder, *common)
    )
    assert len({c for c in captions_seen if c.startswith("sks0")}) > 1  # variants of one caption were drawn
    argv = with_data(sdxl_args(assets, tmp_path / "c"), folder, *common, "--cache_text_embeddings")
    cached = losses_of(run_main, monkeypatch, "train_sdxl_lokr", argv)
    assert len(live) == len(cached) == 4
    assert torch.allclose(torch.tensor(live), torch.tensor(cached), rtol=1e-4), (live, cached)


CONFIG = """
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"
batch_size = 2

[[datasets]]
resolution = 64

  [[datasets.subsets]]
  image_dir = "{small}"
  num_repeats = 2
  class_tokens = "sks dog"
  caption_prefix = "photo of"

[[datasets]]
resolution = [128, 128]
shuffle_caption = false

  [[datasets.subsets]]
  image_dir = "{large}"
  class_tokens = "big cat"
"""


def config_folders(root: Path) -> Path:
    for i in range(2):
        image(root / "small" / f"{i}.png", i)
        image(root / "large" / f"{i}.png", 5 + i, (128, 160))
    (root / "small" / "0.txt").write_text("a, b, c")
    path = root / "data.toml"
    path.write_text(CONFIG.format(small=root / "small", large=root / "large"))
    return path


def test_dataset_config_levels_override_and_each_batch_is_one_data_set(assets, tmp_path, run_main, monkeypatch):
    config = config_folders(tmp_path)
    groups = []

    def record(compute_loss):
        def recorded(batch, models):
            groups.append(tuple(tuple(t.tolist()[-2:]) for t in batch["time_ids"]))
            return compute_loss(batch, models)

        return recorded

    spy_on_training(monkeypatch.setattr, wrap_loss=record)
    argv = sdxl_args(assets, tmp_path / "out", "--train_batch_size", "1", steps=6)
    argv = [*argv[: argv.index("--train_data_dir")], *argv[argv.index("--train_data_dir") + 2 :]]
    assert run_main("train_sdxl_lokr", [*argv, "--dataset_config", config]) == 0
    # batch_size 2 from [general]; 4 small samples (2 repeats) + 2 large per epoch: 3 steps, each one data set.
    assert len(groups) == 6 and all(len(g) == 2 and len(set(g)) == 1 for g in groups)
    assert {g[0] for g in groups} == {(64.0, 64.0), (128.0, 128.0)}
    assert "6 samples per epoch" in (tmp_path / "out" / "README.md").read_text()


def test_dataset_config_caption_options_per_subset(tmp_path):
    from difftune.data.config import load_dataset_config

    args = types.SimpleNamespace(caption_extension=None, resolution=64, train_batch_size=1, caption_prefix="",
                                 caption_suffix="", caption_dropout_rate=0.0, caption_separator=",", keep_tokens=0,
                                 shuffle_caption=False, caption_tag_dropout_rate=0.0)  # fmt: skip
    small, large = load_dataset_config(config_folders(tmp_path), args)
    assert small.batch_size == large.batch_size == 2  # from [general]
    assert small.resolution == (64, 64) and large.resolution == (128, 128)
    assert small.subsets[0].repeats == 2 and small.subsets[0].class_tokens == "sks dog"
    assert small.subsets[0].options == CaptionOptions(prefix="photo of", keep_tokens=1, shuffle=True)
    assert large.subsets[0].options == CaptionOptions(keep_tokens=1, shuffle=False)  # the data set overrides [general]
    assert large.subsets[0].repeats == 1 and large.subsets[0].caption_extension == ".txt"


BAD_CONFIG = """
[general]
is_reg = true
flip_aug = "yes"
colour_aug = true

[[datasets]]
batch_size = 0
  [[datasets.subsets]]
  image_dir = "x"
  keep_tokens = '1'
  caption_dropout_rate = 1.5
  conditioning_data_dir = "c"
"""


def test_dataset_config_every_problem_in_one_line_before_any_model_loads(assets, tmp_path, run_main, capsys):
    config = tmp_path / "c.toml"
    config.write_text(BAD_CONFIG)
    earlier = tmp_path / "out" / "step2"
    earlier.mkdir(parents=True)
    (earlier / "marker").write_text("an earlier checkpoint")
    argv = sdxl_args(assets, tmp_path / "out", "--resume_from_checkpoint", "latest")
    argv = [*argv[: argv.index("--train_data_dir")], *argv[argv.index("--train_data_dir") + 2 :]]
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(tmp_path / "no model here")  # none is loaded
    assert run_main("train_sdxl_lokr", [*argv, "--dataset_config", config]) == 2
    error = one_line_error(capsys)
    for part in (
        "7 problems",
        "[general]: is_reg belongs in [[datasets.subsets]]",
        "[general]: flip_aug = 'yes' must be true or false",
        "[[datasets]] #1: batch_size = 0 must be >= 1",
        "[[datasets]] #1 [[datasets.subsets]] #1: keep_tokens = '1' must be an integer",
        "caption_dropout_rate = 1.5 must be in [0, 1]",
        "conditioning_data_dir is for ControlNet training's conditioning images",
        "unsupported keys (not in kohya's data-set schema): [general] colour_aug",
    ):
        assert part in error, (part, error)
    assert (earlier / "marker").read_text() == "an earlier checkpoint"
    assert run_main("train_sdxl_lokr", [*sdxl_args(assets, tmp_path / "o2"), "--dataset_config", config]) == 2
    assert "--dataset_config and --train_data_dir both name the training data" in one_line_error(capsys)


def test_scan_once_then_warm_and_image_unreadable_after_the_scan(assets, tmp_path, run_main, monkeypatch, caplog):
    from difftune.data import scan
    from difftune.train import loop

    folder = tagged_folder(tmp_path / "data")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "broken.txt").write_text("broken")
    probed = []
    real_probe = scan.probe
    monkeypatch.setattr(scan, "probe", lambda record: probed.append(record["path"]) or real_probe(record))
    common = ("--cache_dir", tmp_path / "cache", "--aspect_ratio_buckets")
    with caplog.at_level("WARNING"):
        assert run_main("train_sdxl_lokr", with_data(sdxl_args(assets, tmp_path / "a", steps=1), folder, *common)) == 0
    assert len(probed) == 5 and (tmp_path / "cache" / scan.SCAN_FILE).is_file()
    assert any("skipping unreadable image" in r.message and "broken.png" in r.message for r in caplog.records)

    # A warm start decodes nothing, still skips the broken image; one that breaks after the scan is skipped too.
    probed.clear()
    caplog.clear()
    real_train = loop.train

    def break_one_then_train(*args, **kwargs):
        (folder / "0.png").write_bytes((folder / "0.png").read_bytes()[:100])
        return real_train(*args, **kwargs)

    monkeypatch.setattr(loop, "train", break_one_then_train)
    with caplog.at_level("WARNING"):
        assert run_main("train_sdxl_lokr", with_data(sdxl_args(assets, tmp_path / "b", steps=2), folder, *common)) == 0
    assert probed == []
    assert any("skipping unreadable image" in r.message and "broken.png" in r.message for r in caplog.records)
    assert any("unreadable since the scan" in r.message and "0.png" in r.message for r in caplog.records)


def test_validation_split_holds_out_part_of_each_subset_as_kohya(tmp_path):
    """kohya's split_train_val per subset: training keeps ceil(n * (1 - split)) of a seeded shuffle; the held-out
    images are evaluated once and never trained, whatever their repeats."""
    from difftune.train.evaluation import held_out_split

    parser = ErrorOnlyParser()
    flags.add_data_args(parser, resolution=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(["--train_data_dir", str(kohya_folder(tmp_path / "data")), "--caption_extension", "txt"])
    args.validation_split = 0.5
    dataset = data.dataset_from_args(args, data.ImageTransform(True, False), lambda caption: {})
    train, held = held_out_split(dataset, 0.0, seed=0)
    folder_of = [Path(dataset.rows[dataset.row(i)]["image"]["path"]).parent.name for i in range(len(dataset))]
    # '2_sks dog': 2 images, ceil(2 * 0.5) = 1 trained (x2), 1 held out; '3_cat': ceil(1 * 0.5) = 1 trained (x3).
    assert Counter(folder_of[i] for i in train) == Counter({"2_sks dog": 2, "3_cat": 3})
    assert [folder_of[i] for i in held] == ["2_sks dog"]
    assert {dataset.row(i) for i in train}.isdisjoint(dataset.row(i) for i in held)


def test_cached_shuffling_needs_caption_variants(tmp_path):
    parser = ErrorOnlyParser()
    flags.add_data_args(parser, resolution=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(["--train_data_dir", str(tagged_folder(tmp_path / "data", 2)), "--shuffle_caption"])
    dataset = data.dataset_from_args(args, data.ImageTransform(True, False), lambda caption: {})
    with pytest.raises(UserError, match="needs --caption_variants K"):
        dataset.texts()
    dataset.caption_variants = 3
    texts = dataset.texts()
    tag_sets = [{f"sks{i}", "red", "round", "small", "shiny", f"tag{i}"} for i in range(2)]
    assert 2 < len(texts) <= 6 and all(set(t.split(", ")) in tag_sets for t in texts)  # K orders of each caption
    for epoch in range(3):  # every caption a sample draws is one of the cached texts
        dataset.set_epoch(epoch)
        assert {dataset.caption(i) for i in range(len(dataset))} <= set(texts)
