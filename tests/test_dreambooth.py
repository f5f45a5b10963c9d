"""DreamBooth with prior preservation: class images generated once and reproducibly, the two-part loss, the
kohya forms (is_reg, --reg_data_dir), the one-line errors, and exact resume with class batches."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import load_script
from helpers import adapter_weights, max_difference, one_line_error, resumed_copy, sdxl_args, spy_on_training

from difftune import data
from difftune.generate import class_images
from difftune.models import sdxl
from difftune.train import loop, objectives

WEIGHT = 0.5  # --prior_loss_weight: not 1, so that a dropped weight shows


class MainProcess:
    """What generate_missing needs of an Accelerator, for one process."""

    is_main_process, device = True, torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass


def record_model_calls(monkeypatch) -> list[dict]:
    """Every training loss computation's batch flags, noise and UNet output (SDXL, epsilon prediction)."""
    calls: list[dict] = []
    real_noise = objectives.Objective.noise

    def noise(self, x0):
        out = real_noise(self, x0)
        if self.args is not None and hasattr(self.args, "prior_loss_weight"):  # the training objective
            calls.append({"noise": out.detach().clone()})
        return out

    monkeypatch.setattr(objectives.Objective, "noise", noise)
    return calls


@pytest.mark.slow
def test_class_images_are_generated_once_train_with_the_weighted_loss_and_resume_exactly(
    assets, tmp_path, run_main, monkeypatch
):
    classes = tmp_path / "classes"
    flags = (
        "--with_prior_preservation", "--class_data_dir", classes, "--class_prompt", "a shape",
        "--num_class_images", "3", "--sample_batch_size", "2", "--prior_loss_weight", str(WEIGHT),
        "--validation_inference_steps", "2",
    )  # fmt: skip
    calls = record_model_calls(monkeypatch)

    def wrap_loss(compute_loss):
        def loss(batch, models, fractions=None):
            unet = models["unet"]
            real_forward = unet.forward

            def forward(*args, **kwargs):
                out = real_forward(*args, **kwargs)
                calls[-1]["pred"], calls[-1]["is_class"] = out.sample.detach().clone(), batch["is_class"].clone()
                return out

            unet.forward = forward
            try:
                value = compute_loss(batch, models, fractions)
            finally:
                del unet.forward
            calls[-1]["loss"] = value.detach().clone()
            return value

        return loss

    spy_on_training(monkeypatch.setattr, wrap_loss=wrap_loss)
    full = tmp_path / "full"
    assert run_main("train_sdxl_lokr", sdxl_args(assets, full, *flags, steps=4)) == 0
    # The empty folder now holds --num_class_images images, named by index.
    assert sorted(p.name for p in classes.iterdir()) == [f"class_0000{i}.png" for i in range(3)]

    # Each step's loss is the instance MSE + weight x the class MSE, computed here from the UNet's output.
    assert len(calls) == 4
    for call in calls:
        is_class = call["is_class"]
        assert is_class.tolist() == [False, False, True, True]  # two instance samples and two class samples
        pred, noise = call["pred"].float(), call["noise"].float()
        instance = F.mse_loss(pred[~is_class], noise[~is_class])
        prior = F.mse_loss(pred[is_class], noise[is_class])
        assert torch.allclose(call["loss"], instance + WEIGHT * prior, rtol=1e-5, atol=0)
        assert abs(instance - prior) > 1e-3  # the two parts differ: swapping them would show

    # A resumed run (class images already there: nothing generated) equals the uninterrupted one.
    monkeypatch.setattr(class_images, "generate", lambda *a, **k: pytest.fail("generated again"))
    resumed = tmp_path / "resumed"
    resumed_copy(full / "step2", resumed)
    argv = sdxl_args(assets, resumed, *flags, "--resume_from_checkpoint", "latest", steps=4)
    assert run_main("train_sdxl_lokr", argv) == 0
    assert max_difference(adapter_weights(resumed / "step4"), adapter_weights(full / "step4")) <= 1e-6


def test_generation_fills_only_what_is_missing_with_the_same_images(assets, tmp_path):
    folder = tmp_path / "classes"
    folder.mkdir()
    shutil.copy(assets / "data" / "000_black_circle.png", folder / "mine.png")  # a user's image counts
    sd = sdxl.load_sdxl(str(assets / "sdxl"), str(assets / "sdxl-vae-fp16-fix"))
    built = []

    def build():
        built.append(1)
        return sdxl.build_pipeline(sd, str(assets / "sdxl"))

    args = SimpleNamespace(
        with_prior_preservation=True, class_data_dir=str(folder), num_class_images=4, class_prompt="a shape",
        sample_batch_size=2,
    )  # fmt: skip

    def sampling(pipe):
        return {"height": 64, "width": 64, "num_inference_steps": 2}

    def fill() -> int:
        return class_images.generate_missing(MainProcess(), args, build, torch.float32, sampling)

    assert fill() == 3
    assert sorted(p.name for p in folder.iterdir()) == [
        "class_00000.png",
        "class_00001.png",
        "class_00002.png",
        "mine.png",
    ]
    assert fill() == 0 and len(built) == 1  # nothing missing: no pipeline built
    kept = (folder / "class_00001.png").read_bytes()
    (folder / "class_00001.png").unlink()
    assert fill() == 1 and (folder / "class_00001.png").read_bytes() == kept
    assert kept != (folder / "class_00000.png").read_bytes()  # seeded per index: not one image three times


def script_args(assets: Path, tmp_path: Path, *extra) -> list[str]:
    return [str(a) for a in sdxl_args(assets, tmp_path / "out", *extra, steps=1)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--with_prior_preservation",), "--with_prior_preservation needs --class_data_dir"),
        (
            ("--with_prior_preservation", "--class_data_dir", "{data}"),
            "holds 20 images, fewer than --num_class_images 100",
        ),
        (("--instance_data_dir", "{data}"), "--instance_data_dir and --train_data_dir name the same folder"),
        (("--prior_loss_weight", "-1"), "--prior_loss_weight must be >= 0"),
    ],
)
def test_prior_preservation_settings_that_cannot_run_are_one_line_errors(
    assets, tmp_path, run_main, capsys, extra, message
):
    extra = [e.format(data=assets / "data") for e in extra]
    assert run_main("train_sdxl_lokr", script_args(assets, tmp_path, *extra)) == 2
    assert message in one_line_error(capsys)
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("instance", "message"),
    [
        ("empty", "--instance_data_dir {folder} holds no usable image"),
        ("uncaptioned", "1 of 1 images in --instance_data_dir {folder} have no caption file (.txt)"),
    ],
)
def test_an_instance_folder_that_cannot_train_fails_before_class_images_are_generated(
    assets, tmp_path, run_main, capsys, monkeypatch, instance, message
):
    folder, classes = tmp_path / instance, tmp_path / "class"
    folder.mkdir()
    if instance == "uncaptioned":
        shutil.copy(next((assets / "data").glob("*.png")), folder / "dog.png")
    monkeypatch.setattr(class_images, "generate", lambda *a, **k: pytest.fail("class images generated first"))
    argv = [a for a in script_args(assets, tmp_path) if a not in ("--train_data_dir", str(assets / "data"))]
    extra = ["--instance_data_dir", folder, "--with_prior_preservation", "--class_data_dir", classes,
             "--class_prompt", "a dog", "--num_class_images", "2"]  # fmt: skip
    assert run_main("train_sdxl_lokr", [*argv, *map(str, extra)]) == 2
    assert message.format(folder=folder) in one_line_error(capsys)
    assert not classes.exists() and not (tmp_path / "out").exists()


def test_class_flags_without_prior_preservation_warn(assets, tmp_path, caplog):
    with caplog.at_level("WARNING"):
        load_script("train_wuerstchen_lora").parse_args(
            ["--train_data_dir", str(assets / "data"), "--class_prompt", "a dog"]
        )
    assert any("--class_prompt: unused without --with_prior_preservation" in r.message for r in caplog.records)


def paired_batches(args, dataset) -> list[list[int]]:
    """The training loop's first epoch of batches over `dataset` (one process)."""
    run = SimpleNamespace(args=args, dataset=dataset, accum=1)
    run.accelerator = SimpleNamespace(num_processes=1, process_index=0, device=torch.device("cpu"))
    loop.TrainingRun.build_data(run)
    run.sampler.set_epoch(0)
    return list(run.sampler)


@pytest.mark.parametrize("form", ["is_reg", "reg_data_dir"])
def test_kohya_regularisation_images_fill_the_epoch_as_kohya_counts_them(assets, tmp_path, form):
    """kohya's meaning of regularisation images: part of the epoch, repeated in turn up to the training samples
    (3 images x 2 repeats = 6; 4 regularisation images of 1 repeat: 1, 1, 1, 1, then 1 more for the first two),
    mixed into the batches and weighted --prior_loss_weight in the loss."""
    images = sorted((assets / "data").glob("*.png"))
    instance, reg = tmp_path / "instance" / "2_sks shape", tmp_path / "reg" / "1_shape"
    for folder, chosen in ((instance, images[:3]), (reg, images[3:7])):
        folder.mkdir(parents=True)
        for image in chosen:
            shutil.copy(image, folder)
    argv = ["--train_batch_size", "2", "--seed", "0", "--resolution", "64", "--prior_loss_weight", str(WEIGHT)]
    if form == "is_reg":
        config = tmp_path / "data.toml"
        config.write_text(
            f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{instance}"\nclass_tokens = "sks shape"\n'
            "num_repeats = 2\n"
            f'[[datasets.subsets]]\nimage_dir = "{reg}"\nclass_tokens = "shape"\nis_reg = true\n'
        )
        argv += ["--dataset_config", str(config)]
    else:
        argv += ["--train_data_dir", str(instance.parent), "--reg_data_dir", str(reg.parent)]
    args = load_script("train_sdxl_lokr").parse_args(argv)

    def tokenize(caption: str) -> dict[str, torch.Tensor]:
        return {"caption_length": torch.tensor(len(caption))}

    dataset = data.dataset_from_args(args, data.ImageTransform(True, False), tokenize)
    paths = [Path(dataset.rows[dataset.row(i)]["image"]["path"]) for i in range(len(dataset))]
    counts = {path.name: paths.count(path) for path in paths}
    assert [counts[p.name] for p in images[:3]] == [2, 2, 2]
    assert [counts[p.name] for p in images[3:7]] == [2, 2, 1, 1]
    assert dataset.samples_per_epoch() == 12 and dataset.class_sample is None  # not diffusers' paired batches
    assert dataset.sample_weights == [WEIGHT if p.parent == reg else 1.0 for p in paths]
    assert {p.parent.name: dataset.caption(i) for i, p in enumerate(paths)} == {"2_sks shape": "sks shape",
                                                                                   "1_shape": "shape"}  # fmt: skip
    batches = paired_batches(args, dataset)
    assert len(batches) == 6 and sorted(i for batch in batches for i in batch) == list(range(12))
    collated = data.collate([dataset[i] for i in batches[0]])
    assert collated["loss_weight"].tolist() == [dataset.sample_weights[i] for i in batches[0]]


def test_regularisation_repeats_count_as_kohya():
    from difftune.data.subsets import regularisation_repeats

    assert regularisation_repeats(6, [1, 1, 1, 1]) == [2, 2, 1, 1]
    # The first round adds whole repeats until 90 are reached: an image never reached is not used.
    assert regularisation_repeats(90, [10] * 10) == [10] * 9 + [0]
    assert regularisation_repeats(7, [3, 1]) == [5, 2]  # 3 + 1, then 1 each in turn until 7
    assert regularisation_repeats(0, [2, 2]) == [0, 0]


def test_regularisation_loss_is_the_weighted_mean_of_the_batch():
    """kohya's loss with regularisation images: each sample's loss times its weight, averaged over the batch."""
    parser = argparse.ArgumentParser()
    objectives.add_objective_args(parser)
    args = parser.parse_args([])
    objective = objectives.Objective(
        args, SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000, prediction_type="epsilon"))
    )
    generator = torch.Generator().manual_seed(0)
    pred, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    draw = objectives.Draw(objective, noise, torch.zeros(3, dtype=torch.long), None)
    loss = draw.loss(pred, None, {"loss_weight": torch.tensor([1.0, WEIGHT, 1.0])})
    per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    assert torch.allclose(loss, (per_sample[0] + WEIGHT * per_sample[1] + per_sample[2]) / 3, rtol=1e-6, atol=0)


def test_instance_and_class_batches_of_different_sizes_run_as_parts_with_the_same_loss():
    parser = argparse.ArgumentParser()
    objectives.add_objective_args(parser)
    args = parser.parse_args([])
    args.prior_loss_weight = WEIGHT
    objective = objectives.Objective(
        args, SimpleNamespace(config=SimpleNamespace(num_train_timesteps=1000, prediction_type="epsilon"))
    )
    generator = torch.Generator().manual_seed(0)
    examples = [
        {name: torch.randn(4, 8, width, generator=generator) for name in ("pred", "noise")}
        | {"is_class": torch.tensor(width == 4)}
        for width in (8, 8, 4, 4)  # two instance samples in one bucket, two class samples in another
    ]
    batch = data.collate(examples)
    assert [part["is_class"].tolist() for part in batch["parts"]] == [[False, False], [True, True]]

    def compute_loss(part, models):
        draw = objectives.Draw(objective, part["noise"], torch.zeros(2, dtype=torch.long), None)
        return draw.loss(part["pred"], None, part)

    loss, parts = objectives.batch_loss(compute_loss, batch, {})
    instance = F.mse_loss(
        torch.stack([e["pred"] for e in examples[:2]]), torch.stack([e["noise"] for e in examples[:2]])
    )
    prior = F.mse_loss(torch.stack([e["pred"] for e in examples[2:]]), torch.stack([e["noise"] for e in examples[2:]]))
    assert torch.allclose(loss, instance + WEIGHT * prior, rtol=1e-6, atol=0)
    assert torch.allclose(parts["instance"], instance) and torch.allclose(parts["prior"], prior)
