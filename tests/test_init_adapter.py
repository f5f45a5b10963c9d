"""--init_adapter: a new run starts from an exported or saved adapter exactly as ComfyUI / A1111 show it."""

import json

import pytest
import torch
from conftest import load_script, run_script
from helpers import one_line_error, sdxl_args
from safetensors.torch import save_file
from test_export_infer import comfyui_delta

from difftune import adapters
from difftune.adapters import init_adapter

TARGETS = "to_q,to_k,to_v,to_out.0,conv1"
CASES = {
    # rank 2 with decompose_both: w1 split where it is 8 x 8, full where 4 x 4; w2 split; alpha != rank.
    "split": ("--rank", "2", "--alpha", "6", "--decompose_both"),
    # rank 8: every factor of these tiny layers stays full; alpha == rank.
    "full": ("--rank", "8", "--alpha", "8"),
}


def models_of(assets):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    return {
        "unet": UNet2DConditionModel.from_pretrained(assets / "sdxl", subfolder="unet"),
        "text_encoder_one": CLIPTextModel.from_pretrained(assets / "sdxl", subfolder="text_encoder"),
        "text_encoder_two": CLIPTextModelWithProjection.from_pretrained(assets / "sdxl", subfolder="text_encoder_2"),
    }


def deltas(checkpoint, assets) -> dict[str, torch.Tensor]:
    """Every adapted module's delta weight, by peft's own layers loaded from the checkpoint."""
    from peft import PeftModel

    out = {}
    for name, base in models_of(assets).items():
        if not (checkpoint / name).is_dir():
            continue
        model = PeftModel.from_pretrained(base, checkpoint / name)
        for module_name, module in model.base_model.model.named_modules():
            if hasattr(module, "lokr_w1") and "default" in module.scaling:
                out[f"{name}/{module_name}"] = module.get_delta_weight("default")
    return out


@pytest.fixture(scope="module", params=list(CASES))
def original(request, assets, tmp_path_factory):
    """A trained run (one step, text encoders, convs) and its kohya export."""
    root = tmp_path_factory.mktemp(request.param)
    flags = ("--train_text_encoder", "--target_modules", TARGETS, *CASES[request.param])
    argv = sdxl_args(assets, root / "run", *flags, steps=1, lr="1e-2", checkpointing_steps=1)
    assert run_script("train_sdxl_lokr", argv) == 0
    step = root / "run" / "step1"
    assert run_script("export", ["--checkpoint", step, "--out", root / "lokr.safetensors"]) == 0
    return step, root / "lokr.safetensors"


def start_from(assets, out, source, *extra):
    """One step at a learning rate too small to move anything: the saved adapter is the starting one."""
    argv = sdxl_args(assets, out, "--init_adapter", source, *extra, steps=1, lr="1e-30", checkpointing_steps=1)
    assert run_script("train_sdxl_lokr", argv) == 0
    return out / "step1"


def assert_same_deltas(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    for key, value in expected.items():
        # <= 1e-5 relative; a text encoder's last layer gets no gradient (SDXL reads the penultimate one): zero
        assert (got[key] - value).abs().max() <= 1e-5 * value.abs().max(), key
    assert sum(bool(v.abs().max() > 0) for v in expected.values()) > 0.8 * len(expected)


def test_new_run_from_the_export_starts_at_the_original_deltas(original, assets, tmp_path):
    step, exported = original
    expected = deltas(step, assets)
    assert {k.split("/")[0] for k in expected} == {"unet", "text_encoder_one", "text_encoder_two"}
    assert any("conv1" in k for k in expected)
    started = start_from(assets, tmp_path / "from_file", exported)  # no --rank / --alpha / targets: from the file
    assert_same_deltas(expected, deltas(started, assets))
    assert json.loads((started / "training_state.json").read_text())["global_step"] == 1  # a new run from step 0
    # The file's module names become the run's targets: the card counts them, adapted_modules.txt names them.
    card = (started.parent / "README.md").read_text()
    assert "on the modules counted below" in card and max(map(len, card.splitlines())) < 500
    listed = (started.parent / "adapted_modules.txt").read_text().splitlines()
    assert len([line for line in listed if line and not line.startswith("# ")]) == len(expected)


def test_new_run_from_our_checkpoint_folder(original, assets, tmp_path, caplog):
    """step<N>/ gives every adapter in it; its unet/ gives the UNet's (the text encoders then train from zero)."""
    step, _ = original
    expected = deltas(step, assets)
    source = step if "split" in str(step) else step / "unet"
    with caplog.at_level("INFO", logger="difftune"):
        started = start_from(assets, tmp_path / "run", source)
    modules = sum(1 for k in expected if k.startswith("unet/"))
    assert f"--init_adapter {source}: unet starts from its {modules} adapted modules (rank" in caplog.text
    got = deltas(started, assets)
    if source.name == "unet":
        assert not (started / "text_encoder_one").exists()
        expected = {k: v for k, v in expected.items() if k.startswith("unet/")}
    assert_same_deltas(expected, got)


def test_flags_that_contradict_the_file_are_refused(original, assets, tmp_path, run_main, capsys):
    _, exported = original
    argv = sdxl_args(assets, tmp_path / "x", "--init_adapter", exported, "--rank", "3", steps=1)
    assert run_main("train_sdxl_lokr", argv) == 2
    assert "--rank 3 contradicts --init_adapter" in one_line_error(capsys)
    assert not (tmp_path / "x").exists() or not list((tmp_path / "x").glob("step*"))


# LyCORIS's factor layouts, written by hand with kohya names (input_blocks.4 = down_blocks.1.*.0, input_blocks.7 =
# down_blocks.2.*.0 in this UNet) and random factors; alpha != the split rank.
def lycoris_files(tmp_path) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    q4 = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # 32 x 32: a = c = 4, b = d = 8
    q7 = "lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q"  # 64 x 64: a = b = c = d = 8
    conv = "lora_unet_input_blocks_4_0_in_layers_2"  # conv 32 -> 32, 3 x 3
    te1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"  # 32 x 32
    te2 = "lora_te2_text_model_encoder_layers_1_mlp_fc1"  # 96 x 48: a = 8, b = 12, c = 6, d = 8
    files = {
        "w1_full_w2_split": {
            f"{q4}.lokr_w1": r(4, 4), f"{q4}.lokr_w2_a": r(8, 2), f"{q4}.lokr_w2_b": r(2, 8),
            f"{q4}.alpha": torch.tensor(3.0),
            f"{conv}.lokr_w1": r(4, 4), f"{conv}.lokr_w2_a": r(8, 2), f"{conv}.lokr_w2_b": r(2, 8 * 9),
            f"{conv}.alpha": torch.tensor(5.0),
            f"{te1}.lokr_w1": r(4, 4), f"{te1}.lokr_w2_a": r(8, 2), f"{te1}.lokr_w2_b": r(2, 8),
            f"{te1}.alpha": torch.tensor(1.0),
            f"{te2}.lokr_w1": r(8, 6), f"{te2}.lokr_w2_a": r(12, 2), f"{te2}.lokr_w2_b": r(2, 8),
            f"{te2}.alpha": torch.tensor(2.5),
        },
        "both_split": {
            f"{q7}.lokr_w1_a": r(8, 2), f"{q7}.lokr_w1_b": r(2, 8), f"{q7}.lokr_w2_a": r(8, 2),
            f"{q7}.lokr_w2_b": r(2, 8), f"{q7}.alpha": torch.tensor(0.5),
        },
        "both_full": {  # ComfyUI ignores the alpha here
            f"{q4}.lokr_w1": r(4, 4), f"{q4}.lokr_w2": r(8, 8), f"{q4}.alpha": torch.tensor(3.0),
            f"{conv}.lokr_w1": r(4, 4), f"{conv}.lokr_w2": r(8, 8, 3, 3), f"{conv}.alpha": torch.tensor(3.0),
        },
    }  # fmt: skip
    return files


KOHYA_TO_MODULE = {  # literal: the modules those kohya names patch (ComfyUI / A1111 SGM names)
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": (
        "unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    "lora_unet_input_blocks_7_1_transformer_blocks_0_attn1_to_q": (
        "unet", "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q"),
    "lora_unet_input_blocks_4_0_in_layers_2": ("unet", "down_blocks.1.resnets.0.conv1"),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": ("text_encoder_one", "encoder.layers.0.self_attn.q_proj"),
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": ("text_encoder_two", "text_model.encoder.layers.1.mlp.fc1"),
}  # fmt: skip


@pytest.mark.parametrize("layout", ["w1_full_w2_split", "both_split", "both_full"])
def test_lycoris_factor_layouts_load_with_comfyuis_deltas(assets, tmp_path, layout):
    state = lycoris_files(tmp_path)[layout]
    path = tmp_path / f"{layout}.safetensors"
    save_file(state, path)
    argv = [str(a) for a in sdxl_args(assets, tmp_path / "out", "--init_adapter", path)]
    args = load_script("train_sdxl_lokr").parse_args(argv)
    names = ["unet", "text_encoder_one", "text_encoder_two"]
    sources = init_adapter.prepare(args, ["--init_adapter", str(path)], names)
    models = models_of(assets)
    trained, _ = init_adapter.attach_all(
        args, adapters.lokr_config, str(assets / "sdxl"), ("unet", models["unet"]),
        {n: models[n] for n in names[1:]}, sources, [],
    )  # fmt: skip
    modules = {k.rsplit(".", 1)[0] for k in state}
    for name in modules:
        model_name, module_name = KOHYA_TO_MODULE[name]
        layer = trained[model_name].base_model.model.get_submodule(module_name)
        expected = comfyui_delta(state, name, layer.get_base_layer().weight.shape)
        assert expected.abs().max() > 0
        assert (layer.get_delta_weight("default") - expected).abs().max() <= 1e-6, name
    adapted = {
        (m, n) for m, model in trained.items() for n, x in model.base_model.model.named_modules()
        if hasattr(x, "lokr_w1") and "default" in x.scaling
    }  # fmt: skip
    assert adapted == {KOHYA_TO_MODULE[n] for n in modules}  # exactly the file's modules, nothing fresh besides


def lora_deltas(checkpoint, assets) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    from difftune.models import wuerstchen

    prior = wuerstchen.load_prior(str(assets / "wuerstchen-prior"))
    out = {}
    for name, base in (("prior", prior.prior), ("text_encoder", prior.text_encoder)):
        if not (checkpoint / name).is_dir():
            continue
        model = PeftModel.from_pretrained(base, checkpoint / name)
        for module_name, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "default" in module.scaling:
                out[f"{name}/{module_name}"] = module.get_delta_weight("default")
    return out


def test_wuerstchen_starts_from_its_diffusers_file_and_prior_folder(assets, tmp_path):
    from helpers import wuerstchen_args

    flags = ("--train_text_encoder", "--rank", "4", "--lora_alpha", "16")
    argv = wuerstchen_args(assets, tmp_path / "run", *flags, steps=1, lr="1e-2", checkpointing_steps=1)
    assert run_script("train_wuerstchen_lora", argv) == 0
    step = tmp_path / "run" / "step1"
    exported = tmp_path / "lora.safetensors"
    assert run_script("export", ["--checkpoint", step, "--out", exported, "--format", "diffusers"]) == 0
    expected = lora_deltas(step, assets)
    assert {k.split("/")[0] for k in expected} == {"prior", "text_encoder"}
    for name, source in (("file", exported), ("folder", step / "prior")):
        out = tmp_path / name
        argv = wuerstchen_args(assets, out, "--init_adapter", source, steps=1, lr="1e-30", checkpointing_steps=1)
        assert run_script("train_wuerstchen_lora", argv) == 0
        want = expected if name == "file" else {k: v for k, v in expected.items() if k.startswith("prior/")}
        assert_same_deltas(want, lora_deltas(out / "step1", assets))
