"""An exponential moving average of the adapter weights (--use_ema), with diffusers' EMAModel.

Only the trained adapter parameters are averaged, in fp32: under DeepSpeed the EMA steps on the fp32
master weights (gathered by the update's full_precision_weights), not on the bf16/fp16 copies the models
run with. Decay as in diffusers: 0 for the first step and until --ema_update_after_step, then
min(--ema_decay, (1+t)/(10+t)), or with --ema_power the warm-up min(--ema_decay, 1-(1+t)^-power).
A checkpoint holds the EMA adapter in the live one's formats under ema/, and its state in ema.pt.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from difftune.adapters import injection as adapter_io
from difftune.cli.errors import UserError
from difftune.storage import checkpoints

if TYPE_CHECKING:  # (infer.py and export.py import adapter_dir before --help, which needs no torch)
    from torch import nn

EMA_DIR = "ema"  # a checkpoint's subfolder with the EMA adapter, laid out as the checkpoint itself
EMA_FILE = "ema.pt"  # its state for resuming


class AdapterEMA:
    """EMAModel over the trainable parameters of `adapters` (name -> PeftModel)."""

    def __init__(self, args: argparse.Namespace, adapters: dict[str, nn.Module]):
        from diffusers.training_utils import EMAModel

        self.adapters = adapters
        self.params = [p for model in adapters.values() for p in adapter_io.trainable_parameters(model)]
        self.model = EMAModel(
            [p.detach().float() for p in self.params],
            decay=args.ema_decay,
            update_after_step=args.ema_update_after_step,
            use_ema_warmup=args.ema_power is not None,
            power=args.ema_power if args.ema_power is not None else 2 / 3,
            foreach=True,
        )

    def step(self) -> None:
        """After an optimizer step, while the parameters hold fp32 weights."""
        self.model.step(self.params)

    @contextmanager
    def applied(self):
        """The adapters hold the EMA weights (in the parameters' dtype) for a while."""
        live = [p.data for p in self.params]
        for param, shadow in zip(self.params, self.model.shadow_params, strict=True):
            param.data = shadow.to(param.dtype)
        try:
            yield
        finally:
            for param, data in zip(self.params, live, strict=True):
                param.data = data

    def save(self, directory: Path, save_extra: Callable[[Path, dict[str, nn.Module]], None] | None) -> None:
        """The EMA adapter under directory/ema (as the live one is saved), and the state to resume from."""
        with self.applied():
            adapter_io.save_adapters(self.adapters, directory / EMA_DIR)
            if save_extra is not None:
                save_extra(directory / EMA_DIR, self.adapters)
        checkpoints.save_torch_state(self.model.state_dict(), directory / EMA_FILE)

    def load(self, directory: Path) -> None:
        path = directory / EMA_FILE
        if path.is_file():
            self.model.load_state_dict(checkpoints.load_torch_state(path))
            self.model.shadow_params = [
                s.to(p.device) for s, p in zip(self.model.shadow_params, self.params, strict=True)
            ]
        else:
            # A checkpoint of a run without --use_ema: the average starts from the resumed weights.
            self.model.shadow_params = [p.detach().float().clone() for p in self.params]


def adapter_dir(checkpoint: Path, use_ema: bool) -> Path:
    """Where a checkpoint's adapters are: the step<N> dir itself, or its ema/ with --ema."""
    if not use_ema:
        return checkpoint
    if not (checkpoint / EMA_DIR).is_dir():
        raise UserError(f"--ema: {checkpoint} has no {EMA_DIR}/ (the run was trained without --use_ema): drop --ema")
    return checkpoint / EMA_DIR


def make_ema(args: argparse.Namespace, adapters: dict[str, nn.Module]) -> AdapterEMA | None:
    return AdapterEMA(args, adapters) if args.use_ema else None
