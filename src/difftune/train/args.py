"""Command-line flags shared by the training scripts, named as in the diffusers examples, in the groups of
docs/options.md's flag table; and their checks, before any model loads.

The scripts import this module before they parse: it (and what it imports) loads no torch, PIL or numpy, so
`--help` answers at once (tests/test_help.py keeps it so).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from difftune.cli.errors import UserError
from difftune.data.captions import add_caption_args, check_caption_args
from difftune.data.config import INTERPOLATIONS
from difftune.data.dreambooth import add_dreambooth_args, check_dreambooth_args
from difftune.data.masks import add_mask_args, check_mask_args
from difftune.generate.prompts import check_validation_args
from difftune.train import kohya_flags

logger = logging.getLogger("difftune")

# --optimizer values and the package each needs (None: torch's own).
OPTIMIZERS = {"adamw": None, "adamw8bit": "bitsandbytes", "prodigy": "prodigyopt", "adafactor": None}


def add_model_args(group: argparse._ArgumentGroup) -> None:
    """--revision and --variant, after a script's base-model flags in its "model" group."""
    group.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the base model.")
    group.add_argument("--variant", default=None, help="Weights variant of the base model, e.g. fp16.")


def add_data_args(parser: argparse.ArgumentParser, *, resolution: int) -> argparse._ArgumentGroup:
    """The data flags and the groups that shape the data (masked loss, kohya data sets, captions, DreamBooth);
    returns the "data" group, for a script's own data flags."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--dataset_name",
        default="lambdalabs/pokemon-blip-captions",
        help="Hub data set id or local data set path (ignored when --train_data_dir is given).",
    )
    group.add_argument("--dataset_config_name", default=None)
    group.add_argument(
        "--train_data_dir",
        default=None,
        help="A folder of images with a metadata.jsonl (file_name, text), or with caption files beside them "
        "and kohya '<repeats>_<class tokens>' subfolders (see docs/data.md).",
    )
    group.add_argument(
        "--dataset_config",
        default=None,
        help="A kohya data-set config (TOML or .json: [general], [[datasets]], [[datasets.subsets]]), trained "
        "with kohya's rules; see docs/data.md.",
    )
    group.add_argument("--image_column", default="image")
    group.add_argument("--caption_column", default="text")
    group.add_argument("--max_train_samples", type=int, default=None, help="Train on this many samples at most.")
    group.add_argument("--resolution", type=int, default=resolution, help="Training image side, a multiple of 8.")
    group.add_argument(
        "--center_crop", action="store_true",
        help="Crop the centre (default: a random crop; kohya's forms crop the centre unless --random_crop).",
    )  # fmt: skip
    group.add_argument(
        "--random_flip", "--flip_aug", action="store_true", help="Flip images horizontally at random (kohya: flip_aug)."
    )
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    add_mask_args(parser.add_argument_group("masked loss (see docs/data.md, Masked loss)"))
    add_kohya_data_args(parser)
    add_caption_args(parser)
    add_dreambooth_args(parser)
    return group


def add_kohya_data_args(parser: argparse.ArgumentParser) -> None:
    """kohya's data-set keys as flags: the level above a --dataset_config's [general], and the settings of
    `<repeats>_<class tokens>` folders (kohya's argparse names and defaults)."""
    group = parser.add_argument_group("kohya data sets (--dataset_config, '<repeats>_<class tokens>' folders)")
    group.add_argument("--random_crop", action="store_true", help="Crop at random (default: the centre, as kohya).")
    group.add_argument("--color_aug", action="store_true", help="kohya's colour augmentation (hue or gamma, 1 in 3).")
    group.add_argument(
        "--face_crop_aug_range", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
        help="kohya's face crop for images named <name>_<cx>_<cy>_<w>_<h> (without buckets).",
    )  # fmt: skip
    group.add_argument(
        "--resize_interpolation", default=None, choices=INTERPOLATIONS,
        help="Resampling filter (default: area when shrinking, else lanczos, as kohya).",
    )  # fmt: skip
    group.add_argument("--min_bucket_reso", type=int, default=256, help="Smallest bucket side (kohya's default).")
    group.add_argument("--max_bucket_reso", type=int, default=1024, help="Largest bucket side (kohya's default).")
    group.add_argument("--bucket_reso_steps", type=int, default=64, help="Bucket sides are multiples of this.")
    group.add_argument(
        "--bucket_no_upscale", action="store_true", help="Buckets from the image sizes, never enlarging an image."
    )


@contextlib.contextmanager
def muted(*names: str):
    """Those loggers silent for a moment."""
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.disabled for logger in loggers]
    for logger in loggers:
        logger.disabled = True
    try:
        yield
    finally:
        for logger, disabled in zip(loggers, before, strict=True):
            logger.disabled = disabled


def check_kohya_data_args(args: argparse.Namespace, image_flag: str) -> None:
    """A --dataset_config is read and checked whole (every problem in one message), and kohya's forms checked
    against the caches, before any model loads."""
    from difftune.data.sources import kohya_specs

    for name in ("min_bucket_reso", "max_bucket_reso", "bucket_reso_steps"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    face = args.face_crop_aug_range
    if face is not None and not 0 < face[0] <= face[1]:
        raise UserError(f"--face_crop_aug_range {face[0]} {face[1]} must satisfy 0 < LOW <= HIGH")
    with muted("difftune.data.folders", "difftune.data.config"):  # (their warnings come again when data loads)
        specs = kohya_specs(args)
    defaults = {"min_bucket_reso": 256, "max_bucket_reso": 1024, "bucket_reso_steps": 64, "bucket_no_upscale": False}
    kohya_only = [f"--{n}" for n in ("random_crop", "color_aug") if getattr(args, n)]
    kohya_only += [f"--{n}" for n, default in defaults.items() if getattr(args, n) != default]
    kohya_only += ["--face_crop_aug_range"] * (face is not None) + ["--resize_interpolation"] * bool(
        args.resize_interpolation
    )
    if not specs:
        if kohya_only:
            raise UserError(
                f"{', '.join(kohya_only)} apply to kohya's data forms (--dataset_config, '<repeats>_<class tokens>' "
                "folders); for other data use --center_crop / --random_flip (--aspect_ratio_buckets: kohya's "
                "default buckets)"
            )
        return
    subsets = [subset for spec in specs for subset in spec.subsets]
    missing = [str(s.metadata_file) for s in subsets if s.metadata_file and not s.metadata_file.is_file()]
    missing += [str(s.image_dir) for s in subsets if not s.metadata_file and not s.image_dir.is_dir()]
    if missing:
        raise UserError(f"{len(missing)} image folders or metadata files of the data set do not exist: "
                        f"{', '.join(missing)}")  # fmt: skip
    drawn = sorted({k for s in subsets for k, on in (("random_crop", s.augment.random_crop),
                                                   ("color_aug", s.augment.color)) if on})  # fmt: skip
    if getattr(args, image_flag, False) and drawn:
        raise UserError(
            f"--{image_flag} cannot hold images that change every epoch ({' and '.join(drawn)}, as kohya refuses "
            f"to cache latents with them): drop --{image_flag} or those settings"
        )


def add_cache_args(parser: argparse.ArgumentParser, image_flag: str, image_help: str) -> None:
    group = parser.add_argument_group("speed (encode once, reuse across runs)")
    group.add_argument(image_flag, action="store_true", help=image_help + " Needs --center_crop.")
    group.add_argument(
        "--cache_text_embeddings", action="store_true", help="Encode the captions once (not with --train_text_encoder)."
    )
    group.add_argument("--cache_dir", default="work_dirs/cache", help="Where caches live; shared by runs.")


def check_cache_args(args: argparse.Namespace, image_flag: str) -> None:
    from difftune.data.config import kohya_root

    kohya = args.dataset_config or kohya_root(args.train_data_dir)  # (centre-cropped unless random_crop)
    if getattr(args, image_flag) and not args.center_crop and not kohya:
        raise UserError(
            f"--{image_flag} needs --center_crop: random crops differ every epoch and cannot be cached "
            f"(add --center_crop, or drop --{image_flag})"
        )
    if args.cache_text_embeddings and args.train_text_encoder:
        raise UserError(
            "--cache_text_embeddings cannot be used with --train_text_encoder: the embeddings change as it trains"
        )


def add_training_args(parser: argparse.ArgumentParser, *, output_dir: str) -> None:
    """The training flags, by help group: optimisation, EMA, checkpoints and logging, reliability and validation."""
    add_optimisation_args(parser)
    add_ema_args(parser)
    add_checkpoint_args(parser, output_dir)
    add_reliability_and_validation_args(parser)


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


def add_checkpoint_args(parser: argparse.ArgumentParser, output_dir: str) -> None:
    group = parser.add_argument_group("checkpoints and logging")
    group.add_argument("--output_dir", default=output_dir)
    group.add_argument(
        "--output_name", default=None,
        help="The name scripts/export.py gives its file by default (kohya's): OUTPUT_DIR/<name>.safetensors.",
    )  # fmt: skip
    group.add_argument("--checkpointing_steps", type=int, default=500, help="0: none by steps (only at the end).")
    group.add_argument(
        "--checkpointing_epochs", type=int, default=None,
        help="Also checkpoint at the end of every N-th epoch (kohya's save_every_n_epochs).",
    )  # fmt: skip
    group.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep this many checkpoints.")
    group.add_argument(
        "--resume_from_checkpoint", default=None, help='A checkpoint dir (output_dir/step<N>) or "latest".'
    )
    group.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "none"])
    group.add_argument("--logging_dir", default="logs", help="Tracker logs, relative to --output_dir.")
    group.add_argument(
        "--push_to_hub", action="store_true",
        help="At the end, upload the final checkpoint, the model card and the files it shows to a Hub model repo.",
    )  # fmt: skip
    group.add_argument("--hub_model_id", default=None, help="The Hub repo (org/name). Default: --output_dir's name.")
    group.add_argument(
        "--hub_token", default=None, help="Default: the `hf auth login` token. Never written to args.json or logs."
    )


def add_reliability_and_validation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reliability (see docs/reliability.md)")
    group.add_argument(
        "--overwrite_output_dir", action="store_true", help="Start afresh over an earlier run's checkpoints."
    )
    group.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=0,
        help="Skip up to N steps whose loss is NaN/inf before stopping with an error.",
    )

    group = parser.add_argument_group("validation")
    group.add_argument("--validation_prompt", action="append", default=None, help="Repeat for several prompts.")
    group.add_argument(
        "--validation_prompts_file",
        type=Path,
        default=None,
        help="One prompt a line with kohya's inline options (--n, --w, --h, --d, --l, --s; see docs/options.md), "
        "after the --validation_prompt ones.",
    )
    group.add_argument("--validation_negative_prompt", default=None, help="For every prompt without its own --n.")
    group.add_argument(
        "--validation_guidance_scale", type=float, default=None, help="Default: the pipeline's (SDXL 5, prior 4)."
    )
    group.add_argument(
        "--validation_seed", type=int, default=None, help="Image i of a prompt uses seed + i. Default: --seed."
    )
    group.add_argument("--num_validation_images", type=int, default=4, help="Images per prompt.")
    group.add_argument(
        "--validation_steps", type=int, default=500, help="Validate every N steps and at the end (0: only at the end)."
    )
    group.add_argument(
        "--validation_epochs", type=int, default=None,
        help="Also validate at the end of every N-th epoch (diffusers' flag), besides --validation_steps.",
    )  # fmt: skip
    group.add_argument("--validation_inference_steps", type=int, default=30)
    group.add_argument(
        "--validation_split",
        type=float,
        default=0.0,
        help="Hold out this seeded share of the data for an evaluation loss at each validation and checkpoint.",
    )
    group.add_argument(
        "--eval_data_dir",
        default=None,
        help="A folder of held-out images (like --train_data_dir) for the evaluation loss, instead of a split.",
    )


def add_objective_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The objective flags (diffusers / kohya names); returns the group for script-specific additions."""
    group = parser.add_argument_group("objective (see docs/options.md, Objective options)")
    group.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR weighting; 5.0 is a good value.")
    group.add_argument("--noise_offset", type=float, default=0.0, help="Per-channel noise offset; try 0.05.")
    group.add_argument(
        "--timestep_bias_strategy", default="none", choices=["none", "earlier", "later", "range"],
        help="Sample some timesteps more often (diffusers' SDXL script).",
    )  # fmt: skip
    group.add_argument("--timestep_bias_multiplier", type=float, default=1.0, help="Weight of the biased timesteps.")
    group.add_argument("--timestep_bias_portion", type=float, default=0.25, help="Share biased by earlier/later.")
    group.add_argument("--timestep_bias_begin", type=int, default=0, help="range: first biased timestep index.")
    group.add_argument("--timestep_bias_end", type=int, default=1000, help="range: biased timestep indices end here.")
    group.add_argument(
        "--timestep_sampling", default="uniform", choices=["uniform", "cubic"],
        help="cubic: t = (1 - u^3) T, favouring noisy steps (T2I-Adapter).",
    )  # fmt: skip
    group.add_argument("--loss_type", default="l2", choices=["l2", "huber", "smooth_l1"])
    group.add_argument("--huber_schedule", default="snr", choices=["constant", "exponential", "snr"])
    group.add_argument("--huber_c", type=float, default=0.1, help="Huber / smooth L1 threshold c, in (0, 1].")
    group.add_argument("--debiased_estimation", action="store_true", help="Weight each sample by 1/sqrt(snr) (kohya).")
    group.add_argument("--input_perturbation", type=float, default=0.0, help="Noisy input gets extra noise; try 0.1.")
    group.add_argument("--multires_noise_iterations", type=int, default=0, help="Pyramid noise levels; try 6.")
    group.add_argument("--multires_noise_discount", type=float, default=0.3, help="Pyramid noise decay per level.")
    group.add_argument(
        "--proportion_empty_prompts", type=float, default=0.0, help="Share of captions trained as ''; try 0.1."
    )
    return group


def check_objective_args(args: argparse.Namespace) -> None:
    """Refuse impossible objective settings (before any model is loaded)."""
    if args.snr_gamma is not None and args.snr_gamma <= 0:
        raise UserError(f"--snr_gamma must be positive, got {args.snr_gamma}")
    if args.timestep_bias_strategy != "none":
        if args.timestep_bias_multiplier <= 0:
            raise UserError(
                f"--timestep_bias_multiplier must be positive, got {args.timestep_bias_multiplier} "
                "(below 1 samples the biased timesteps less often)"
            )
        if args.timestep_sampling != "uniform":
            raise UserError("--timestep_bias_strategy and --timestep_sampling cubic both pick timesteps: use one")
    if not 0.0 <= args.timestep_bias_portion <= 1.0:
        raise UserError(f"--timestep_bias_portion must be in [0, 1], got {args.timestep_bias_portion}")
    if args.timestep_bias_begin < 0 or args.timestep_bias_begin >= args.timestep_bias_end:
        raise UserError(
            f"--timestep_bias_begin {args.timestep_bias_begin} must be >= 0 and below "
            f"--timestep_bias_end {args.timestep_bias_end}"
        )
    if not 0.0 < args.huber_c <= 1.0:
        raise UserError(f"--huber_c must be in (0, 1], got {args.huber_c}")
    for flag in ("input_perturbation", "noise_offset"):
        if getattr(args, flag) < 0:
            raise UserError(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    if args.multires_noise_iterations < 0:
        raise UserError(f"--multires_noise_iterations must be >= 0, got {args.multires_noise_iterations}")
    if not 0.0 < args.multires_noise_discount <= 1.0:
        raise UserError(f"--multires_noise_discount must be in (0, 1], got {args.multires_noise_discount}")
    if not 0.0 <= args.proportion_empty_prompts <= 1.0:
        raise UserError(f"--proportion_empty_prompts must be in [0, 1], got {args.proportion_empty_prompts}")
    if getattr(args, "loss_weighting", "constant") == "p2":
        if args.snr_gamma is not None or args.debiased_estimation:
            given = "--snr_gamma" if args.snr_gamma is not None else "--debiased_estimation"
            raise UserError(f"--loss_weighting p2 and {given} both weight the loss by the SNR: use one of them")
        if args.p2_k < 0 or args.p2_gamma <= 0:
            raise UserError(f"--p2_k must be >= 0 and --p2_gamma positive, got {args.p2_k} and {args.p2_gamma}")


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


def check_output_dir_is_a_folder(output_dir: str | Path) -> None:
    """--output_dir is a folder, or can become one (no file in its place or above it)."""
    for path in (Path(output_dir), *Path(output_dir).parents):
        if path.exists():
            if not path.is_dir():
                raise UserError(f"--output_dir {output_dir}: {path} is a file, not a folder: name a folder")
            return


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
