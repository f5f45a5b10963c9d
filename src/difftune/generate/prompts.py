"""Prompt files in kohya sd-scripts' sample-prompt syntax: one prompt a line, with inline options.

    a photo of sks dog on a beach --n blurry, low quality --w 1024 --h 768 --d 42 --l 6.5 --s 30

A line splits at " --" (a space, then two dashes): the first piece is the prompt, each later piece an option,
its one-letter name (any case), a space, and its value. The negative prompt (--n) runs to the next " --".
Blank lines and lines starting with "#" are skipped. Where kohya ignores what it cannot read (an unknown
option, "--w 512px", "--s 0" clamped to 1), difftune refuses the file with the line's number: a typo should
not silently change what a run generates.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from difftune.cli.errors import UserError

# Inline option -> (key of the parsed line, kind of value).
OPTIONS = {
    "n": ("negative_prompt", "text"),
    "w": ("width", "size"),
    "h": ("height", "size"),
    "d": ("seed", "seed"),
    "l": ("guidance_scale", "scale"),
    "s": ("steps", "steps"),
}
SIZE_RANGE = (64, 8192)
STEPS_RANGE = (1, 1000)  # kohya clamps --s to this range; difftune refuses values outside it


def _value(kind: str, name: str, text: str) -> object:
    """An option's value, or ValueError saying what --name takes."""
    if kind == "text":
        return text
    if kind == "scale":
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"--{name} takes a number, got {text!r}") from None
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"--{name} {text} must be >= 0")
        return value
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"--{name} takes a whole number, got {text!r}")
    value = int(text)
    low, high = {"size": SIZE_RANGE, "steps": STEPS_RANGE}.get(kind, (0, 2**63 - 1))
    if not low <= value <= high:
        raise ValueError(f"--{name} {value} is out of range ({low} to {high})")
    return value


def parse_line(line: str) -> dict:
    """One prompt line as {"prompt": ..., and the options it gives}; ValueError says what is malformed."""
    # A leading space lets a line that starts with an option split too (its prompt is then empty).
    prompt, *pieces = (" " + line.strip()).split(" --")
    parsed = {"prompt": prompt.strip()}
    if not parsed["prompt"]:
        raise ValueError("the prompt is empty (write the prompt first, then its options)")
    for piece in pieces:
        name, _, text = piece.strip().partition(" ")
        if name.lower() not in OPTIONS:
            what = f"unknown option --{name}" if name else '" --" without an option name'
            raise ValueError(f"{what} (a line takes --n, --w, --h, --d, --l, --s)")
        key, kind = OPTIONS[name.lower()]
        if not text.strip():
            raise ValueError(f"--{name} has no value")
        parsed[key] = _value(kind, name, text.strip())  # a repeated option: the last one counts, as in kohya
    return parsed


def read_prompts_file(path: Path, flag: str) -> list[dict]:
    """The prompts of a file (see the module docstring), each with its `line` number; a UserError naming the
    file and line for the first malformed one."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path} does not exist")
    entries = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.strip().startswith("#"):
            continue
        try:
            entries.append({**parse_line(line), "line": number})
        except ValueError as error:
            raise UserError(f"{flag} {path} line {number}: {error}") from None
    if not entries:
        raise UserError(f"{flag} {path} holds no prompt (only blank or # comment lines)")
    return entries


def prompt_entries(prompts: list[str] | None, path: Path | None, flag: str) -> list[dict]:
    """The flag's prompts (run-wide settings only), then the file's lines."""
    entries = [{"prompt": prompt} for prompt in prompts or []]
    return entries + (read_prompts_file(path, flag) if path is not None else [])


def check_validation_args(args: argparse.Namespace) -> None:
    """Read --validation_prompts_file (before any model loads) into args.validation_samples, the run's
    validation prompts in order: --validation_prompt's, then the file's."""
    if args.validation_guidance_scale is not None and not args.validation_guidance_scale >= 0:
        raise UserError(f"--validation_guidance_scale must be >= 0, got {args.validation_guidance_scale}")
    if args.validation_seed is not None and args.validation_seed < 0:
        raise UserError(f"--validation_seed must be >= 0, got {args.validation_seed}")
    args.validation_samples = prompt_entries(
        args.validation_prompt, args.validation_prompts_file, "--validation_prompts_file"
    )
