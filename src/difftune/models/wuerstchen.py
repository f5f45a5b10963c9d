"""Wuerstchen v2: the stage-C prior, its frozen EfficientNet image encoder, and the full pipeline.

diffusers 0.42 keeps Wuerstchen in its deprecated corner, where `from_pretrained` on a
saved pipeline cannot resolve the model classes; so every component is loaded from its
subfolder with its own class and the pipeline is assembled here. This works alike for the
Hub repos (warp-ai/wuerstchen-prior, warp-ai/wuerstchen) and for local copies of them.

What differs between the generations (loading, the image target, the text conditioning, the prior's
call, the pipeline) sits behind `PriorFamily`, whose defaults are v2's; Stable Cascade overrides them
(difftune.models.cascade), and difftune.models.priors picks one by the class the prior folder's config names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from difftune.cli.errors import UserError
from difftune.storage.hub import fetch_file, looks_like_hub_id, read_model_index

PRIOR_PIPELINE = "WuerstchenPriorPipeline"
DECODER_PIPELINE = "WuerstchenDecoderPipeline"
DEFAULT_DECODER = "warp-ai/wuerstchen"
DEFAULT_IMAGE_ENCODER = "dome272/wuerstchen/model_v2_stage_b.pt"
# EfficientNet embeddings are mapped to the prior's latent range by (x + 1) / 42.
EMBEDDING_SHIFT, EMBEDDING_SCALE = 1.0, 42.0
V2_ENCODER_HINT = "pass stage B's model_v2_stage_b.pt or a file with its effnet_state_dict keys"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class EfficientNetEncoder(nn.Module):
    """EfficientNetV2-S features and a 1x1 conv + BatchNorm to 16 channels (stage B's `effnet`).

    Stable Cascade's encoder (`effnet_encoder.safetensors`) has the same layout with a BatchNorm
    without affine weights (`affine=False`)."""

    def __init__(self, latent_channels: int = 16, affine: bool = True) -> None:
        super().__init__()
        from torchvision.models import efficientnet_v2_s

        self.backbone = efficientnet_v2_s(weights=None).features
        self.mapper = nn.Sequential(
            nn.Conv2d(1280, latent_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(latent_channels, affine=affine),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.mapper(self.backbone(images))


def image_embeddings(encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The prior's training target x0 for ImageNet-normalised images."""
    return encoder(pixel_values).add(EMBEDDING_SHIFT).div(EMBEDDING_SCALE)


def batch_image_embeddings(batch: dict, encoder: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """x0 for a batch: cached, or encoded now."""
    if "image_embeds" in batch:
        return batch["image_embeds"].to(dtype)
    return image_embeddings(encoder, batch["pixel_values"].float()).to(dtype)  # (the encoder runs in fp32)


def batch_text_embeddings(batch: dict, text_encoder: nn.Module) -> torch.Tensor:
    """The prior's text conditioning (last hidden state): cached, or encoded now."""
    if "prompt_embeds" in batch:
        return batch["prompt_embeds"]
    out = text_encoder(batch["prior_input_ids"], attention_mask=batch["prior_attention_mask"])
    return out.last_hidden_state


def cache_encodings(
    accelerator, args, prior: PriorComponents, encoder: nn.Module, dataset, dtype: torch.dtype, family=None
) -> None:
    """Build (or reuse) the image- and text-embedding caches the flags ask for; point the dataset at them."""
    from difftune.data import cache

    family = family or V2
    base = {"prior": args.pretrained_prior_model_name_or_path, "revision": args.revision, "variant": args.variant}
    if family is not V2:  # v2 caches keep their former fingerprints
        base["prior_subfolder"] = args.prior_subfolder
    if args.cache_image_embeddings:

        def encode_images(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
            pixels = pixels.to(accelerator.device, torch.float32)  # (the encoder runs in fp32; stored in dtype)
            return {"image_embeds": family.image_embeddings(encoder, pixels).to(dtype)}

        fields = {**base, "encoder": args.image_encoder_path, "dtype": str(dtype), "encoder_dtype": "float32"}
        kind = f"{family.name}-image"
        cache.cache_images(
            accelerator, args, dataset, kind, fields, encode_images, ["image_embeds"], "image embeddings"
        )
    if args.cache_text_embeddings:

        def encode_text(tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return family.encode_text(tokens, prior.text_encoder)

        fields = {**base, "dtype": str(prior.text_encoder.dtype)}
        kind = f"{family.name}-text"
        cache.cache_texts(accelerator, args, dataset, kind, fields, encode_text, list(family.text_fields))


def _read_encoder_state(path: str) -> dict[str, torch.Tensor]:
    local = Path(path).expanduser()
    if not local.exists():
        parts = path.split("/")
        if len(parts) < 3 or not looks_like_hub_id("/".join(parts[:2])):
            raise UserError(
                f"--image_encoder_path {path} does not exist: pass a .safetensors or .pt file "
                "(or a Hub file as org/repo/filename)"
            )
        from difftune.storage.hub import fetch_file

        local = fetch_file("/".join(parts[:2]), "/".join(parts[2:]), None, "--image_encoder_path")
    if local.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(local))
    if local.suffix in {".pt", ".pth", ".bin", ".ckpt"}:
        try:
            state = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001
            raise UserError(f"--image_encoder_path {path} cannot be read safely (weights only): {error}") from None
        return state.get("effnet_state_dict", state) if isinstance(state, dict) else {}
    raise UserError(f"--image_encoder_path {path}: expected a .safetensors or .pt file")


def load_image_encoder(
    path: str,
    affine: bool = True,
    hint: str = "pass stage B's model_v2_stage_b.pt or a file with its effnet_state_dict keys",
) -> EfficientNetEncoder:
    """The frozen EfficientNet encoder, in eval mode, from stage B's `effnet_state_dict` or safetensors."""
    state = _read_encoder_state(path)
    encoder = EfficientNetEncoder(affine=affine)
    expected = set(encoder.state_dict())
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(
            f"--image_encoder_path {path} is not an EfficientNetV2-S {'Wuerstchen' if affine else 'Stable Cascade'} "
            f"image encoder ({len(missing)} keys missing, e.g. {missing[:1]}; {len(unexpected)} unexpected, "
            f"e.g. {unexpected[:1]}): {hint}"
        )
    encoder.load_state_dict(state)
    return encoder.eval().requires_grad_(False)


@dataclass
class PriorComponents:
    tokenizer: object
    text_encoder: nn.Module
    prior: nn.Module
    scheduler: object


def load_prior(
    path: str, revision: str | None = None, variant: str | None = None, subfolder: str = "prior"
) -> PriorComponents:
    """The prior repo's components, each by subfolder (see the module docstring)."""
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior
    from transformers import AutoTokenizer, CLIPTextModel

    read_model_index(path, revision, "--pretrained_prior_model_name_or_path", PRIOR_PIPELINE)
    return PriorComponents(
        tokenizer=AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision, variant=variant),
        prior=WuerstchenPrior.from_pretrained(path, subfolder=subfolder, revision=revision, variant=variant),
        scheduler=DDPMWuerstchenScheduler.from_pretrained(path, subfolder="scheduler", revision=revision),
    )


def load_decoder(
    path: str, revision: str | None = None, variant: str | None = None, subfolder: str = "decoder"
) -> dict[str, object]:
    """The decoder repo's components (stage B and A), by subfolder, as pipeline keyword arguments."""
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt
    from transformers import AutoTokenizer, CLIPTextModel

    read_model_index(path, revision, "--pretrained_decoder_model_name_or_path", DECODER_PIPELINE)
    return {
        "tokenizer": AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision),
        "text_encoder": CLIPTextModel.from_pretrained(
            path, subfolder="text_encoder", revision=revision, variant=variant
        ),
        "decoder": WuerstchenDiffNeXt.from_pretrained(path, subfolder=subfolder, revision=revision, variant=variant),
        "vqgan": PaellaVQModel.from_pretrained(path, subfolder="vqgan", revision=revision, variant=variant),
        "scheduler": DDPMWuerstchenScheduler.from_pretrained(path, subfolder="scheduler", revision=revision),
    }


def build_combined_pipeline(prior: PriorComponents, decoder: dict[str, object]):
    """A WuerstchenCombinedPipeline (prior + decoder) from loaded components."""
    from diffusers import WuerstchenCombinedPipeline

    return WuerstchenCombinedPipeline(
        **decoder,
        prior_tokenizer=prior.tokenizer,
        prior_text_encoder=prior.text_encoder,
        prior_prior=prior.prior,
        prior_scheduler=prior.scheduler,
    )


def decodable_size(pipe, size: int) -> int:
    """`size` if the combined pipeline can generate it, else the nearest multiple of 64 it can (ties: the larger).

    The prior makes ceil(size / resolution_multiple) embeddings a side and the decoder's latent is int(that *
    latent_dim_scale), which its patching and down-sampling must divide: at 192 the latent is 53 and the decoder's
    PixelUnshuffle(2) rejects it (the real decoder needs a multiple of 16, which multiples of 128 give).
    """
    decoder = pipe.decoder_pipe.decoder.config
    levels = getattr(decoder, "c_hidden", None) or decoder.block_out_channels  # v2 / Stable Cascade
    divisor = decoder.patch_size * 2 ** (len(levels) - 1)

    def decodable(side: int) -> bool:
        embeddings = math.ceil(side / pipe.prior_pipe.config.resolution_multiple)
        return int(embeddings * pipe.decoder_pipe.config.latent_dim_scale) % divisor == 0

    if decodable(size):
        return size
    candidates = [side for side in range(64, 4 * size + 64, 64) if decodable(side)]
    return min(candidates, key=lambda side: (abs(side - size), -side), default=size)


def save_diffusers_lora(directory: Path, adapters: dict[str, tuple[dict, dict[str, torch.Tensor]]]) -> None:
    """pytorch_lora_weights.safetensors for `load_lora_weights`, from {"prior" / "text_encoder": (peft
    LoraConfig as a dict, adapter weights with bare module names)}.

    The configs go in as diffusers' adapter metadata: without lora_alpha diffusers loads at scale 1, not alpha / r.
    """
    from diffusers import WuerstchenPriorPipeline

    prior_config, prior_weights = adapters["prior"]
    text_config, text_weights = adapters.get("text_encoder", (None, None))
    WuerstchenPriorPipeline.save_lora_weights(
        directory,
        unet_lora_layers=prior_weights,
        text_encoder_lora_layers=text_weights,
        unet_lora_adapter_metadata=prior_config,
        text_encoder_lora_adapter_metadata=text_config,
    )


class PriorFamily:
    """One generation of the Wuerstchen prior: Wuerstchen v2 (this class) or Stable Cascade (models.cascade)."""

    name = "wuerstchen"
    title = "Wuerstchen v2"
    prior_class, decoder_class = "WuerstchenPrior", "WuerstchenDiffNeXt"
    prior_pipeline, decoder_pipeline = PRIOR_PIPELINE, DECODER_PIPELINE
    default_decoder, default_image_encoder = DEFAULT_DECODER, DEFAULT_IMAGE_ENCODER
    text_fields: tuple[str, ...] = ("prompt_embeds",)

    def load_prior(self, path: str, subfolder: str, revision: str | None, variant: str | None) -> PriorComponents:
        return load_prior(path, revision, variant, subfolder)

    def sampling_side(self, pipe, resolution: int) -> int:
        """The pipeline's height / width for a run trained at `resolution` (v2 samples at it)."""
        return resolution

    def load_decoder(self, path: str, subfolder: str, revision: str | None, variant: str | None) -> dict[str, object]:
        return load_decoder(path, revision, variant, subfolder)

    def load_image_encoder(self, path: str) -> nn.Module:
        return load_image_encoder(path)

    def image_embeddings(self, encoder: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        return image_embeddings(encoder, pixel_values)

    def encode_text(self, batch: dict, text_encoder: nn.Module) -> dict[str, torch.Tensor]:
        """The prior's text conditioning, named as cached (`text_fields`)."""
        return {"prompt_embeds": batch_text_embeddings(batch, text_encoder)}

    def predict(self, prior: nn.Module, noisy: torch.Tensor, ratio: torch.Tensor, text: dict) -> torch.Tensor:
        """The prior's noise prediction at timestep ratios `ratio` in (0, 1)."""
        return prior(noisy, ratio, text["prompt_embeds"])

    def build_pipeline(self, prior: PriorComponents, decoder: dict[str, object]):
        return build_combined_pipeline(prior, decoder)

    def sampling_kwargs(self, decoder_steps: int) -> dict:
        from diffusers.pipelines.deprecated.wuerstchen import DEFAULT_STAGE_C_TIMESTEPS

        return {"prior_timesteps": DEFAULT_STAGE_C_TIMESTEPS, "num_inference_steps": decoder_steps}

    def check_decoder(self, path: str, subfolder: str, revision: str | None) -> None:
        """Refuse a decoder repo of the other generation before anything trains, from its config files only
        (model_index.json and `subfolder`/config.json; no weights are read)."""
        flag = "--pretrained_decoder_model_name_or_path"
        found = json.loads(fetch_file(path, "model_index.json", revision, flag).read_text()).get("_class_name")
        if found != self.decoder_pipeline:
            raise UserError(
                f"{flag} {path} is a {found} pipeline, but the prior is a {self.title} prior ({self.prior_class}): "
                f"pass a {self.decoder_pipeline} repo such as {self.default_decoder}"
            )
        config = fetch_file(path, f"{subfolder}/config.json", revision, f"{flag} (with --decoder_subfolder)")
        found = json.loads(config.read_text()).get("_class_name")
        if found != self.decoder_class:
            raise UserError(
                f"{flag} {path}: {subfolder}/ holds a {found}, not a {self.title} decoder ({self.decoder_class}): "
                f"pass a {self.title} decoder repo such as {self.default_decoder} and its decoder subfolder"
            )


V2 = PriorFamily()
