"""The objective flags (the loss, its weighting, the timesteps and noise) and their check."""

from __future__ import annotations

import argparse

from difftune.cli.errors import UserError


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
