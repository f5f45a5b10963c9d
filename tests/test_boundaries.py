"""Cases and boundaries no other test took (issue 36): non-square kohya resolutions, kohya's default caption
extension, --instance_prompt with kohya folders, palette PNGs with transparency, the exported kohya metadata
against its tensors, `--flag=value`, class-image counts and their boundaries, prompt-option ranges, the merged
checkpoint's missing-key check, damaged manifests, every refused-on-resume flag, and the scan cache's mtime."""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import load_script, run_script
from helpers import sdxl_args
from PIL import Image

from difftune import data
from difftune.cli.errors import UserError


def picture(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A (width, height) PNG of random pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=torch.Generator().manual_seed(seed))
    Image.fromarray(pixels.to(torch.uint8).numpy()).save(path)
    return path


def parse_sdxl(*flags: object) -> argparse.Namespace:
    return load_script("train_sdxl_lokr").parse_args(["--resolution", "64", "--seed", "0", *map(str, flags)])


def dataset_for(args: argparse.Namespace):
    """The SDXL script's data set for parsed flags (captions kept as given: no tokenizer)."""
    return data.dataset_from_args(args, data.ImageTransform(False, False), lambda caption: {})


def captions_by_image(dataset) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for index in range(len(dataset)):
        name = Path(dataset.rows[dataset.row(index)]["image"]["path"]).name
        out.setdefault(name, set()).add(dataset.caption(index))
    return out


# a. A kohya resolution is [width, height]: a non-square one reaches the trained size the right way round.
def test_a_non_square_dataset_resolution_trains_width_by_height(tmp_path):
    from difftune.generate import validation

    picture(tmp_path / "images" / "wide.png", (160, 96))
    config = tmp_path / "data.toml"
    config.write_text(
        f'[[datasets]]\nresolution = [128, 64]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "images"}"\n'
    )
    args = parse_sdxl("--dataset_config", config)
    dataset = dataset_for(args)
    assert dataset.target_size(0) == (64, 128)  # (height, width)
    sample = dataset[0]
    assert tuple(sample["pixel_values"].shape) == (3, 64, 128)
    assert sample["time_ids"].tolist()[:2] == [96.0, 160.0] and sample["time_ids"].tolist()[4:] == [64.0, 128.0]
    assert args.trained_size == [64, 128] and validation.trained_size(args) == (64, 128)
    assert args.datasets[0]["resolution"] == [128, 64]  # recorded as kohya writes it


# b. kohya's default caption extension is ".caption" (kohya's --caption_extension default and DreamBoothSubsetParams);
# a plain folder's is ".txt".
def two_captions(folder: Path) -> None:
    picture(folder / "a.png", (64, 64))
    (folder / "a.caption").write_text("from the caption file")
    (folder / "a.txt").write_text("from the txt file")


def test_kohya_folders_without_caption_extension_read_dot_caption(tmp_path):
    two_captions(tmp_path / "train" / "1_tokens")
    dataset = dataset_for(parse_sdxl("--train_data_dir", tmp_path / "train"))
    assert captions_by_image(dataset) == {"a.png": {"from the caption file"}}


def test_a_dataset_config_without_caption_extension_reads_dot_caption(tmp_path):
    two_captions(tmp_path / "images")
    config = tmp_path / "data.toml"
    config.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{tmp_path / "images"}"\n')
    dataset = dataset_for(parse_sdxl("--dataset_config", config))
    assert captions_by_image(dataset) == {"a.png": {"from the caption file"}}


def test_a_plain_folder_without_caption_extension_reads_dot_txt(tmp_path):
    two_captions(tmp_path / "plain")
    dataset = dataset_for(parse_sdxl("--train_data_dir", tmp_path / "plain"))
    assert captions_by_image(dataset) == {"a.png": {"from the txt file"}}


# c. --instance_prompt with kohya folders: a caption file wins, then the folder's class tokens; the prompt is
# never used (every kohya subfolder has class tokens).
def test_instance_prompt_does_not_replace_kohya_class_tokens(tmp_path, caplog):
    folder = tmp_path / "train" / "2_sks shape"
    picture(folder / "a.png", (64, 64))
    (folder / "a.caption").write_text("its own caption")
    picture(folder / "b.png", (64, 64), seed=1)
    with caplog.at_level(logging.WARNING):
        dataset = dataset_for(parse_sdxl("--train_data_dir", tmp_path / "train", "--instance_prompt", "zzz photo"))
    assert captions_by_image(dataset) == {"a.png": {"its own caption"}, "b.png": {"sks shape"}}
    assert len(dataset) == 4  # 2 repeats
    assert "they train on its class tokens 'sks shape'" in caplog.text


# d. A palette PNG with transparency (tRNS) loads as kohya loads it (PIL's convert("RGB"): the palette colour
# under the transparent pixels), and its transparency is its mask with --alpha_mask.
def test_a_palette_png_with_transparency_loads_as_rgb_and_masks_by_its_transparency(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    image = Image.new("P", (64, 64), 1)
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 red (transparent), 1 blue
    for y in range(32):
        for x in range(64):
            image.putpixel((x, y), 0)  # the top half transparent
    image.save(folder / "p.png", transparency=0)
    (folder / "p.txt").write_text("a palette image")
    with Image.open(folder / "p.png") as opened:
        assert opened.mode == "P" and "transparency" in opened.info
    args = parse_sdxl("--train_data_dir", folder, "--masked_loss", "--alpha_mask")
    sample = dataset_for(args)[0]
    pixels, mask = sample["pixel_values"], sample["mask"]
    assert tuple(pixels.shape) == (3, 64, 64)
    assert pixels[:, 0, 0].tolist() == [1.0, -1.0, -1.0]  # red: the transparent pixels' palette colour
    assert pixels[:, 63, 0].tolist() == [-1.0, -1.0, 1.0]  # blue
    assert mask.flatten().tolist().count(0.0) == 32 * 64 and float(mask.max()) == 1.0
    assert float(mask[..., 0, 0]) == 0.0 and float(mask[..., 63, 0]) == 1.0


# e. The exported kohya file's metadata agrees with its tensors (what ComfyUI / A1111 / LyCORIS read together).
def test_exported_kohya_metadata_matches_the_stored_tensors(assets, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "run"
    argv = sdxl_args(assets, out, "--rank", "2", "--alpha", "6", "--decompose_both", "--train_text_encoder",
                     steps=1, checkpointing_steps=1)  # fmt: skip
    assert run_script("train_sdxl_lokr", argv) == 0
    exported = tmp_path / "lokr.safetensors"
    assert run_script("export", ["--checkpoint", out / "step1", "--out", exported]) == 0
    with safe_open(str(exported), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no iter
    dim, alpha = int(metadata["ss_network_dim"]), float(metadata["ss_network_alpha"])
    assert dim == 2 and float(metadata["difftune_peft_alpha"]) == 6
    assert json.loads(metadata["ss_network_args"])["algo"] == "lokr"
    modules = {key.rsplit(".", 1)[0] for key in tensors}
    assert any(m.startswith("lora_te1_") for m in modules) and any(m.startswith("lora_unet_") for m in modules)
    low_rank = 0
    for module in modules:
        assert float(tensors[f"{module}.alpha"]) == alpha, module
        for side in ("lokr_w1", "lokr_w2"):
            if f"{module}.{side}_a" in tensors:
                assert tensors[f"{module}.{side}_a"].shape[1] == dim, module
                assert tensors[f"{module}.{side}_b"].shape[0] == dim, module
                low_rank += 1
    assert low_rank > 0


# f. Flags given as --flag=value, where the code reads argv itself.
def test_init_adapter_refuses_a_contradicting_flag_given_with_equals(monkeypatch):
    from difftune.adapters import init_adapter

    source = init_adapter.Source(settings={"r": 8, "alpha": 8.0})
    monkeypatch.setattr(init_adapter, "read_source", lambda path, names: {"unet": source})
    for argv in (["--rank=3"], ["--rank", "3"]):
        args = argparse.Namespace(init_adapter="x.safetensors", rank=3, alpha=8.0)
        with pytest.raises(UserError, match="--rank 3 contradicts --init_adapter"):
            init_adapter.prepare(args, argv, ["unet"])
    args = argparse.Namespace(init_adapter="x.safetensors", rank=3, alpha=8.0)  # --rank not typed: the file's
    init_adapter.prepare(args, ["--alpha=8"], ["unet"])
    assert args.rank == 8


def test_a_repeatable_flag_with_equals_replaces_the_settings_files(tmp_path):
    config = tmp_path / "settings.toml"
    config.write_text('validation_prompt = ["from the file"]\n')
    args = parse_sdxl("--config", config, "--validation_prompt=typed")
    assert args.validation_prompt == ["typed"]
    assert parse_sdxl(f"--config={config}").validation_prompt == ["from the file"]


def test_kohya_flags_with_equals_convert_and_clash_as_with_a_space():
    assert parse_sdxl("--max_train_epochs=3").num_train_epochs == 3
    assert parse_sdxl("--network_dim=4", "--network_alpha=2").rank == 4
    with pytest.raises(UserError, match="--decompose_factor and kohya's --network_args both set --decompose_factor"):
        parse_sdxl("--network_args", "algo=lokr", "factor=8", "--decompose_factor=4")


# g, h. Class images: counts, batches, and the boundary of --num_class_images.
class FakePipe:
    """Makes a 4x4 image per generator: its colour the generator's first draw (so image i is seed i's)."""

    def __init__(self, calls: list) -> None:
        self.calls = calls

    def set_progress_bar_config(self, **kwargs) -> None:
        pass

    def __call__(self, prompts, generator, **kwargs):
        self.calls.append(len(prompts))
        colours = [int(torch.randint(0, 256, (1,), generator=g)) for g in generator]
        return argparse.Namespace(images=[Image.new("RGB", (4, 4), (c, c, c)) for c in colours])


class FakeAccelerator:
    is_main_process = True
    device = torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass


def generate_class_images(folder: Path, wanted: int, batch: int) -> tuple[int, list[int]]:
    from difftune.generate import class_images

    calls: list[int] = []
    args = argparse.Namespace(
        with_prior_preservation=True, class_data_dir=str(folder), num_class_images=wanted, class_prompt="a dog",
        sample_batch_size=batch, prior_generation_precision=None,
    )  # fmt: skip
    written = class_images.generate_missing(
        FakeAccelerator(), args, lambda: FakePipe(calls), torch.float32, lambda pipe: {}
    )
    return written, calls


def seed_colour(index: int) -> int:
    return int(torch.randint(0, 256, (1,), generator=torch.Generator().manual_seed(index)))


@pytest.mark.parametrize(("wanted", "batch", "calls"), [(5, 2, [2, 2, 2]), (3, 2, [2, 2]), (4, 2, [2, 2]), (1, 4, [4])])
def test_class_images_generated_in_batches_are_as_many_as_wanted(tmp_path, wanted, batch, calls):
    folder = tmp_path / "class"
    written, made = generate_class_images(folder, wanted, batch)
    assert written == wanted and made == calls
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"class_{i:05d}.png" for i in range(wanted)]
    for index in range(wanted):  # image i is seed i's, whatever the batch
        assert Image.open(folder / f"class_{index:05d}.png").getpixel((0, 0))[0] == seed_colour(index)


def test_class_images_already_there_count_and_one_missing_is_made(tmp_path):
    folder = tmp_path / "class"
    for index in range(4):
        picture(folder / f"own_{index}.png", (8, 8), index)
    assert generate_class_images(folder, 4, 2) == (0, [])  # exactly --num_class_images: nothing generated
    written, calls = generate_class_images(folder, 5, 2)  # one more wanted: one made
    assert written == 1 and calls == [2]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("class_")) == ["class_00000.png"]


def dreambooth_args(*flags: object) -> argparse.Namespace:
    return parse_sdxl("--with_prior_preservation", *flags)


def test_num_class_images_present_needs_no_class_prompt_and_one_less_does(tmp_path):
    from difftune.data import dreambooth

    folder = tmp_path / "class"
    for index in range(3):
        picture(folder / f"own_{index}.png", (8, 8), index)
    args = dreambooth_args("--class_data_dir", folder, "--num_class_images", "3")
    assert args.num_class_images == 3  # exactly what is there: accepted without --class_prompt
    with pytest.raises(UserError, match="holds 3 images, fewer than --num_class_images 4"):
        dreambooth_args("--class_data_dir", folder, "--num_class_images", "4")
    assert dreambooth.count_images(folder) == 3


@pytest.mark.parametrize(("flag", "value", "refused"), [
    ("--num_class_images", "0", True), ("--num_class_images", "1", False),
    ("--sample_batch_size", "0", True), ("--sample_batch_size", "1", False),
    ("--prior_loss_weight", "-0.5", True), ("--prior_loss_weight", "0", False),
])  # fmt: skip
def test_class_image_flags_at_their_bounds(tmp_path, flag, value, refused):
    picture(tmp_path / "class" / "own.png", (8, 8))
    argv = ["--class_data_dir", tmp_path / "class", "--num_class_images", "1", "--class_prompt", "a dog", flag, value]
    if refused:
        with pytest.raises(UserError):
            dreambooth_args(*argv)
    else:
        assert dreambooth_args(*argv) is not None


# i. Prompt-line options at each side of their range.
@pytest.mark.parametrize(("option", "value", "parsed"), [
    ("l", "0", ("guidance_scale", 0.0)), ("l", "-0.5", None), ("l", "7.5", ("guidance_scale", 7.5)),
    ("w", "64", ("width", 64)), ("w", "63", None), ("w", "8192", ("width", 8192)), ("w", "8193", None),
    ("h", "64", ("height", 64)), ("h", "63", None), ("h", "8192", ("height", 8192)), ("h", "8193", None),
    ("s", "1", ("steps", 1)), ("s", "0", None), ("s", "1000", ("steps", 1000)), ("s", "1001", None),
    ("d", "0", ("seed", 0)), ("d", "-1", None), ("d", str(2**63 - 1), ("seed", 2**63 - 1)), ("d", str(2**63), None),
])  # fmt: skip
def test_prompt_options_at_their_bounds(tmp_path, option, value, parsed):
    from difftune.generate import prompts

    path = tmp_path / "prompts.txt"
    path.write_text(f"a dog --{option} {value}\n")
    if parsed is None:
        with pytest.raises(UserError, match=f"line 1: --{option} "):
            prompts.read_prompts_file(path, "--validation_prompts_file")
    else:
        (entry,) = prompts.read_prompts_file(path, "--validation_prompts_file")
        assert entry == {"prompt": "a dog", parsed[0]: parsed[1], "line": 1}


@pytest.mark.parametrize(("flags", "refused"), [
    (["--validation_guidance_scale", "0"], False), (["--validation_guidance_scale", "-0.5"], True),
    (["--validation_seed", "0"], False), (["--validation_seed", "-1"], True),
])  # fmt: skip
def test_validation_scale_and_seed_at_their_bounds(flags, refused):
    if refused:
        with pytest.raises(UserError, match="must be >= 0"):
            parse_sdxl(*flags)
    else:
        assert parse_sdxl(*flags).validation_samples == []


# j. A merged checkpoint refuses an adapter whose weight the base lacks (rather than writing it without the delta).
def test_merging_into_a_base_without_the_adapted_weight_is_refused():
    from difftune.formats import merged_checkpoint

    base = torch.zeros(4, 4)
    entries = [merged_checkpoint.Entry("present.weight", (4, 4), "F32", lambda: base.clone())]
    weights = {"lokr_w1": torch.ones(2, 2), "lokr_w2": torch.ones(2, 2)}
    config = {"r": 2, "alpha": 2}
    with pytest.raises(UserError, match=r"the base model has no absent\.weight for the adapter to merge into"):
        list(merged_checkpoint.merged(entries, {"absent.weight": [(None, config, weights)]}, torch.float32))
    ((entry, tensor),) = merged_checkpoint.merged(entries, {}, torch.float32)  # nothing to merge: the base's
    assert entry.key == "present.weight" and torch.equal(tensor, base)


# k. A damaged manifest is damage, not a checkpoint written before manifests.
DAMAGED_MANIFESTS = {
    "truncated": None, "empty": b"", "binary": b"\xff\xfe\x00", "null": b"null", "a list": b"[]",
    "a number for a digest": b'{"weights.bin": 3}', "no checksum": b'{"weights.bin": {"size": 10}}',
}  # fmt: skip


@pytest.mark.parametrize("damage", list(DAMAGED_MANIFESTS))
def test_a_damaged_manifest_is_not_taken_as_missing(tmp_path, caplog, damage):
    from difftune.storage import integrity

    steps = []
    for step in (2, 4):
        folder = tmp_path / f"step{step}"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(b"w" * 10)
        integrity.write_manifest(folder)
        steps.append((step, folder))
    manifest = tmp_path / "step4" / integrity.MANIFEST
    text = manifest.read_bytes()
    manifest.write_bytes(DAMAGED_MANIFESTS[damage] if damage != "truncated" else text[: len(text) // 2])
    assert integrity.damaged_checkpoint(tmp_path / "step4") == f"{manifest} is unreadable"
    with pytest.raises(UserError, match=r"step4 is damaged: .*manifest.json is unreadable"):
        integrity.check_checkpoint(tmp_path / "step4", "--resume_from_checkpoint")
    with caplog.at_level(logging.WARNING):
        assert integrity.newest_sound(steps) == tmp_path / "step2"
    assert "skipping damaged checkpoint" in caplog.text
    manifest.unlink()  # no manifest at all: taken as it is
    assert integrity.damaged_checkpoint(tmp_path / "step4") is None


# l. Every flag of the refused-on-resume table is refused when it changed (a literal list: dropping one from the
# table fails here).
REFUSED_ON_RESUME = [
    "rank", "alpha", "conv_rank", "conv_alpha", "lora_alpha", "target_modules", "decompose_both", "decompose_factor",
    "lokr_init", "rank_dropout", "module_dropout", "lora_dropout", "train_text_encoder", "text_encoder_target_modules",
    "prior_subfolder", "prediction_type", "snr_gamma", "loss_weighting", "p2_k", "p2_gamma", "noise_offset",
    "timestep_bias_strategy", "timestep_bias_multiplier", "timestep_bias_portion", "timestep_bias_begin",
    "timestep_bias_end", "timestep_sampling", "loss_type", "huber_schedule", "huber_c", "debiased_estimation",
    "input_perturbation", "multires_noise_iterations", "multires_noise_discount", "proportion_empty_prompts",
    "masked_loss", "with_prior_preservation", "prior_loss_weight", "class_data_dir", "class_prompt",
    "num_class_images", "reg_data_dir", "optimizer", "use_ema", "validation_split", "eval_data_dir",
]  # fmt: skip


def resume_from(tmp_path: Path, saved: dict, now: dict) -> None:
    from difftune.storage import checkpoints
    from difftune.train import resume

    step = tmp_path / "step2"
    step.mkdir(exist_ok=True)
    (step / checkpoints.STATE_FILE).write_text(json.dumps({"seed": 0, "num_processes": 1}))
    (step / checkpoints.ARGS_FILE).write_text(json.dumps({"seed": 0, **saved}))
    resume.take_checkpoint_settings(argparse.Namespace(seed=None, **now), step, 1, "ddp")


@pytest.mark.parametrize("flag", REFUSED_ON_RESUME)
def test_every_refused_flag_is_refused_when_changed_on_resume(tmp_path, flag):
    resume_from(tmp_path, {flag: 1}, {flag: 1})  # unchanged: resumes
    with pytest.raises(UserError, match=f"--{flag} 1 -> 2: .* was trained with the former value"):
        resume_from(tmp_path, {flag: 1}, {flag: 2})


def test_an_applied_flag_changed_on_resume_is_not_refused(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="difftune"):
        resume_from(tmp_path, {"learning_rate": 1e-4}, {"learning_rate": 2e-4})
    assert "resuming with --learning_rate 0.0002" in caplog.text


# m. The scan cache is keyed by mtime too: a file rewritten to the same byte size is scanned again.
def test_an_image_rewritten_to_the_same_size_is_scanned_again(tmp_path):
    from difftune.data import scan

    path = picture(tmp_path / "images" / "a.png", (32, 16))
    record = {"path": str(path), "bytes": None}
    cache = tmp_path / "cache"
    assert scan.scan_images([record], cache) == [(16, 32)]
    before = os.stat(path)
    path.write_bytes(b"\x00" * before.st_size)  # same size, unreadable now
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    (result,) = scan.scan_images([record], cache)
    assert isinstance(result, str)  # the reason it cannot be read, not the former size
    stat = os.stat(path)  # the folder's rows pass (size, mtime) themselves
    (result,) = scan.scan_images([record], cache, stats=[(stat.st_size, stat.st_mtime_ns)])
    assert isinstance(result, str)
