"""Resuming a run: which checkpoint, its seed, and what becomes of flags that changed since it was written.

A resumed run continues the checkpoint's run, so it takes the checkpoint's seed, and every flag that
changed is handled by one of three rules (the table in docs/reliability.md):
- REFUSED: the flag changes what the adapter means or what the objective computes; one line, exit 2.
- APPLIED: the user's intent for the rest of the run (learning rate, weight decay, length); logged.
- anything else that changed: used as given, with a warning that the run no longer equals an
  uninterrupted one (data, batch, precision, validation, ...), except flags that only say where and how
  the run reports (IGNORED), which change nothing trained.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from difftune.cli.errors import UserError
from difftune.storage import checkpoints

logger = logging.getLogger("difftune")

REFUSED = frozenset(
    {
        # the adapter
        "rank", "alpha", "conv_rank", "conv_alpha", "lora_alpha", "target_modules", "decompose_both",
        "decompose_factor", "lokr_init", "rank_dropout", "module_dropout", "lora_dropout", "train_text_encoder",
        "text_encoder_target_modules", "prior_subfolder",
        # the objective
        "prediction_type", "snr_gamma", "loss_weighting", "p2_k", "p2_gamma", "noise_offset", "timestep_bias_strategy",
        "timestep_bias_multiplier",
        "timestep_bias_portion", "timestep_bias_begin", "timestep_bias_end", "timestep_sampling", "loss_type",
        "huber_schedule", "huber_c", "debiased_estimation", "input_perturbation", "multires_noise_iterations",
        "multires_noise_discount", "proportion_empty_prompts", "masked_loss",
        # prior preservation: the class images and their share of the objective
        "with_prior_preservation", "prior_loss_weight", "class_data_dir", "class_prompt", "num_class_images",
        "reg_data_dir",
        # the optimizer's saved state and the held-out images
        "optimizer", "use_ema", "validation_split", "eval_data_dir",
    }
)  # fmt: skip
APPLIED = frozenset(
    {"learning_rate", "scale_lr", "text_encoder_lr", "adam_weight_decay", "max_train_steps", "num_train_epochs"}
)
IGNORED = frozenset(
    {
        "output_dir", "resume_from_checkpoint", "overwrite_output_dir", "logging_dir", "report_to",
        "checkpointing_steps", "checkpoints_total_limit", "max_nonfinite_steps", "validation_prompt",
        "num_validation_images", "validation_steps", "validation_inference_steps", "dataloader_num_workers",
        "cache_dir", "seed", "use_8bit_adam", "init_adapter", "sample_batch_size", "instance_data_dir",
        "validation_prompts_file", "validation_samples", "validation_negative_prompt", "validation_guidance_scale",
        "validation_seed", "validation_epochs", "push_to_hub", "hub_model_id", "hub_token",
        "enable_xformers_memory_efficient_attention", "prior_generation_precision", "checkpointing_epochs",
        "output_name",
    }
)  # fmt: skip


def as_json(value: object) -> object:
    """A flag's value as args.json holds it (paths as strings, tuples as lists)."""
    return json.loads(json.dumps(value, default=str))


def changed_flags(saved: dict, args: argparse.Namespace) -> dict[str, tuple[object, object]]:
    """Flags whose value differs from the checkpoint's args.json: name -> (then, now). Flags the checkpoint
    does not record (written by an older difftune) are not compared."""
    now = {name: as_json(value) for name, value in vars(args).items()}
    changed = {name: (saved[name], now[name]) for name in now if name in saved and saved[name] != now[name]}
    if now.get("max_train_steps") is None:  # not given: the run's length follows --num_train_epochs
        changed.pop("max_train_steps", None)
    return changed


def check_resumable(state: dict, kind: str, num_processes: int, resume_dir: Path) -> None:
    """DeepSpeed shards the optimizer state by process: a checkpoint resumes only under the same set-up."""
    saved_kind = state.get("distributed", "ddp")
    if saved_kind != kind:
        raise UserError(
            f"{resume_dir} was written under {saved_kind}, this run uses {kind}: "
            "resume with the accelerate config that wrote it"
        )
    if kind == "deepspeed" and state["num_processes"] != num_processes:
        raise UserError(
            f"{resume_dir} holds DeepSpeed optimizer shards for {state['num_processes']} processes, "
            f"this run has {num_processes}: resume with --num_processes {state['num_processes']}"
        )


def take_checkpoint_settings(args: argparse.Namespace, checkpoint: Path, num_processes: int, kind: str) -> None:
    """Continue `checkpoint`'s run: check it resumes under this launch (`kind`: "ddp" or "deepspeed"), take its
    seed, refuse or report changed flags (before any model loads)."""
    state = checkpoints.read_json(checkpoint / checkpoints.STATE_FILE)
    check_resumable(state, kind, num_processes, checkpoint)
    args_file = checkpoint / checkpoints.ARGS_FILE
    saved = checkpoints.read_json(args_file) if args_file.is_file() else {}
    seed = state.get("seed", saved.get("seed"))
    if args.seed is not None and seed is not None and args.seed != seed:
        raise UserError(
            f"--seed {args.seed} differs from the seed {seed} of {checkpoint}: a resumed run keeps its seed "
            "(drop --seed, or start a new run)"
        )
    if seed is not None:
        args.seed = seed
    if args_file.is_file() and getattr(args, "init_adapter", None) and saved.get("init_adapter"):
        # The adapted modules came from the --init_adapter file (recorded by its attach_all), not from the flags.
        for name in ("target_modules", "text_encoder_target_modules"):
            if name in saved:
                setattr(args, name, saved[name])
    changed = changed_flags(saved, args)
    refused = sorted(set(changed) & REFUSED)
    if refused:
        described = ", ".join(f"--{name} {changed[name][0]} -> {changed[name][1]}" for name in refused)
        raise UserError(
            f"{described}: {checkpoint} was trained with the former value, which a resumed run must keep "
            "(pass it again, or start a new run with --output_dir)"
        )
    for name in sorted(set(changed) & APPLIED):
        logger.info("resuming with --%s %s (the checkpoint had %s)", name, changed[name][1], changed[name][0])
    different = sorted(set(changed) - APPLIED - IGNORED)
    if different:
        logger.warning(
            "changed since %s: %s; the resumed run will not equal an uninterrupted one",
            checkpoint,
            ", ".join(f"--{name} {changed[name][0]} -> {changed[name][1]}" for name in different),
        )
    saved_processes = state.get("num_processes", num_processes)
    if saved_processes != num_processes:
        logger.warning(
            "%s was written by %d process(es), this run has %d: the data is split across processes differently, "
            "so the resumed run will not equal an uninterrupted one",
            checkpoint,
            saved_processes,
            num_processes,
        )


def apply_optimizer_flags(optimizer, lr_scheduler, fresh_groups: list[dict]) -> None:
    """After loading the optimizer and lr scheduler state: this run's learning rates and weight decay
    (`fresh_groups`: each group's `initial_lr` and `weight_decay` as built from the flags) replace the
    saved ones, at the schedule's current position. Unchanged values are left as loaded (exact resume)."""
    for group, fresh in zip(optimizer.param_groups, fresh_groups, strict=True):
        if fresh.get("weight_decay") is not None:
            group["weight_decay"] = fresh["weight_decay"]
    base_lrs = [fresh["initial_lr"] for fresh in fresh_groups]
    if base_lrs == list(lr_scheduler.base_lrs):
        return
    lr_scheduler.base_lrs = base_lrs
    for index, (group, base_lr) in enumerate(zip(optimizer.param_groups, base_lrs, strict=True)):
        group["initial_lr"] = base_lr
        group["lr"] = base_lr * lr_scheduler.lr_lambdas[index](lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
