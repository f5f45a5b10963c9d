"""The command line's basics: a parser whose errors are one-line user errors, list values, the dtype names."""

from __future__ import annotations

import argparse

import torch

from difftune.cli.errors import UserError

# --dtype / --mixed_precision values and the torch dtypes they mean ("no" precision: fp32).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ErrorOnlyParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported like every other user error (one line, exit 2), and only whole
    flag names are accepted (argparse would read `--checkpoints 3` as --checkpoints_total_limit 3)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:
        raise UserError(f"{message} (see --help)")


def comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]
