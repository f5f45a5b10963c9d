"""Command-line flags shared by the training scripts, named as in the diffusers examples, in the groups of
docs/options.md's flag table; and their checks, before any model loads. By concern: `data` (the base model's
revision, data sets, kohya's data keys, caches), `objective`, `optimisation` (optimizer, schedule, EMA),
`outputs` (checkpoints, logging, reliability, validation), `parse` (parse() and the checks across groups).

The scripts import this package before they parse: it (and what it imports) loads no torch, PIL or numpy, so
`--help` answers at once (tests/test_help.py keeps it so).
"""

from difftune.train.args.data import add_cache_args, add_data_args, add_model_args
from difftune.train.args.objective import add_objective_args
from difftune.train.args.optimisation import scale_learning_rate
from difftune.train.args.parse import add_training_args, parse

__all__ = [
    "add_cache_args",
    "add_data_args",
    "add_model_args",
    "add_objective_args",
    "add_training_args",
    "parse",
    "scale_learning_rate",
]
