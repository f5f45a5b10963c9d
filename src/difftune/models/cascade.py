"""Stable Cascade (Wuerstchen v3): stage C as the prior family that train_wuerstchen_lora.py trains.

The prior is diffusers' `StableCascadeUNet` (stabilityai/stable-cascade-prior, subfolder prior or
prior_lite). It is conditioned on CLIP-G (`CLIPTextModelWithProjection`): the last layer's hidden states
as `clip_text` (what StableCascadePriorPipeline feeds it: `hidden_states[-1]`), `text_embeds` as
`clip_text_pooled` (B, 1, C), and zeros as `clip_img` for text-to-image. Its target is the EfficientNet
encoding as is (Stable Cascade's encoder ends in a BatchNorm without affine weights; no (x + 1) / 42).
The decoder repo (stabilityai/stable-cascade) names PaellaVQModel under "diffusers", which diffusers 0.42
cannot resolve from its deprecated corner: as for v2, every component is loaded by subfolder.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from difftune.models.wuerstchen import PriorComponents, PriorFamily, load_image_encoder
from difftune.storage.hub import read_model_index

PRIOR_PIPELINE = "StableCascadePriorPipeline"
DECODER_PIPELINE = "StableCascadeDecoderPipeline"
DEFAULT_DECODER = "stabilityai/stable-cascade"
DEFAULT_IMAGE_ENCODER = "stabilityai/stable-cascade/effnet_encoder.safetensors"
# Stability's sampling setting for stage C (the pipeline's own default is 60 steps).
PRIOR_STEPS = 20


EFFNET_STRIDE = 32  # EfficientNet-V2-S features: 5 stride-2 stages


class CascadeFamily(PriorFamily):
    name = "cascade"
    title = "Stable Cascade"
    prior_class = decoder_class = "StableCascadeUNet"  # stage C and stage B are the same diffusers class
    prior_pipeline, decoder_pipeline = PRIOR_PIPELINE, DECODER_PIPELINE
    default_decoder, default_image_encoder = DEFAULT_DECODER, DEFAULT_IMAGE_ENCODER
    text_fields = ("prompt_embeds", "pooled_prompt_embeds")

    def load_prior(self, path: str, subfolder: str, revision: str | None, variant: str | None) -> PriorComponents:
        from diffusers import DDPMWuerstchenScheduler, StableCascadeUNet
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        read_model_index(path, revision, "--pretrained_prior_model_name_or_path", PRIOR_PIPELINE)
        return PriorComponents(
            tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
            text_encoder=CLIPTextModelWithProjection.from_pretrained(
                path, subfolder="text_encoder", revision=revision, variant=variant
            ),
            prior=StableCascadeUNet.from_pretrained(path, subfolder=subfolder, revision=revision, variant=variant),
            scheduler=DDPMWuerstchenScheduler.from_pretrained(path, subfolder="scheduler", revision=revision),
        )

    def load_decoder(self, path: str, subfolder: str, revision: str | None, variant: str | None) -> dict[str, object]:
        from diffusers import DDPMWuerstchenScheduler, StableCascadeUNet
        from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection

        read_model_index(path, revision, "--pretrained_decoder_model_name_or_path", DECODER_PIPELINE)
        kwargs = {"revision": revision, "variant": variant}
        return {
            "tokenizer": AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
            "text_encoder": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", **kwargs),
            "decoder": StableCascadeUNet.from_pretrained(path, subfolder=subfolder, **kwargs),
            "vqgan": PaellaVQModel.from_pretrained(path, subfolder="vqgan", **kwargs),
            "scheduler": DDPMWuerstchenScheduler.from_pretrained(path, subfolder="scheduler", revision=revision),
        }

    def load_image_encoder(self, path: str) -> nn.Module:
        return load_image_encoder(
            path, affine=False, hint="pass stabilityai/stable-cascade's effnet_encoder.safetensors"
        )

    def image_embeddings(self, encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return encoder(pixel_values)

    def sampling_side(self, pipe, resolution: int) -> int:
        """The pipeline's height / width whose prior latent is the one trained on: EfficientNet makes
        ceil(resolution / 32) a side (768 px: 24), the prior pipeline ceil(side / resolution_multiple), so the
        largest side giving the same latent (24 x 42.67: 1024 px, the size Stability's trainer previews at)."""
        latent = math.ceil(resolution / EFFNET_STRIDE)
        return math.floor(latent * pipe.prior_pipe.config.resolution_multiple)

    def encode_text(self, batch: dict, text_encoder: nn.Module) -> dict[str, torch.Tensor]:
        if "prompt_embeds" in batch:
            return {name: batch[name] for name in self.text_fields}
        out = text_encoder(
            batch["prior_input_ids"], attention_mask=batch["prior_attention_mask"], output_hidden_states=True
        )
        return {"prompt_embeds": out.hidden_states[-1], "pooled_prompt_embeds": out.text_embeds[:, None]}

    def predict(self, prior: nn.Module, noisy: torch.Tensor, ratio: torch.Tensor, text: dict) -> torch.Tensor:
        clip_text = text["prompt_embeds"]
        # Text-to-image: no image prompt, so the CLIP image embedding is zeros (as the pipeline does).
        channels = _config(prior).clip_image_in_channels
        clip_img = clip_text.new_zeros(clip_text.shape[0], 1, channels)
        return prior(
            noisy, ratio, clip_text_pooled=text["pooled_prompt_embeds"], clip_text=clip_text, clip_img=clip_img,
            return_dict=False,
        )[0]  # fmt: skip

    def build_pipeline(self, prior: PriorComponents, decoder: dict[str, object]):
        from diffusers import StableCascadeCombinedPipeline

        return StableCascadeCombinedPipeline(
            **decoder,
            prior_tokenizer=prior.tokenizer,
            prior_text_encoder=prior.text_encoder,
            prior_prior=prior.prior,
            prior_scheduler=prior.scheduler,
        )

    def sampling_kwargs(self, decoder_steps: int) -> dict:
        return {"prior_num_inference_steps": PRIOR_STEPS, "num_inference_steps": decoder_steps}


def _config(model: nn.Module):
    """The diffusers config of a model, through peft / DDP wrappers."""
    while not hasattr(model, "config") or not hasattr(model.config, "clip_image_in_channels"):
        model = model.module if hasattr(model, "module") else model.get_base_model()
    return model.config


CASCADE = CascadeFamily()
