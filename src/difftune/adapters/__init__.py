"""Adapters on a model: the LoKr / LoRA flags, peft configs, attaching them, saving and loading their weights
(`injection`, whose names this package re-exports), faster forwards for peft's layers (`lokr`, `lora`), a start
from an existing adapter (`init_adapter`), and an EMA of the adapter weights (`ema`).

May import: difftune.cli, difftune.storage, difftune.data, difftune.models, difftune.formats.
"""

from difftune.adapters.injection import (
    ADAPTER_WEIGHTS,
    ATTENTION_TARGETS,
    TEXT_ENCODER_TARGETS,
    adapter_state_dict,
    add_lokr_args,
    add_lora_args,
    attach,
    attach_all,
    enable_gradient_checkpointing,
    load_adapters,
    lokr_config,
    lora_config,
    param_groups,
    save_adapters,
    trainable_parameters,
)

__all__ = [
    "ADAPTER_WEIGHTS",
    "ATTENTION_TARGETS",
    "TEXT_ENCODER_TARGETS",
    "adapter_state_dict",
    "add_lokr_args",
    "add_lora_args",
    "attach",
    "attach_all",
    "enable_gradient_checkpointing",
    "load_adapters",
    "lokr_config",
    "lora_config",
    "param_groups",
    "save_adapters",
    "trainable_parameters",
]
