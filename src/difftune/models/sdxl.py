"""Stable Diffusion XL: loading the components, prompt encoding, size conditioning, the pipeline."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from difftune.cli.errors import UserError
from difftune.models import single_file
from difftune.storage.hub import fetch_file, read_model_index

SDXL_PIPELINE = "StableDiffusionXLPipeline"
logger = logging.getLogger("difftune")


@dataclass
class SDXLComponents:
    tokenizer_one: object
    tokenizer_two: object
    text_encoder_one: nn.Module
    text_encoder_two: nn.Module
    vae: nn.Module
    unet: nn.Module
    noise_scheduler: object
    inference_scheduler: object | None = None  # set for a single-file base (its config and markers)


def vae_location(value: str) -> str | None:
    """--pretrained_vae_model_name_or_path as a VAE model: None for "none" (the base's own), a local
    pipeline folder's vae/ subfolder, else as given."""
    if value.lower() == "none":
        return None
    if (Path(value) / "vae" / "config.json").is_file() and not (Path(value) / "config.json").is_file():
        logger.info("--pretrained_vae_model_name_or_path %s is a pipeline folder: using its vae/", value)
        return str(Path(value) / "vae")
    return value


def check_sources(path: str, vae_value: str, revision: str | None, single_file_config: str | None) -> None:
    """Every model location an SDXL run reads, checked before any weights load (their JSON files only), all that
    fail named in one message: the base (for a single file, its configs' folder) and the separate VAE."""
    checks = []
    if single_file.is_single_file(path):
        single_file.inspect(path)  # the file itself: readable, an SDXL checkpoint
        config = single_file_config or single_file.DEFAULT_CONFIG
        checks.append(("--single_file_config", config, "model_index.json", None))
    else:
        checks.append(("--pretrained_model_name_or_path", path, "model_index.json", revision))
    vae = vae_location(vae_value)
    if vae is not None:
        checks.append(("--pretrained_vae_model_name_or_path", vae, "config.json", None))
    problems = []
    for flag, name, filename, flag_revision in checks:
        try:
            fetch_file(name, filename, flag_revision, flag)
        except UserError as error:
            problems.append(str(error))
    if len(problems) > 1 and single_file.is_single_file(path):
        problems.append(
            "a single file needs its architecture's configs (--single_file_config: a local diffusers SDXL folder) "
            "and a VAE (--pretrained_vae_model_name_or_path: a local VAE, or none for the file's own)"
        )
    if problems:
        raise UserError("; ".join(problems))


def load_sdxl(
    path: str,
    vae_path: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    single_file_config: str | None = None,
) -> SDXLComponents:
    """The components of an SDXL pipeline repo (Hub id or local dir) or single file (configs from
    `single_file_config`), the VAE optionally from elsewhere."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    if single_file.is_single_file(path):
        return _from_single_file(path, single_file_config, separate_vae(vae_path))
    read_model_index(path, revision, "--pretrained_model_name_or_path", SDXL_PIPELINE)
    vae = separate_vae(vae_path)
    if vae is None:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, variant=variant)
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


def separate_vae(vae_path: str | None, torch_dtype: torch.dtype | None = None) -> nn.Module | None:
    """The VAE of --pretrained_vae_model_name_or_path, if one is given (checked first: one clear line if absent)."""
    from diffusers import AutoencoderKL

    if vae_path is None:
        return None
    fetch_file(vae_path, "config.json", None, "--pretrained_vae_model_name_or_path")
    return AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch_dtype)


def _from_single_file(path: str, config: str | None, vae: nn.Module | None) -> SDXLComponents:
    """The training components of a single file (see single_file.load_pipeline); its markers set the schedulers."""
    from diffusers import DDPMScheduler

    pipe, folder, info = single_file.load_pipeline(path, config, vae)
    overrides = single_file.scheduler_overrides(info)
    return SDXLComponents(
        tokenizer_one=pipe.tokenizer,
        tokenizer_two=pipe.tokenizer_2,
        text_encoder_one=pipe.text_encoder,
        text_encoder_two=pipe.text_encoder_2,
        vae=pipe.vae,
        unet=pipe.unet,
        noise_scheduler=DDPMScheduler.from_pretrained(folder, subfolder="scheduler", **overrides),
        inference_scheduler=pipe.scheduler,
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


def latents(batch: dict, vae: nn.Module, vae_dtype: torch.dtype) -> torch.Tensor:
    """Scaled VAE latents, sampled from the posterior: live, or from cached mean and std.

    The cached path draws its normal sample exactly as the VAE's posterior does, so both give
    the same latents for the same RNG state.
    """
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"].to(vae_dtype), batch["latent_std"].to(vae_dtype)
        sample = mean + std * torch.randn(mean.shape, device=mean.device, dtype=vae_dtype)
    else:
        sample = vae.encode(batch["pixel_values"].to(vae_dtype)).latent_dist.sample()
    return sample * vae.config.scaling_factor


def text_conditioning(batch: dict, text_encoder_one: nn.Module, text_encoder_two: nn.Module):
    """(prompt_embeds, pooled): cached, or encoded now."""
    if "prompt_embeds" in batch:
        return batch["prompt_embeds"], batch["pooled_prompt_embeds"]
    return encode_prompt(text_encoder_one, text_encoder_two, batch["one_input_ids"], batch["two_input_ids"])


def cache_encodings(accelerator, args, sd: SDXLComponents, dataset, vae_dtype: torch.dtype) -> None:
    """Build (or reuse) the latent and text caches the flags ask for and point the dataset at them."""
    from difftune.data import cache

    base = {"model": args.pretrained_model_name_or_path, "revision": args.revision, "variant": args.variant}
    if getattr(args, "base_model_sha256", None):
        base["sha256"] = args.base_model_sha256  # a changed file never reuses old encodings
    if args.cache_latents:

        def encode_images(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
            posterior = sd.vae.encode(pixels.to(accelerator.device, vae_dtype)).latent_dist
            return {"latent_mean": posterior.mean, "latent_std": posterior.std}

        fields = {**base, "vae": args.pretrained_vae_model_name_or_path, "dtype": str(vae_dtype)}
        names = ["latent_mean", "latent_std"]
        cache.cache_images(accelerator, args, dataset, "sdxl-latents", fields, encode_images, names, "latents")
    if args.cache_text_embeddings:

        def encode_text(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            embeds, pooled = encode_prompt(
                sd.text_encoder_one, sd.text_encoder_two, tokens["one_input_ids"], tokens["two_input_ids"]
            )
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

        fields = {**base, "dtype": str(sd.text_encoder_one.dtype)}
        names = ["prompt_embeds", "pooled_prompt_embeds"]
        cache.cache_texts(accelerator, args, dataset, "sdxl-text", fields, encode_text, names)


def build_pipeline(
    components: SDXLComponents,
    path: str,
    revision: str | None = None,
    prediction_type: str | None = None,
    **models: nn.Module,
):
    """A StableDiffusionXLPipeline over loaded components (the repo's own inference scheduler, sampling
    `prediction_type` when given). `models` replaces components by name, e.g. unet=<unet with its adapter>.
    """
    from diffusers import StableDiffusionXLPipeline

    own = components.inference_scheduler
    own = own.from_config(own.config) if own is not None else inference_scheduler(path, revision)
    scheduler = with_prediction_type(own, prediction_type)
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


def num_train_timesteps(path: str, revision: str | None = None) -> int:
    """The length of the training noise schedule, from the repo's scheduler config (no model loaded)."""
    config_path = fetch_file(path, "scheduler/scheduler_config.json", revision, "--pretrained_model_name_or_path")
    return json.loads(config_path.read_text()).get("num_train_timesteps", 1000)


def inference_scheduler(path: str, revision: str | None = None):
    """The scheduler class and config the repo ships for sampling (EulerDiscrete for SDXL base)."""
    import diffusers

    config_path = fetch_file(path, "scheduler/scheduler_config.json", revision, "--pretrained_model_name_or_path")
    config = json.loads(config_path.read_text())
    scheduler_class = getattr(diffusers, config.get("_class_name", "EulerDiscreteScheduler"))
    return scheduler_class.from_config(config)


def with_prediction_type(scheduler, prediction_type: str | None):
    """The sampling scheduler for a model trained with --prediction_type (None: the base model's, unchanged)."""
    if prediction_type is None:
        return scheduler
    return scheduler.from_config(scheduler.config, prediction_type=prediction_type)
