"""The command line's basics: a parser whose errors are one-line user errors, list values, the dtype names."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Iterator, Mapping

from difftune.cli.errors import UserError

_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class _TorchDtypes(Mapping):
    """--dtype / --mixed_precision values and the torch dtypes they mean ("no" precision: fp32). torch is
    imported at the first lookup: the names alone (a flag's choices) must not load it, or --help waits for it."""

    def __getitem__(self, name: str):
        import torch

        return getattr(torch, _DTYPE_NAMES[name])

    def __iter__(self) -> Iterator[str]:
        return iter(_DTYPE_NAMES)

    def __len__(self) -> int:
        return len(_DTYPE_NAMES)


DTYPES = _TorchDtypes()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The scripts' docstrings as written, and each flag's default after its help, unless the help already
    says it or there is none to show (None, off, an empty list)."""

    @staticmethod
    def _default_note(action: argparse.Action) -> str:
        """ "(default: X)", or "" when the help says it already or there is none to show."""
        default = action.default
        # (None and False by identity: a default of 0 is shown)
        nothing = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if nothing or "default:" in (action.help or "").lower():
            return ""
        # Shown as typed: a list `to_q,to_k` (--target_modules), an empty text ''; "%" is argparse's format character.
        shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else str(default) or "''"
        return f"(default: {shown.replace('%', '%%')})"

    def _get_help_string(self, action: argparse.Action) -> str:
        note = self._default_note(action)
        return f"{action.help} {note}" if note else action.help

    def _format_action(self, action: argparse.Action) -> str:
        # argparse writes no help line for a flag without help text: its default becomes its help.
        if not action.help and (note := self._default_note(action)):
            action = copy.copy(action)
            action.help = note  # (it says "default:", so _get_help_string adds nothing)
        return super()._format_action(action)


class ErrorOnlyParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported like every other user error (one line, exit 2), and only whole
    flag names are accepted (argparse would read `--checkpoints 3` as --checkpoints_total_limit 3). --help shows
    every default, and a one-line usage (the flags, a hundred of them, are listed below it by group)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("usage", "%(prog)s [options]")
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:
        raise UserError(f"{message} (see --help)")


def comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]
