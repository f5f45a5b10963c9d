"""--config FILE: a run's settings in a file, TOML, YAML or JSON (by its extension).

Keys are flag names, with dashes or underscores; section headers (`[data]`, `optimisation:`) group keys and are
otherwise ignored. The file's settings become command-line tokens placed before the command line's own, so the
command line wins and every value goes through the same types, choices and checks as a typed flag. Every
problem of a file (unknown keys, values of the wrong type) comes in one message, before anything loads.

A run's `args.json` is a valid --config: the keys it records that are facts about the run rather than
settings (RECORDED) are not applied; the base file's sha256 is compared with the file's today (a warning).
A parser may translate another tool's keys first (`parser.translate_settings`, e.g. kohya's training config).
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
from pathlib import Path

import tomllib

from difftune.cli.errors import UserError

FLAG = "--config"
KINDS = {".toml": "TOML", ".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}
# What a run's args.json records beside its settings: facts, not applied when it is read back as a --config.
RECORDED = {
    "config": "the settings file the run was started with",
    "config_sha256": "that file's sha256",
    "base_model_file": "the single-file base model's name",
    "base_model_sha256": "its sha256 (compared with the file's today)",
    "prior_class": "the prior's generation, read from its folder",
    "validation_samples": "the validation prompts as resolved from the flags",
    "datasets": "the kohya data sets as read",
    "trained_size": "the size the first data set trained at",
    "expected_base_model_sha256": "the base file's sha256 in the settings file this run was started with",
}


def config_path(argv: list[str]) -> str | None:
    """The value of --config in `argv` (`--config F` or `--config=F`), if given."""
    for index, token in enumerate(argv):
        if token == FLAG and index + 1 < len(argv):
            return argv[index + 1]
        if token.startswith(FLAG + "="):
            return token.split("=", 1)[1]
    return None


def read_table(path: Path, flag: str, default_kind: str | None = None) -> dict:
    """A TOML, YAML or JSON file's top-level table, its format by its extension (else `default_kind`); every
    failure one line naming `flag`."""
    kind = KINDS.get(path.suffix.lower(), default_kind)
    if kind is None:
        raise UserError(f"{flag} {path}: name it *.toml, *.yaml or *.json (its format follows the extension)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{flag} {path} does not exist") from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise UserError(f"{flag} {path} cannot be read as text: {error}") from None
    try:
        if kind == "TOML":
            raw = tomllib.loads(text)
        elif kind == "JSON":
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text) or {}
    except Exception as error:  # noqa: BLE001 - each parser's own error type; all become one line
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"{flag} {path} is not valid {kind}: {first}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{flag} {path} must hold keys and values (a table), not a {type(raw).__name__}")
    return raw


def read_settings(path: Path) -> dict:
    """The file's keys, one level of sections flattened, dashes as underscores."""
    raw = read_table(path, FLAG)
    settings: dict = {}
    for key, value in raw.items():
        table = value if isinstance(value, dict) else {key: value}  # a section: its keys
        for name, item in table.items():
            name = str(name).replace("-", "_")
            if name in settings:
                raise UserError(f"{FLAG} {path}: {name} is set twice (in two sections): keep one")
            settings[name] = item
    return settings


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def action_for(parser: argparse.ArgumentParser, key: str) -> tuple[argparse.Action, str] | None:
    """The flag a key names (by its option string, or by the name the flags are stored under) and the option
    string to write it with."""
    option = "--" + key
    if option in parser._option_string_actions:  # (argparse keeps no public index of the flags)
        return parser._option_string_actions[option], option
    for action in parser._actions:
        if action.dest == key and action.option_strings:
            return action, action.option_strings[0]
    return None


def tokens_for(action: argparse.Action, option: str, value) -> list[str]:
    """The command-line tokens that set `value`: what a user would have typed."""
    if action.nargs == 0:  # on / off flags: store_true's const is True, store_false's False
        if not isinstance(value, bool):
            raise ValueError("must be true or false")
        return [option] if value == action.const else []
    if isinstance(value, dict):
        raise ValueError("must be a value, not a table")
    if isinstance(value, list):
        if isinstance(action, argparse._AppendAction):  # a repeatable flag (infer.py --prompt): once per item
            return [token for item in value for token in (option, str(item))]
        if action.nargs in (None, "?"):  # a comma-separated list flag (e.g. --target_modules)
            return [option, ",".join(map(str, value))]
        return [option, *map(str, value)]
    if isinstance(value, bool):
        raise ValueError("must be a value, not true / false")
    return [option, str(value)]


def check_value(parser: argparse.ArgumentParser, action: argparse.Action, tokens: list[str]) -> None:
    """The tokens' value through the flag's type and choices (argparse's own conversion), or ValueError."""
    if action.nargs == 0 or not tokens:
        return
    try:
        parser._get_values(action, list(tokens[1:]))  # (argparse's conversion: a list of strings)
    except argparse.ArgumentError as error:
        raise ValueError(error.message) from None


def config_tokens(parser: argparse.ArgumentParser, path: Path) -> tuple[list[tuple[argparse.Action, list[str]]], dict]:
    """The file's settings as command-line tokens, flag by flag, and the recorded facts it holds (every problem
    in one UserError)."""
    settings = read_settings(path)
    translate = getattr(parser, "translate_settings", None)
    if translate is not None:
        settings = translate(settings)
    facts = {key: settings.pop(key) for key in list(settings) if key in RECORDED}
    if (
        settings.get("instance_data_dir") is not None
        and settings.get("train_data_dir") == settings["instance_data_dir"]
    ):
        del settings["train_data_dir"]  # (args.json: --instance_data_dir is recorded under both names)
    tokens, problems = [], []
    known = [option[2:] for option in parser._option_string_actions if option.startswith("--")]
    for key, value in settings.items():
        if value is None:  # (JSON null, args.json's "not given": the flag keeps its default)
            continue
        found = action_for(parser, key)
        if found is None or key in ("config", "help"):
            near = difflib.get_close_matches(key, known, n=1)
            problems.append(f"{key} is not a flag" + (f" (did you mean {near[0]}?)" if near else ""))
            continue
        action, option = found
        try:
            more = tokens_for(action, option, value)
            check_value(parser, action, more)
        except ValueError as error:
            problems.append(f"{key} = {value!r} {error}")
            continue
        tokens.append((action, more))
    if problems:
        count = f"{len(problems)} problems: " if len(problems) > 1 else ""
        raise UserError(f"{FLAG} {path}: {count}{'; '.join(problems)}")
    return tokens, facts


def with_config(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], dict]:
    """`argv` with --config's settings put before it (the command line wins), and the file's recorded facts."""
    value = config_path(argv)
    if value is None:
        return argv, {}
    groups, facts = config_tokens(parser, Path(value).expanduser())
    typed = {token.split("=", 1)[0] for token in argv if token.startswith("-")}
    # A flag on the command line replaces the file's (a repeatable one too, rather than adding to it).
    tokens = [token for action, more in groups if typed.isdisjoint(action.option_strings) for token in more]
    return tokens + argv, facts


def record(args: argparse.Namespace, facts: dict) -> None:
    """The settings file's path and sha256 in the run's arguments; recorded facts checked, not applied."""
    if getattr(args, "config", None):
        args.config_sha256 = file_sha256(Path(args.config).expanduser())
    expected = facts.get("base_model_sha256")
    if expected:
        args.expected_base_model_sha256 = expected  # (compared when the base file is hashed: single_file.record)
