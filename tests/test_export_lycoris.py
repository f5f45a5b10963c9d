"""export.py --format kohya read by LyCORIS's own loader, and per-module ranks (peft's rank_pattern /
alpha_pattern) in both exports: every module's delta equals peft's."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from test_export_infer import comfyui_delta

from difftune.formats import kohya
from difftune.models import sgm_layout

# Resnet convs (3x3 and the 1x1 shortcut), conv_in (4 input channels) and attention / feed-forward Linears.
CONV_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "conv_shortcut", "conv_in", "ff.net.2"]


def peft_unet_checkpoint(assets, tmp_path, config):
    """A step dir holding peft's own UNet adapter for `config` with random (nonzero) factors, and the live model."""
    from diffusers import UNet2DConditionModel
    from peft import get_peft_model

    unet = UNet2DConditionModel.from_pretrained(assets / "sdxl", subfolder="unet")
    peft_unet = get_peft_model(unet, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in peft_unet.named_parameters():
            if ".lokr_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    checkpoint = tmp_path / "step1"
    peft_unet.save_pretrained(checkpoint / "unet")
    (checkpoint / "args.json").write_text(json.dumps({"pretrained_model_name_or_path": str(assets / "sdxl")}))
    return checkpoint, peft_unet


def lokr_modules(peft_unet) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in peft_unet.base_model.model.named_modules() if hasattr(m, "lokr_w1") and m.scaling}


def output_delta(layer: torch.nn.Module, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """What adding `delta` to the layer's weight adds to its output on `x`."""
    if isinstance(layer, torch.nn.Conv2d):
        return F.conv2d(x, delta.double(), None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return F.linear(x, delta.double())


def lycoris_forward_delta(exported: dict, name: str, base: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module LyCORIS's loader builds from the file (lycoris.kohya's create_network_from_weights path:
    get_module then make_module_from_state_dict), applied to a copy of the base layer: its output minus the
    base layer's. Its forward, not get_merged_weight (which applies the scale twice on split factors)."""
    from lycoris.modules import get_module, make_module
    from lycoris.modules.lokr import LokrModule

    layer = copy.deepcopy(base).double()  # fp64 base output: the difference is not lost to cancellation
    kind, params = get_module(exported, name)
    assert kind is LokrModule, name
    module = make_module(kind, params, name, layer)
    module.apply_to()
    with torch.no_grad():
        return layer(x) - base.double()(x)


def sample_input(layer: torch.nn.Module, generator: torch.Generator) -> torch.Tensor:
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn(2, layer.in_channels, 6, 6, generator=generator, dtype=torch.float64)
    return torch.randn(3, layer.in_features, generator=generator, dtype=torch.float64)


def assert_consumers_read_peft_deltas(exported: dict, peft_unet, unet_config: dict) -> dict[str, int]:
    """For every adapted module: LyCORIS's loader's forward and ComfyUI's rule give peft's delta (relative error
    <= 1e-5). Returns how many modules of each kind (conv / linear) were checked."""
    generator = torch.Generator().manual_seed(1)
    checked = {"conv": 0, "linear": 0}
    for module_name, module in lokr_modules(peft_unet).items():
        name = kohya.kohya_name("unet", module_name, unet_config)
        base = module.get_base_layer()
        with torch.no_grad():
            expected = module.get_delta_weight("default")
        assert expected.abs().max() > 0, module_name
        comfyui = comfyui_delta(exported, name, base.weight.shape)
        assert (comfyui - expected).norm() <= 1e-5 * expected.norm(), (module_name, "ComfyUI")
        x = sample_input(base, generator)
        want = output_delta(base, x, expected)
        got = lycoris_forward_delta(exported, name, base, x)
        assert (got - want).norm() <= 1e-5 * want.norm(), (module_name, "LyCORIS", (got - want).norm() / want.norm())
        checked["conv" if base.weight.dim() == 4 else "linear"] += 1
    return checked


@pytest.mark.parametrize(
    ("rank", "alpha", "decompose_both"), [(2, 6.0, True), (2, 2.0, False), (8, 3.0, False)], ids=str
)
def test_lycoris_loader_reads_every_exported_module(assets, tmp_path, run_main, rank, alpha, decompose_both):
    """Rank 2 splits the convs' w2 (and with decompose_both w1): written unsplit, since LyCORIS's loader takes
    a split conv's in_dim from the flattened lokr_w2_b; rank 8 keeps them full."""
    from peft import LoKrConfig

    config = LoKrConfig(r=rank, alpha=alpha, decompose_both=decompose_both, target_modules=CONV_TARGETS)
    checkpoint, peft_unet = peft_unet_checkpoint(assets, tmp_path, config)
    saved = load_file(checkpoint / "unet" / "adapter_model.safetensors")
    if rank == 2:  # peft's own layout splits a conv's w2: the case LyCORIS cannot read
        assert any(k.endswith("conv1.lokr_w2_b") for k in saved)
    out = tmp_path / "lokr.safetensors"
    assert run_main("export", ["--checkpoint", checkpoint, "--out", out]) == 0
    exported = load_file(out)
    unet_config = json.loads((assets / "sdxl" / "unet" / "config.json").read_text())
    checked = assert_consumers_read_peft_deltas(exported, peft_unet, unet_config)
    assert checked["conv"] >= 10 and checked["linear"] >= 10, checked
    assert checked["conv"] + checked["linear"] == len({k.rsplit(".", 1)[0] for k in exported})
    # Convs are stored unsplit, w2 as (b, d, k, k); the Linears keep peft's split (the smaller file).
    conv_in = kohya.kohya_name("unet", "conv_in", unet_config)
    assert exported[f"{conv_in}.lokr_w2"].dim() == 4 and f"{conv_in}.lokr_w2_b" not in exported
    assert not any(k.endswith(("_in_layers_2.lokr_w2_b", "_out_layers_3.lokr_w2_b")) for k in exported)
    if rank == 2:
        assert any(k.endswith("to_q.lokr_w2_b") for k in exported)


# Per-module ranks and alphas as peft matches them (a key is a suffix of the module name, regex allowed): convs
# at a rank and alpha of their own, one attention projection at rank 8, to_k's alpha changed.
RANK_PATTERN = {
    "conv1": 2,
    "conv2": 2,
    "conv_shortcut": 2,
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": 8,
}
ALPHA_PATTERN = {"conv1": 5.0, "conv2": 5.0, "conv_shortcut": 5.0, "to_k": 7.0}


@pytest.fixture
def patterned(assets, tmp_path):
    from peft import LoKrConfig

    config = LoKrConfig(
        r=4, alpha=2.0, target_modules=["to_q", "to_k", "to_v", "conv1", "conv2", "conv_shortcut", "ff.net.2"],
        rank_pattern=RANK_PATTERN, alpha_pattern=ALPHA_PATTERN,
    )  # fmt: skip
    return peft_unet_checkpoint(assets, tmp_path, config)


def test_rank_and_alpha_patterns_export_to_kohya(patterned, assets, tmp_path, run_main):
    checkpoint, peft_unet = patterned
    modules = lokr_modules(peft_unet)
    # peft did apply the patterns (scaling = alpha / r per module): the test is not of the defaults.
    scalings = {name: m.scaling["default"] for name, m in modules.items()}
    assert scalings["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"] == 2.0 / 8
    assert scalings["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"] == 7.0 / 4
    assert scalings["down_blocks.0.resnets.0.conv1"] == 5.0 / 2
    assert scalings["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v"] == 2.0 / 4
    out = tmp_path / "patterned.safetensors"
    assert run_main("export", ["--checkpoint", checkpoint, "--out", out]) == 0
    exported = load_file(out)
    unet_config = json.loads((assets / "sdxl" / "unet" / "config.json").read_text())
    checked = assert_consumers_read_peft_deltas(exported, peft_unet, unet_config)
    assert sum(checked.values()) == len(modules)
    # The rank-8 projection's split rank is what its stored alpha says (ComfyUI's s = alpha / dim = 1).
    name = kohya.kohya_name("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", unet_config)
    if f"{name}.lokr_w2_b" in exported:
        assert exported[f"{name}.alpha"].item() == exported[f"{name}.lokr_w2_b"].shape[0]
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
    args = json.loads(metadata["ss_network_args"])
    assert (args["conv_dim"], args["conv_alpha"], metadata["difftune_peft_conv_alpha"]) == (2, 2, "5.0")
    assert (metadata["ss_network_dim"], metadata["difftune_peft_alpha"]) == ("4", "2.0")


def test_rank_and_alpha_patterns_merge_into_the_checkpoint(patterned, assets, tmp_path, run_main):
    checkpoint, peft_unet = patterned
    out = tmp_path / "merged.safetensors"
    argv = ["--checkpoint", checkpoint, "--out", out, "--format", "checkpoint", "--dtype", "fp32"]
    assert run_main("export", argv) == 0
    merged = load_file(out)
    unet_config = json.loads((assets / "sdxl" / "unet" / "config.json").read_text())
    for module_name, module in lokr_modules(peft_unet).items():
        base = module.get_base_layer().weight
        with torch.no_grad():
            expected = base + module.get_delta_weight("default")
        got = merged[sgm_layout.unet_key(module_name + ".weight", unet_config)]
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6, msg=module_name)
