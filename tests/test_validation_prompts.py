"""Validation prompt files in kohya's sample-prompt syntax: the parser, each prompt's own size, seed,
negative prompt, guidance and steps in validation images and infer.py, malformed lines refused at start."""

from __future__ import annotations

import types

import numpy as np
import pytest
from helpers import sdxl_args, wuerstchen_args
from PIL import Image

from difftune.generate import prompts, validation

# kohya: split at " --"; -- n runs to the next " --"; option names in any case; "#" lines and blanks skipped.
PROMPTS_FILE = """\
# validation prompts

a red circle --w 96 --h 64 --d 7 --n a blue square, blurry --l 3 --s 2
  # an indented comment
a green square --H 96 --W 64 --d 3
"""
RED = {"prompt": "a red circle", "width": 96, "height": 64, "seed": 7, "negative_prompt": "a blue square, blurry",
       "guidance_scale": 3.0, "steps": 2, "line": 3}  # fmt: skip
GREEN = {"prompt": "a green square", "height": 96, "width": 64, "seed": 3, "line": 5}
FULL = {"prompt": "a dog on a beach", "negative_prompt": "blurry, low quality", "width": 1024, "height": 768,
        "seed": 42, "guidance_scale": 6.5, "steps": 30}  # fmt: skip


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("a dog", {"prompt": "a dog"}),
        ("a dog on a beach --n blurry, low quality --w 1024 --h 768 --d 42 --l 6.5 --s 30", FULL),
        ("  a dog  --W 512 --H 640  ", {"prompt": "a dog", "width": 512, "height": 640}),
        ("a dog --l 7 --d 0", {"prompt": "a dog", "guidance_scale": 7.0, "seed": 0}),
        ("a dog --d 1 --d 2", {"prompt": "a dog", "seed": 2}),  # the last one counts
        ("a well-known--dog --n a--cat", {"prompt": "a well-known--dog", "negative_prompt": "a--cat"}),
        ("a dog --n  no cats  --s 1000", {"prompt": "a dog", "negative_prompt": "no cats", "steps": 1000}),
    ],
)
def test_parse_line(line, expected):
    assert prompts.parse_line(line) == expected


def test_prompts_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(PROMPTS_FILE)
    assert prompts.read_prompts_file(path, "--x") == [RED, GREEN]
    # --validation_prompt's prompts come first, with the run-wide settings only.
    assert prompts.prompt_entries(["p", "q"], path, "--x") == [{"prompt": "p"}, {"prompt": "q"}, RED, GREEN]


MALFORMED = [
    ("a dog --x 3", "unknown option --x"),
    ("a dog --ss euler_a", "unknown option --ss"),  # kohya's sampler: not supported
    ("a dog -- --w 512", '" --" without an option name'),
    ("a dog --w", "--w has no value"),
    ("a dog --n ", "--n has no value"),
    ("a dog --w 512px", "--w takes a whole number, got '512px'"),
    ("a dog --h 7.5", "--h takes a whole number"),
    ("a dog --d -1", "--d takes a whole number"),
    ("a dog --l high", "--l takes a number"),
    ("a dog --w 32", "--w 32 is out of range (64 to 8192)"),
    ("a dog --h 100000", "--h 100000 is out of range"),
    ("a dog --s 0", "--s 0 is out of range (1 to 1000)"),
    ("--w 512 --h 512", "the prompt is empty"),
    ("   --n blurry", "the prompt is empty"),
]


@pytest.mark.parametrize(("line", "message"), MALFORMED)
def test_malformed_line(line, message):
    with pytest.raises(ValueError) as error:
        prompts.parse_line(line)
    assert message in str(error.value)


@pytest.mark.parametrize("script", ["train_sdxl_lokr", "train_wuerstchen_lora", "infer"])
def test_malformed_file_fails_at_start_naming_the_line(script, tmp_path, run_main, capsys):
    """Before any model loads: the model paths do not exist, so a later check would report them instead."""
    path = tmp_path / "prompts.txt"
    path.write_text("# fine\na dog --w 512\n\na cat --w 512px\n")
    missing = tmp_path / "missing"
    flag = "--prompts_file" if script == "infer" else "--validation_prompts_file"
    argv = {
        "train_sdxl_lokr": ["--pretrained_model_name_or_path", missing, "--train_data_dir", missing],
        "train_wuerstchen_lora": ["--pretrained_prior_model_name_or_path", missing, "--train_data_dir", missing],
        "infer": ["--checkpoint", missing],
    }[script]
    assert run_main(script, [*argv, flag, path, "--output_dir", tmp_path / "out"]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {flag} {path} line 4: --w takes a whole number, got '512px'\n"
    assert not (tmp_path / "out").exists()


def test_run_wide_flags_are_checked(tmp_path, run_main, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    for extra, message in [
        (["--validation_prompts_file", empty], "holds no prompt"),
        (["--validation_prompts_file", tmp_path / "none.txt"], "does not exist"),
        (["--validation_guidance_scale", "-1"], "--validation_guidance_scale must be >= 0"),
        (["--validation_seed", "-3"], "--validation_seed must be >= 0"),
    ]:
        assert run_main("train_sdxl_lokr", ["--pretrained_model_name_or_path", tmp_path / "missing", *extra]) == 2
        assert message in capsys.readouterr().err


def test_trackers_get_each_prompt_as_the_caption(tmp_path, caplog):
    calls = []
    writer = types.SimpleNamespace(
        add_images=lambda tag, arrays, step, dataformats: calls.append(("images", tag, arrays.shape, step)),
        add_text=lambda tag, text, step: calls.append(("text", tag, text, step)),
    )
    accelerator = types.SimpleNamespace(trackers=[types.SimpleNamespace(name="tensorboard", writer=writer)])
    rows = [[Image.new("RGB", (96, 64))] * 2, [Image.new("RGB", (64, 96))]]
    with caplog.at_level("INFO", logger="difftune"):
        paths = validation.save_and_log(accelerator, ["a red circle", "a red circle"], rows, 12, tmp_path)
    assert f"validation at step 12: 3 images in {tmp_path / 'validation'}" in caplog.text  # where to look
    assert [p.name for p in paths] == [f"step000012_prompt{p}_{i}.png" for p, i in ((0, 0), (0, 1), (1, 0))]
    assert calls == [
        ("images", "validation/prompt0", (2, 64, 96, 3), 12),
        ("text", "validation/prompt0", "a red circle", 12),
        ("images", "validation/prompt1", (1, 96, 64, 3), 12),
        ("text", "validation/prompt1", "a red circle", 12),
    ]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(scope="module")
def sdxl_run(assets, tmp_path_factory):
    """One step with validation: a --validation_prompt (run-wide seed and negative prompt) and the file's two
    prompts; and infer.py's images for the same settings given as flags (the independent expectation)."""
    from conftest import run_script

    root = tmp_path_factory.mktemp("prompts")
    path = root / "prompts.txt"
    path.write_text(PROMPTS_FILE)
    out = root / "run"
    argv = sdxl_args(
        assets, out, "--validation_prompt", "x", "--validation_seed", "5", "--validation_negative_prompt", "green",
        "--validation_prompts_file", path, "--num_validation_images", "1", "--validation_steps", "1",
        "--validation_inference_steps", "3", steps=1, checkpointing_steps=1,
    )  # fmt: skip
    assert run_script("train_sdxl_lokr", argv) == 0
    common = ["--checkpoint", out / "step1"]
    expected = {}
    for name, flags in {
        "x": ["--prompt", "x", "--seed", "5", "--negative_prompt", "green", "--num_inference_steps", "3"],
        "red": ["--prompt", "a red circle", "--seed", "7", "--width", "96", "--height", "64", "--negative_prompt",
                "a blue square, blurry", "--guidance_scale", "3", "--num_inference_steps", "2"],
    }.items():  # fmt: skip
        assert run_script("infer", [*common, *flags, "--output_dir", root / name]) == 0
        (image,) = (root / name).glob("00_*_00.png")
        expected[name] = pixels(image)
    return out, path, expected


def test_sdxl_validation_images_follow_each_prompt_s_settings(sdxl_run):
    out, _, expected = sdxl_run
    folder = out / "validation"
    sizes = {p: Image.open(folder / f"step000001_prompt{p}_0.png").size for p in range(3)}
    assert sizes == {0: (64, 64), 1: (96, 64), 2: (64, 96)}  # (width, height)
    assert [(folder / f"prompt{p}.txt").read_text() for p in range(3)] == ["x\n", "a red circle\n", "a green square\n"]
    # The line's seed, negative prompt, guidance and steps (and the run-wide ones for the flag's prompt).
    assert np.abs(pixels(folder / "step000001_prompt1_0.png") - expected["red"]).max() <= 1
    assert np.abs(pixels(folder / "step000001_prompt0_0.png") - expected["x"]).max() <= 1


def test_infer_reads_the_same_prompts_file(sdxl_run, tmp_path, run_main):
    out, path, expected = sdxl_run
    argv = ["--checkpoint", out / "step1", "--prompt", "x", "--prompts_file", path, "--seed", "5"]
    argv += ["--negative_prompt", "green", "--num_inference_steps", "3", "--output_dir", tmp_path]
    assert run_main("infer", argv) == 0
    names = sorted(p.name for p in tmp_path.glob("0*.png"))
    assert names == ["00_x_00.png", "01_a-red-circle_00.png", "02_a-green-square_00.png"]
    assert [Image.open(tmp_path / n).size for n in names] == [(64, 64), (96, 64), (64, 96)]
    assert Image.open(tmp_path / "grid.png").size == (96, 3 * 96)  # cells as large as the largest image
    assert np.abs(pixels(tmp_path / "01_a-red-circle_00.png") - expected["red"]).max() <= 1
    assert np.abs(pixels(tmp_path / "00_x_00.png") - expected["x"]).max() <= 1


def test_wuerstchen_validation_sizes_follow_the_decoder_rule(assets, tmp_path, run_main):
    """192 is a size the tiny decoder cannot generate: that line's images are 256 wide, as --resolution 192's
    would be; --l is the prior's guidance scale."""
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle --w 192 --h 128 --d 7 --l 2\na blue square --w 256 --h 256 --s 1\n")
    out = tmp_path / "run"
    argv = wuerstchen_args(
        assets, out, "--validation_prompts_file", path, "--num_validation_images", "1", "--validation_steps", "1",
        "--validation_inference_steps", "1", steps=1, checkpointing_steps=1,
    )  # fmt: skip
    assert run_main("train_wuerstchen_lora", argv) == 0
    sizes = [Image.open(out / "validation" / f"step000001_prompt{p}_0.png").size for p in range(2)]
    assert sizes == [(256, 128), (256, 256)]


def test_sdxl_sizes_round_down_to_a_multiple_of_8():
    """kohya's rule for SDXL; the line's own settings go over the run-wide ones (the pipeline's names)."""
    said = []
    pipe = types.SimpleNamespace()  # not a combined (prior + decoder) pipeline
    entry = {"prompt": "a", "width": 100, "height": 515, "seed": 9, "steps": 4, "guidance_scale": 2.0, "line": 6}
    defaults = {"height": 64, "width": 64, "num_inference_steps": 30, "negative_prompt": "b"}
    (sample,) = validation.resolve_samples(pipe, [entry], defaults, seed=0, say=said.append)
    assert sample == validation.Sample(
        "a", 9, {"height": 512, "width": 96, "num_inference_steps": 4, "negative_prompt": "b", "guidance_scale": 2.0}
    )
    assert said == [
        "line 6: generating at height 512: SDXL needs a multiple of 8, not height 515",
        "line 6: generating at width 96: SDXL needs a multiple of 8, not width 100",
    ]
