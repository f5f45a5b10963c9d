"""kohya sd-scripts' training settings and flag names, read with kohya's meaning.

A kohya training config (the TOML of kohya's `--output_config` / `--config_file`, or the one the kohya_ss GUI
writes, in sections such as [model_arguments] and [optimizer_arguments]) comes in through `--config`
(`translate`, the parser's `translate_settings`), kohya's flag names through the command line
(`add_kohya_aliases`, `rewrite_argv`). Each kohya key is one of:

- another name for one of our flags, same meaning (`network_dim` = `--rank`): an extra option string, in --help;
- converted to our flags (`network_alpha`, `network_args`, `optimizer_type`, `max_train_epochs`, ...): a hidden
  option, its value converted exactly as the config key's;
- without effect on what trains here (attention kernels, loader processes, memory modes): accepted, named in one
  note;
- refused with its reason; all refusals in one error.

Settings holding any kohya-only key are a kohya config: kohya's `--output_config` leaves out every value equal to
kohya's default, so the keys it leaves out take kohya's defaults where ours differ (one note lists them).

Imported while the training scripts build their parser: no torch here (--help must not wait for it).

The package by concern: `keys` (the tables of kohya's keys: aliases, noted, refused and converted keys, switches
and lists), `lycoris` (LyCORIS's presets and factoring on SDXL's layers), `translation` (a config's keys as our
dests), `command_line` (kohya's flag names on our parser, the command line rewritten, the --config hook).
"""

from difftune.train.kohya_flags.command_line import add_kohya_aliases, rewrite_argv
from difftune.train.kohya_flags.keys import KOHYA_ONLY
from difftune.train.kohya_flags.translation import convert, translate

__all__ = ["KOHYA_ONLY", "add_kohya_aliases", "convert", "rewrite_argv", "translate"]
