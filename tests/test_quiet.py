"""No library noise a user cannot act on: each script runs in its own process, as a user runs it (the README's
`accelerate launch` command for SDXL), so what libraries print at import shows too, and no line may match NOISE.
The filters are difftune.cli.quiet's; the fixes at the call sites are named there."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import ROOT, SCRIPTS
from helpers import cascade_args, sdxl_args, wuerstchen_args

pytestmark = pytest.mark.slow  # several processes, a minute and a half

ACCELERATE_CONFIG = ROOT / "configs" / "accelerate" / "accelerate_config.yaml"
# The README's way, with one process and bf16 from the config.
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--config_file", str(ACCELERATE_CONFIG)]

NOISE = [
    # bitsandbytes at import (peft imports it): a CPU kernel for 4-bit layers, which difftune never uses
    r"Failed to load CPU gemm_4bit_forward from kernels-community",
    # diffusers at a model's .to(dtype), naming no module
    r"that should be kept in float32: \[\]",
    # diffusers at each Würstchen / Stable Cascade pipeline built
    r"Pipeline has been deprecated and will not receive bug fixes",
    # peft at each save of an adapter whose base folder has no config.json
    r"Could not find a config file in .* will assume that the vocabulary was not modified",
    # diffusers when a LoRA file has no text-encoder keys
    r"No LoRA keys associated to",
    # diffusers' pipelines, when given torch_dtype
    r"`torch_dtype` is deprecated",
    # transformers' progress bar, one per text encoder loaded
    r"Loading weights",
    # accelerate launch without a config
    r"were not passed to `accelerate launch`",
    # accelerate launch without -q, after a script's one-line error
    r"CalledProcessError|Traceback \(most recent call last\)",
    # any Python warning ("path.py:12: UserWarning: ...") and any other library's logged warning or error in the
    # training scripts' log format: new noise, to silence in difftune.cli.quiet or to keep on purpose here
    r"\.py:\d+: \w*Warning: ",
    r"^\S+ \S+ (WARNING|ERROR) (?!difftune\b)",
]


def lines(text: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]+", text) if line.strip()]


def run(command: list) -> subprocess.CompletedProcess:
    # (The environment is conftest's: offline, a scratch HF_HOME.)
    return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=600, cwd=ROOT)


def noise(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in lines(result.stdout + result.stderr) if any(re.search(p, line) for p in NOISE)]


def test_scripts_print_no_library_noise(assets, tmp_path):
    validation = ["--validation_prompt", "x", "--validation_steps", "1", "--num_validation_images", "1"]
    validation += ["--validation_inference_steps", "2"]
    sdxl, wuerstchen, cascade = tmp_path / "sdxl", tmp_path / "wuerstchen", tmp_path / "cascade"
    runs = {
        "train_sdxl_lokr (accelerate launch)": [
            *LAUNCH, SCRIPTS / "train_sdxl_lokr.py",
            *sdxl_args(assets, sdxl, *validation, steps=1, checkpointing_steps=1),
        ],
        "train_wuerstchen_lora (v2)": [
            sys.executable, SCRIPTS / "train_wuerstchen_lora.py",
            *wuerstchen_args(assets, wuerstchen, *validation, steps=1, checkpointing_steps=1),
        ],
        "train_wuerstchen_lora (Stable Cascade)": [
            sys.executable, SCRIPTS / "train_wuerstchen_lora.py",
            *cascade_args(assets, cascade, *validation, steps=1, checkpointing_steps=1),
        ],
        "infer (Würstchen v2)": [
            sys.executable, SCRIPTS / "infer.py", "--checkpoint", wuerstchen / "step1", "--prompt", "x",
            "--num_inference_steps", "2", "--output_dir", tmp_path / "samples",
        ],
        "export (SDXL, kohya)": [
            sys.executable, SCRIPTS / "export.py", "--checkpoint", sdxl / "step1", "--out", tmp_path / "k.safetensors",
        ],
    }  # fmt: skip
    found = {}
    for name, command in runs.items():  # in order: infer and export read the runs' checkpoints
        result = run(command)
        assert result.returncode == 0, f"{name} failed:\n{result.stderr[-3000:]}"
        found[name] = noise(result)
    assert not any(found.values()), "library noise:\n" + "\n".join(
        f"{name}: {line}" for name, found_lines in found.items() for line in found_lines
    )


def test_error_under_accelerate_launch_is_one_line(tmp_path):
    """The README's launch of a script that stops on bad input: our line, nothing of accelerate's after it."""
    result = run([*LAUNCH, SCRIPTS / "export.py", "--checkpoint", tmp_path / "none", "--out", tmp_path / "x"])
    assert result.returncode != 0
    out = lines(result.stdout + result.stderr)
    assert len(out) == 1 and out[0].startswith("error: --checkpoint "), out
