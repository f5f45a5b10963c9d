"""Stable Diffusion XL: loading the components, prompt encoding, size conditioning, the pipeline."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from torch import nn

from difftune.hub import fetch_file, read_model_index

SDXL_PIPELINE = "StableDiffusionXLPipeline"


@dataclass
class SDXLComponents:
    tokenizer_one: object
    tokenizer_two: object
    text_encoder_one: nn.Module
    text_encoder_two: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: object


def load_sdxl(
    path: str, vae_path: str | None = None, revision: str | None = None, variant: str | None = None
) -> SDXLComponents:
    """The components of an SDXL pipeline repo (Hub id or local dir), the VAE optionally from elsewhere."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    read_model_index(path, revision, "--pretrained_model_name_or_path", SDXL_PIPELINE)
    if vae_path is None:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, variant=variant)
    else:
        fetch_file(vae_path, "config.json", None, "--pretrained_vae_model_name_or_path")
        vae = AutoencoderKL.from_pretrained(vae_path)
    return SDXLComponents(
        tokenizer_one=AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
        tokenizer_two=AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=revision),
        text_encoder_one=CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", revision=revision, variant=variant
        ),
        text_encoder_two=CLIPTextModelWithProjection.from_pretrained(
            path, subfolder="text_encoder_2", revision=revision, variant=variant
        ),
        vae=vae,
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision, variant=variant),
        noise_scheduler=DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision),
    )


def encode_prompt(
    text_encoder_one: nn.Module,
    text_encoder_two: nn.Module,
    input_ids_one: torch.Tensor,
    input_ids_two: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL text conditioning: both encoders' penultimate hidden states, concatenated; pooled from the second."""
    out_one = text_encoder_one(input_ids_one, output_hidden_states=True)
    out_two = text_encoder_two(input_ids_two, output_hidden_states=True)
    prompt_embeds = torch.cat([out_one.hidden_states[-2], out_two.hidden_states[-2]], dim=-1)
    return prompt_embeds, out_two.text_embeds


def build_pipeline(components: SDXLComponents, path: str, revision: str | None = None, **models: nn.Module):
    """A StableDiffusionXLPipeline over loaded components (the repo's own inference scheduler).

    `models` replaces components by name, e.g. unet=<unet with its adapter>.
    """
    from diffusers import StableDiffusionXLPipeline

    scheduler = inference_scheduler(path, revision)
    parts = {
        "vae": components.vae,
        "text_encoder": components.text_encoder_one,
        "text_encoder_2": components.text_encoder_two,
        "tokenizer": components.tokenizer_one,
        "tokenizer_2": components.tokenizer_two,
        "unet": components.unet,
        "scheduler": scheduler,
    }
    parts.update(models)
    return StableDiffusionXLPipeline(**parts)


def inference_scheduler(path: str, revision: str | None = None):
    """The scheduler class and config the repo ships for sampling (EulerDiscrete for SDXL base)."""
    import diffusers

    config_path = fetch_file(path, "scheduler/scheduler_config.json", revision, "--pretrained_model_name_or_path")
    config = json.loads(config_path.read_text())
    scheduler_class = getattr(diffusers, config.get("_class_name", "EulerDiscreteScheduler"))
    return scheduler_class.from_config(config)
