"""diffusers SDXL weight names -> the original (SGM) single-file names ComfyUI, A1111 and from_single_file read.

UNet module paths map by sgm_unet_name, which the kohya export (difftune.formats.kohya) uses too. The VAE
follows the original autoencoder's names (decoder blocks numbered the other way round, 1x1-conv attention
projections). CLIP-L keeps its transformers names under `conditioner.embedders.0.transformer.text_model.`;
OpenCLIP-bigG uses open_clip's names, q/k/v fused into one in_proj and the projection stored transposed.
"""

from __future__ import annotations

import re

from difftune.cli.errors import UserError

UNET, VAE = "model.diffusion_model.", "first_stage_model."
CLIP_L, CLIP_G = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_PARTS = [
    ("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
    ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
]  # fmt: skip
QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
TOP_LEVEL = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _inner(kind: str, rest: str) -> str:
    """ "0.<sgm resnet part>" for a resnet, "1.<path>" for a transformer (SGM keeps attention names)."""
    if kind == "attentions":
        return f"1.{rest}"
    head, _, tail = rest.partition(".")
    return "0." + ".".join(filter(None, [RESNET_PARTS.get(head, head), tail]))


def sgm_unet_name(name: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """The SGM/LDM module path of a diffusers SDXL UNet module path."""
    for diffusers_name, sgm in TOP_LEVEL.items():
        if name == diffusers_name or name.startswith(diffusers_name + "."):
            return sgm + name[len(diffusers_name) :]
    per_block = layers_per_block + 1
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = per_block * block + layer + 1
        return f"input_blocks.{index}.{_inner(kind, rest)}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(.*)", name):
        return f"input_blocks.{per_block * (int(m[1]) + 1)}.0.op{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", name):
        return f"middle_block.{2 * int(m[1])}.{_inner('resnets', m[2]).removeprefix('0.')}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", name):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = per_block * block + layer
        return f"output_blocks.{index}.{_inner(kind, rest)}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", name):
        block = int(m[1])
        position = 2 if block in up_blocks_with_attention else 1
        return f"output_blocks.{per_block * block + layers_per_block}.{position}.{m[2]}"
    raise UserError(f"cannot name UNet module {name} in the SGM layout; exclude it from --target_modules")


def unet_key(key: str, unet_config: dict) -> str:
    module, _, parameter = key.rpartition(".")
    with_attention = {i for i, t in enumerate(unet_config["up_block_types"]) if "CrossAttn" in t}
    return UNET + sgm_unet_name(module, unet_config["layers_per_block"], with_attention) + "." + parameter


def vae_key(key: str, vae_config: dict) -> tuple[str, bool]:
    """(original key, whether the weight becomes a 1x1 conv)."""
    blocks = len(vae_config["down_block_types"])
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)$", key):
        return f"{VAE}{m[1]}.mid.attn_1.{VAE_ATTENTION[m[2]]}.{m[3]}", m[3] == "weight" and m[2] != "group_norm"
    new = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
    new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
    new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
    new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)

    def up(match: re.Match, part: str) -> str:  # decoder blocks are numbered the other way round
        return f"decoder.up.{blocks - 1 - int(match[1])}.{part}."

    new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: up(m, "block"), new)
    new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: up(m, "upsample"), new)
    return VAE + new, False


def clip_l_key(key: str) -> str:
    return CLIP_L + (key if key.startswith("text_model.") else "text_model." + key)


def clip_g_key(key: str) -> tuple[str, int | None]:
    """(original key, row block of the fused in_proj (0, 1, 2 for q, k, v) or None)."""
    if key == "text_projection.weight":
        return CLIP_G + "text_projection", None
    key = key.removeprefix("text_model.")
    if key == "embeddings.token_embedding.weight":
        return CLIP_G + "token_embedding.weight", None
    if key == "embeddings.position_embedding.weight":
        return CLIP_G + "positional_embedding", None
    if key.startswith("final_layer_norm."):
        return CLIP_G + "ln_final." + key.removeprefix("final_layer_norm."), None
    m = re.match(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", key)
    if m is None:
        raise ValueError(f"no OpenCLIP name for text encoder 2 weight {key}")
    layer, part, kind = m[1], m[2], m[3]
    prefix = f"{CLIP_G}transformer.resblocks.{layer}."
    if part.startswith("self_attn.") and part.removeprefix("self_attn.") in QKV:
        return f"{prefix}attn.in_proj_{kind}", QKV[part.removeprefix("self_attn.")]
    for diffusers, original in OPEN_CLIP_PARTS:
        part = part.replace(diffusers, original)
    return f"{prefix}{part}.{kind}", None
