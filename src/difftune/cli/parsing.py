"""The command line's basics: a parser whose errors are one-line user errors, list values, the dtype names."""

from __future__ import annotations

import argparse
import copy
import difflib
import sys
from collections.abc import Iterator, Mapping

from difftune.cli import config_file
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
        self.add_argument_group("settings file").add_argument(
            config_file.FLAG, metavar="FILE",
            help="Flags from a TOML, YAML or JSON file (keys: flag names; a run's args.json works); the command "
            "line wins.",
        )  # fmt: skip

    def parse_args(self, args=None, namespace=None):
        """The flags of the command line, after those of its --config file (difftune.cli.config_file)."""
        argv = list(sys.argv[1:] if args is None else map(str, args))
        argv, facts = config_file.with_config(self, argv)
        parsed = super().parse_args(argv, namespace)
        config_file.record(parsed, facts)
        return parsed

    def error(self, message: str) -> None:
        raise UserError(f"{message}{self.nearest_flag(message)} (see --help)")

    def nearest_flag(self, message: str) -> str:
        """For argparse's "unrecognized arguments: --x ...": " (did you mean --y?)", naming the flag's main name
        too when --y is another name for it (kohya's --network_dim is --rank)."""
        unknown = [t for t in message.split()[2:] if t.startswith("--")] if "unrecognized arguments" in message else []
        options = [option for option in self._option_string_actions if option.startswith("--")]
        near = difflib.get_close_matches(unknown[0].split("=")[0], options, n=1) if unknown else []
        if not near:
            return ""
        main = self._option_string_actions[near[0]].option_strings[0]
        return f" (did you mean {near[0]}{f' (= {main})' if main != near[0] else ''}?)"


def comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]
