"""DeepSpeed ZeRO-2 under accelerate: the launch check, the config from the script's flags, safe loading.

The run's flags are the single source of truth: batch size, gradient accumulation and clipping
are written into the DeepSpeed config, whatever the accelerate config file said.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from difftune.cli.errors import UserError

logger = logging.getLogger("difftune")

DEFAULT_BUCKET_SIZE = 500_000_000  # DeepSpeed's, in elements: buffers that big for a few million adapter weights


def requested() -> bool:
    """Whether `accelerate launch` was configured for DeepSpeed."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_installed() -> None:
    """A one-line error, not an ImportError deep in accelerate, when DeepSpeed is asked for but missing."""
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError(
            "the accelerate config asks for DeepSpeed, which is not installed: pip install deepspeed"
        ) from None


def process_group_kwargs() -> list:
    """accelerate's handlers for a DeepSpeed launch: gloo where no GPU is (DeepSpeed's CPU default is oneCCL)."""
    from accelerate.utils import InitProcessGroupKwargs

    return [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]


def _refuse_unsupported(config: dict) -> None:
    zero = config.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    if stage != 2:
        raise UserError(
            f"the DeepSpeed config asks for ZeRO stage {stage}; difftune supports ZeRO-2 only: "
            "set zero_stage: 2 (configs/accelerate/deepspeed_zero2.yaml)"
        )
    if "optimizer" in config or "scheduler" in config:
        raise UserError(
            "the DeepSpeed config sets an optimizer or scheduler: remove them, the script's flags choose both"
        )
    for offload in ("offload_optimizer", "offload_param"):
        device = (zero.get(offload) or {}).get("device", "none")
        if device not in ("none", None):
            raise UserError(
                f"the DeepSpeed config offloads to {device} ({offload}), which difftune does not support (it "
                "would replace the script's optimizer): set offload_optimizer_device and offload_param_device to none"
            )
    if config.get("bf16", {}).get("check_grad_overflow") is False or zero.get("compute_grad_norm") is False:
        raise UserError(
            "the DeepSpeed config turns off the gradient overflow check or norm, which skip the updates of "
            "non-finite losses: remove bf16.check_grad_overflow and zero_optimization.compute_grad_norm"
        )


def configure(accelerator, args: argparse.Namespace, trainable: int) -> None:
    """Refuse what difftune does not support; write the run's batch, accumulation and clipping into the
    DeepSpeed config, and size its communication buckets for `trainable` weights."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    _refuse_unsupported(config)
    wanted = {
        "train_micro_batch_size_per_gpu": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_clipping": args.max_grad_norm,
    }
    for key, value in wanted.items():
        if config.get(key, "auto") not in ("auto", value):
            logger.info("DeepSpeed %s: %s from the script's flags (the config said %s)", key, value, config[key])
        config[key] = value
    config.pop("train_batch_size", None)  # derived from the above by accelerate
    zero = config["zero_optimization"]
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if zero.get(key, "auto") == "auto":
            zero[key] = min(trainable, DEFAULT_BUCKET_SIZE)
    accelerator.gradient_accumulation_steps = args.gradient_accumulation_steps


def _safe_globals() -> list:
    """The non-tensor objects DeepSpeed's ZeRO-1/2 checkpoints hold (nothing that runs code)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def use_safe_loading(engine) -> None:
    """Make the engine read its checkpoints with torch.load(weights_only=True), not the unrestricted default."""
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    if type(engine.checkpoint_engine) is not TorchCheckpointEngine:
        raise UserError(
            "difftune supports DeepSpeed's default (torch) checkpoint engine only: remove checkpoint settings"
        )
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine(engine._config)
