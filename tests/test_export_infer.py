"""infer.py and export.py: same images as the users' snippets, kohya deltas equal to peft's, key round trip."""

import argparse
import json
import shutil
import stat
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import load_script, run_script
from helpers import prior_inputs, sdxl_args, wuerstchen_args
from PIL import Image
from safetensors.torch import load_file

from difftune import adapters
from difftune.formats import kohya

CONV_AND_LINEAR = "to_q,to_k,to_v,to_out.0,conv1,conv2,conv_shortcut,proj_in,ff.net.2"


@pytest.fixture(scope="module")
def sdxl_checkpoint(assets, tmp_path_factory):
    """A trained SDXL run: split factors (rank 2, decompose_both), alpha != rank, convs, both text encoders,
    LyCORIS's init, rank and module dropout."""
    out = tmp_path_factory.mktemp("sdxl") / "run"
    argv = sdxl_args(
        assets, out, "--train_text_encoder", "--rank", "2", "--alpha", "6", "--decompose_both",
        "--target_modules", CONV_AND_LINEAR, "--use_ema", "--ema_decay", "0.5", "--lokr_init", "lycoris",
        "--rank_dropout", "0.25", "--module_dropout", "0.125",
        steps=4, lr="1e-2",
    )  # fmt: skip
    assert run_script("train_sdxl_lokr", argv) == 0
    return out / "step4"


@pytest.fixture(scope="module")
def wuerstchen_checkpoint(assets, tmp_path_factory):
    """lora_alpha != rank, text encoder too: the diffusers file must carry peft's lora_alpha / r."""
    out = tmp_path_factory.mktemp("wuerstchen") / "run"
    argv = wuerstchen_args(
        assets, out, "--target_modules", "to_q,to_k,to_v,to_out.0,out.1", "--rank", "4", "--lora_alpha", "16",
        "--train_text_encoder", "--use_ema", steps=4, lr="1e-2",
    )  # fmt: skip
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


# ComfyUI's text-encoder key map (comfy/lora.py, model_lora_keys_clip), written from its convention for SDXL:
# kohya key -> the weight it patches, clip_l for lora_te1_, clip_g for lora_te2_ (ComfyUI keeps `text_model.`).
COMFYUI_CLIP_PARTS = {
    "mlp.fc1": "mlp_fc1",
    "mlp.fc2": "mlp_fc2",
    "self_attn.k_proj": "self_attn_k_proj",
    "self_attn.q_proj": "self_attn_q_proj",
    "self_attn.v_proj": "self_attn_v_proj",
    "self_attn.out_proj": "self_attn_out_proj",
}


def comfyui_clip_key_map(layers: int) -> dict[str, str]:
    key_map = {}
    for prefix, clip in (("lora_te1_", "clip_l"), ("lora_te2_", "clip_g")):
        for b in range(layers):
            for part, name in COMFYUI_CLIP_PARTS.items():
                key_map[f"{prefix}text_model_encoder_layers_{b}_{name}"] = (
                    f"{clip}.transformer.text_model.encoder.layers.{b}.{part}.weight"
                )
    return key_map


def comfyui_name(model_name: str, module_name: str) -> str:
    """The key ComfyUI reads a text-encoder module from, whatever transformers' layout (`text_model.` or not)."""
    clip = {"text_encoder_one": "clip_l", "text_encoder_two": "clip_g"}[model_name]
    weight = f"{clip}.transformer.text_model.{module_name.removeprefix('text_model.')}.weight"
    names = [key for key, target in comfyui_clip_key_map(32).items() if target == weight]
    assert len(names) == 1, f"ComfyUI has no key for {model_name} {module_name}"
    return names[0]


def assert_kohya_equals_peft(exported: dict, models: dict, unet_config: dict) -> int:
    checked = 0
    for model_name, peft_model in models.items():
        for module_name, module in peft_model.base_model.model.named_modules():
            if not hasattr(module, "lokr_w1") or "default" not in module.scaling:
                continue
            if model_name == "unet":  # SGM names: checked against diffusers' own converter below
                name = kohya.kohya_name(model_name, module_name, unet_config)
            else:
                name = comfyui_name(model_name, module_name)
            assert f"{name}.alpha" in exported, f"{name} missing: the consumer would not load {module_name}"
            expected = module.get_delta_weight("default")
            got = comfyui_delta(exported, name, module.get_base_layer().weight.shape)
            assert (got - expected).abs().max() <= 1e-6, name
            checked += 1
    return checked


# Real SDXL's SGM module names (layers_per_block 2: input_blocks 1-8, middle_block 0-2, output_blocks 0-8), written
# out as ComfyUI / kohya name them, for the diffusers module each one is.
SGM_NAMES = {
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.resnets.0.conv2": "input_blocks.1.0.out_layers.3",
    "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.2.resnets.0.conv_shortcut": "input_blocks.7.0.skip_connection",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q": "input_blocks.5.1.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.downsamplers.0.conv": "input_blocks.6.0.op",
    "down_blocks.2.resnets.1.conv2": "input_blocks.8.0.out_layers.3",
    "mid_block.resnets.0.conv2": "middle_block.0.out_layers.3",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "middle_block.1.transformer_blocks.0.attn2.to_k",
    "mid_block.resnets.1.conv1": "middle_block.2.in_layers.2",
    "up_blocks.0.resnets.0.conv_shortcut": "output_blocks.0.0.skip_connection",
    "up_blocks.0.attentions.2.transformer_blocks.0.ff.net.2": "output_blocks.2.1.transformer_blocks.0.ff.net.2",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.resnets.1.conv1": "output_blocks.4.0.in_layers.2",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.resnets.2.conv2": "output_blocks.8.0.out_layers.3",
}


def assert_deltas_on_literal_sgm_names(exported: dict, peft_unet, at_least: int) -> None:
    """Each listed module's peft delta is what a consumer reads from its literal SGM name (and, the deltas being
    distinct, from no other listed name)."""
    modules = dict(peft_unet.base_model.model.named_modules())
    checked = 0
    for module_name, sgm in SGM_NAMES.items():
        module = modules[module_name]
        if not hasattr(module, "lokr_w1") or "default" not in module.scaling:
            continue
        shape = module.get_base_layer().weight.shape
        expected = module.get_delta_weight("default")
        assert expected.abs().max() > 0, module_name
        got = comfyui_delta(exported, f"lora_unet_{sgm.replace('.', '_')}", shape)
        assert (got - expected).abs().max() <= 1e-6 * expected.abs().max(), (module_name, sgm)
        checked += 1
    assert checked >= at_least, checked


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
    # kohya's text-encoder names for both encoders: 2 layers, q/k/v/out; at rank 2 with decompose_both, te1
    # (width 32 = 4 x 8) keeps w1 full and splits w2, te2 (width 48 = 6 x 8) splits both.
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lokr_w1" in exported
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.lokr_w1_a" in exported
    suffixes = {
        1: ("lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"),
        2: ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha"),
    }
    text_keys = {k for k in exported if k.startswith(("lora_te1_", "lora_te2_"))}
    assert text_keys == {
        f"lora_te{encoder}_text_model_encoder_layers_{layer}_self_attn_{projection}_proj.{suffix}"
        for encoder in (1, 2)
        for layer in (0, 1)
        for projection in ("q", "k", "v", "out")
        for suffix in suffixes[encoder]
    }
    # The trained convolutions and attention, by their literal SGM names.
    assert_deltas_on_literal_sgm_names(exported, models["unet"], at_least=13)


def test_every_module_s_delta_lands_on_its_sgm_name(assets, tmp_path, run_main):
    """Distinct random deltas on resnet convs, shortcuts, down- and upsamplers and transformer blocks of every
    part of the UNet: each is exported under the SGM name of the module that produced it."""
    from peft import LoKrConfig

    targets = ["conv1", "conv2", "conv_shortcut", "conv", "to_q", "to_k", "ff.net.2"]
    checkpoint, peft_unet = random_unet_checkpoint(assets, tmp_path, LoKrConfig(r=4, alpha=3, target_modules=targets))
    exported = run_export(run_main, checkpoint, tmp_path / "all.safetensors")
    assert_deltas_on_literal_sgm_names(exported, peft_unet, at_least=len(SGM_NAMES))


def test_checkpoint_configs_record_the_flags(sdxl_checkpoint):
    for name in ("unet", "text_encoder_one", "text_encoder_two"):
        config = json.loads((sdxl_checkpoint / name / "adapter_config.json").read_text())
        assert config["peft_type"] == "LOKR"
        assert (config["r"], config["alpha"], config["decompose_both"], config["decompose_factor"]) == (2, 6, True, -1)
        assert (config["rank_dropout"], config["module_dropout"], config["init_weights"]) == (0.25, 0.125, "lycoris")
        targets = CONV_AND_LINEAR if name == "unet" else adapters.TEXT_ENCODER_TARGETS
        assert sorted(config["target_modules"]) == sorted(targets.split(",")), name


def file_modes(folder) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}


def test_checkpoints_and_exports_get_the_umask_s_mode(sdxl_checkpoint, wuerstchen_checkpoint, tmp_path, run_main):
    """safetensors writes its files 0600: the adapters, the diffusers file and the export get the mode json
    files get from the umask (args.json is written by plain open())."""
    plain = stat.S_IMODE((sdxl_checkpoint / "args.json").stat().st_mode)
    if plain == 0o600:
        pytest.skip("under umask 077 every file is 0600: nothing to tell apart")
    for checkpoint in (sdxl_checkpoint, wuerstchen_checkpoint):
        modes = file_modes(checkpoint)
        assert any(name.endswith(".safetensors") for name in modes)
        assert {name for name, mode in modes.items() if mode != plain} == set()
    run_export(run_main, sdxl_checkpoint, tmp_path / "kohya.safetensors")
    run_export(run_main, wuerstchen_checkpoint, tmp_path / "lora.safetensors", "--format", "diffusers")
    assert file_modes(tmp_path) == {"kohya.safetensors": plain, "lora.safetensors": plain}


def test_adapter_folders_hold_no_peft_card_and_the_manifest_verifies(sdxl_checkpoint, wuerstchen_checkpoint):
    """peft's save_pretrained writes an empty model card template into each adapter folder: removed (the
    run's card is OUTPUT_DIR/README.md) before the manifest, which still verifies."""
    from difftune.storage import integrity

    for checkpoint in (sdxl_checkpoint, wuerstchen_checkpoint):
        assert (checkpoint / "ema").is_dir()  # the EMA adapters are saved the same way
        assert list(checkpoint.rglob("README.md")) == []
        assert integrity.damaged_checkpoint(checkpoint) is None
        listed = json.loads((checkpoint / integrity.MANIFEST).read_text())
        assert set(listed) == set(file_modes(checkpoint)) - {integrity.MANIFEST}


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
    # a run trained without --use_ema (its manifest never listed ema/)
    shutil.copytree(wuerstchen_checkpoint, no_ema, ignore=shutil.ignore_patterns("ema", "manifest.json"))
    argv = ["--checkpoint", no_ema, "--out", tmp_path / "x.safetensors", "--format", "diffusers", "--ema"]
    assert run_main("export", argv) == 2
    assert "has no ema/ (the run was trained without --use_ema)" in capsys.readouterr().err


@pytest.mark.parametrize("rank", [2, 8])
@pytest.mark.parametrize("alpha", ["rank", 3.0])
@pytest.mark.parametrize("decompose_both", [False, True])
def test_export_matches_peft_for_every_factor_layout(assets, tmp_path, run_main, rank, alpha, decompose_both):
    """Random adapter weights (no training), every combination of split / full factors and alpha."""
    parser = argparse.ArgumentParser()
    adapters.add_lokr_args(parser)
    args = parser.parse_args(["--rank", str(rank), "--alpha", str(rank if alpha == "rank" else alpha)])
    args.decompose_both = decompose_both
    checkpoint, peft_unet = random_unet_checkpoint(
        assets, tmp_path, adapters.lokr_config(args, CONV_AND_LINEAR.split(","))
    )
    exported = run_export(run_main, checkpoint, tmp_path / "out.safetensors")
    unet_config = json.loads((assets / "sdxl" / "unet" / "config.json").read_text())
    assert assert_kohya_equals_peft(exported, {"unet": peft_unet}, unet_config) > 0
    stored_alpha = {v.item() for k, v in exported.items() if k.endswith(".alpha")}
    assert stored_alpha == {float(rank)}


def random_unet_checkpoint(assets, tmp_path, config):
    """A step dir holding a UNet adapter with random (nonzero) weights, and the live peft model."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(assets / "sdxl", subfolder="unet")
    peft_unet = adapters.attach(unet, config, str(assets / "sdxl"))
    generator = torch.Generator().manual_seed(config.r)
    with torch.no_grad():
        for parameter in adapters.trainable_parameters(peft_unet):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    checkpoint = tmp_path / "step1"
    peft_unet.save_pretrained(checkpoint / "unet", save_embedding_layers=False)
    (checkpoint / "args.json").write_text(json.dumps({"pretrained_model_name_or_path": str(assets / "sdxl")}))
    return checkpoint, peft_unet


def test_large_decompose_factor_exports_for_comfyui_on_request(assets, tmp_path, run_main, capsys):
    """A factor above sqrt(dim) makes w1 the larger factor: refused by default (LyCORIS's loader cannot read it),
    exported with --allow_large_factor, and then ComfyUI's / A1111's kron-and-reshape gives peft's delta."""
    from peft import LoKrConfig

    config = LoKrConfig(r=4, alpha=6, target_modules=["to_q", "to_k"], decompose_factor=16)
    checkpoint, peft_unet = random_unet_checkpoint(assets, tmp_path, config)
    out = tmp_path / "large.safetensors"
    assert run_main("export", ["--checkpoint", checkpoint, "--out", out]) == 2
    message = capsys.readouterr().err
    assert "ComfyUI and AUTOMATIC1111 load it exactly, LyCORIS's own loader" in message
    assert "--allow_large_factor" in message and not out.exists()

    exported = run_export(run_main, checkpoint, out, "--allow_large_factor")
    w1 = [v for k, v in exported.items() if k.endswith(".lokr_w1")]
    assert w1 and all(v.shape[0] == 16 for v in w1)  # the larger factor first: the layout LyCORIS cannot read
    unet_config = json.loads((assets / "sdxl" / "unet" / "config.json").read_text())
    assert assert_kohya_equals_peft(exported, {"unet": peft_unet}, unet_config) == len(w1)


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
    original = {kohya.split_peft_key(k)[0] for k in trained}
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
        get_peft_model(unet, config).save_pretrained(checkpoint / "unet", save_embedding_layers=False)
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


def test_wuerstchen_diffusers_lora_loads_like_peft(wuerstchen_checkpoint, assets, tmp_path, run_main):
    """load_lora_weights (checkpoint dir and exported file) gives the peft adapter's outputs at rank 4, alpha 16;
    also the export of a checkpoint whose diffusers file has no adapter metadata (as written before the fix)."""
    from diffusers import WuerstchenPriorPipeline
    from peft import PeftModel
    from safetensors.torch import save_file

    from difftune.models import wuerstchen

    config = json.loads((wuerstchen_checkpoint / "prior" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (4, 16)
    exported = tmp_path / "w.safetensors"
    run_export(run_main, wuerstchen_checkpoint, exported, "--format", "diffusers")
    old = tmp_path / "old" / "step4"
    shutil.copytree(wuerstchen_checkpoint, old)
    save_file(load_file(old / "pytorch_lora_weights.safetensors"), old / "pytorch_lora_weights.safetensors")
    (old / "manifest.json").unlink()  # nor a manifest, written since
    exported_old = tmp_path / "old.safetensors"
    run_export(run_main, old, exported_old, "--format", "diffusers")

    def outputs(parts) -> tuple[torch.Tensor, torch.Tensor]:
        ids = parts.tokenizer("a red circle", return_tensors="pt").input_ids
        return parts.prior(*prior_inputs(parts.prior)), parts.text_encoder(ids).last_hidden_state

    with torch.no_grad():
        parts = wuerstchen.load_prior(str(assets / "wuerstchen-prior"))
        base_prior, base_text = outputs(parts)
        parts.prior = PeftModel.from_pretrained(parts.prior, wuerstchen_checkpoint / "prior")
        parts.text_encoder = PeftModel.from_pretrained(parts.text_encoder, wuerstchen_checkpoint / "text_encoder")
        peft_prior, peft_text = outputs(parts)
        assert (peft_prior - base_prior).abs().max() > 1e-3 and (peft_text - base_text).abs().max() > 1e-3
        for source in (wuerstchen_checkpoint, exported, exported_old):
            fresh = wuerstchen.load_prior(str(assets / "wuerstchen-prior"))
            pipe = WuerstchenPriorPipeline(
                tokenizer=fresh.tokenizer, text_encoder=fresh.text_encoder, prior=fresh.prior,
                scheduler=fresh.scheduler,
            )  # fmt: skip
            pipe.load_lora_weights(str(source))
            got_prior, got_text = outputs(fresh)
            torch.testing.assert_close(got_prior, peft_prior, atol=1e-5, rtol=1e-5, msg=f"prior from {source.name}")
            torch.testing.assert_close(got_text, peft_text, atol=1e-5, rtol=1e-5, msg=f"text from {source.name}")


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

    from difftune.models import wuerstchen

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


def test_v_prediction_run_samples_with_v_prediction(assets, tmp_path, run_main, monkeypatch):
    """Validation, infer.py and the model card's snippet sample with the parameterisation the run trained."""
    from difftune.generate import inference, validation

    seen = {}
    real_validation, real_pipeline = validation.run_validation, inference.sdxl_pipeline

    def spy_validation(accelerator, args, pipe, *rest, **kwargs):
        seen["validation"] = pipe.scheduler.config.prediction_type
        return real_validation(accelerator, args, pipe, *rest, **kwargs)

    def spy_pipeline(*args, **kwargs):
        pipe = real_pipeline(*args, **kwargs)
        seen["infer"] = pipe.scheduler.config.prediction_type
        return pipe

    monkeypatch.setattr(validation, "run_validation", spy_validation)
    monkeypatch.setattr(inference, "sdxl_pipeline", spy_pipeline)
    out = tmp_path / "run"
    argv = sdxl_args(
        assets, out, "--prediction_type", "v_prediction", "--validation_prompt", "a red circle",
        "--num_validation_images", "1", "--validation_steps", "1", "--validation_inference_steps", "1", steps=1,
    )  # fmt: skip
    assert run_main("train_sdxl_lokr", argv) == 0
    argv = ["--checkpoint", out / "step1", "--prompt", "x", "--num_inference_steps", "1", "--output_dir", tmp_path]
    assert run_main("infer", argv) == 0
    assert seen == {"validation": "v_prediction", "infer": "v_prediction"}
    # The base model's own sampler is epsilon: the run had to change it.
    assert json.loads((assets / "sdxl" / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == (
        "epsilon"
    )
    card = (out / "README.md").read_text()
    assert 'pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")' in card


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


# A prompt a user may type: quotes of both kinds and a backslash (before an "n": pasted raw, a newline).
AWKWARD_PROMPT = 'a "red" circle, it\'s \\not blue'


def run_card_snippets(card: str, prompt: str, cpu_swaps: dict[str, str]) -> list[dict]:
    """Run the card's code blocks as a user pastes them: the first block (loading) then each later one in turn,
    with only `cpu_swaps` edited (CUDA and fp16 to the CPU and fp32, fewer steps, a smaller size: each must be
    in the card). Every call of `pipe` must receive `prompt` exactly. Returns each run's namespace."""
    import ast
    import re

    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert blocks, card
    for old, new in cpu_swaps.items():
        assert old in card, f"{old!r} is not in the card"
        blocks = [block.replace(old, new) for block in blocks]
    calls = [node for node in ast.walk(ast.parse(blocks[-1])) if isinstance(node, ast.Call)]
    prompts = [ast.literal_eval(c.args[0]) for c in calls if isinstance(c.func, ast.Name) and c.func.id == "pipe"]
    assert prompts == [prompt]
    # One loading block then the generation: run as is. Several: setup, then each loading route, then generation.
    routes = [blocks] if len(blocks) <= 2 else [[blocks[0], route, blocks[-1]] for route in blocks[1:-1]]
    spaces = []
    for route in routes:
        namespace: dict = {}
        for block in route:
            exec(compile(block, "<model card>", "exec"), namespace)
        assert namespace["image"].size[0] > 0
        spaces.append(namespace)
    return spaces


VAE_FILE = "diffusion_pytorch_model.safetensors"
SDXL_CPU = {
    '.to("cuda")': '.to("cpu")',
    "torch.float16": "torch.float32",
    "num_inference_steps=50": "num_inference_steps=1",
}


@pytest.mark.parametrize(
    "extra",
    [
        ("--pretrained_vae_model_name_or_path", "none"),
        ("--train_text_encoder",),
        ("--prediction_type", "v_prediction"),
        ("--pretrained_model_name_or_path", "{assets}/sdxl.safetensors", "--single_file_config", "{assets}/sdxl"),
    ],
    ids=["base_vae", "text_encoders", "v_prediction", "single_file"],
)
def test_sdxl_model_card_snippet_runs_as_written(sdxl_checkpoint, assets, tmp_path, extra):
    from peft import PeftModel

    script = load_script("train_sdxl_lokr")
    extra = [flag.format(assets=assets) for flag in extra]
    argv = sdxl_args(assets, tmp_path, "--validation_prompt", AWKWARD_PROMPT, *extra)
    args = script.parse_args([str(a) for a in argv])
    (namespace,) = run_card_snippets(script.write_card(args, sdxl_checkpoint).read_text(), AWKWARD_PROMPT, SDXL_CPU)
    pipe = namespace["pipe"]
    assert isinstance(pipe.unet, PeftModel)
    assert isinstance(pipe.text_encoder, PeftModel) == ("--train_text_encoder" in extra)
    expected_vae = load_file(assets / ("sdxl/vae" if "none" in extra else "sdxl-vae-fp16-fix") / VAE_FILE)
    assert all(torch.equal(v, expected_vae[k]) for k, v in pipe.vae.state_dict().items())
    expected_prediction = "v_prediction" if "v_prediction" in extra else "epsilon"
    assert pipe.scheduler.config.prediction_type == expected_prediction


@pytest.mark.parametrize("text_encoder", [False, True], ids=["prior", "prior_and_text_encoder"])
def test_wuerstchen_model_card_snippets_run_as_written(wuerstchen_checkpoint, assets, tmp_path, text_encoder):
    script = load_script("train_wuerstchen_lora")
    extra = ["--train_text_encoder"] if text_encoder else []
    argv = wuerstchen_args(assets, tmp_path, "--validation_prompt", AWKWARD_PROMPT, *extra)
    args = script.parse_args([str(a) for a in argv])
    swaps = {
        '.to("cuda", torch.float16)': '.to("cpu", torch.float32)',
        "height=1024, width=1024": "height=128, width=128, num_inference_steps=2, generator=torch.manual_seed(0)",
    }
    card = script.write_card(args, wuerstchen_checkpoint).read_text()
    diffusers_route, peft_route = run_card_snippets(card, AWKWARD_PROMPT, swaps)
    if text_encoder:  # the diffusers file holds the text encoder's LoRA too: with it, both routes load the same
        images = [np.asarray(space["image"], dtype=np.int16) for space in (diffusers_route, peft_route)]
        assert np.abs(images[0] - images[1]).max() <= 1


def test_decompose_factor_is_checked_against_the_adapted_modules_only(assets, tmp_path, run_main):
    """--decompose_factor 4 fits every attention projection (dims 32..80); the untargeted conv_in (4 input
    channels, 4 > sqrt(4)) must not make the export refuse it."""
    from peft import LoKrConfig

    config = LoKrConfig(r=4, alpha=6, target_modules=["to_q", "to_k"], decompose_factor=4)
    checkpoint, peft_unet = random_unet_checkpoint(assets, tmp_path, config)
    exported = run_export(run_main, checkpoint, tmp_path / "f4.safetensors")
    unet_config = json.loads((assets / "sdxl" / "unet" / "config.json").read_text())
    assert assert_kohya_equals_peft(exported, {"unet": peft_unet}, unet_config) == len(
        {k.rsplit(".", 1)[0] for k in exported}
    )
