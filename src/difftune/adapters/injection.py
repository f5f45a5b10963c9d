"""Adapter flags, injection (peft LoKr and LoRA), and saving / loading adapter weights."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from difftune.cli.errors import UserError
from difftune.cli.parsing import comma_list

# torch, and lokr / lora (which need it), are imported where used: the training scripts import this module for
# their flags, and --help must not wait for torch.
if TYPE_CHECKING:
    import torch
    from torch import nn

ATTENTION_TARGETS = "to_q,to_k,to_v,to_out.0"
TEXT_ENCODER_TARGETS = "q_proj,k_proj,v_proj,out_proj"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def add_common_adapter_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--rank", type=int, default=8, help="Adapter rank.")
    group.add_argument(
        "--target_modules", type=comma_list, default=comma_list(ATTENTION_TARGETS), help="Comma-separated."
    )


def add_text_encoder_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("text encoders")
    group.add_argument("--train_text_encoder", action="store_true", help="Also put an adapter on the text encoder(s).")
    group.add_argument(
        "--text_encoder_target_modules", type=comma_list, default=comma_list(TEXT_ENCODER_TARGETS),
        help="Comma-separated.",
    )  # fmt: skip
    group.add_argument("--text_encoder_lr", type=float, default=None, help="Default: --learning_rate.")


def add_lokr_args(parser: argparse.ArgumentParser) -> None:
    """The LoKr flags, then the text encoders' (adapted alike)."""
    group = parser.add_argument_group("LoKr adapter (peft LoKrConfig)")
    add_common_adapter_args(group)
    group.add_argument("--alpha", type=float, default=8, help="Scale alpha / rank.")
    group.add_argument(
        "--conv_rank", type=int, default=None,
        help="Rank of the targeted Conv2d layers with a kernel above 1x1 (LyCORIS's conv_dim; 1x1 convs take --rank, "
        "as there). Default: --rank.",
    )  # fmt: skip
    group.add_argument(
        "--conv_alpha",
        type=float,
        default=None,
        help="Alpha of those conv layers (LyCORIS's conv_alpha). Default: --alpha.",
    )
    group.add_argument("--decompose_both", action="store_true", help="Also factor the left Kronecker factor.")
    group.add_argument("--decompose_factor", type=int, default=-1, help="-1: factors closest to sqrt(dim).")
    group.add_argument("--rank_dropout", type=float, default=0.0)
    group.add_argument("--module_dropout", type=float, default=0.0)
    group.add_argument("--lokr_init", default="peft", choices=["peft", "lycoris"], help="Which factor starts at zero.")
    add_text_encoder_args(parser)


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    """The LoRA flags, then the text encoder's (adapted alike)."""
    group = parser.add_argument_group("LoRA adapter (peft LoraConfig)")
    add_common_adapter_args(group)
    group.add_argument("--lora_alpha", type=float, default=8, help="Scale lora_alpha / rank.")
    group.add_argument("--lora_dropout", type=float, default=0.0)
    add_text_encoder_args(parser)


def _check(args: argparse.Namespace, alpha_flag: str) -> None:
    if args.rank <= 0:
        raise UserError(f"--rank must be a positive integer, got {args.rank}")
    alpha = getattr(args, alpha_flag)
    if alpha <= 0:
        raise UserError(f"--{alpha_flag} must be positive, got {alpha}")
    conv_rank, conv_alpha = getattr(args, "conv_rank", None), getattr(args, "conv_alpha", None)
    if conv_rank is not None and conv_rank <= 0:
        raise UserError(f"--conv_rank must be a positive integer, got {conv_rank}")
    if conv_alpha is not None and conv_alpha <= 0:
        raise UserError(f"--conv_alpha must be positive, got {conv_alpha}")
    for flag in ("rank_dropout", "module_dropout", "lora_dropout"):
        value = getattr(args, flag, 0.0)
        if not 0.0 <= value < 1.0:
            raise UserError(f"--{flag} must be in [0, 1), got {value}")
    if args.text_encoder_lr is not None and args.text_encoder_lr <= 0:
        raise UserError(f"--text_encoder_lr must be positive, got {args.text_encoder_lr}")


def check_adapter_args(args: argparse.Namespace) -> None:
    """The adapter flags' values, checked when the flags are parsed (before any model loads)."""
    _check(args, "alpha" if hasattr(args, "alpha") else "lora_alpha")
    if hasattr(args, "decompose_factor"):
        check_decompose_factor(args.decompose_factor)


def check_decompose_factor(factor: int) -> None:
    """-1 or a positive factor: peft reads 0 and values below -1 as "no factor" and splits every
    dimension as 1 x n, a LoKr with a full-size second factor."""
    if factor == 0 or factor < -1:
        raise UserError(f"--decompose_factor must be -1 (factors near sqrt(dim)) or a positive integer, got {factor}")


def lokr_config(args: argparse.Namespace, target_modules: list[str], model: nn.Module | None = None):
    """A peft LoKrConfig from the LoKr flags; with `model`, its spatial conv layers at --conv_rank / --conv_alpha
    (peft's rank_pattern / alpha_pattern, one entry per layer)."""
    from peft import LoKrConfig

    _check(args, "alpha")
    check_decompose_factor(args.decompose_factor)
    rank_pattern, alpha_pattern = {}, {}
    conv_rank, conv_alpha = getattr(args, "conv_rank", None), getattr(args, "conv_alpha", None)
    if model is not None and (conv_rank, conv_alpha) != (None, None):
        for name in spatial_convs(model, target_modules):
            rank_pattern[name] = conv_rank if conv_rank is not None else args.rank
            alpha_pattern[name] = conv_alpha if conv_alpha is not None else args.alpha
    return LoKrConfig(
        r=args.rank,
        alpha=args.alpha,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=target_modules,
        decompose_both=args.decompose_both,
        decompose_factor=args.decompose_factor,
        rank_dropout=args.rank_dropout,
        module_dropout=args.module_dropout,
        init_weights="lycoris" if args.lokr_init == "lycoris" else True,
    )


def spatial_convs(model: nn.Module, target_modules: list[str]) -> list[str]:
    """The targeted Conv2d layers whose kernel is above 1x1: those LyCORIS gives conv_dim / conv_alpha (a 1x1 conv
    is a linear layer to it)."""
    from torch import nn

    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
        and module.kernel_size != (1, 1)
        and any(name == t or name.endswith("." + t) for t in target_modules)
    ]


def lora_config(args: argparse.Namespace, target_modules: list[str], model: nn.Module | None = None):
    """A peft LoraConfig from the LoRA flags (`model`: unused, as lokr_config's)."""
    from peft import LoraConfig

    _check(args, "lora_alpha")
    return LoraConfig(
        r=args.rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=target_modules,
        init_lora_weights=True,
    )


def attach(
    model: nn.Module, config, base_model_name_or_path: str | None = None, flag: str = "--target_modules"
) -> nn.Module:
    """Freeze `model`, wrap it in a PeftModel with `config`, keep adapter weights in fp32; `flag` names the
    option that chose the target modules, for the error."""
    from difftune.adapters import lokr, lora

    model.requires_grad_(False)
    peft_model = _wrap(model, config, flag)
    # Recorded in adapter_config.json, so a checkpoint names the base model it belongs to.
    peft_model.peft_config["default"].base_model_name_or_path = base_model_name_or_path
    lokr.use_factored_forward(peft_model)  # LoKr Linear layers only; a no-op for LoRA
    lora.use_lean_forward(peft_model)  # LoRA Linear layers only; a no-op for LoKr
    for parameter in peft_model.parameters():
        if parameter.requires_grad:
            # Under mixed precision the frozen weights go low-precision; the trained ones stay fp32.
            parameter.data = parameter.data.float()
    return peft_model


def _wrap(model: nn.Module, config, flag: str) -> nn.Module:
    """get_peft_model, its refusals as a one-line UserError naming `flag`: ValueError for names that match
    nothing, TypeError for names that match a module peft cannot adapt (a norm, an attention block)."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, config)
    except (ValueError, TypeError) as error:
        reason = " ".join(str(error).split())
        raise UserError(
            f"{flag} {','.join(sorted(config.target_modules))} cannot be adapted in {type(model).__name__}: "
            f"{reason} (name Linear or Conv2d layers)"
        ) from None


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def param_groups(args: argparse.Namespace, denoiser: nn.Module, text_encoders: list[nn.Module]) -> list[dict]:
    """Optimizer groups: the denoiser's adapter at --learning_rate, text encoders' at --text_encoder_lr."""
    groups = [{"params": trainable_parameters(denoiser)}]
    if text_encoders:
        params = [p for model in text_encoders for p in trainable_parameters(model)]
        groups.append({"params": params, "lr": args.text_encoder_lr or args.learning_rate})
    return groups


def attach_all(
    args: argparse.Namespace,
    make_config,
    base: str,
    denoiser: tuple[str, nn.Module],
    text_encoders: dict[str, nn.Module],
) -> tuple[dict[str, nn.Module], list[dict]]:
    """Adapters on the denoiser, and on the text encoders with --train_text_encoder; returns them by
    checkpoint subfolder, and their optimizer groups. Turns on gradient checkpointing when asked."""
    name, model = denoiser
    trained = {name: attach(model, make_config(args, args.target_modules, model), base)}
    if args.train_text_encoder:
        for te_name, te_model in text_encoders.items():
            config = make_config(args, args.text_encoder_target_modules, te_model)
            trained[te_name] = attach(te_model, config, base, "--text_encoder_target_modules")
    adapted_text_encoders = [trained[n] for n in text_encoders if n in trained]
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model, adapted_text_encoders)
    return trained, param_groups(args, trained[name], adapted_text_encoders)


def enable_gradient_checkpointing(denoiser: nn.Module, text_encoders: list[nn.Module]) -> None:
    """Recompute activations in backward: the denoiser (diffusers) and adapted text encoders (transformers)."""
    denoiser.enable_gradient_checkpointing()
    for model in text_encoders:
        model.get_base_model().gradient_checkpointing_enable({"use_reentrant": False})


def adapter_state_dict(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights with bare module names (no "base_model.model." prefix), as diffusers wants them."""
    from peft import get_peft_model_state_dict

    prefix = "base_model.model."
    # As save_adapters: no vocabulary is ever resized. peft's default ("auto") would look for the base model's
    # config.json to find out, and warn at every save of a model whose folder has none (a diffusers repo).
    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    return {k.removeprefix(prefix): v for k, v in state.items()}


def save_adapters(adapters: dict[str, nn.Module], directory: Path) -> None:
    """peft format (adapter_config.json + adapter_model.safetensors), one subfolder per model."""
    for name, peft_model in adapters.items():
        peft_model.save_pretrained(directory / name, save_embedding_layers=False)
        # peft also writes its empty model card template ("More Information Needed"), with no flag to stop it;
        # the run's own card is OUTPUT_DIR/README.md. Removed before the checkpoint's manifest is written.
        (directory / name / "README.md").unlink(missing_ok=True)


def load_adapters(adapters: dict[str, nn.Module], directory: Path) -> None:
    """Load adapter weights saved by save_adapters into the same adapters."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    for name, peft_model in adapters.items():
        path = directory / name / ADAPTER_WEIGHTS
        if not path.is_file():
            raise UserError(f"checkpoint {directory} has no {name}/{ADAPTER_WEIGHTS}: was it made with other flags?")
        result = set_peft_model_state_dict(peft_model, load_file(str(path)))
        if result.unexpected_keys:
            raise UserError(
                f"checkpoint {directory}/{name} does not fit this adapter "
                f"({len(result.unexpected_keys)} unexpected weights): resume with the run's own adapter flags"
            )
