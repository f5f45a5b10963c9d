"""Export SDXL LoKr checkpoints to the single-file kohya / LyCORIS format (ComfyUI, AUTOMATIC1111).

Those programs name UNet modules as in the original SGM/LDM code (input_blocks, middle_block,
output_blocks) and compute delta = strength * s * kron(w1, w2), where s = alpha / dim only when an
alpha is stored and a factor is split, else 1. peft always applies alpha / r (each module's own, from
rank_pattern / alpha_pattern). Folding alpha / r into w1 and storing alpha = the split factor's rank makes every
consumer apply exactly peft's scale. LyCORIS's own loader (LokrModule.make_module_from_state_dict) rebuilds each
module from the factor shapes and misreads some of peft's layouts (a conv's flattened lokr_w2_b; a split w1 beside
a full w2): those factors are written unsplit, which every consumer reads with scale 1.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from difftune.cli.errors import UserError
from difftune.models import sgm_layout

LOKR_SUFFIXES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
PREFIXES = {"unet": "lora_unet_", "text_encoder_one": "lora_te1_", "text_encoder_two": "lora_te2_"}
# The children of CLIP's text transformer. kohya names them under `text_model.`, which transformers 5's
# CLIPTextModel no longer has (CLIPTextModelWithProjection still does).
CLIP_TEXT_TRANSFORMER_PARTS = ("embeddings", "encoder", "final_layer_norm")


def kohya_name(model: str, module: str, unet_config: dict) -> str:
    """lora_unet_<sgm path> / lora_te1_text_model_<path> / lora_te2_text_model_<path>, dots as underscores."""
    if model == "unet":
        with_attention = {i for i, t in enumerate(unet_config["up_block_types"]) if "CrossAttn" in t}
        module = sgm_layout.sgm_unet_name(module, unet_config["layers_per_block"], with_attention)
    elif module.split(".")[0] in CLIP_TEXT_TRANSFORMER_PARTS:
        module = "text_model." + module
    return PREFIXES[model] + module.replace(".", "_")


def split_peft_key(key: str) -> tuple[str, str]:
    """("down_blocks.1....to_q", "lokr_w1") from a peft adapter_model key."""
    key = key.removeprefix("base_model.model.")
    module, _, suffix = key.rpartition(".")
    if suffix not in LOKR_SUFFIXES:
        raise UserError(f"unexpected weight {key} in a LoKr checkpoint")
    return module, suffix


def check_exportable(config: dict, shapes: dict[str, tuple[int, ...]], allow_large_factor: bool = False) -> None:
    """Refuse LoKr settings that ComfyUI / A1111 cannot read, and (unless allowed) ones LyCORIS's loader cannot.

    A decompose_factor above sqrt(dim) makes peft's first Kronecker factor the larger one. ComfyUI and A1111's
    built-in loader reshape kron(w1, w2) to the weight and read it exactly; LyCORIS's loader rebuilds the
    module with the smaller factor first, so the stored w1 / w2 no longer fit its shapes.
    """
    if config.get("use_effective_conv2d"):
        raise UserError(
            "this checkpoint uses Tucker conv factors (use_effective_conv2d), which ComfyUI and A1111 cannot load: "
            "retrain without it to export"
        )
    factor = config.get("decompose_factor", -1)
    if factor > 0 and not allow_large_factor:
        for module, shape in shapes.items():
            for dim in shape[:2]:
                if dim % factor == 0 and factor > math.isqrt(dim):
                    raise UserError(
                        f"decompose_factor {factor} is above sqrt({dim}) for {module}: ComfyUI and AUTOMATIC1111 "
                        "load it exactly, LyCORIS's own loader (kohya sd-scripts, lycoris.kohya) cannot: pass "
                        "--allow_large_factor to export for ComfyUI / A1111, or retrain with --decompose_factor -1"
                    )


def module_rank_alpha(config: dict, module: str) -> tuple[int, float]:
    """The module's r and alpha as peft gave them: rank_pattern / alpha_pattern matched by peft's own helper."""
    from peft.utils.other import get_pattern_key

    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rank = ranks.get(get_pattern_key(ranks.keys(), module), config["r"])
    return rank, alphas.get(get_pattern_key(alphas.keys(), module), config["alpha"])


def lycoris_layout(
    weights: dict[str, torch.Tensor], shape: tuple[int, ...], scale: float, rank: int
) -> dict[str, torch.Tensor]:
    """One module's fp32 factors as LyCORIS's loader rebuilds them, peft's `scale` folded into w1, with the alpha
    that makes ComfyUI's, A1111's and LyCORIS's scale 1 (alpha / dim, dim the split factor's rank)."""
    w1a, w1b, w2a, w2b = (weights.get(k) for k in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"))
    w1 = weights["lokr_w1"] if "lokr_w1" in weights else w1a @ w1b
    conv = len(shape) == 4
    # LyCORIS takes a conv's in_dim from lokr_w2_b's flattened (r, d*k*k) width, and rebuilds w2 split only when
    # r < max(b, d) / 2 (its rule and peft's), w1 split only beside a split w2 of the same rank.
    keep_w2 = w2a is not None and not conv and w2a.shape[1] < max(w2a.shape[0], w2b.shape[1]) / 2
    keep_w1 = w1a is not None and keep_w2 and w1a.shape[1] == w2a.shape[1] and w1a.shape[1] < max(w1.shape) / 2
    out = {"lokr_w1_a": w1a * scale, "lokr_w1_b": w1b} if keep_w1 else {"lokr_w1": w1 * scale}
    if keep_w2:
        out.update(lokr_w2_a=w2a, lokr_w2_b=w2b)
    elif "lokr_w2" in weights:
        out["lokr_w2"] = weights["lokr_w2"]
    else:  # peft's conv w2 is (b, d*k*k): back to (b, d, k, k)
        w2 = w2a @ w2b
        out["lokr_w2"] = w2.reshape(w2.shape[0], shape[1] // w1.shape[1], *shape[2:]) if conv else w2
    # Unsplit factors: consumers ignore alpha; LyCORIS's own files store the rank there.
    out["alpha"] = torch.tensor(float(w2a.shape[1] if keep_w2 else rank))
    return out


def lokr_to_kohya(
    adapters: dict[str, tuple[dict, dict[str, torch.Tensor]]],
    unet_config: dict,
    weight_shapes: dict[str, dict[str, tuple[int, ...]]],
    dtype: torch.dtype = torch.float32,
    allow_large_factor: bool = False,
) -> dict[str, torch.Tensor]:
    """kohya state dict from {model: (adapter_config, peft state dict)} for unet / text_encoder_one / _two."""
    out: dict[str, torch.Tensor] = {}
    for model, (config, state) in adapters.items():
        grouped = group_modules(state)
        # Only the adapted modules' factors matter (an untargeted conv_in with 4 channels is no reason to refuse).
        shapes = weight_shapes.get(model, {})
        check_exportable(config, {m: shapes[m] for m in grouped if m in shapes}, allow_large_factor)
        for module, weights in sorted(grouped.items()):
            if module not in shapes:
                raise UserError(f"the base model has no {module} for the adapter's weights: is it the run's base?")
            name = kohya_name(model, module, unet_config)
            rank, alpha = module_rank_alpha(config, module)
            for suffix, value in lycoris_layout(weights, shapes[module], alpha / rank, rank).items():
                out[f"{name}.{suffix}"] = value.to(dtype).contiguous()
    return out


def group_modules(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {lokr_w1: fp32 tensor, ...}} from a peft LoKr state dict."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, suffix = split_peft_key(key)
        grouped.setdefault(module, {})[suffix] = value.float()
    return grouped


def kohya_metadata(config: dict, base_model: str | None, conv_modules: Iterable[str] = ()) -> dict[str, str]:
    """ss_* metadata; conv_dim / conv_alpha (LyCORIS's names) when the adapted convs share a rank of their own."""
    args = {"algo": "lokr", "factor": config.get("decompose_factor", -1)}
    if config.get("decompose_both"):
        args["decompose_both"] = True
    conv = {module_rank_alpha(config, m) for m in conv_modules}
    extra = {}
    if len(conv) == 1 and conv != {(config["r"], config["alpha"])}:
        (conv_rank, conv_alpha), *_ = conv
        # Folded like ss_network_alpha: the stored alpha is the rank, peft's alpha kept beside it.
        args.update(conv_dim=conv_rank, conv_alpha=conv_rank)
        extra["difftune_peft_conv_alpha"] = str(conv_alpha)
    return {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": json.dumps(args),
        "ss_network_dim": str(config["r"]),
        # alpha / r is folded into w1; the stored alpha equals the rank (see the module docstring).
        "ss_network_alpha": str(config["r"]),
        "difftune_peft_alpha": str(config["alpha"]),
        **extra,
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": str(base_model or ""),
    }


def module_shapes(base: str, revision: str | None, models: list[str]) -> tuple[dict, dict[str, dict]]:
    """The UNet config and every Linear/Conv weight shape of the base models, built on the meta device."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_config = dict(UNet2DConditionModel.load_config(base, subfolder="unet", revision=revision))
    builders = {
        "unet": lambda: UNet2DConditionModel.from_config(unet_config),
        "text_encoder_one": lambda: CLIPTextModel(
            CLIPTextConfig.from_pretrained(base, subfolder="text_encoder", revision=revision)
        ),
        "text_encoder_two": lambda: CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(base, subfolder="text_encoder_2", revision=revision)
        ),
    }
    shapes = {}
    for model in models:
        with init_empty_weights():
            module = builders[model]()
        shapes[model] = {
            name: tuple(m.weight.shape)
            for name, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        }
    return unet_config, shapes


def read_peft_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    config = json.loads((directory / "adapter_config.json").read_text())
    return config, load_file(str(directory / "adapter_model.safetensors"))
