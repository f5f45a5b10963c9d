"""Small fast tests written for the mutants `make mutation-auto` found alive in generate/class_images.py
(docs/mutation.md): each asserts what a user sees (a value, a file name, a count, a log line) that a surviving
mutant changed. No models: a fake pipeline draws one number per seeded generator."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from difftune.generate import class_images

CPU = torch.device("cpu")


def no_settings(pipe) -> dict:
    return {}


def picture(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4)).save(path)


def seed_colour(index: int) -> int:
    return int(torch.randint(0, 256, (1,), generator=torch.Generator().manual_seed(index)))


class Saved:
    """An image that records where and how it was saved (then writes a real PNG there)."""

    def __init__(self, colour: int, saves: list) -> None:
        self.colour, self.saves = colour, saves

    def save(self, path, format=None) -> None:
        self.saves.append((Path(path).name, format))
        Image.new("RGB", (4, 4), (self.colour,) * 3).save(path, format=format)


class FakePipe:
    """Records each call (prompts, keyword arguments, grad / autocast state, its weight's dtype)."""

    def __init__(self, weight_dtype: torch.dtype = torch.float32, short: int = 0) -> None:
        self.short = short  # images fewer than prompts (a broken pipeline)
        self.calls: list[dict] = []
        self.saves: list = []
        self.progress: dict = {}
        self.unet = torch.nn.Linear(2, 2).to(weight_dtype)
        self.components = {"unet": self.unet, "name": "not a module"}

    def set_progress_bar_config(self, **kwargs) -> None:
        self.progress = kwargs

    def __call__(self, prompts, generator, **kwargs):
        self.calls.append({
            "prompts": prompts, "kwargs": kwargs, "grad": torch.is_grad_enabled(),
            "autocast": torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu"),
            "weights": self.unet.weight.dtype,
        })  # fmt: skip
        colours = [int(torch.randint(0, 256, (1,), generator=g)) for g in generator]
        return argparse.Namespace(images=[Saved(c, self.saves) for c in colours][: len(colours) - self.short])


class Accelerator:
    def __init__(self, main: bool = True) -> None:
        self.is_main_process = main
        self.device = torch.device("cpu")
        self.waited = 0

    def wait_for_everyone(self) -> None:
        self.waited += 1


def run_args(folder: Path, wanted: int, **more) -> argparse.Namespace:
    return argparse.Namespace(
        with_prior_preservation=True, class_data_dir=str(folder), num_class_images=wanted, class_prompt="a dog",
        sample_batch_size=2, **more,
    )  # fmt: skip


# --- names and counts of the images to generate ---


def test_class_image_names_are_five_digit_indices():
    assert class_images.file_name(7) == "class_00007.png"
    assert class_images.file_name(123456) == "class_123456.png"


@pytest.mark.parametrize(
    ("there", "wanted", "missing"),
    [
        ([], 3, [0, 1, 2]),
        (["class_00000.png"], 2, [1]),  # one missing after a taken index
        (["class_00000.png", "class_00001.png", "class_00002.png", "class_00003.png"], 5, [4]),
        (["class_00000.png", "class_00002.png", "mine.png"], 5, [1, 3]),  # the gaps first; any image counts
        (["mine.png", "yours.jpg"], 3, [0]),
        (["a.png", "b.png", "c.png"], 3, []),  # exactly enough
        (["a.png", "b.png", "c.png", "d.png"], 3, []),  # more than enough
        ([".class_00000.png.partial-1", "notes.txt"], 1, [0]),  # a leftover partial file is no image
    ],
)
def test_missing_indices_fill_the_gaps_up_to_the_count_wanted(tmp_path, there, wanted, missing):
    for name in there:
        if name.endswith((".png", ".jpg")):
            picture(tmp_path / name)
        else:
            (tmp_path / name).write_text("x")
    assert class_images.missing_indices(tmp_path, wanted) == missing


def test_missing_indices_of_a_folder_not_made_yet(tmp_path):
    assert class_images.missing_indices(tmp_path / "new", 2) == [0, 1]


def test_to_generate_counts_only_with_prior_preservation(tmp_path):
    picture(tmp_path / "mine.png")
    assert class_images.to_generate(argparse.Namespace()) == 0
    assert class_images.to_generate(argparse.Namespace(with_prior_preservation=False)) == 0
    assert class_images.to_generate(run_args(tmp_path, 4)) == 3
    assert class_images.to_generate(run_args(tmp_path / "new", 4)) == 4


@pytest.mark.parametrize(
    ("precision", "expected"),
    [(None, torch.bfloat16), ("no", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16),
     ("fp16", torch.float16)],
)  # fmt: skip
def test_generation_dtype_is_the_flag_s_or_the_weights(precision, expected):
    args = argparse.Namespace(prior_generation_precision=precision)
    assert class_images.generation_dtype(args, torch.bfloat16) == expected
    assert class_images.generation_dtype(argparse.Namespace(), torch.float16) == torch.float16  # no such flag


# --- fp32 generation from half-precision weights ---


def test_in_float32_lifts_half_weights_and_restores_them_exactly_even_after_an_error():
    pipe = argparse.Namespace()
    layer = torch.nn.Linear(3, 3).to(torch.bfloat16)
    layer.register_buffer("steps", torch.arange(3))  # an integer buffer stays an integer
    kept = torch.nn.Linear(2, 2)  # already fp32
    pipe.components = {"unet": layer, "same": layer, "vae": kept, "scheduler": object()}
    before = layer.weight.detach().clone()
    with pytest.raises(RuntimeError, match="stopped"), class_images.in_float32(pipe):
        assert layer.weight.dtype == torch.float32 and layer.bias.dtype == torch.float32
        assert layer.steps.dtype == torch.int64 and kept.weight.dtype == torch.float32
        assert torch.equal(layer.weight, before.float())
        raise RuntimeError("stopped")
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.weight, before) and layer.steps.dtype == torch.int64
    assert kept.weight.dtype == torch.float32


def test_in_float32_of_a_pipeline_without_components_does_nothing():
    with class_images.in_float32(object()):
        pass


# --- generate_missing / generate ---


def test_generation_writes_the_missing_images_each_seeded_by_its_index(tmp_path, caplog):
    folder = tmp_path / "class"
    picture(folder / "class_00001.png")
    pipe = FakePipe()
    accelerator = Accelerator()
    args = run_args(folder, 4, prior_generation_precision=None)

    def sampling(given) -> dict:  # the settings are read from the pipeline built
        return {"height": 8} if given is pipe else {}

    with caplog.at_level(logging.INFO, logger="difftune"):
        written = class_images.generate_missing(accelerator, args, lambda: pipe, torch.float32, sampling)
    assert written == 3 and accelerator.waited == 1
    assert sorted(p.name for p in folder.iterdir()) == [f"class_0000{i}.png" for i in range(4)]
    for index in (0, 2, 3):
        assert Image.open(folder / f"class_0000{index}.png").getpixel((0, 0))[0] == seed_colour(index)
    # two aligned batches of --sample_batch_size, the prompt each time, the sampling settings, no gradients
    assert [call["prompts"] for call in pipe.calls] == [["a dog", "a dog"]] * 2
    assert all(call["kwargs"] == {"height": 8} and call["grad"] is False for call in pipe.calls)
    assert pipe.progress == {"disable": True}
    pid = os.getpid()
    assert pipe.saves == [(f".class_0000{i}.png.partial-{pid}", "PNG") for i in (0, 2, 3)]
    messages = [r.getMessage() for r in caplog.records if r.name == "difftune"]
    assert messages == [f"generating 3 class images of 'a dog' in {folder} (float32)"]


def test_generation_in_half_precision_autocasts_and_fp32_lifts_the_weights(tmp_path, caplog):
    pipe = FakePipe(torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="difftune"):
        assert class_images.generate(lambda: pipe, [0], tmp_path, "a cat", 1, CPU, torch.bfloat16, no_settings) == 1
    assert pipe.calls[0]["autocast"] == torch.bfloat16 and pipe.calls[0]["weights"] == torch.bfloat16
    assert caplog.records[-1].getMessage().endswith("(bfloat16)")
    pipe = FakePipe(torch.bfloat16)
    (tmp_path / "b").mkdir()
    class_images.generate(lambda: pipe, [0], tmp_path / "b", "a cat", 1, CPU, torch.float32, no_settings)
    assert pipe.calls[0]["autocast"] is False and pipe.calls[0]["weights"] == torch.float32
    assert pipe.unet.weight.dtype == torch.bfloat16  # back as it was


def test_a_missing_folder_is_made_with_its_parents_and_the_flag_s_precision_is_used(tmp_path):
    folder = tmp_path / "a" / "class"
    pipe = FakePipe()
    args = run_args(folder, 1, prior_generation_precision="bf16")  # fp32 weights, bf16 asked for
    assert class_images.generate_missing(Accelerator(), args, lambda: pipe, torch.float32, no_settings) == 1
    assert pipe.calls[0]["autocast"] == torch.bfloat16
    assert [p.name for p in folder.iterdir()] == ["class_00000.png"]


def test_fp16_generation_autocasts_to_fp16(tmp_path):
    pipe = FakePipe()
    class_images.generate(lambda: pipe, [0], tmp_path, "a cat", 1, CPU, torch.float16, no_settings)
    assert pipe.calls[0]["autocast"] == torch.float16


def test_a_pipeline_returning_fewer_images_than_prompts_is_an_error_not_a_short_folder(tmp_path):
    with pytest.raises(ValueError, match="zip"):
        class_images.generate(lambda: FakePipe(short=1), [0, 1], tmp_path, "a cat", 2, CPU, torch.float32, no_settings)
    assert [p.name for p in tmp_path.iterdir()] == ["class_00000.png"]  # the images before the missing one


def test_the_progress_bar_counts_the_images_written(tmp_path, monkeypatch):
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, **kwargs) -> None:
            self.kwargs, self.n = kwargs, 0
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

        def update(self, n) -> None:
            self.n += n

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    (tmp_path / "b").mkdir()
    class_images.generate(FakePipe, [1, 4], tmp_path / "b", "a cat", 3, CPU, torch.float32, no_settings)
    (bar,) = bars
    assert bar.kwargs == {"total": 2, "desc": "class images", "unit": "image"} and bar.n == 2
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["class_00001.png", "class_00004.png"]


def test_only_the_main_process_generates_and_all_wait(tmp_path):
    built = []
    accelerator = Accelerator(main=False)
    args = run_args(tmp_path / "class", 2)
    assert class_images.generate_missing(accelerator, args, lambda: built.append(1), torch.float32, dict) == 0
    assert built == [] and accelerator.waited == 1 and not (tmp_path / "class").exists()
    no_prior = argparse.Namespace(class_data_dir=str(tmp_path / "class"), num_class_images=2)
    assert class_images.generate_missing(Accelerator(), no_prior, lambda: built.append(1), torch.float32, dict) == 0
    assert built == []


def test_nothing_missing_builds_no_pipeline(tmp_path):
    picture(tmp_path / "mine.png")
    accelerator = Accelerator()
    args = run_args(tmp_path, 1)
    assert class_images.generate_missing(accelerator, args, lambda: pytest.fail("built"), torch.float32, dict) == 0
    assert accelerator.waited == 1
