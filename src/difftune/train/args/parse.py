"""parse(): a training script's flags parsed (kohya's names too), and the checks that span several groups,
run before any model loads."""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence

from difftune.cli.errors import UserError
from difftune.data.captions import check_caption_args
from difftune.data.dreambooth import check_dreambooth_args
from difftune.data.masks import check_mask_args
from difftune.generate.prompts import check_validation_args
from difftune.train import kohya_flags
from difftune.train.args.data import check_cache_args, check_kohya_data_args
from difftune.train.args.objective import check_objective_args
from difftune.train.args.optimisation import (
    add_ema_args,
    add_optimisation_args,
    check_optimizer_args,
    check_optimizer_ranges,
)
from difftune.train.args.outputs import (
    add_checkpoint_args,
    add_reliability_and_validation_args,
    check_output_dir_is_a_folder,
)

logger = logging.getLogger("difftune")


def add_training_args(parser: argparse.ArgumentParser, *, output_dir: str) -> None:
    """The training flags, by help group: optimisation, EMA, checkpoints and logging, reliability and validation."""
    add_optimisation_args(parser)
    add_ema_args(parser)
    add_checkpoint_args(parser, output_dir)
    add_reliability_and_validation_args(parser)


def check_common_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot work, before anything is loaded."""
    if args.resolution <= 0 or args.resolution % 8:
        raise UserError(f"--resolution {args.resolution} must be a positive multiple of 8 (e.g. 1024)")
    positive = (
        "train_batch_size",
        "gradient_accumulation_steps",
        "num_train_epochs",
        "num_validation_images",
    )
    for name in positive:
        if getattr(args, name) <= 0:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("checkpointing_steps", "validation_steps"):  # (0: none by steps)
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.checkpointing_epochs is not None and args.checkpointing_epochs <= 0:
        raise UserError(f"--checkpointing_epochs must be positive, got {args.checkpointing_epochs}")
    if args.max_train_steps is not None and args.max_train_steps <= 0:
        raise UserError(f"--max_train_steps must be positive, got {args.max_train_steps}")
    if not args.learning_rate > 0 or not math.isfinite(args.learning_rate):  # (nan > 0 is False)
        raise UserError(f"--learning_rate must be a positive number, got {args.learning_rate}")
    check_optimizer_ranges(args)
    check_output_dir_is_a_folder(args.output_dir)
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise UserError(
            "--overwrite_output_dir deletes the checkpoints that --resume_from_checkpoint would continue from: "
            "pass only one of them"
        )
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit <= 0:
        raise UserError("--checkpoints_total_limit must be positive")
    check_optimizer_args(args)
    check_caption_args(args)
    check_validation_args(args)
    if getattr(args, "text_encoder_lr", None) is not None and not args.train_text_encoder:
        logger.warning("--text_encoder_lr is unused without --train_text_encoder")
    if not 0.0 <= args.validation_split < 1.0:
        raise UserError(f"--validation_split must be in [0, 1), got {args.validation_split}")
    if args.validation_split and args.eval_data_dir:
        raise UserError("--validation_split and --eval_data_dir both choose the held-out images: pass one of them")
    if not 0.0 <= args.ema_decay <= 1.0:
        raise UserError(f"--ema_decay must be in [0, 1], got {args.ema_decay}")
    if args.ema_update_after_step < 0 or (args.ema_power is not None and args.ema_power <= 0):
        raise UserError("--ema_update_after_step must be >= 0 and --ema_power positive")
    check_diffusers_habits(args)


def check_diffusers_habits(args: argparse.Namespace) -> None:
    """The flags diffusers' example commands carry: checked, or noted when they change nothing here."""
    from difftune.storage.hub import is_offline

    if args.validation_epochs is not None and args.validation_epochs <= 0:
        raise UserError(f"--validation_epochs must be positive, got {args.validation_epochs}")
    if args.lr_num_cycles < 1 or args.lr_power <= 0:
        raise UserError(f"--lr_num_cycles must be >= 1 and --lr_power positive, got {args.lr_num_cycles} and "
                        f"{args.lr_power}")  # fmt: skip
    # (a schedule without the setting would silently ignore it)
    for flag, default, scheduler in (("lr_num_cycles", 1, "cosine_with_restarts"), ("lr_power", 1.0, "polynomial")):
        if getattr(args, flag) != default and args.lr_scheduler != scheduler:
            logger.warning("--%s is used by --lr_scheduler %s only", flag, scheduler)
    if args.enable_xformers_memory_efficient_attention:
        logger.warning("--enable_xformers_memory_efficient_attention: not needed, PyTorch's scaled-dot-product "
                       "attention (SDPA) is used")  # fmt: skip
    if args.push_to_hub and is_offline():
        # Refused now: otherwise the upload would fail only after the whole run has trained.
        raise UserError("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set: unset it or drop --push_to_hub")
    unused = [f"--{name}" for name in ("hub_model_id", "hub_token") if getattr(args, name) is not None]
    if unused and not args.push_to_hub:
        logger.warning("%s: unused without --push_to_hub", ", ".join(unused))


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None, image_cache_flag: str) -> argparse.Namespace:
    """Parse a training script's flags (kohya's names too) and refuse impossible combinations."""
    kohya_flags.add_kohya_aliases(parser)
    args = parser.parse_args(kohya_flags.rewrite_argv(parser, argv))
    from difftune.adapters.injection import check_adapter_args  # (after parsing: --help stays light)

    check_adapter_args(args)
    check_dreambooth_args(args, parser)
    if args.dataset_config and (args.train_data_dir or args.dataset_name != parser.get_default("dataset_name")):
        given = "--train_data_dir" if args.train_data_dir else "--dataset_name"
        raise UserError(f"--dataset_config and {given} both name the training data: pass one of them")
    check_common_args(args)
    check_cache_args(args, image_cache_flag)
    check_kohya_data_args(args, image_cache_flag)
    check_objective_args(args)
    check_mask_args(args)
    return args
