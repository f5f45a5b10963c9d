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
import json
import random
import tempfile
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tiny_assets.cascade import make_stable_cascade
from tiny_assets.clip import EOS, clip_text_config, clip_tokenizer, save_tokenizer, write_clip_vocab, write_model_index
from tiny_assets.sgm import write_single_file


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


def make_wuerstchen(out: Path, vocab: tuple[Path, Path]) -> None:
    from diffusers import DDPMWuerstchenScheduler
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
    from transformers import CLIPTextModel

    from difftune.models.wuerstchen import EfficientNetEncoder

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
