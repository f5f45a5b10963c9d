"""The optimisation and EMA flags: the optimizer (and the package it needs), the learning-rate schedule,
--scale_lr, and their checks."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math

from difftune.cli.errors import UserError

logger = logging.getLogger("difftune")


# --optimizer values and the package each needs (None: torch's own).
OPTIMIZERS = {"adamw": None, "adamw8bit": "bitsandbytes", "prodigy": "prodigyopt", "adafactor": None}


def add_optimisation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("optimisation")
    group.add_argument("--train_batch_size", type=int, default=1, help="Batch size per process.")
    group.add_argument("--num_train_epochs", type=int, default=100)
    group.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--gradient_checkpointing", action="store_true")
    group.add_argument("--learning_rate", type=float, default=1e-4)
    group.add_argument(
        "--scale_lr", action="store_true",
        help="Multiply --learning_rate by --gradient_accumulation_steps x --train_batch_size x the number of "
        "processes (diffusers' --scale_lr).",
    )  # fmt: skip
    group.add_argument(
        "--lr_scheduler",
        default="constant",
        choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
    )
    group.add_argument("--lr_warmup_steps", type=int, default=0)
    group.add_argument("--lr_num_cycles", type=int, default=1, help="cosine_with_restarts: hard restarts of the lr.")
    group.add_argument("--lr_power", type=float, default=1.0, help="polynomial: the power of its decay.")
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=1e-2)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--max_grad_norm", type=float, default=1.0)
    group.add_argument(
        "--optimizer",
        default="adamw",
        choices=list(OPTIMIZERS),
        help="adamw (torch), adamw8bit (bitsandbytes), prodigy (prodigyopt, learning-rate-free: use "
        "--learning_rate 1.0), adafactor (torch.optim.Adafactor).",
    )
    group.add_argument("--use_8bit_adam", action="store_true", help="The same as --optimizer adamw8bit.")
    group.add_argument("--prodigy_d_coef", type=float, default=1.0, help="Prodigy: scales its step-size estimate.")
    group.add_argument("--prodigy_safeguard_warmup", action="store_true", help="Prodigy: for runs with lr warm-up.")
    group.add_argument("--prodigy_use_bias_correction", action="store_true", help="Prodigy: Adam's bias correction.")
    group.add_argument(
        "--mixed_precision",
        default=None,
        choices=["no", "fp16", "bf16"],
        help="Default: the accelerate config's. fp16 needs CUDA.",
    )
    group.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs.")
    group.add_argument(
        "--enable_xformers_memory_efficient_attention", action="store_true",
        help="Accepted for diffusers' commands; changes nothing: PyTorch's scaled-dot-product attention is used.",
    )  # fmt: skip
    group.add_argument("--seed", type=int, default=None, help="Default: a random seed, recorded in args.json.")


def add_ema_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("EMA")
    group.add_argument(
        "--use_ema", action="store_true", help="Keep an EMA of the adapter weights (diffusers EMAModel), saved in ema/."
    )
    group.add_argument("--ema_decay", type=float, default=0.9999, help="The EMA's largest decay.")
    group.add_argument("--ema_update_after_step", type=int, default=0, help="The EMA copies the weights until then.")
    group.add_argument(
        "--ema_power",
        type=float,
        default=None,
        help="Warm-up decay 1-(1+t)^-power (diffusers use_ema_warmup, e.g. 0.75); default: (1+t)/(10+t).",
    )


def check_optimizer_ranges(args: argparse.Namespace) -> None:
    """The optimizer's and loader's numbers in their range (torch would stop later with a traceback)."""
    text_encoder_lr = getattr(args, "text_encoder_lr", None)
    if text_encoder_lr is not None and (not text_encoder_lr > 0 or not math.isfinite(text_encoder_lr)):
        raise UserError(f"--text_encoder_lr must be a positive number, got {text_encoder_lr}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name, 0.0) < 1.0:  # (nan fails too)
            raise UserError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if not 0.0 <= getattr(args, "adam_epsilon", 0.0) < math.inf:
        raise UserError(f"--adam_epsilon must be >= 0, got {args.adam_epsilon}")
    if not 0.0 <= getattr(args, "adam_weight_decay", 0.0) < math.inf:
        raise UserError(f"--adam_weight_decay must be >= 0, got {args.adam_weight_decay}")
    if getattr(args, "dataloader_num_workers", 0) < 0:
        raise UserError(f"--dataloader_num_workers must be >= 0, got {args.dataloader_num_workers}")
    if getattr(args, "max_train_samples", None) is not None and args.max_train_samples <= 0:
        raise UserError(f"--max_train_samples must be positive, got {args.max_train_samples}: drop it to use them all")


def scale_learning_rate(args: argparse.Namespace, num_processes: int) -> None:
    """--scale_lr, as diffusers: the learning rate x accumulation x batch size x processes (an explicit
    --text_encoder_lr is left as given, as in diffusers' DreamBooth script)."""
    if not args.scale_lr:
        return
    scaled = args.learning_rate * args.gradient_accumulation_steps * args.train_batch_size * num_processes
    logger.info(
        "--scale_lr: learning rate %g x %d (accumulation) x %d (batch) x %d (processes) = %g", args.learning_rate,
        args.gradient_accumulation_steps, args.train_batch_size, num_processes, scaled,
    )  # fmt: skip
    args.learning_rate = scaled


def check_optimizer_args(args: argparse.Namespace) -> None:
    """Resolve --use_8bit_adam, and check the optimizer's package and settings."""
    if args.use_8bit_adam:
        if args.optimizer not in ("adamw", "adamw8bit"):
            raise UserError(f"--use_8bit_adam means --optimizer adamw8bit, not {args.optimizer}: drop one of them")
        args.optimizer = "adamw8bit"
    package = OPTIMIZERS[args.optimizer]
    if package and importlib.util.find_spec(package) is None:
        raise UserError(f"--optimizer {args.optimizer} needs {package}: pip install {package}")
    if args.optimizer == "prodigy":
        if args.prodigy_d_coef <= 0:
            raise UserError(f"--prodigy_d_coef must be positive, got {args.prodigy_d_coef}")
        if getattr(args, "text_encoder_lr", None) not in (None, args.learning_rate):
            # Prodigy estimates one step size for all parameter groups.
            raise UserError("--optimizer prodigy takes one learning rate: drop --text_encoder_lr")
