"""The tiny Stable Cascade (Wuerstchen v3) prior and decoder repos."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from tiny_assets.clip import clip_text_config, clip_tokenizer, save_tokenizer, write_model_index


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

    from difftune.models.wuerstchen import EfficientNetEncoder

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
