"""DeepSpeed ZeRO-1/2 under accelerate: the launch check, the config from the script's flags, safe loading.

The run's flags are the single source of truth: batch size, gradient accumulation and clipping
are written into the DeepSpeed config, whatever the accelerate config file said.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch

from difftune.errors import UserError

logger = logging.getLogger("difftune")


def requested() -> bool:
    """Whether `accelerate launch` was configured for DeepSpeed."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def process_group_kwargs() -> list:
    """accelerate's handlers for a DeepSpeed launch: gloo where no GPU is (DeepSpeed's CPU default is oneCCL)."""
    from accelerate.utils import InitProcessGroupKwargs

    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise UserError(
            "the accelerate config asks for DeepSpeed, which is not installed: pip install deepspeed"
        ) from None
    return [] if torch.cuda.is_available() else [InitProcessGroupKwargs(backend="gloo")]


def configure(accelerator, args: argparse.Namespace) -> None:
    """Check the ZeRO stage and write the run's batch, accumulation and clipping into the DeepSpeed config."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if stage > 2:
        raise UserError(
            f"DeepSpeed ZeRO-{stage} shards the frozen base model too, which difftune does not support: "
            "use zero_stage 2 (configs/accelerate/deepspeed_zero2.yaml)"
        )
    if "optimizer" in config or "scheduler" in config:
        raise UserError(
            "the DeepSpeed config sets an optimizer or scheduler: remove them, the script's flags choose both"
        )
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
