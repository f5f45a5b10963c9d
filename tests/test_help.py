"""`--help` of every script: it answers without importing torch and the other heavy libraries, shows each flag's
default and a one-line usage, and groups the training flags as docs/options.md's flag table does."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_sdxl_lokr", "train_wuerstchen_lora", "infer", "export")
TRAINING = SCRIPTS[:2]
HEAVY = ("torch", "diffusers", "transformers", "peft", "accelerate", "datasets", "PIL", "numpy")
# `python scripts/NAME.py --help`, run by runpy so that the same process can then say what --help imported.
PROBE = f"""
import runpy, sys
sys.argv, code = [sys.argv[1], "--help"], None
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit_:
    code = exit_.code
print("exit", code, "imported", [name for name in {HEAVY!r} if name in sys.modules])
"""


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """Each script's --help output (wide, so that wrapping does not depend on the terminal) and its last line,
    what the probe reports."""
    env = {**os.environ, "COLUMNS": "1000"}
    out = {}
    for name in SCRIPTS:
        script = str(ROOT / "scripts" / f"{name}.py")
        result = subprocess.run([sys.executable, "-c", PROBE, script], capture_output=True, text=True, env=env)
        assert result.returncode == 0, result.stderr
        out[name] = result.stdout
    return out


def groups(help_text: str) -> dict[str, dict[str, str]]:
    """Group title (up to its first " (") -> each option string (aliases too: "--flip_aug") -> its help text."""
    found: dict[str, dict[str, str]] = {}
    entries, names = None, []
    for line in help_text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":") and (entries is not None or line == "options:"):
            entries = found.setdefault(line[:-1].split(" (")[0], {})
        elif entries is not None and line.startswith("  -"):
            invocation, _, text = line.strip().partition("  ")  # "--random_flip, --flip_aug", "--rank RANK"
            names = [option.split()[0] for option in invocation.split(", ")]
            entries.update(dict.fromkeys(names, text.strip()))
        elif entries is not None and line.strip():  # the help text, continued
            entries.update({name: f"{entries[name]} {line.strip()}".strip() for name in names})
    return found


def flag_help(help_text: str, flag: str) -> str:
    return next(entries[flag] for entries in groups(help_text).values() if flag in entries)


def group_of(help_text: str, flag: str) -> str:
    return next(title for title, entries in groups(help_text).items() if flag in entries)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_exits_cleanly_without_importing_torch_or_the_other_heavy_libraries(helps, name):
    assert helps[name].splitlines()[-1] == "exit 0 imported []"


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_usage_is_one_line(helps, name):
    first, second = helps[name].splitlines()[:2]
    assert first.startswith(f"usage: {name}.py ") and first.endswith("[options]") and second == ""


@pytest.mark.parametrize(
    "name, flag, default",
    [
        ("train_sdxl_lokr", "--resolution", "1024"),
        ("train_wuerstchen_lora", "--resolution", "768"),
        *[(name, "--rank", "8") for name in TRAINING],
        *[(name, "--learning_rate", "0.0001") for name in TRAINING],  # (a flag without help text)
        *[(name, "--target_modules", "to_q,to_k,to_v,to_out.0") for name in TRAINING],  # a list, as typed
        *[(name, "--caption_prefix", "''") for name in TRAINING],
        ("infer", "--seed", "0"),  # 0 shown, though false
        ("export", "--format", "kohya"),
    ],
)
def test_each_default_is_shown(helps, name, flag, default):
    assert flag_help(helps[name], flag).endswith(f"(default: {default})")


@pytest.mark.parametrize("name", TRAINING)
def test_a_default_is_not_said_twice_and_none_or_off_is_not_shown(helps, name):
    assert flag_help(helps[name], "--validation_seed").endswith("Default: --seed.")
    assert flag_help(helps[name], "--max_train_samples").endswith("at most.")  # None
    assert flag_help(helps[name], "--use_ema").endswith("saved in ema/.")  # off


def table_rows() -> dict[str, list[str]]:
    """docs/options.md's flag table: group (up to its first " (") -> the flags of its row, without aliases
    ("`--flip_aug` = `--random_flip`") and other flags named in passing ("(= `--train_data_dir`)",
    "(default: `--seed`)")."""
    text = (ROOT / "docs" / "options.md").read_text()
    table = text.split("\n## Flags\n", 1)[1].split("\n\n")[1]
    rows = {}
    for line in table.splitlines()[2:]:
        title, cell = line.strip("| ").split(" | ", 1)
        cell = re.sub(r"`--\w+` = `--\w+`", "", cell)
        rows[title.split(" (")[0]] = re.findall(r"(?<!= )(?<!default: )`(--\w+)`", cell)
    return rows


def test_the_groups_are_the_tables_and_hold_its_flags(helps):
    rows = table_rows()
    titles = set()
    for name in TRAINING:
        found = groups(helps[name])
        assert list(found["options"]) == ["-h", "--help"], "every flag in a group"
        titles |= set(found) - {"options"}
        for title in set(rows) & set(found):  # (the LoKr row is the SDXL script's, the LoRA row the other's)
            for flag in rows[title]:
                if any(flag in entries for entries in found.values()):  # (one of this script's flags)
                    assert group_of(helps[name], flag) == title, f"{name}: {flag}"
    assert titles == set(rows)


@pytest.mark.parametrize(
    "name, model_flags",
    [
        ("train_sdxl_lokr", ["--pretrained_model_name_or_path", "--pretrained_vae_model_name_or_path",
                             "--single_file_config", "--init_adapter", "--revision", "--variant"]),
        ("train_wuerstchen_lora", ["--pretrained_prior_model_name_or_path", "--prior_subfolder",
                                   "--pretrained_decoder_model_name_or_path", "--decoder_subfolder",
                                   "--image_encoder_path", "--init_adapter", "--revision", "--variant"]),
    ],
)  # fmt: skip
def test_the_base_model_flags_are_in_model_and_the_mask_flags_together(helps, name, model_flags):
    assert {group_of(helps[name], flag) for flag in model_flags} == {"model"}
    assert {group_of(helps[name], flag) for flag in ("--masked_loss", "--alpha_mask", "--mask_dir")} == {"masked loss"}


def test_the_written_out_image_encoder_defaults_are_the_models(helps):
    """train_wuerstchen_lora.py writes them out (their modules load torch); they must stay the ones used."""
    for module in ("wuerstchen", "cascade"):
        tree = ast.parse((ROOT / "src" / "difftune" / "models" / f"{module}.py").read_text())
        value = next(
            node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["DEFAULT_IMAGE_ENCODER"]
        )
        assert value in flag_help(helps["train_wuerstchen_lora"], "--image_encoder_path")
