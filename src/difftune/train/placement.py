"""Where the frozen models live and in which dtype: frozen in the weight dtype on the accelerator, encoders
moved off it while their outputs come from caches, and back for validation."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from difftune.cli.parsing import DTYPES


def weight_dtype(accelerator) -> torch.dtype:
    """The dtype for frozen weights: the mixed-precision dtype, else fp32."""
    return DTYPES.get(accelerator.mixed_precision, torch.float32)


def freeze(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """No gradients, on `device`, in `dtype` (cast only when it differs: diffusers warns on every cast)."""
    model.requires_grad_(False).to(device)
    if next(model.parameters()).dtype != dtype:
        model.to(dtype=dtype)
    return model


def offload(modules: list[nn.Module]) -> None:
    """Move frozen encoders off the accelerator (their outputs are cached)."""
    for module in modules:
        module.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def on_device(modules: list[nn.Module], device: torch.device):
    """Bring offloaded modules to `device` for a while (validation), then back to the CPU."""
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        offload(modules)
