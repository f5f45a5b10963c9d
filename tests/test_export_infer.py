"""infer.py and export.py: same images as the users' snippets, kohya deltas equal to peft's, key round trip."""

import argparse
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_script
from helpers import sdxl_args, wuerstchen_args
from PIL import Image
from safetensors.torch import load_file

from difftune import adapters, export

CONV_AND_LINEAR = "to_q,to_k,to_v,to_out.0,conv1,conv2,conv_shortcut,proj_in,ff.net.2"


@pytest.fixture(scope="module")
def sdxl_checkpoint(assets, tmp_path_factory):
    """A trained SDXL run: split factors (rank 2, decompose_both), alpha != rank, convs, both text encoders."""
    out = tmp_path_factory.mktemp("sdxl") / "run"
    argv = sdxl_args(
        assets, out, "--train_text_encoder", "--rank", "2", "--alpha", "6", "--decompose_both",
        "--target_modules", CONV_AND_LINEAR, "--use_ema", "--ema_decay", "0.5", steps=4, lr="1e-2",
    )  # fmt: skip
    assert run_script("train_sdxl_lokr", argv) == 0
    return out / "step4"


@pytest.fixture(scope="module")
def wuerstchen_checkpoint(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("wuerstchen") / "run"
    argv = wuerstchen_args(
        assets, out, "--target_modules", "to_q,to_k,to_v,to_out.0,out.1", "--use_ema", steps=4, lr="1e-2"
    )
    assert run_script("train_wuerstchen_lora", argv) == 0
    return out / "step4"


def comfyui_delta(state: dict, name: str, shape: torch.Size) -> torch.Tensor:
    """ComfyUI's / A1111's LoKr rule: strength * s * kron(w1, w2), s = alpha / dim only if alpha and a split factor."""
    get = state.get
    w1 = get(f"{name}.lokr_w1")
    if w1 is None:
        w1 = get(f"{name}.lokr_w1_a") @ get(f"{name}.lokr_w1_b")
    w2 = get(f"{name}.lokr_w2")
    if w2 is None:
        w2 = get(f"{name}.lokr_w2_a") @ get(f"{name}.lokr_w2_b")
    dim = None
    if get(f"{name}.lokr_w2_b") is not None:
        dim = get(f"{name}.lokr_w2_b").shape[0]
    elif get(f"{name}.lokr_w1_b") is not None:
        dim = get(f"{name}.lokr_w1_b").shape[0]
    alpha = get(f"{name}.alpha")
    scale = alpha.item() / dim if alpha is not None and dim is not None else 1.0
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return scale * torch.kron(w1, w2).reshape(shape)


def peft_models_from(checkpoint, assets):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    bases = {
        "unet": lambda: UNet2DConditionModel.from_pretrained(assets / "sdxl", subfolder="unet"),
        "text_encoder_one": lambda: CLIPTextModel.from_pretrained(assets / "sdxl", subfolder="text_encoder"),
        "text_encoder_two": lambda: CLIPTextModelWithProjection.from_pretrained(
            assets / "sdxl", subfolder="text_encoder_2"
        ),
    }
    return {
        name: PeftModel.from_pretrained(build(), checkpoint / name)
        for name, build in bases.items()
        if (checkpoint / name).is_dir()
    }


def assert_kohya_equals_peft(exported: dict, models: dict, unet_config: dict) -> int:
    checked = 0
    for model_name, peft_model in models.items():
        for module_name, module in peft_model.base_model.model.named_modules():
            if not hasattr(module, "lokr_w1") or "default" not in module.scaling:
                continue
            name = export.kohya_name(model_name, module_name, unet_config)
            expected = module.get_delta_weight("default")
            got = comfyui_delta(exported, name, module.get_base_layer().weight.shape)
            assert (got - expected).abs().max() <= 1e-6, name
            checked += 1
    return checked


def run_export(run_main, checkpoint, out, *extra) -> dict:
    assert run_main("export", ["--checkpoint", checkpoint, "--out", out, *extra]) == 0
    return load_file(out)


def test_trained_checkpoint_exports_exact_deltas(sdxl_checkpoint, assets, tmp_path, run_main):
    exported = run_export(run_main, sdxl_checkpoint, tmp_path / "lokr.safetensors")
    models = peft_models_from(sdxl_checkpoint, assets)
    assert set(models) == {"unet", "text_encoder_one", "text_encoder_two"}
    unet_config = json.loads((assets / "sdxl" / "unet" / "config.json").read_text())
    checked = assert_kohya_equals_peft(exported, models, unet_config)
    assert checked == len({k.rsplit(".", 1)[0] for k in exported})
    assert any(k.endswith(".lokr_w1_a") for k in exported) and any(k.endswith(".lokr_w2_b") for k in exported)
    assert any(k.startswith("lora_te1_") for k in exported) and any(k.startswith("lora_te2_") for k in exported)
    assert any("_in_layers_2." in k for k in exported)  # a resnet conv, by its SGM name


def test_ema_exports_the_ema_adapter(sdxl_checkpoint, wuerstchen_checkpoint, assets, tmp_path, run_main, capsys):
    exported = run_export(run_main, sdxl_checkpoint, tmp_path / "ema.safetensors", "--ema")
    unet_config = json.loads((assets / "sdxl" / "unet" / "config.json").read_text())
    checked = assert_kohya_equals_peft(exported, peft_models_from(sdxl_checkpoint / "ema", assets), unet_config)
    assert checked == len({k.rsplit(".", 1)[0] for k in exported})
    live = run_export(run_main, sdxl_checkpoint, tmp_path / "live.safetensors")
    assert max((exported[k] - live[k]).abs().max().item() for k in live) > 1e-5

    exported = run_export(run_main, wuerstchen_checkpoint, tmp_path / "w.safetensors", "--format", "diffusers", "--ema")
    ema_file = load_file(wuerstchen_checkpoint / "ema" / "pytorch_lora_weights.safetensors")
    assert exported.keys() == ema_file.keys() and all(torch.equal(exported[k], ema_file[k]) for k in exported)

    no_ema = tmp_path / "run" / "step1"
    shutil.copytree(wuerstchen_checkpoint, no_ema, ignore=shutil.ignore_patterns("ema"))
    argv = ["--checkpoint", no_ema, "--out", tmp_path / "x.safetensors", "--format", "diffusers", "--ema"]
    assert run_main("export", argv) == 2
    assert "has no ema/ (the run was trained without --use_ema)" in capsys.readouterr().err


@pytest.mark.parametrize("rank", [2, 8])
@pytest.mark.parametrize("alpha", ["rank", 3.0])
@pytest.mark.parametrize("decompose_both", [False, True])
def test_export_matches_peft_for_every_factor_layout(assets, tmp_path, run_main, rank, alpha, decompose_both):
    """Random adapter weights (no training), every combination of split / full factors and alpha."""
    from diffusers import UNet2DConditionModel

    parser = argparse.ArgumentParser()
    adapters.add_lokr_args(parser)
    args = parser.parse_args(["--rank", str(rank), "--alpha", str(rank if alpha == "rank" else alpha)])
    args.decompose_both = decompose_both
    unet = UNet2DConditionModel.from_pretrained(assets / "sdxl", subfolder="unet")
    peft_unet = adapters.attach(unet, adapters.lokr_config(args, CONV_AND_LINEAR.split(",")), str(assets / "sdxl"))
    generator = torch.Generator().manual_seed(rank)
    with torch.no_grad():
        for parameter in adapters.trainable_parameters(peft_unet):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    checkpoint = tmp_path / "step1"
    peft_unet.save_pretrained(checkpoint / "unet")
    (checkpoint / "args.json").write_text(json.dumps({"pretrained_model_name_or_path": str(assets / "sdxl")}))
    exported = run_export(run_main, checkpoint, tmp_path / "out.safetensors")
    unet_config = json.loads((assets / "sdxl" / "unet" / "config.json").read_text())
    assert assert_kohya_equals_peft(exported, {"unet": peft_unet}, unet_config) > 0
    stored_alpha = {v.item() for k, v in exported.items() if k.endswith(".alpha")}
    assert stored_alpha == {float(rank)}


def diffusers_module(key: str) -> str:
    """The module a converted LoRA key belongs to: diffusers names attention projections in an older form
    (`attn1.to_q_lora.down.weight` or `attn1.processor.to_q_lora.down.weight` for `attn1.to_q`)."""
    key = key.removesuffix(".down.weight").removesuffix(".lora").replace(".processor.", ".")
    if key.endswith("_lora"):
        key = key.removesuffix("_lora")
        key = key + ".0" if key.endswith(".to_out") else key
    return key


def test_exported_unet_keys_map_back_through_diffusers(sdxl_checkpoint, assets, tmp_path, run_main):
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )

    exported = run_export(run_main, sdxl_checkpoint, tmp_path / "lokr.safetensors")
    names = sorted({k.rsplit(".", 1)[0] for k in exported})
    # diffusers' kohya reader takes LoRA keys: give each exported module a dummy LoRA pair.
    as_lora = {}
    for name in names:
        as_lora[f"{name}.lora_down.weight"] = torch.zeros(1, 1)
        as_lora[f"{name}.lora_up.weight"] = torch.zeros(1, 1)
    unet_config = SimpleNamespace(**json.loads((assets / "sdxl" / "unet" / "config.json").read_text()))
    converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(as_lora, unet_config))
    back = {
        diffusers_module(k.removeprefix("unet."))
        for k in converted
        if k.startswith("unet.") and k.endswith(".down.weight")
    }
    trained = load_file(sdxl_checkpoint / "unet" / "adapter_model.safetensors")
    original = {export.split_peft_key(k)[0] for k in trained}
    assert back == original


def test_refuses_settings_comfyui_cannot_load(tmp_path, run_main, capsys, assets):
    from diffusers import UNet2DConditionModel
    from peft import LoKrConfig, get_peft_model

    for config, message in (
        (LoKrConfig(r=4, target_modules=["conv1"], use_effective_conv2d=True), "Tucker"),
        (LoKrConfig(r=4, target_modules=["to_q"], decompose_factor=16), "decompose_factor 16 is above sqrt"),
    ):
        unet = UNet2DConditionModel.from_pretrained(assets / "sdxl", subfolder="unet")
        checkpoint = tmp_path / message.split()[0] / "step1"
        get_peft_model(unet, config).save_pretrained(checkpoint / "unet")
        (checkpoint / "args.json").write_text(json.dumps({"pretrained_model_name_or_path": str(assets / "sdxl")}))
        assert run_main("export", ["--checkpoint", checkpoint, "--out", tmp_path / "x.safetensors"]) == 2
        assert message in capsys.readouterr().err


def test_fp16_export_is_close(sdxl_checkpoint, tmp_path, run_main):
    full = run_export(run_main, sdxl_checkpoint, tmp_path / "fp32.safetensors")
    half = run_export(run_main, sdxl_checkpoint, tmp_path / "fp16.safetensors", "--dtype", "fp16")
    assert all(half[k].dtype == torch.float16 for k in half)
    for key, value in full.items():
        assert torch.allclose(half[key].float(), value, rtol=2e-3, atol=1e-6), key


def test_wuerstchen_diffusers_export_and_kohya_refusal(wuerstchen_checkpoint, tmp_path, run_main, capsys):
    exported = run_export(run_main, wuerstchen_checkpoint, tmp_path / "w.safetensors", "--format", "diffusers")
    original = load_file(wuerstchen_checkpoint / "pytorch_lora_weights.safetensors")
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)
    assert run_main("export", ["--checkpoint", wuerstchen_checkpoint, "--out", tmp_path / "k.safetensors"]) == 2
    assert "--format diffusers" in capsys.readouterr().err


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_infer_equals_model_card_snippet_and_fuse_is_close(sdxl_checkpoint, assets, tmp_path, run_main):
    from diffusers import AutoencoderKL, DiffusionPipeline
    from peft import PeftModel

    common = ["--checkpoint", sdxl_checkpoint, "--prompt", "a red circle", "--num_inference_steps", "4"]
    assert run_main("infer", [*common, "--output_dir", tmp_path / "plain", "--compare_base"]) == 0
    assert run_main("infer", [*common, "--output_dir", tmp_path / "fused", "--fuse"]) == 0
    plain = png(tmp_path / "plain" / "00_a-red-circle_00.png")
    assert (tmp_path / "plain" / "grid.png").is_file()

    # The model card's snippet, with the same seed and settings.
    vae = AutoencoderKL.from_pretrained(assets / "sdxl-vae-fp16-fix", torch_dtype=torch.float32)
    pipe = DiffusionPipeline.from_pretrained(assets / "sdxl", vae=vae, torch_dtype=torch.float32)
    pipe.unet = PeftModel.from_pretrained(pipe.unet, sdxl_checkpoint / "unet", adapter_name="default")
    pipe.text_encoder = PeftModel.from_pretrained(pipe.text_encoder, sdxl_checkpoint / "text_encoder_one")
    pipe.text_encoder_2 = PeftModel.from_pretrained(pipe.text_encoder_2, sdxl_checkpoint / "text_encoder_two")
    snippet = pipe("a red circle", num_inference_steps=4, height=64, width=64, generator=torch.manual_seed(0))
    assert np.abs(np.asarray(snippet.images[0], dtype=np.int16) - plain).max() <= 1

    # Fusing changes only rounding: stated tolerance, 2/255 per pixel.
    assert np.abs(png(tmp_path / "fused" / "00_a-red-circle_00.png") - plain).max() <= 2
    assert np.abs(png(tmp_path / "plain" / "00_a-red-circle_00_base.png") - plain).max() > 0


@pytest.mark.parametrize("ema", [False, True], ids=["live", "ema"])
def test_infer_wuerstchen_equals_lora_loading_route(wuerstchen_checkpoint, assets, tmp_path, run_main, ema):
    from diffusers.pipelines.deprecated.wuerstchen import DEFAULT_STAGE_C_TIMESTEPS

    from difftune import wuerstchen

    argv = ["--checkpoint", wuerstchen_checkpoint, "--prompt", "a red circle", "--num_inference_steps", "2"]
    assert run_main("infer", [*argv, "--output_dir", tmp_path / "w", *(["--ema"] if ema else [])]) == 0
    pipe = wuerstchen.build_combined_pipeline(
        wuerstchen.load_prior(str(assets / "wuerstchen-prior")), wuerstchen.load_decoder(str(assets / "wuerstchen"))
    )
    pipe.prior_pipe.load_lora_weights(wuerstchen_checkpoint / "ema" if ema else wuerstchen_checkpoint)
    image = pipe(
        "a red circle", prior_timesteps=DEFAULT_STAGE_C_TIMESTEPS, num_inference_steps=2, height=128, width=128,
        generator=torch.manual_seed(0),
    ).images[0]  # fmt: skip
    assert np.abs(np.asarray(image, dtype=np.int16) - png(tmp_path / "w" / "00_a-red-circle_00.png")).max() <= 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--checkpoint", "/nonexistent/step3", "--prompt", "x"], "does not exist"),
        (["--checkpoint", "TMP", "--prompt", "x"], "is not a difftune checkpoint"),
    ],
)
def test_infer_bad_checkpoint(run_main, capsys, tmp_path, argv, message):
    argv = [str(tmp_path) if a == "TMP" else a for a in argv]
    assert run_main("infer", argv) == 2
    assert message in capsys.readouterr().err
