"""export.py --format checkpoint: the merged single file loads in from_single_file with peft's merged weights."""

import numpy as np
import pytest
import torch
from conftest import run_script
from helpers import sdxl_args
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from difftune.formats import kohya, merged_checkpoint

TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv_shortcut,proj_in,ff.net.2"


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
    """Split factors, alpha != rank, convs, both text encoders (q/k/v of OpenCLIP go into its fused in_proj)."""
    out = tmp_path_factory.mktemp("merge") / "run"
    flags = ("--train_text_encoder", "--rank", "2", "--alpha", "6", "--decompose_both", "--target_modules", TARGETS)
    assert run_script("train_sdxl_lokr", sdxl_args(assets, out, *flags, steps=1, lr="1e-2", checkpointing_steps=1)) == 0
    return out / "step1"


def peft_merged(checkpoint, assets) -> dict[str, dict[str, torch.Tensor]]:
    """Each model's weights after peft's own merge_and_unload."""
    from diffusers import UNet2DConditionModel
    from peft import PeftModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    bases = {
        "unet": UNet2DConditionModel.from_pretrained(assets / "sdxl", subfolder="unet"),
        "text_encoder": CLIPTextModel.from_pretrained(assets / "sdxl", subfolder="text_encoder"),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(assets / "sdxl", subfolder="text_encoder_2"),
    }
    folders = {"unet": "unet", "text_encoder": "text_encoder_one", "text_encoder_2": "text_encoder_two"}
    return {
        name: PeftModel.from_pretrained(base, checkpoint / folders[name]).merge_and_unload().state_dict()
        for name, base in bases.items()
    }


def load_single_file(path, assets):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_single_file(str(path), config=str(assets / "sdxl"), local_files_only=True)


def test_merged_checkpoint_equals_peft_merge_and_infer_fuse(run, assets, tmp_path, run_main):
    out = tmp_path / "merged.safetensors"
    assert run_main("export", ["--checkpoint", run, "--out", out, "--format", "checkpoint", "--dtype", "fp32"]) == 0
    pipe = load_single_file(out, assets)
    expected = peft_merged(run, assets)
    for name, state in expected.items():
        got = getattr(pipe, name).state_dict()
        assert got.keys() >= state.keys()
        for key, value in state.items():
            torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-6, msg=f"{name}.{key}")
    # The merge is not trivial: adapted weights differ from the base's (text encoder 2's fused q/k/v included).
    base_te2 = load_file(assets / "sdxl" / "text_encoder_2" / "model.safetensors")
    key = "text_model.encoder.layers.0.self_attn.k_proj.weight"
    base_k = base_te2.get(key, base_te2.get(key.removeprefix("text_model.")))
    assert not torch.allclose(base_k, expected["text_encoder_2"][key])
    # The run's VAE (the fp16-fix one) is in the file.
    vae = load_file(assets / "sdxl-vae-fp16-fix" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(pipe.vae.state_dict()[k], v) for k, v in vae.items())

    # Its image equals infer.py --fuse's (same prompt, seed, steps and size).
    argv = ["--checkpoint", run, "--prompt", "a red circle", "--num_inference_steps", "3", "--fuse"]
    assert run_main("infer", [*argv, "--output_dir", tmp_path / "fused"]) == 0
    image = pipe("a red circle", num_inference_steps=3, height=64, width=64, generator=torch.manual_seed(0)).images[0]
    fused = np.asarray(Image.open(tmp_path / "fused" / "00_a-red-circle_00.png"), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - fused).max() <= 1


def test_fp16_default_and_a_single_file_base_keeps_its_markers(run, assets, tmp_path, run_main):
    """From a v_pred / ztsnr single file (its path given to export.py): fp16, the markers kept, weights = peft's."""
    state = load_file(assets / "sdxl.safetensors")
    state.update({"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    base = tmp_path / "vpred.safetensors"
    save_file(state, base)
    out = tmp_path / "merged16.safetensors"
    argv = ["--checkpoint", run, "--out", out, "--format", "checkpoint", "--pretrained_model_name_or_path", base]
    argv += ["--single_file_config", assets / "sdxl"]
    assert run_main("export", argv) == 0
    with safe_open(str(out), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    assert {"v_pred", "ztsnr"} <= keys
    pipe = load_single_file(out, assets)
    for name, expected in peft_merged(run, assets).items():
        got = getattr(pipe, name).state_dict()
        for key, value in expected.items():
            torch.testing.assert_close(got[key].float(), value, atol=1e-3, rtol=1e-3, msg=f"{name}.{key}")


def unet_deltas(checkpoint, assets) -> dict[str, torch.Tensor]:
    """Output key -> peft's own delta, for every adapted UNet weight."""
    import json

    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    from difftune.models import sgm_layout

    unet = UNet2DConditionModel.from_pretrained(assets / "sdxl", subfolder="unet")
    peft_unet = PeftModel.from_pretrained(unet, checkpoint / "unet")
    unet_config = json.loads((assets / "sdxl" / "unet" / "config.json").read_text())
    with torch.no_grad():
        return {
            sgm_layout.unet_key(name + ".weight", unet_config): module.get_delta_weight("default")
            for name, module in peft_unet.base_model.model.named_modules()
            if hasattr(module, "lokr_w1") and module.scaling
        }


@pytest.mark.parametrize(
    ("base_dtype", "out_dtype", "rtol"),
    # rtol: the written dtype's rounding (fp16: half an ulp is 2^-11 of the value; fp32: about 6e-8), with room for
    # the order of the fp32 sums. A merge done in fp8 or bf16 would be off by 2^-4 or 2^-8.
    [("fp8", "fp16", 2**-10), ("bf16", "fp32", 1e-6)],
)
def test_fp8_and_bf16_single_file_bases(run, assets, tmp_path, run_main, base_dtype, out_dtype, rtol):
    """A base in fp8 (the UNet's weights float8_e4m3fn, the rest fp16, as weight-only fp8 files are) or bf16:
    merged in fp32 and written in --dtype, the fp8 tensors the adapter does not touch copied byte for byte."""
    state = load_file(assets / "sdxl.safetensors")
    for key, value in state.items():
        if base_dtype == "bf16":
            state[key] = value.to(torch.bfloat16)
        elif key.startswith("model.diffusion_model.") and value.dim() >= 2:
            state[key] = value.to(torch.float8_e4m3fn)
        else:
            state[key] = value.to(torch.float16)
    base = tmp_path / f"{base_dtype}.safetensors"
    save_file(state, base)
    out = tmp_path / "merged.safetensors"
    argv = ["--checkpoint", run, "--out", out, "--format", "checkpoint", "--pretrained_model_name_or_path", base]
    assert run_main("export", [*argv, "--single_file_config", assets / "sdxl", "--dtype", out_dtype]) == 0
    written = load_file(out)
    deltas = unet_deltas(run, assets)
    asked = {"fp16": torch.float16, "fp32": torch.float32}[out_dtype]
    # The text encoders' adapted weights (fp16 / bf16 in the base) are checked against peft by the tests above.
    adapters = {m: kohya.read_peft_adapter(run / m) for m in ("text_encoder_one", "text_encoder_two")}
    text_merged = set(merged_checkpoint.patches(adapters, {}))
    assert text_merged and not text_merged & set(deltas)
    untouched_fp8 = 0
    for key, value in state.items():
        if key.startswith("first_stage_model."):  # replaced by the run's VAE (checked above)
            continue
        got = written[key]
        if key in deltas:  # merged: base (in fp32) + peft's delta, rounded once to --dtype
            expected = value.float() + deltas[key]
            assert got.dtype == asked, key
            torch.testing.assert_close(got.float(), expected, rtol=rtol, atol=1e-7, msg=key)
        elif key in text_merged:
            assert got.dtype == asked, key
        elif value.dtype == torch.float8_e4m3fn:
            assert got.dtype == value.dtype and torch.equal(got.view(torch.uint8), value.view(torch.uint8)), key
            untouched_fp8 += 1
        else:
            assert got.dtype == asked and torch.equal(got, value.to(asked)), key
    assert len(deltas) >= 10
    if base_dtype == "fp8":
        assert untouched_fp8 >= 10 and all(state[k].dtype == torch.float8_e4m3fn for k in deltas)
