"""--config FILE: a run's settings in a TOML, YAML or JSON file; the command line wins; a run's args.json runs
again as a --config and trains the identical adapter; a bad file is one message before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script
from helpers import adapter_weights, max_difference, one_line_error, sdxl_args


def as_settings(argv: list) -> dict:
    """A command line of `--flag value` pairs as settings."""
    return {str(argv[i]).removeprefix("--"): str(argv[i + 1]) for i in range(0, len(argv), 2)}


def write(path: Path, settings: dict) -> Path:
    """The settings in the file's format (TOML with two sections, to show they only group keys)."""
    if path.suffix == ".json":
        path.write_text(json.dumps(settings))
    elif path.suffix == ".yaml":
        path.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in settings.items()))
    else:
        model = {k: v for k, v in settings.items() if k.startswith("pretrained")}
        rest = {k: v for k, v in settings.items() if k not in model}
        lines = ["[model]", *(f"{k} = {json.dumps(v)}" for k, v in model.items()), "[training]"]
        path.write_text("\n".join([*lines, *(f"{k.replace('_', '-')} = {json.dumps(v)}" for k, v in rest.items())]))
    return path


@pytest.mark.parametrize("suffix", [".toml", ".yaml", ".json"])
def test_a_settings_file_trains_and_the_command_line_wins(assets, tmp_path, run_main, suffix):
    settings = as_settings(sdxl_args(assets, tmp_path / "from_file", steps=1, checkpointing_steps=1))
    settings |= {"rank": 4, "learning_rate": 0.001, "random_flip": True}
    config = write(tmp_path / f"run{suffix}", settings)
    assert run_main("train_sdxl_lokr", ["--config", config, "--rank", "2"]) == 0
    recorded = json.loads((tmp_path / "from_file" / "step1" / "args.json").read_text())
    assert recorded["rank"] == 2  # the command line over the file's 4
    assert recorded["learning_rate"] == 0.001 and recorded["random_flip"] is True  # the file's, typed
    assert recorded["config"] == str(config) and len(recorded["config_sha256"]) == 64


def test_a_runs_args_json_trains_the_identical_adapter(assets, tmp_path, run_main):
    first = tmp_path / "first"
    argv = sdxl_args(assets, first, "--rank", "4", "--shuffle_caption", "--target_modules", "to_q,to_v", steps=2)
    assert run_main("train_sdxl_lokr", argv) == 0
    again = tmp_path / "again"
    assert run_main("train_sdxl_lokr", ["--config", first / "step2" / "args.json", "--output_dir", again]) == 0
    assert max_difference(adapter_weights(again / "step2"), adapter_weights(first / "step2")) == 0
    recorded = json.loads((again / "step2" / "args.json").read_text())
    assert recorded["target_modules"] == ["to_q", "to_v"] and recorded["output_dir"] == str(again)


def test_a_bad_file_is_one_message_naming_every_problem(assets, tmp_path, run_main, capsys):
    config = tmp_path / "bad.toml"
    config.write_text('[training]\nrnak = 4\nlearning_rate = "fast"\nmixed_precision = "fp64"\nrandom_flip = 1\n')
    argv = sdxl_args(assets, tmp_path / "out")
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(tmp_path / "no model here")  # none is read
    assert run_main("train_sdxl_lokr", [*argv, "--config", config]) == 2
    error = one_line_error(capsys)
    for part in (
        "4 problems",
        "rnak is not a flag (did you mean rank?)",
        "learning_rate = 'fast' invalid float value",
        "mixed_precision = 'fp64' invalid choice",
        "random_flip = 1 must be true or false",
    ):
        assert part in error, (part, error)


def test_other_scripts_take_a_settings_file_too(assets, tmp_path):
    prompts = ["a red circle", "a blue square"]
    config = write(tmp_path / "infer.json", {"checkpoint": str(tmp_path / "step1"), "prompt": prompts})
    args = load_script("infer").parse_args(["--config", str(config), "--seed", "3"])
    assert args.prompt == prompts and args.seed == 3
    args = load_script("infer").parse_args(["--config", str(config), "--prompt", "a green star"])
    assert args.prompt == ["a green star"]  # the command line's replaces the file's (it does not add to them)
