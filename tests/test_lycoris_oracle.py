"""--init_adapter against LyCORIS itself: files written by LyCORIS's kohya network (and its create_lycoris) on the
tiny models, in every LoKr layout it has, start our run at the delta LyCORIS's own forward computes, module by
module, and at ComfyUI's rule (test_export_infer.comfyui_delta). LyCORIS is pinned in requirements.txt as a
test-only oracle."""

import copy

import pytest
import torch
from conftest import load_script
from helpers import one_line_error, sdxl_args
from safetensors.torch import load_file
from test_export_infer import comfyui_delta
from test_init_adapter import models_of

from difftune import adapters
from difftune.adapters import init_adapter

# LyCORIS's network on a few of each kind of SDXL layer (its own "full" preset names time_embedding twice on
# diffusers' UNet and stops; every module costs time here): attention and feed-forward Linears, resnet convs (3x3
# and the 1x1 shortcut, LyCORIS's linear rank), down / up sampler convs, CLIP attention and MLP of both encoders.
UNET_NAMES = [
    "down_blocks.1.attentions.0.transformer_blocks.0.*", "down_blocks.1.resnets.0.*", "down_blocks.2.resnets.0.*",
    "up_blocks.0.resnets.0.*", "down_blocks.1.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv",
]  # fmt: skip
PRESET = f"""
enable_conv = true
use_fnmatch = true
unet_target_module = []
unet_target_name = {UNET_NAMES}
text_encoder_target_module = []
text_encoder_target_name = ["*layers.0.*", "*layers.1.mlp.*"]
"""
NAMES = ["unet", "text_encoder_one", "text_encoder_two"]
# network_dim 2, network_alpha 3 (alpha != dim: a scale ComfyUI applies on split factors only) unless a case says.
LAYOUTS = {
    "default": {},  # linear layers: w1 full, w2 split; 3x3 convs: both full (rank 2 >= half their side)
    "conv_dim": {"conv_dim": 4, "conv_alpha": 1},  # convs at another rank and alpha: some split, some full
    "decompose_both": {"decompose_both": True, "conv_dim": 1},
    "unbalanced_factorization": {"unbalanced_factorization": True},  # w1 takes the larger output side
    "factor_8": {"factor": 8},  # 8 x 4 splits of 32 (LyCORIS puts the smaller first) and 8 x 8 of 64
    "factor_above_sqrt": {"factor": 16, "conv_dim": 1},
    "use_scalar": {"use_scalar": True},  # the trained scalar is folded into w1 when saved
    "rs_lora": {"rs_lora": True},  # alpha stored as alpha * sqrt(dim): the scale is alpha / sqrt(dim)
    "full_matrix": {"full_matrix": True},
}


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "sdxl_full.toml"
    path.write_text(PRESET)
    return path


@pytest.fixture(scope="module")
def base_models(assets):
    return models_of(assets)


def lycoris_network(models: dict, preset, dim: int = 2, alpha: float = 3.0, **network_args):
    """LyCORIS's kohya network on the models (applied: their forwards are LyCORIS's), every factor random."""
    from lycoris import kohya

    text_encoders = [models["text_encoder_one"], models["text_encoder_two"]]
    network = kohya.create_network(
        1.0, dim, alpha, None, text_encoders, models["unet"], algo="lokr", preset=str(preset), **network_args
    )
    network.apply_to(text_encoders, models["unet"], True, True)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in network.named_parameters():
            value = 0.7 if name.endswith("scalar") else torch.randn(parameter.shape, generator=generator) * 0.1
            parameter.copy_(value)
    return network.eval()


def module_paths(models: dict, network) -> dict[str, tuple[str, str]]:
    """LyCORIS module name -> (model, module path), found by the module object LyCORIS wraps (not by its name)."""
    where = {id(m): (model, path) for model, root in models.items() for path, m in root.named_modules()}
    return {lora.lora_name: where[id(lora.org_module[0])] for lora in network.unet_loras + network.text_encoder_loras}


def start_from(path, models: dict, assets):
    argv = [str(a) for a in sdxl_args(assets, path.parent / "out", "--init_adapter", path)]
    args = load_script("train_sdxl_lokr").parse_args(argv)
    sources = init_adapter.prepare(args, ["--init_adapter", str(path)], NAMES)
    trained, _ = init_adapter.attach_all(
        args, adapters.lokr_config, "base", ("unet", models["unet"]),
        {n: models[n] for n in NAMES[1:]}, sources, [],
    )  # fmt: skip
    return trained


def sample_input(layer: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(1, layer.in_channels, 4, 4, generator=generator)
    return torch.randn(3, layer.in_features, generator=generator)


def compare(network, paths: dict, trained: dict, state: dict, *, skip_lycoris: set[str] = frozenset()) -> int:
    """Every LyCORIS module: our layer's delta output equals LyCORIS's forward's, and our delta weight ComfyUI's."""
    checked = 0
    with torch.no_grad():
        for lora in network.unet_loras + network.text_encoder_loras:
            model, path = paths[lora.lora_name]
            layer = trained[model].base_model.model.get_submodule(path)
            x = sample_input(layer.get_base_layer())
            # Both frozen layers zeroed: the outputs are the deltas alone, with no fp32 cancellation against the base.
            for frozen in (layer.get_base_layer(), lora.org_module[0]):
                frozen.weight.zero_()
                if frozen.bias is not None:
                    frozen.bias.zero_()
            ours = layer(x)
            if lora.lora_name not in skip_lycoris:
                theirs = lora(x)
                assert theirs.abs().max() > 0, lora.lora_name
                assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max(), lora.lora_name
            comfyui = comfyui_delta(state, lora.lora_name, layer.get_base_layer().weight.shape)
            delta = layer.get_delta_weight("default")
            assert (delta - comfyui).abs().max() <= 1e-5 * comfyui.abs().max(), lora.lora_name
            checked += 1
    adapted = {(m, n) for m, model in trained.items() for n, x in model.base_model.model.named_modules()
               if hasattr(x, "lokr_w1") and "default" in x.scaling}  # fmt: skip
    assert adapted == set(paths.values())  # exactly LyCORIS's modules
    return checked


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_lycoris_layout_starts_at_lycoris_forward(layout, preset, base_models, assets, tmp_path):
    lycoris_models, our_models = copy.deepcopy(base_models), copy.deepcopy(base_models)
    network = lycoris_network(lycoris_models, preset, **LAYOUTS[layout])
    path = tmp_path / f"{layout}.safetensors"
    network.save_weights(str(path), torch.float32, {"ss_network_module": "lycoris.kohya"})
    state = load_file(str(path))
    trained = start_from(path, our_models, assets)
    skip = set()
    if layout == "rs_lora":
        # Where both factors are full LyCORIS's training forward scales by sqrt(dim); ComfyUI, A1111 and LyCORIS's
        # own loader of the file by 1. We start where the file loads (checked against ComfyUI's rule for all).
        skip = {lora.lora_name for lora in network.unet_loras + network.text_encoder_loras
                if lora.use_w1 and lora.use_w2}  # fmt: skip
    paths = module_paths(lycoris_models, network)
    assert compare(network, paths, trained, state, skip_lycoris=skip) == len(paths) > 30
    if layout == "conv_dim":  # mixed ranks: the run keeps each module's own
        ranks = {layer.r["default"] for m in trained.values() for layer in m.modules() if hasattr(layer, "lokr_w1")}
        assert {2, 4} <= ranks


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_half_and_fp8_files_start_at_their_stored_values(dtype, preset, base_models, assets, tmp_path):
    lycoris_models, our_models = copy.deepcopy(base_models), copy.deepcopy(base_models)
    network = lycoris_network(lycoris_models, preset, conv_dim=4, conv_alpha=1)
    with torch.no_grad():  # LyCORIS's forward on the values the file holds
        for parameter in network.parameters():
            parameter.copy_(parameter.to(dtype).float())
    path = tmp_path / "lokr.safetensors"
    network.save_weights(str(path), dtype, {"ss_network_module": "lycoris.kohya"})
    assert {v.dtype for v in load_file(str(path)).values()} == {dtype}
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    trained = start_from(path, our_models, assets)
    paths = module_paths(lycoris_models, network)
    assert compare(network, paths, trained, state) == len(paths)


def test_create_lycoris_file_on_the_unet(preset, base_models, assets, tmp_path):
    """LyCORIS's own wrapper (create_lycoris) names modules lycoris_<diffusers path>."""
    from lycoris import create_lycoris

    lycoris_models, our_models = copy.deepcopy(base_models), copy.deepcopy(base_models)
    from lycoris.wrapper import LycorisNetwork

    unet = lycoris_models["unet"]
    LycorisNetwork.apply_preset({"target_module": [], "target_name": UNET_NAMES, "use_fnmatch": True})
    network = create_lycoris(unet, 1.0, linear_dim=2, linear_alpha=3.0, algo="lokr", factor=-1)
    network.apply_to()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    path = tmp_path / "lycoris.safetensors"
    network.save_weights(str(path), torch.float32, None)
    state = load_file(str(path))
    assert all(k.startswith("lycoris_") for k in state)
    trained = start_from(path, our_models, assets)
    where = {id(m): ("unet", p) for p, m in unet.named_modules()}
    paths = {lora.lora_name: where[id(lora.org_module[0])] for lora in network.loras}
    network.unet_loras, network.text_encoder_loras = network.loras, []
    assert compare(network, paths, trained, state) == len(paths) > 20


@pytest.mark.parametrize(
    ("network_args", "message"),
    [
        ({"dora_wd": True}, "is a DoRA LoKr (dora_scale"),
        ({"use_tucker": True, "conv_dim": 1}, "uses Tucker conv factors (lokr_t2"),
    ],
)
def test_dora_and_tucker_files_are_one_line_refusals(network_args, message, preset, base_models, assets, tmp_path,
                                                     run_main, capsys):  # fmt: skip
    network = lycoris_network(copy.deepcopy(base_models), preset, **network_args)
    path = tmp_path / "lokr.safetensors"
    network.save_weights(str(path), torch.float32, None)
    assert run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "out", "--init_adapter", path, steps=1)) == 2
    line = one_line_error(capsys)
    assert message in line and "start from a LoKr trained without" in line


def test_a_layout_peft_does_not_build_trains_resumes_and_loads_for_inference(preset, base_models, assets, tmp_path):
    """unbalanced_factorization: the run keeps the file's factor shapes through training, --resume_from_checkpoint
    and infer.py's loader (a bare PeftModel.from_pretrained cannot build them)."""
    from conftest import run_script
    from helpers import adapter_weights

    from difftune.generate import inference

    network = lycoris_network(copy.deepcopy(base_models), preset, unbalanced_factorization=True)
    path = tmp_path / "unbalanced.safetensors"
    network.save_weights(str(path), torch.float32, None)
    flags = ("--init_adapter", path)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert run_script("train_sdxl_lokr", sdxl_args(assets, full, *flags, steps=2, checkpointing_steps=1)) == 0
    argv = sdxl_args(assets, resumed, *flags, steps=2, checkpointing_steps=1)
    assert run_script("train_sdxl_lokr", [*argv, "--max_train_steps", "1"]) == 0
    assert run_script("train_sdxl_lokr", [*argv, "--resume_from_checkpoint", "latest"]) == 0
    expected, got = adapter_weights(full / "step2"), adapter_weights(resumed / "step2")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    # w1 (out 8 of 32 = 8 x 4 unbalanced) as the file has it, not peft's 4 x 8
    w1 = expected["unet/base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lokr_w1"]
    assert w1.shape == (8, 4)
    model = inference.load_peft_model(copy.deepcopy(base_models)["unet"], full / "step2" / "unet")
    layer = model.base_model.model.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    stored = {k.rsplit(".", 1)[-1]: v for k, v in expected.items() if ".attn1.to_q." in k and "down_blocks.1." in k
              and "attentions.0." in k}  # fmt: skip
    assert torch.equal(layer.lokr_w1["default"], stored["lokr_w1"])
    # ... and export.py writes it for ComfyUI / A1111 as it trained (LyCORIS's own loader reads no unbalanced file)
    exported = tmp_path / "exported.safetensors"
    assert run_script("export", ["--checkpoint", full / "step2", "--out", exported, "--allow_large_factor"]) == 0
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # (down_blocks.1.attentions.0 in SGM names)
    comfyui = comfyui_delta(load_file(str(exported)), name, layer.get_base_layer().weight.shape)
    assert (comfyui - layer.get_delta_weight("default")).abs().max() <= 1e-6 * comfyui.abs().max()
