"""Write tiny random models and a toy captioned image set for tests and the demo.

Every model is a real diffusers/transformers class with a tiny config, saved in
the layout of the Hub repo it stands in for, so the training and inference code
loads it exactly as it loads the real thing:

    OUT_DIR/sdxl/               like stabilityai/stable-diffusion-xl-base-1.0
    OUT_DIR/sdxl.safetensors    the same SDXL as one single file in the original (SGM) layout
    OUT_DIR/sdxl-vae-fp16-fix/  like madebyollin/sdxl-vae-fp16-fix
    OUT_DIR/wuerstchen-prior/   like warp-ai/wuerstchen-prior
    OUT_DIR/wuerstchen/         like warp-ai/wuerstchen
    OUT_DIR/effnet/effnet.safetensors  EfficientNetV2-S image encoder, stage-B keys
    OUT_DIR/stable-cascade-prior/  like stabilityai/stable-cascade-prior (prior, prior_lite, ...)
    OUT_DIR/stable-cascade/        like stabilityai/stable-cascade (decoder, decoder_lite, vqgan, ...,
                                   effnet_encoder.safetensors at the root, original keys)
    OUT_DIR/data/               imagefolder: PNGs + metadata.jsonl (file_name, text)

Usage: python scripts/make_tiny_assets.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import random
import re
import shutil
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

# The real CLIP vocabulary: 256 byte tokens, the same with an end-of-word mark,
# 48,894 merges, then the two special tokens (49,408 in all).
NUM_CLIP_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet in CLIP's order: printable bytes as themselves first, then the rest above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    table = {byte: chr(byte) for byte in printable}
    table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return table


def write_clip_vocab(directory: Path) -> tuple[Path, Path]:
    """Turn open_clip's BPE file into the vocab.json + merges.txt of the real CLIP tokenizer."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise SystemExit("error: the CLIP vocabulary comes from the open-clip-torch wheel; run `make venv` first")
    bpe_file = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe_file) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_CLIP_MERGES + 1]]
    alphabet = list(byte_to_unicode().values())
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_file, merges_file


def clip_tokenizer(vocab: tuple[Path, Path], pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=str(vocab[0]), merges=str(vocab[1]), pad_token=pad_token, model_max_length=77)


def save_tokenizer(tokenizer, directory: Path, vocab: tuple[Path, Path]) -> None:
    """Save like the Hub repos: tokenizer.json and config, plus the slow tokenizer's vocab.json + merges.txt."""
    tokenizer.save_pretrained(directory)
    for file in vocab:
        shutil.copy(file, directory / file.name)


def clip_text_config(tokenizer, hidden: int, hidden_act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=projection_dim or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def tiny_sdxl_vae(force_upcast: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=force_upcast,
    )


def make_sdxl(out: Path, vocab: tuple[Path, Path]) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # SDXL pads its first tokenizer with the end token and its second with "!".
    tokenizer, tokenizer_2 = clip_tokenizer(vocab, EOS), clip_tokenizer(vocab, "!")
    text_encoder = CLIPTextModel(clip_text_config(tokenizer, 32, "quick_gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config(tokenizer_2, 48, "gelu", projection_dim=32))
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 32, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        use_linear_projection=True,
        cross_attention_dim=32 + 48,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + 32,
        norm_num_groups=32,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_sdxl_vae(force_upcast=True),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(out / "sdxl", safe_serialization=True)
    save_tokenizer(tokenizer, out / "sdxl" / "tokenizer", vocab)
    save_tokenizer(tokenizer_2, out / "sdxl" / "tokenizer_2", vocab)
    # The fp16-fix VAE is a separate repo with the weights at its root.
    fixed_vae = tiny_sdxl_vae(force_upcast=False)
    fixed_vae.load_state_dict(pipe.vae.state_dict())
    fixed_vae.save_pretrained(out / "sdxl-vae-fp16-fix", safe_serialization=True)
    write_single_file(out / "sdxl", out / "sdxl.safetensors")


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


def write_model_index(directory: Path, index: dict) -> None:
    """Write model_index.json the way the Hub repos have it (Wuerstchen classes under "wuerstchen")."""
    import diffusers

    (directory / "model_index.json").write_text(
        json.dumps({**index, "_diffusers_version": diffusers.__version__}, indent=2) + "\n"
    )


def make_wuerstchen(out: Path, vocab: tuple[Path, Path]) -> None:
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
    from transformers import CLIPTextModel

    from difftune.wuerstchen import EfficientNetEncoder

    prior_dir, decoder_dir = out / "wuerstchen-prior", out / "wuerstchen"
    tokenizer = clip_tokenizer(vocab, "!")
    hidden = 32

    prior = WuerstchenPrior(c_in=16, c=32, c_cond=hidden, c_r=8, depth=2, nhead=2)
    # The prior returns (x - a) / |1 - b|; with a full-size random output layer b comes near 1 and
    # sampling explodes. A small output layer keeps the random prior finite, as a trained one is.
    with torch.no_grad():
        prior.out[1].weight.mul_(0.05)
        prior.out[1].bias.zero_()
    prior.save_pretrained(prior_dir / "prior", safe_serialization=True)
    CLIPTextModel(clip_text_config(tokenizer, hidden, "gelu")).save_pretrained(prior_dir / "text_encoder")
    save_tokenizer(tokenizer, prior_dir / "tokenizer", vocab)
    DDPMWuerstchenScheduler().save_pretrained(prior_dir / "scheduler")
    write_model_index(
        prior_dir,
        {
            "_class_name": "WuerstchenPriorPipeline",
            "latent_mean": 42.0,
            "latent_std": 1.0,
            "resolution_multiple": 42.67,
            "prior": ["wuerstchen", "WuerstchenPrior"],
            "scheduler": ["diffusers", "DDPMWuerstchenScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizerFast"],
        },
    )

    decoder = WuerstchenDiffNeXt(
        c_in=4,
        c_out=4,
        c_r=8,
        c_cond=hidden,
        c_hidden=[32],
        nhead=[-1],
        blocks=[2],
        level_config=["CT"],
        inject_effnet=[True],  # the real decoder injects the prior's embeddings; so must this one
        effnet_embd=16,
        clip_embd=hidden,
    )
    # The decoder returns (x - a) / sigmoid(b) and diffusers zero-initialises its output layer, which
    # would make it ignore every input. Start it small and random, with sigmoid(b) near 1 (after the
    # pixel shuffle the last half of the conv's channels become b), so that it is finite and responsive.
    with torch.no_grad():
        decoder.clf[1].weight.normal_(std=0.2)
        decoder.clf[1].bias.zero_()
        decoder.clf[1].bias[decoder.clf[1].out_channels // 2 :] = 4.0
    decoder.save_pretrained(decoder_dir / "decoder", safe_serialization=True)
    vqgan = PaellaVQModel(bottleneck_blocks=1, embed_dim=32, num_vq_embeddings=16)
    vqgan.save_pretrained(decoder_dir / "vqgan", safe_serialization=True)
    CLIPTextModel(clip_text_config(tokenizer, hidden, "gelu")).save_pretrained(decoder_dir / "text_encoder")
    save_tokenizer(tokenizer, decoder_dir / "tokenizer", vocab)
    DDPMWuerstchenScheduler().save_pretrained(decoder_dir / "scheduler")
    write_model_index(
        decoder_dir,
        {
            "_class_name": "WuerstchenDecoderPipeline",
            "latent_dim_scale": 10.67,
            "decoder": ["wuerstchen", "WuerstchenDiffNeXt"],
            "scheduler": ["diffusers", "DDPMWuerstchenScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizerFast"],
            "vqgan": ["wuerstchen", "PaellaVQModel"],
        },
    )

    (out / "effnet").mkdir(parents=True, exist_ok=True)
    effnet = EfficientNetEncoder()
    save_file({k: v.contiguous() for k, v in effnet.state_dict().items()}, str(out / "effnet" / "effnet.safetensors"))


def tiny_stage_c(clip_text: int, clip_image: int, channels: int, heads: int):
    """Stage C as Stable Cascade's prior has it (2 levels of ResBlock, TimestepBlock, AttnBlock), tiny."""
    from diffusers import StableCascadeUNet

    return StableCascadeUNet(
        in_channels=16,
        out_channels=16,
        conditioning_dim=channels,
        block_out_channels=(channels, channels),
        num_attention_heads=(heads, heads),
        down_num_layers_per_block=(1, 2),
        up_num_layers_per_block=(2, 1),
        down_blocks_repeat_mappers=(1, 1),
        up_blocks_repeat_mappers=(1, 1),
        block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),) * 2,
        clip_text_in_channels=clip_text,
        clip_text_pooled_in_channels=clip_text,
        clip_image_in_channels=clip_image,
        clip_seq=4,
        dropout=(0.1, 0.1),
        self_attn=True,
        timestep_conditioning_type=("sca", "crp"),
        switch_level=(False,),
    )


def tiny_stage_b(clip_text: int, channels: tuple[int, int]):
    """Stage B as Stable Cascade's decoder has it (EfficientNet and pixel conditioning, attention deeper), tiny."""
    from diffusers import StableCascadeUNet

    return StableCascadeUNet(
        in_channels=4,
        out_channels=4,
        patch_size=2,
        conditioning_dim=channels[1],
        block_out_channels=channels,
        num_attention_heads=(0, 2),
        down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1),
        down_blocks_repeat_mappers=(1, 1),
        up_blocks_repeat_mappers=(2, 2),
        block_types_per_layer=(
            ("SDCascadeResBlock", "SDCascadeTimestepBlock"),
            ("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),
        ),
        clip_text_pooled_in_channels=clip_text,
        effnet_in_channels=16,
        pixel_mapper_in_channels=3,
        dropout=(0.0, 0.0),
        self_attn=True,
        timestep_conditioning_type=("sca",),
    )


def make_stable_cascade(out: Path, vocab: tuple[Path, Path]) -> None:
    """Stable Cascade (Wuerstchen v3): the prior repo and the decoder repo, with the original-format
    EfficientNet encoder at the decoder repo's root (its BatchNorm has no affine weights)."""
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from difftune.wuerstchen import EfficientNetEncoder

    prior_dir, decoder_dir = out / "stable-cascade-prior", out / "stable-cascade"
    tokenizer = clip_tokenizer(vocab, "!")  # CLIP-G pads with "!", as SDXL's second tokenizer
    hidden, image_dim = 32, 24
    # CLIP-G as both repos have it: a text model with projection (hidden = projection dim, as in the real one).
    text_config = clip_text_config(tokenizer, hidden, "gelu", projection_dim=hidden)
    tiny_stage_c(hidden, image_dim, 32, 2).save_pretrained(prior_dir / "prior", safe_serialization=True)
    tiny_stage_c(hidden, image_dim, 24, 2).save_pretrained(prior_dir / "prior_lite", safe_serialization=True)
    CLIPTextModelWithProjection(text_config).save_pretrained(prior_dir / "text_encoder")
    save_tokenizer(tokenizer, prior_dir / "tokenizer", vocab)
    DDPMWuerstchenScheduler().save_pretrained(prior_dir / "scheduler")
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
        patch_size=8, projection_dim=image_dim,
    )  # fmt: skip
    CLIPVisionModelWithProjection(vision).save_pretrained(prior_dir / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        prior_dir / "feature_extractor"
    )
    write_model_index(
        prior_dir,
        {
            "_class_name": "StableCascadePriorPipeline",
            "resolution_multiple": 42.67,
            "feature_extractor": ["transformers", "CLIPImageProcessor"],
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "prior": ["diffusers", "StableCascadeUNet"],
            "scheduler": ["diffusers", "DDPMWuerstchenScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizerFast"],
        },
    )

    tiny_stage_b(hidden, (16, 32)).save_pretrained(decoder_dir / "decoder", safe_serialization=True)
    tiny_stage_b(hidden, (16, 24)).save_pretrained(decoder_dir / "decoder_lite", safe_serialization=True)
    vqgan = PaellaVQModel(bottleneck_blocks=1, embed_dim=32, num_vq_embeddings=16)
    vqgan.save_pretrained(decoder_dir / "vqgan", safe_serialization=True)
    CLIPTextModelWithProjection(text_config).save_pretrained(decoder_dir / "text_encoder")
    save_tokenizer(tokenizer, decoder_dir / "tokenizer", vocab)
    DDPMWuerstchenScheduler().save_pretrained(decoder_dir / "scheduler")
    write_model_index(
        decoder_dir,
        {
            "_class_name": "StableCascadeDecoderPipeline",
            "latent_dim_scale": 10.67,
            "decoder": ["diffusers", "StableCascadeUNet"],
            "scheduler": ["diffusers", "DDPMWuerstchenScheduler"],
            "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizerFast"],
            "vqgan": ["diffusers", "PaellaVQModel"],
        },
    )
    effnet = EfficientNetEncoder(affine=False)
    state = {k: v.contiguous() for k, v in effnet.state_dict().items()}
    save_file(state, str(decoder_dir / "effnet_encoder.safetensors"))


COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ((96, 96), (128, 96), (96, 128), (160, 90), (90, 160), (200, 120), (80, 80), (144, 112))


def make_data(out: Path, rng: random.Random, count: int = 20) -> None:
    """A toy captioned image set: a coloured shape on a coloured background, several sizes."""
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    names = list(COLOURS)
    records = []
    for i in range(count):
        shape = SHAPES[i % len(SHAPES)]
        fg, bg = rng.sample(names, 2)
        width, height = SIZES[i % len(SIZES)]
        image = Image.new("RGB", (width, height), COLOURS[bg])
        draw = ImageDraw.Draw(image)
        side = int(min(width, height) * rng.uniform(0.4, 0.7))
        left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        box = (left, top, left + side, top + side)
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[fg])
        elif shape == "square":
            draw.rectangle(box, fill=COLOURS[fg])
        else:
            draw.polygon([(left, top + side), (left + side, top + side), (left + side // 2, top)], fill=COLOURS[fg])
        file_name = f"{i:03d}_{fg}_{shape}.png"
        image.save(data_dir / file_name)
        records.append({"file_name": file_name, "text": f"a {fg} {shape} on a {bg} background"})
    (data_dir / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--only", choices=["sdxl", "wuerstchen", "cascade", "data"], action="append", help="default: all"
    )
    args = parser.parse_args()
    parts = args.only or ["sdxl", "wuerstchen", "cascade", "data"]
    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        vocab = write_clip_vocab(Path(tmp))
        if "sdxl" in parts:
            make_sdxl(out, vocab)
        if "wuerstchen" in parts:
            make_wuerstchen(out, vocab)
        if "cascade" in parts:
            # Its own seed: the assets made before it stay byte-identical with or without it.
            with torch.random.fork_rng():
                torch.manual_seed(args.seed + 3)
                make_stable_cascade(out, vocab)
    if "data" in parts:
        make_data(out, random.Random(args.seed))
    print(f"tiny assets written to {out}")


if __name__ == "__main__":
    main()
