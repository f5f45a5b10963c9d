"""The tiny SDXL pipeline as one single file in the original (SGM) layout."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file


# The original (SGM) single-file layout community SDXL checkpoints ship in, written as diffusers' own
# scripts/convert_diffusers_to_original_sdxl.py writes it (the reference), with the block and layer counts
# taken from the configs instead of the real model's, CLIP-L under `text_model.` and the OpenCLIP projection
# stored transposed, as real files have them.
def sgm_unet_renames(config: dict) -> list[tuple[str, str]]:
    """(diffusers prefix, SGM prefix) pairs for the UNet, most specific first."""
    layers, blocks = config["layers_per_block"], len(config["down_block_types"])
    pairs = [
        ("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
        ("mid_block.attentions.0.", "middle_block.1."),
    ]  # fmt: skip
    pairs += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    for i in range(blocks):
        for j in range(layers):
            pairs.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{(layers + 1) * i + j + 1}.0."))
            pairs.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{(layers + 1) * i + j + 1}.1."))
        for j in range(layers + 1):
            pairs.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{(layers + 1) * i + j}.0."))
            pairs.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{(layers + 1) * i + j}.1."))
        if i < blocks - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(layers + 1) * (i + 1)}.0.op."))
            has_attention = "CrossAttn" in config["up_block_types"][i]
            position = 2 if has_attention else 1
            pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{(layers + 1) * i + layers}.{position}."))
    return pairs


SGM_RESNET_PARTS = [
    ("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"),
]  # fmt: skip


def sgm_unet(state: dict, config: dict) -> dict:
    renames = sgm_unet_renames(config)
    out = {}
    for key, value in state.items():
        prefix = next(p for p in renames if key.startswith(p[0]))
        rest = key[len(prefix[0]) :]
        if ".resnets." in prefix[0]:
            for diffusers_part, sgm_part in SGM_RESNET_PARTS:
                rest = rest.replace(diffusers_part, sgm_part)
        out["model.diffusion_model." + prefix[1] + rest] = value
    return out


def sgm_vae(state: dict, config: dict) -> dict:
    blocks, layers = len(config["down_block_types"]), config["layers_per_block"]
    pairs = [
        ("nin_shortcut", "conv_shortcut"),
        ("norm_out", "conv_norm_out"),
        ("mid.attn_1.", "mid_block.attentions.0."),
    ]
    for i in range(blocks):
        pairs += [(f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.") for j in range(layers)]
        if i < blocks - 1:
            pairs.append((f"down.{i}.downsample.", f"down_blocks.{i}.downsamplers.0."))
            pairs.append((f"up.{blocks - 1 - i}.upsample.", f"up_blocks.{i}.upsamplers.0."))
        pairs += [
            (f"decoder.up.{blocks - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
            for j in range(layers + 1)
        ]
    pairs += [(f"mid.block_{i + 1}.", f"mid_block.resnets.{i}.") for i in range(2)]
    attention = [
        ("norm.", "group_norm."),
        ("q.", "to_q."),
        ("k.", "to_k."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ]
    out = {}
    for key, value in state.items():
        new = key
        for sgm, diffusers in pairs:
            new = new.replace(diffusers, sgm)
        if "attentions" in key:
            for sgm, diffusers in attention:
                new = new.replace(diffusers, sgm)
            if value.ndim == 2:  # the original attention projections are 1x1 convs
                value = value[:, :, None, None]
        out["first_stage_model." + new] = value
    return out


def sgm_open_clip(state: dict) -> dict:
    renames = [
        ("text_model.encoder.layers.", "transformer.resblocks."), ("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"),
        (".fc1.", ".c_fc."), (".fc2.", ".c_proj."), (".self_attn", ".attn"),
        ("text_model.final_layer_norm.", "ln_final."),
        ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
        ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
    ]  # fmt: skip
    out, qkv = {}, {}
    for key, value in state.items():
        if key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
            continue
        new = key
        for diffusers, sgm in renames:
            new = new.replace(diffusers, sgm)
        if m := re.match(r"(.*)\.([qkv])_proj\.(weight|bias)$", new):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
        else:
            out[new] = value
    for (module, kind), parts in qkv.items():
        out[f"{module}.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def write_single_file(pipeline_dir: Path, path: Path) -> None:
    """The pipeline in `pipeline_dir` as one original-layout .safetensors file (UNet, VAE, both text encoders)."""
    from safetensors.torch import load_file

    def part(name: str, weights: str) -> tuple[dict, dict]:
        config_file = pipeline_dir / name / "config.json"
        return load_file(pipeline_dir / name / weights), json.loads(config_file.read_text())

    unet, unet_config = part("unet", "diffusion_pytorch_model.safetensors")
    vae, vae_config = part("vae", "diffusion_pytorch_model.safetensors")
    clip_l, _ = part("text_encoder", "model.safetensors")
    clip_g, _ = part("text_encoder_2", "model.safetensors")
    clip_l = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in clip_l.items()}
    state = {
        **sgm_unet(unet, unet_config),
        **sgm_vae(vae, vae_config),
        **{"conditioner.embedders.0.transformer." + k: v for k, v in clip_l.items()},
        **{"conditioner.embedders.1.model." + k: v for k, v in sgm_open_clip(clip_g).items()},
    }
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
