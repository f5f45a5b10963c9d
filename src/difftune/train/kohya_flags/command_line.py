"""kohya's flag names on our parser: the same-meaning ones as extra option strings, the converted ones as hidden
options that `rewrite_argv` turns into our flags before parsing; and the --config hook for kohya's training
configs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from difftune.cli.config_file import tokens_for
from difftune.cli.errors import UserError
from difftune.train.kohya_flags.keys import ALIASES, IMAGE_CACHE, KOHYA_ONLY, LISTS, SDXL, SWITCHES, WUERSTCHEN
from difftune.train.kohya_flags.translation import convert, translate


def add_option_strings(parser: argparse.ArgumentParser, flag: str, *names: str) -> None:
    """Give our flag `flag` more names, shown in --help beside it ("--rank RANK, --network_dim RANK"). argparse
    has no public way to add a name to an action: its option strings and the parser's index of them are extended."""
    action = parser._option_string_actions[flag]
    for name in names:
        if name not in parser._option_string_actions:
            action.option_strings.append(name)
            parser._option_string_actions[name] = action


def script_of(parser: argparse.ArgumentParser) -> str:
    return SDXL if "--decompose_factor" in parser._option_string_actions else WUERSTCHEN


def add_kohya_aliases(parser: argparse.ArgumentParser) -> None:
    """kohya's names: the same-meaning ones beside our flags in --help, the converted ones as hidden options (their
    values are converted by `rewrite_argv` before parsing); and the --config hook for kohya's training configs."""
    script = script_of(parser)
    aliases = dict(ALIASES)
    aliases["cache_latents_to_disk"] = IMAGE_CACHE[script]
    if script == WUERSTCHEN:
        aliases["cache_latents"] = IMAGE_CACHE[script]
    for kohya, dest in aliases.items():
        if f"--{dest}" in parser._option_string_actions:
            add_option_strings(parser, f"--{dest}", f"--{kohya}")
    for key in sorted(KOHYA_ONLY - set(aliases)):
        if f"--{key}" not in parser._option_string_actions:
            nargs = 0 if key in SWITCHES else "*" if key in LISTS else None
            kind = {"action": "store_true"} if nargs == 0 else {"nargs": nargs} if nargs else {}
            parser.add_argument(f"--{key}", **kind, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    known = {option[2:] for option in parser._option_string_actions if option.startswith("--")}
    parser.translate_settings = lambda settings: translate(settings, script, known)


# Our flags a kohya flag overrides on the same command line (kohya: max_train_epochs over max_train_steps, ...).
COMPANIONS = {
    "max_train_epochs": ("max_train_steps",),
    "unet_lr": ("learning_rate",),
    "sample_every_n_epochs": ("validation_steps", "sample_every_n_steps"),
}


def rewrite_argv(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> list[str]:
    """The command line with kohya's converted flags replaced by ours (after the rest: kohya's meaning wins over
    the --config file's); a flag given both ways is refused."""
    tokens = list(sys.argv[1:] if argv is None else map(str, argv))
    script = script_of(parser)
    aliases = {f"--{k}" for k, d in ALIASES.items() if f"--{d}" in parser._option_string_actions}
    converted = {f"--{key}" for key in KOHYA_ONLY} - aliases - {"--cache_latents_to_disk"}
    settings, kept, index = {}, [], 0
    while index < len(tokens):
        name, eq, inline = tokens[index].partition("=")
        if name not in converted:
            kept.append(tokens[index])
            index += 1
            continue
        key, index = name[2:], index + 1
        if key in SWITCHES:
            settings[key] = True
        elif eq:
            settings[key] = [inline] if key in LISTS else inline
        elif key in LISTS:
            start = index
            while index < len(tokens) and not tokens[index].startswith("--"):
                index += 1
            settings[key] = tokens[start:index]
        else:
            settings[key], index = (tokens[index] if index < len(tokens) else None), index + 1
    if not settings:
        return tokens
    kept = take_companions(settings, kept)
    context = peek(kept)
    out = convert(settings, script, context)
    added = []
    for dest, value in out.items():
        action = parser._option_string_actions.get(f"--{dest}")
        if action is None:
            raise UserError(f"--{dest} (from kohya's {', '.join(sorted(settings))}) is not a flag of this script")
        typed = [t for t in kept if t.partition("=")[0] in action.option_strings]
        if typed:
            raise UserError(f"{typed[0].partition('=')[0]} and kohya's {', '.join(f'--{k}' for k in sorted(settings))}"
                            f" both set --{dest}: pass one of them")  # fmt: skip
        added += tokens_for(action, f"--{dest}", value)
    return kept + added


def take_companions(settings: dict, kept: list[str]) -> list[str]:
    """Move our flags that a kohya flag overrides from the command line into its settings."""
    remaining, index = [], 0
    names = {f"--{c}": c for key in settings for c in COMPANIONS.get(key, ())}
    while index < len(kept):
        name, eq, inline = kept[index].partition("=")
        if name in names:
            value = inline if eq else (kept[index + 1] if index + 1 < len(kept) else None)
            settings.setdefault(names[name], value)
            index += 1 if eq else 2
            continue
        remaining.append(kept[index])
        index += 1
    return remaining


def peek(tokens: list[str]) -> dict:
    """Our flags' values on a command line that kohya's conversions depend on (rank, alpha, factor, schedules);
    a value that is no number is left for argparse to name when it parses for real."""
    probe = argparse.ArgumentParser(add_help=False, allow_abbrev=False, exit_on_error=False)
    kinds = {"rank": int, "alpha": float, "decompose_factor": int, "checkpointing_steps": int,
             "checkpointing_epochs": int}  # fmt: skip
    names = {"rank": ["--network_dim"], "checkpointing_steps": ["--save_every_n_steps"],
             "checkpointing_epochs": ["--save_every_n_epochs"]}  # fmt: skip
    for dest in kinds:
        probe.add_argument(f"--{dest}", *names.get(dest, []), dest=dest, default=None)
    for dest in ("decompose_both", "train_text_encoder"):
        probe.add_argument(f"--{dest}", action="store_true", default=None)
    try:
        known, _ = probe.parse_known_args(tokens)
    except argparse.ArgumentError:
        return {}
    values = {}
    for dest, value in vars(known).items():
        try:
            values[dest] = kinds[dest](value) if dest in kinds and value is not None else value
        except ValueError:
            continue
    return {k: v for k, v in values.items() if v is not None}
