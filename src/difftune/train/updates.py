"""How gradients become adapter updates: the optimizer, and the two ways a step runs across processes.

`DataParallelUpdate` (one process or DDP) accumulates gradients itself (with one process, into one
flat buffer per parameter group), clips and steps a plain optimizer, and keeps its state in one file.
`DeepSpeedUpdate` (accelerate's DeepSpeed ZeRO-2) leaves accumulation, clipping and the step
to the DeepSpeed engine, which shards the optimizer state: every process saves and loads its share.
The training loop drives both the same way: `micro_batch` around each forward and backward,
`step` once the micro-batches are done, `save` / `load` with checkpoints.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from difftune.cli.errors import UserError
from difftune.storage import checkpoints

logger = logging.getLogger("difftune")
DEEPSPEED_DIR = "deepspeed"  # a checkpoint's subfolder for DeepSpeed's per-process optimizer shards


def flatten_param_groups(param_groups: list[dict]) -> list[dict]:
    """One flat fp32 parameter per group, the adapter weights (and their gradients) becoming views into it.

    An adapter has hundreds of small tensors (LoKr on SDXL: two per attention projection); the
    optimizer and gradient clipping then run over one tensor per group instead of each of them.
    The adapters' own parameters keep their identity, so saving, loading and validation see no
    change; autograd accumulates into the gradient views, which must be zeroed in place, not freed.
    """
    flat_groups = []
    for group in param_groups:
        params = group["params"]
        total = sum(p.numel() for p in params)
        flat = torch.empty(total, dtype=torch.float32, device=params[0].device)
        grad = torch.zeros_like(flat)
        offset = 0
        for param in params:
            size = param.numel()
            flat[offset : offset + size].copy_(param.data.reshape(-1))
            param.data = flat[offset : offset + size].view_as(param)
            param.grad = grad[offset : offset + size].view_as(param)
            offset += size
        flat_param = nn.Parameter(flat)
        flat_param.grad = grad
        flat_groups.append({**group, "params": [flat_param]})
    return flat_groups


@dataclass
class OptimizerLayout:
    """How the optimizer sees the adapter parameters: per group, their names and shapes, either one by one
    or packed into one flat parameter per group (flatten_param_groups)."""

    groups: list[list[tuple[str, tuple[int, ...]]]]
    flat: bool = False

    @classmethod
    def of(cls, adapters: dict[str, nn.Module], param_groups: list[dict]) -> OptimizerLayout:
        names = {id(p): f"{adapter}/{n}" for adapter, model in adapters.items() for n, p in model.named_parameters()}
        return cls([[(names[id(p)], tuple(p.shape)) for p in group["params"]] for group in param_groups])

    def to_dict(self) -> dict:
        return {"groups": [[[name, list(shape)] for name, shape in group] for group in self.groups], "flat": self.flat}

    @classmethod
    def from_dict(cls, data: dict) -> OptimizerLayout:
        return cls([[(name, tuple(shape)) for name, shape in group] for group in data["groups"]], data["flat"])

    def unpack(self, state_dict: dict) -> tuple[list[dict], dict[str, dict]]:
        """(the groups' settings, each parameter's state by name) of an optimizer state_dict in this layout."""
        settings = [{k: v for k, v in group.items() if k != "params"} for group in state_dict["param_groups"]]
        by_name = {}
        for group, members in zip(state_dict["param_groups"], self.groups, strict=True):
            if not self.flat:
                pairs = zip(group["params"], members, strict=True)
                by_name.update({name: state_dict["state"].get(i, {}) for i, (name, _) in pairs})
                continue
            state = state_dict["state"].get(group["params"][0], {})
            sizes = [math.prod(shape) for _, shape in members]
            for name, values in zip([name for name, _ in members], split_state(state, sizes), strict=True):
                by_name[name] = values
        return settings, by_name

    def pack(self, unpacked: tuple[list[dict], dict[str, dict]]) -> dict:
        """An optimizer state_dict in this layout from unpack()'s result (the same parameters by name)."""
        settings, by_name = unpacked
        missing = {name for group in self.groups for name, _ in group} - by_name.keys()
        if missing:
            raise ValueError(f"the saved optimizer state has no entry for {sorted(missing)[0]}")
        for name, shape in (member for group in self.groups for member in group):
            if any(is_elementwise(v) and v.numel() != math.prod(shape) for v in by_name[name].values()):
                raise ValueError(f"the optimizer state of {name} is not per element and cannot be re-packed")
        state, param_groups, index = {}, [], 0
        for group_settings, members in zip(settings, self.groups, strict=True):
            if self.flat:
                states = [by_name[name] for name, _ in members]
                if any(states):
                    state[index] = {key: join_state([s[key] for s in states]) for key in states[0]}
                param_groups.append({**group_settings, "params": [index]})
                index += 1
                continue
            for offset, (name, shape) in enumerate(members):
                if by_name[name]:
                    values = by_name[name].items()
                    state[index + offset] = {k: v.view(shape) if is_elementwise(v) else v for k, v in values}
            param_groups.append({**group_settings, "params": list(range(index, index + len(members)))})
            index += len(members)
        return {"state": state, "param_groups": param_groups}


def is_elementwise(value: object) -> bool:
    """A per-element statistic (Adam's moments, ...), as opposed to a scalar such as the step count."""
    return torch.is_tensor(value) and value.dim() > 0


def split_state(state: dict, sizes: list[int]) -> list[dict]:
    """A packed parameter's state cut into its members' (scalars copied to each: the optimizer steps its own)."""
    total = sum(sizes)
    for key, value in state.items():
        if is_elementwise(value) and value.numel() != total:
            raise ValueError(f"the optimizer's {key!r} state is not per element (quantized?) and cannot be re-packed")
    parts = [{} for _ in sizes]
    for key, value in state.items():
        chunks = value.reshape(-1).split(sizes) if is_elementwise(value) else [value] * len(sizes)
        for part, chunk in zip(parts, chunks, strict=True):
            part[key] = chunk.clone() if torch.is_tensor(chunk) else chunk
    return parts


def join_state(values: list) -> object:
    """The members' states of one key packed into one (scalars such as the step count are equal: one)."""
    if not is_elementwise(values[0]):
        return values[0]
    return torch.cat([value.reshape(-1) for value in values])


def build_optimizer(args: argparse.Namespace, param_groups: list[dict]) -> torch.optim.Optimizer:
    """The --optimizer over the adapter parameters."""
    adam = {
        "lr": args.learning_rate,
        "betas": (args.adam_beta1, args.adam_beta2),
        "eps": args.adam_epsilon,
        "weight_decay": args.adam_weight_decay,
    }
    if args.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(param_groups, **adam)
    if args.optimizer == "prodigy":
        from prodigyopt import Prodigy

        if not 0.5 <= args.learning_rate <= 2.0:
            logger.warning(
                "--optimizer prodigy finds the step size itself and expects --learning_rate ~1.0, got %g",
                args.learning_rate,
            )
        return Prodigy(
            param_groups, **adam, d_coef=args.prodigy_d_coef, safeguard_warmup=args.prodigy_safeguard_warmup,
            use_bias_correction=args.prodigy_use_bias_correction,
        )  # fmt: skip
    if args.optimizer == "adafactor":
        # torch's Adafactor: relative steps (--learning_rate caps them), factored second moments per matrix.
        return torch.optim.Adafactor(param_groups, lr=args.learning_rate, weight_decay=args.adam_weight_decay)
    try:
        # One kernel over all adapter tensors: LoKr/LoRA have hundreds of small ones (5x faster on CPU).
        return torch.optim.AdamW(param_groups, fused=True, **adam)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(param_groups, foreach=True, **adam)


def check_distributed_optimizer(args: argparse.Namespace, deepspeed: bool) -> None:
    """ZeRO-2 steps the optimizer on each process's shard of one flat buffer: Prodigy's step-size estimate and
    Adafactor's per-matrix statistics would then be per shard, unlike one process or DDP."""
    if deepspeed and args.optimizer in ("prodigy", "adafactor"):
        raise UserError(
            f"--optimizer {args.optimizer} does not work under DeepSpeed ZeRO-2 (its statistics would be per shard): "
            "use DDP (configs/accelerate/multi_gpu.yaml) or --optimizer adamw"
        )


class DataParallelUpdate:
    """One process or DDP: gradient accumulation without syncing, clipping, the optimizer step."""

    kind = "ddp"

    def __init__(self, accelerator, args: argparse.Namespace, adapters: dict[str, nn.Module], param_groups: list[dict]):
        self.accelerator = accelerator
        self.accum = args.gradient_accumulation_steps
        self.max_grad_norm = args.max_grad_norm
        self.layout = OptimizerLayout.of(adapters, param_groups)
        self.quantized_state = args.optimizer == "adamw8bit"
        if accelerator.num_processes == 1 and args.optimizer != "adafactor":
            # Not under DDP: its reducer gives the parameters gradient tensors of its own, cutting the views.
            # Not for Adafactor: it factors each matrix's second moment, which one flat vector has not.
            param_groups = flatten_param_groups(param_groups)
            self.layout.flat = True
        self.params = [p for group in param_groups for p in group["params"]]
        self.optimizer = build_optimizer(args, param_groups)  # for the lr scheduler and the checkpoint
        *prepared, self.stepper = accelerator.prepare(*adapters.values(), self.optimizer)  # fp16 loss scaling
        self.models = dict(zip(adapters, prepared, strict=True))  # DDP-wrapped when several processes run

    def micro_batch(self, last: bool) -> ExitStack:
        """Around a micro-batch's forward and backward: gradients are averaged across processes on the last."""
        stack = ExitStack()
        if not last:
            for model in self.models.values():
                stack.enter_context(self.accelerator.no_sync(model))
        return stack

    def backward(self, loss: torch.Tensor, micro_batches: int) -> None:
        """The step's gradient is the mean over its `micro_batches`."""
        self.accelerator.backward(loss / micro_batches)

    def step(self, finite: bool) -> bool:
        """Clip and step (not when a loss was non-finite), then zero the gradients for the next step;
        returns whether the weights were updated (fp16 loss scaling also skips steps that overflow)."""
        if finite:
            if self.max_grad_norm > 0:
                self.accelerator.unscale_gradients()  # no-op unless fp16
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm, foreach=True)
            self.stepper.step()
        self.stepper.zero_grad(set_to_none=False)  # with one process the gradients are views: keep them
        return finite and not self.stepper.step_was_skipped

    def full_precision_weights(self) -> nullcontext:
        return nullcontext()  # the adapters' weights are fp32 already

    def save(self, directory: Path) -> None:
        """The optimizer state with the names of the parameters it belongs to, so that a run with another
        number of processes (packed or not) can load it."""
        if self.accelerator.is_main_process:
            saved = {"state_dict": self.optimizer.state_dict(), "layout": self.layout.to_dict()}
            checkpoints.save_torch_state(saved, directory / checkpoints.OPTIMIZER_FILE)

    def load(self, directory: Path) -> None:
        saved = checkpoints.load_torch_state(directory / checkpoints.OPTIMIZER_FILE)
        if "layout" not in saved:  # written before the layout was recorded: loads into the same packing only
            self.optimizer.load_state_dict(saved)
            return
        state_dict, layout = saved["state_dict"], OptimizerLayout.from_dict(saved["layout"])
        if layout.flat != self.layout.flat:
            if self.quantized_state:
                logger.warning(
                    "%s: the adamw8bit state is quantized per block of the packed buffer and cannot be re-packed "
                    "for another number of processes; the optimizer's moments start afresh (the adapter weights "
                    "are resumed)",
                    directory,
                )
                return
            try:
                state_dict = self.layout.pack(layout.unpack(state_dict))
            except ValueError as error:
                logger.warning("%s: the optimizer's moments start afresh (the adapter weights are resumed)", error)
                return
        self.optimizer.load_state_dict(state_dict)


class DeepSpeedUpdate:
    """DeepSpeed ZeRO-2: the engine accumulates, reduces, clips and steps; the optimizer state is sharded."""

    kind = "deepspeed"

    def __init__(self, accelerator, args: argparse.Namespace, adapters: dict[str, nn.Module], param_groups: list[dict]):
        from difftune.train import deepspeed_zero

        self.accum = args.gradient_accumulation_steps
        trainable = sum(p.numel() for group in param_groups for p in group["params"])
        deepspeed_zero.configure(accelerator, args, trainable)
        # The engine takes one model: the adapted models together. Their forward is called directly,
        # which ZeRO-2 allows (gradients are reduced by hooks on the parameters, not in forward).
        self.optimizer = build_optimizer(args, param_groups)  # ZeRO steps it over its shard of the weights
        self.engine, _ = accelerator.prepare(nn.ModuleDict(adapters), self.optimizer)
        deepspeed_zero.use_safe_loading(self.engine)
        self.models = dict(adapters)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)
        if dtype is not None:
            # DeepSpeed casts the models to `dtype` but, unlike accelerate's other set-ups, does not autocast
            # them; so as there, each adapted model's forward autocasts and returns fp32 (other models,
            # such as an fp32 VAE, keep their precision).
            for model in self.models.values():
                model.forward = autocast_forward(model.forward, accelerator.device.type, dtype)

    def micro_batch(self, last: bool) -> nullcontext:
        """Around a micro-batch's forward and backward: DeepSpeed reduces the gradients on the last."""
        self.engine.set_gradient_accumulation_boundary(last)
        return nullcontext()

    def backward(self, loss: torch.Tensor, micro_batches: int) -> None:
        """The step's gradient is the mean over its `micro_batches` (the engine divides by
        gradient_accumulation_steps itself, also on an epoch's shorter last step)."""
        self.engine.backward(loss * (self.accum / micro_batches))

    def step(self, finite: bool) -> bool:
        """The engine's step; returns whether it updated the weights."""
        # A non-finite loss makes a non-finite gradient norm, and DeepSpeed then skips the update itself
        # (its config cannot turn that check off here: deepspeed_zero.configure refuses it).
        self.engine.step()
        if not finite and self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied an update from a non-finite loss; its overflow check is off")
        return self.engine.was_step_applied()

    @contextmanager
    def full_precision_weights(self):
        """All processes (a collective): the adapters hold their fp32 master weights, gathered from the
        shards, instead of the bf16/fp16 copies the models run with; so saved adapters are fp32 as with DDP."""
        from deepspeed.utils import safe_get_full_fp32_param

        params = [p for p in self.engine.module.parameters() if p.requires_grad and p.dtype != torch.float32]
        low_precision = [p.data for p in params]
        for param in params:
            param.data = safe_get_full_fp32_param(param)
        try:
            yield
        finally:
            for param, data in zip(params, low_precision, strict=True):
                param.data = data

    def save(self, directory: Path) -> None:
        """Every process writes its optimizer shard; the adapters' weights are saved by the caller."""
        self.engine.save_checkpoint(
            str(directory), tag=DEEPSPEED_DIR, client_state={}, save_latest=False, exclude_frozen_parameters=True
        )
        if self.engine.global_rank == 0:
            # Its scripts that rebuild fp32 weights from the shards: the adapter files are fp32 already.
            for script in ("zero_to_fp32.py", "zero_to_torch.py"):
                (directory / script).unlink(missing_ok=True)

    def load(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(directory), tag=DEEPSPEED_DIR, load_module_strict=False, load_lr_scheduler_states=False
        )
        if path is None:
            raise UserError(f"{directory} holds no DeepSpeed state to resume from: pick another checkpoint")
        # The loaded state brings the clipping it was saved with; this run's flag (in the config) decides.
        self.engine.optimizer.clip_grad = self.engine.gradient_clipping()


def autocast_forward(forward, device_type: str, dtype: torch.dtype):
    """`forward` run under autocast to `dtype`, its floating-point outputs converted to fp32."""
    from accelerate.utils import convert_outputs_to_fp32

    @functools.wraps(forward)
    def forward_in_autocast(*args, **kwargs):
        with torch.autocast(device_type, dtype=dtype):
            return forward(*args, **kwargs)

    return convert_outputs_to_fp32(forward_in_autocast)


def make_update(accelerator, args: argparse.Namespace, adapters: dict[str, nn.Module], param_groups: list[dict]):
    """The update that matches how accelerate was launched."""
    if accelerator.distributed_type.value == "DEEPSPEED":
        return DeepSpeedUpdate(accelerator, args, adapters, param_groups)
    return DataParallelUpdate(accelerator, args, adapters, param_groups)
