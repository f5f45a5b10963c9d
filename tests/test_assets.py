"""The tiny assets load like the real Hub repos and tokenize like the real CLIP tokenizer."""

import json

from PIL import Image


def test_sdxl_layout_and_pipeline(assets):
    from diffusers import StableDiffusionXLPipeline

    sdxl = assets / "sdxl"
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert (sdxl / sub).is_dir(), sub
    assert json.loads((sdxl / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl)
    assert pipe.vae_scale_factor == 8
    # Real CLIP ids for "a photo of a cat"; SDXL's second tokenizer pads with "!" (id 0).
    assert pipe.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert pipe.tokenizer_2.pad_token_id == 0 and pipe.tokenizer.pad_token_id == 49407
    assert (sdxl / "tokenizer" / "vocab.json").is_file() and (sdxl / "tokenizer" / "merges.txt").is_file()
    assert len(pipe.tokenizer) == 49408
    image = pipe("a cat", num_inference_steps=2, height=64, width=64).images[0]
    assert image.size == (64, 64)


def test_fp16_fix_vae_is_a_plain_vae_repo(assets):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(assets / "sdxl-vae-fp16-fix")
    assert vae.config.force_upcast is False


def test_toy_data(assets):
    lines = (assets / "data" / "metadata.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) >= 16
    sizes = {Image.open(assets / "data" / r["file_name"]).size for r in records}
    assert any(w != h for w, h in sizes) and len(sizes) >= 4
    assert all(r["text"].startswith("a ") for r in records)


def test_assets_are_deterministic(assets, tmp_path):
    import subprocess
    import sys

    from conftest import SCRIPTS

    subprocess.run(
        [sys.executable, str(SCRIPTS / "make_tiny_assets.py"), str(tmp_path), "--only", "data"],
        check=True,
        capture_output=True,
    )
    built = sorted(p.relative_to(assets / "data") for p in (assets / "data").rglob("*") if p.is_file())
    again = sorted(p.relative_to(tmp_path / "data") for p in (tmp_path / "data").rglob("*") if p.is_file())
    assert built == again and len(built) >= 17  # metadata.jsonl and every image
    for name in built:
        assert (tmp_path / "data" / name).read_bytes() == (assets / "data" / name).read_bytes(), name


def test_stable_cascade_layout(assets):
    from safetensors import safe_open

    prior, decoder = assets / "stable-cascade-prior", assets / "stable-cascade"
    for sub in ("prior", "prior_lite", "text_encoder", "tokenizer", "scheduler", "image_encoder", "feature_extractor"):
        assert (prior / sub).is_dir(), sub
    for sub in ("decoder", "decoder_lite", "vqgan", "text_encoder", "tokenizer", "scheduler"):
        assert (decoder / sub).is_dir(), sub
    assert json.loads((prior / "model_index.json").read_text())["_class_name"] == "StableCascadePriorPipeline"
    assert json.loads((decoder / "model_index.json").read_text())["_class_name"] == "StableCascadeDecoderPipeline"
    assert json.loads((prior / "prior" / "config.json").read_text())["_class_name"] == "StableCascadeUNet"
    # Stable Cascade's effnet_encoder.safetensors: EfficientNetV2-S features, then a 1x1 conv and a BatchNorm
    # without affine weights (running statistics only).
    with safe_open(str(decoder / "effnet_encoder.safetensors"), "pt") as file:
        keys = set(file.keys())
    assert {"backbone.0.0.weight", "mapper.0.weight", "mapper.1.running_mean", "mapper.1.running_var"} <= keys
    assert "mapper.1.weight" not in keys and "mapper.1.bias" not in keys
