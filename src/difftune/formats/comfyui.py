"""Stable Cascade stage C LoRAs as ComfyUI loads them: one .safetensors of lora_down / lora_up / alpha under
ComfyUI's module names (export.py --format comfyui)."""

from __future__ import annotations

import torch

from difftune.cli.errors import UserError

# ComfyUI's stage C (comfy/ldm/cascade) names its modules as diffusers does, except inside attention.
COMFYUI_ATTENTION = {"to_q": "attn.to_q", "to_k": "attn.to_k", "to_v": "attn.to_v", "to_out.0": "attn.out_proj"}
COMFYUI_PREFIXES = {"prior": "lora_prior_unet_", "text_encoder": "lora_prior_te_"}


def comfyui_name(model: str, module: str) -> str:
    """ComfyUI's LoRA key for a diffusers / transformers module path of the prior or its CLIP-G text encoder."""
    if model == "prior":
        head, _, tail = module.rpartition(".attention.")
        if head and tail in COMFYUI_ATTENTION:
            module = f"{head}.attention.{COMFYUI_ATTENTION[tail]}"
    elif not module.startswith(("text_model.", "text_projection")):  # (transformers may drop it; the projection
        module = "text_model." + module  # sits beside text_model, and ComfyUI names it lora_prior_te_text_projection)
    return COMFYUI_PREFIXES[model] + module.replace(".", "_")


def lora_to_comfyui(
    adapters: dict[str, tuple[dict, dict[str, torch.Tensor]]], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """ComfyUI's single-file LoRA (lora_down / lora_up / alpha) from {"prior" / "text_encoder": (peft
    LoraConfig dict, peft adapter weights)}. ComfyUI applies alpha / rank * up @ down, peft lora_alpha / r *
    B @ A: storing peft's alpha gives the same delta."""
    out: dict[str, torch.Tensor] = {}
    for model, (config, state) in adapters.items():
        if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("use_rslora"):
            raise UserError(
                f"the {model} adapter is not a plain LoRA (peft_type, DoRA or rsLoRA): ComfyUI cannot load it"
            )
        for key, value in state.items():
            module, _, suffix = key.removeprefix("base_model.model.").rpartition(".lora_")
            if suffix not in ("A.weight", "B.weight"):
                raise UserError(f"unexpected weight {key} in a LoRA checkpoint")
            name = comfyui_name(model, module)
            out[f"{name}.{'lora_down' if suffix == 'A.weight' else 'lora_up'}.weight"] = value.to(dtype).contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(config["lora_alpha"]), dtype=dtype)
    return out
