"""Small fast tests written for the mutants `make mutation-auto` found alive in formats/kohya.py (docs/mutation.md):
each asserts what a user sees (a kohya / LyCORIS key name, a factor, an alpha, a metadata string, a refusal)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from difftune.cli.errors import UserError
from difftune.formats import kohya

SDXL_UNET = {"up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2}
# SD 1.5's UNet: the first up block has no attention, so its upsampler is output_blocks.2.1 (SDXL: .2.2).
SD15_UNET = {
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "layers_per_block": 2,
}
TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def comfyui_delta(state: dict, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """ComfyUI's / A1111's LoKr rule (comfy/weight_adapter/lokr.py): s * kron(w1, w2) reshaped to the weight,
    s = alpha / dim when an alpha is stored and a factor is split (dim: the split factor's rank), else 1."""
    w1, w2, dim = state.get(f"{name}lokr_w1"), state.get(f"{name}lokr_w2"), None
    if w1 is None:
        dim = state[f"{name}lokr_w1_b"].shape[0]
        w1 = state[f"{name}lokr_w1_a"] @ state[f"{name}lokr_w1_b"]
    if w2 is None:
        dim = state[f"{name}lokr_w2_b"].shape[0]
        w2 = state[f"{name}lokr_w2_a"] @ state[f"{name}lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    alpha = state.get(f"{name}alpha")
    s = alpha.item() / dim if alpha is not None and dim is not None else 1.0
    return s * torch.kron(w1, w2).reshape(shape)


def peft_delta(weights: dict, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    """peft's LoKr get_delta_weight: kron(w1, w2) * alpha / r, w1 = w1_a @ w1_b and w2 = w2_a @ w2_b when split
    (a conv's split w2 is flat, (b, d*k*k))."""
    w1 = weights["lokr_w1"] if "lokr_w1" in weights else weights["lokr_w1_a"] @ weights["lokr_w1_b"]
    w2 = weights["lokr_w2"] if "lokr_w2" in weights else weights["lokr_w2_a"] @ weights["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2) * scale).reshape(shape)


# --- names ---


@pytest.mark.parametrize(
    ("model", "module", "unet_config", "expected"),
    [
        ("unet", TO_Q, SDXL_UNET, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
        ("unet", "down_blocks.1.resnets.0.conv_shortcut", SDXL_UNET, "lora_unet_input_blocks_4_0_skip_connection"),
        ("unet", "mid_block.attentions.0.proj_in", SDXL_UNET, "lora_unet_middle_block_1_proj_in"),
        ("unet", "up_blocks.0.upsamplers.0.conv", SDXL_UNET, "lora_unet_output_blocks_2_2_conv"),
        ("unet", "up_blocks.1.upsamplers.0.conv", SDXL_UNET, "lora_unet_output_blocks_5_2_conv"),
        ("unet", "up_blocks.0.upsamplers.0.conv", SD15_UNET, "lora_unet_output_blocks_2_1_conv"),
        ("unet", "up_blocks.1.upsamplers.0.conv", SD15_UNET, "lora_unet_output_blocks_5_2_conv"),
        (
            "text_encoder_one",
            "encoder.layers.0.self_attn.q_proj",
            SDXL_UNET,
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
        ),
        ("text_encoder_one", "embeddings.token_embedding", SDXL_UNET, "lora_te1_text_model_embeddings_token_embedding"),
        ("text_encoder_one", "final_layer_norm", SDXL_UNET, "lora_te1_text_model_final_layer_norm"),
        (
            "text_encoder_two",
            "text_model.encoder.layers.11.mlp.fc1",
            SDXL_UNET,
            "lora_te2_text_model_encoder_layers_11_mlp_fc1",
        ),
        ("text_encoder_two", "text_projection", SDXL_UNET, "lora_te2_text_projection"),
    ],
)
def test_kohya_names_of_unet_and_text_encoder_modules(model, module, unet_config, expected):
    assert kohya.kohya_name(model, module, unet_config) == expected


@pytest.mark.parametrize("suffix", kohya.LOKR_SUFFIXES)
@pytest.mark.parametrize("prefix", ["", "base_model.model."])
def test_a_peft_key_splits_into_module_and_factor(prefix, suffix):
    module = "down_blocks.0.resnets.0.conv1"
    assert kohya.split_peft_key(f"{prefix}{module}.{suffix}") == (module, suffix)


@pytest.mark.parametrize("key", ["base_model.model.x.to_q.lora_A.weight", "x.to_q.lokr_w3", "lokr_w1x"])
def test_a_weight_that_is_no_lokr_factor_is_refused(key):
    with pytest.raises(UserError) as raised:
        kohya.split_peft_key(key)
    shown = key.removeprefix("base_model.model.")
    assert str(raised.value) == f"unexpected weight {shown} in a LoKr checkpoint"


# --- what can be exported ---


def test_tucker_conv_factors_are_refused():
    with pytest.raises(UserError) as raised:
        kohya.check_exportable({"use_effective_conv2d": True}, {"conv1": (8, 8, 3, 3)})
    assert str(raised.value) == (
        "this checkpoint uses Tucker conv factors (use_effective_conv2d), which ComfyUI and A1111 cannot load: "
        "retrain without it to export"
    )
    kohya.check_exportable({"use_effective_conv2d": False}, {"conv1": (8, 8, 3, 3)})  # no refusal


def large_factor_message(factor: int, dim: int, module: str) -> str:
    return (
        f"decompose_factor {factor} is above sqrt({dim}) for {module}: ComfyUI and AUTOMATIC1111 load it exactly, "
        "LyCORIS's own loader (kohya sd-scripts, lycoris.kohya) cannot: pass --allow_large_factor to export for "
        "ComfyUI / A1111, or retrain with --decompose_factor -1"
    )


@pytest.mark.parametrize(
    ("factor", "shapes", "refused"),
    [
        (16, {"a": (64, 320)}, (64, "a")),  # 16 > sqrt(64) = 8
        (16, {"a": (40, 64)}, (64, "a")),  # the second dim too
        (16, {"a": (40, 40), "b": (48, 40)}, (48, "b")),  # isqrt(48) = 6
        (16, {"ok": (40, 24), "a": (32, 40)}, (32, "a")),  # the first module that is refused is named
        (8, {"a": (64, 64)}, None),  # 8 = sqrt(64): the smaller factor stays first
        (8, {"a": (48, 48)}, (48, "a")),  # 48 / 8 = 6 < 8
        (16, {"a": (40, 40, 32, 32)}, None),  # a kernel size is not split
        (16, {"a": (40, 24)}, None),  # neither is a multiple of 16: peft does not use the factor
        (0, {"a": (64, 64)}, None),
        (-1, {"a": (4, 4)}, None),
        (None, {"a": (4, 4)}, None),  # no decompose_factor in the config
    ],
)
def test_a_decompose_factor_above_sqrt_of_a_dim_is_refused_unless_allowed(factor, shapes, refused):
    config = {} if factor is None else {"decompose_factor": factor}
    if refused is None:
        kohya.check_exportable(config, shapes)
        return
    with pytest.raises(UserError) as raised:
        kohya.check_exportable(config, shapes)
    assert str(raised.value) == large_factor_message(factor, *refused)
    kohya.check_exportable(config, shapes, allow_large_factor=True)  # for ComfyUI / A1111


# --- ranks and alphas ---

PATTERNED = {
    "r": 4,
    "alpha": 2.0,
    "rank_pattern": {"conv1": 2, TO_Q: 8},
    "alpha_pattern": {"conv1": 5.0, "to_k": 7.0},
}


@pytest.mark.parametrize(
    ("config", "module", "expected"),
    [
        (PATTERNED, "down_blocks.0.resnets.0.conv1", (2, 5.0)),
        (PATTERNED, TO_Q, (8, 2.0)),
        (PATTERNED, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", (4, 7.0)),
        (PATTERNED, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v", (4, 2.0)),
        ({"r": 4, "alpha": 2.0}, TO_Q, (4, 2.0)),
        ({"r": 4, "alpha": 2.0, "rank_pattern": None, "alpha_pattern": None}, TO_Q, (4, 2.0)),
    ],
)
def test_each_module_gets_peft_s_rank_and_alpha(config, module, expected):
    assert kohya.module_rank_alpha(config, module) == expected


# --- one module's factors as LyCORIS / ComfyUI read them ---


def factors(**shapes: tuple[int, ...]) -> dict[str, torch.Tensor]:
    return {name: rand(*shape, seed=i) for i, (name, shape) in enumerate(shapes.items())}


# (peft's factors, the weight's shape, rank) -> the exported factor names and shapes, and the stored alpha
LAYOUTS = {
    "linear, both full": (
        factors(lokr_w1=(2, 3), lokr_w2=(4, 4)),
        (8, 12),
        4,
        {"lokr_w1": (2, 3), "lokr_w2": (4, 4)},
        4.0,
    ),
    "linear, w2 split below half its larger side": (
        factors(lokr_w1=(2, 3), lokr_w2_a=(4, 2), lokr_w2_b=(2, 6)),
        (8, 18),
        2,
        {"lokr_w1": (2, 3), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 6)},
        2.0,
    ),
    "linear, w2 split at half its larger side: unsplit": (
        factors(lokr_w1=(2, 3), lokr_w2_a=(4, 3), lokr_w2_b=(3, 6)),
        (8, 18),
        3,
        {"lokr_w1": (2, 3), "lokr_w2": (4, 6)},
        3.0,
    ),
    "linear, w2 split at half its smaller side": (
        factors(lokr_w1=(2, 3), lokr_w2_a=(6, 2), lokr_w2_b=(2, 4)),
        (12, 12),
        2,
        {"lokr_w1": (2, 3), "lokr_w2_a": (6, 2), "lokr_w2_b": (2, 4)},
        2.0,
    ),
    "linear, both split": (
        factors(lokr_w1_a=(4, 1), lokr_w1_b=(1, 6), lokr_w2_a=(4, 1), lokr_w2_b=(1, 6)),
        (16, 36),
        1,
        {"lokr_w1_a": (4, 1), "lokr_w1_b": (1, 6), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 6)},
        1.0,
    ),
    "linear, both split at rank 2, below half of 6": (
        factors(lokr_w1_a=(4, 2), lokr_w1_b=(2, 6), lokr_w2_a=(4, 2), lokr_w2_b=(2, 6)),
        (16, 36),
        2,
        {"lokr_w1_a": (4, 2), "lokr_w1_b": (2, 6), "lokr_w2_a": (4, 2), "lokr_w2_b": (2, 6)},
        2.0,
    ),
    "linear, both split, w1 taller": (
        factors(lokr_w1_a=(6, 1), lokr_w1_b=(1, 2), lokr_w2_a=(4, 1), lokr_w2_b=(1, 6)),
        (24, 12),
        1,
        {"lokr_w1_a": (6, 1), "lokr_w1_b": (1, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 6)},
        1.0,
    ),
    "linear, w1 split at half its larger side: unsplit": (
        factors(lokr_w1_a=(2, 1), lokr_w1_b=(1, 2), lokr_w2_a=(4, 1), lokr_w2_b=(1, 6)),
        (8, 12),
        1,
        {"lokr_w1": (2, 2), "lokr_w2_a": (4, 1), "lokr_w2_b": (1, 6)},
        1.0,
    ),
    "linear, w1 and w2 split at other ranks: w1 unsplit": (
        factors(lokr_w1_a=(8, 2), lokr_w1_b=(2, 8), lokr_w2_a=(6, 1), lokr_w2_b=(1, 6)),
        (48, 48),
        1,
        {"lokr_w1": (8, 8), "lokr_w2_a": (6, 1), "lokr_w2_b": (1, 6)},
        1.0,
    ),
    "linear, split w1 beside a full w2: unsplit": (
        factors(lokr_w1_a=(4, 1), lokr_w1_b=(1, 6), lokr_w2=(2, 2)),
        (8, 12),
        1,
        {"lokr_w1": (4, 6), "lokr_w2": (2, 2)},
        1.0,
    ),
    "conv, w2 split (flat)": (
        factors(lokr_w1=(2, 3), lokr_w2_a=(4, 1), lokr_w2_b=(1, 36)),
        (8, 12, 3, 3),
        1,
        {"lokr_w1": (2, 3), "lokr_w2": (4, 4, 3, 3)},
        1.0,
    ),
    "conv 1x1, both split": (
        factors(lokr_w1_a=(4, 1), lokr_w1_b=(1, 6), lokr_w2_a=(8, 1), lokr_w2_b=(1, 10)),
        (32, 60, 1, 1),
        1,
        {"lokr_w1": (4, 6), "lokr_w2": (8, 10, 1, 1)},
        1.0,
    ),
    "conv, both full": (
        factors(lokr_w1=(2, 3), lokr_w2=(4, 4, 3, 3)),
        (8, 12, 3, 3),
        8,
        {"lokr_w1": (2, 3), "lokr_w2": (4, 4, 3, 3)},
        8.0,
    ),
}


@pytest.mark.parametrize("case", LAYOUTS)
def test_each_layout_exports_the_factors_consumers_read_as_peft_s_delta(case):
    weights, shape, rank, expected_shapes, expected_alpha = LAYOUTS[case]
    scale = 0.75  # alpha / r (folded into w1)
    out = kohya.lycoris_layout(dict(weights), shape, scale, rank)
    assert {k: tuple(v.shape) for k, v in out.items() if k != "alpha"} == expected_shapes
    assert out["alpha"].shape == () and out["alpha"].dtype == torch.float32
    assert out["alpha"].item() == expected_alpha
    got = comfyui_delta({f"m.{k}": v for k, v in out.items()}, "m.", shape)
    want = peft_delta(weights, shape, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # The factors LyCORIS's loader keeps are stored as peft has them; the scale goes into w1 (or w1_a).
    for key in ("lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_w1_b"):
        if key in out and key in weights:
            assert torch.equal(out[key], weights[key]), key
    if "lokr_w1" in weights:
        torch.testing.assert_close(out["lokr_w1"], weights["lokr_w1"] * scale)
    if "lokr_w1_a" in out:
        torch.testing.assert_close(out["lokr_w1_a"], weights["lokr_w1_a"] * scale)


def base_layer(shape: tuple[int, ...]) -> torch.nn.Module:
    if len(shape) == 4:
        return torch.nn.Conv2d(shape[1], shape[0], shape[2:], bias=False).double()
    return torch.nn.Linear(shape[1], shape[0], bias=False).double()


# The layouts whose factor shapes are peft's (and LyCORIS's) factorization of the weight (the smaller factor first,
# the closest to sqrt): LyCORIS's loader rebuilds its module from those shapes.
PEFT_FACTORIZATIONS = [
    "linear, both full",
    "linear, w2 split below half its larger side",
    "linear, w2 split at half its larger side: unsplit",
    "linear, both split",
    "linear, w1 split at half its larger side: unsplit",
    "conv, w2 split (flat)",
    "conv 1x1, both split",
    "conv, both full",
]


@pytest.mark.parametrize("case", PEFT_FACTORIZATIONS)
def test_lycoris_s_loader_rebuilds_each_layout_with_peft_s_delta(case):
    """LyCORIS's own loader (lycoris.kohya: get_module, make_module) on a small layer of the layout."""
    from lycoris.modules import get_module, make_module

    weights, shape, rank, _, _ = LAYOUTS[case]
    base, layer = base_layer(shape), base_layer(shape)
    layer.load_state_dict(base.state_dict())
    exported = {f"lora_unet_m.{k}": v.double() for k, v in kohya.lycoris_layout(weights, shape, 0.75, rank).items()}
    kind, params = get_module(exported, "lora_unet_m")
    make_module(kind, params, "lora_unet_m", layer).apply_to()
    x = torch.randn(2, shape[1], *(5,) * (len(shape) - 2), generator=torch.Generator().manual_seed(3)).double()
    delta = peft_delta({k: v.double() for k, v in weights.items()}, shape, 0.75)
    want = F.conv2d(x, delta) if len(shape) == 4 else F.linear(x, delta)
    with torch.no_grad():
        got = layer(x) - base(x)
    assert (got - want).norm() <= 1e-5 * want.norm()


# --- the whole export ---


def peft_state(modules: dict[str, dict[str, torch.Tensor]], dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {f"base_model.model.{m}.{k}": v.to(dtype) for m, ws in modules.items() for k, v in ws.items()}


def test_adapters_export_to_kohya_keys_with_peft_s_scale_folded_in():
    conv1 = "down_blocks.0.resnets.0.conv1"
    unet_weights = {
        TO_Q: factors(lokr_w1=(2, 3), lokr_w2_a=(4, 1), lokr_w2_b=(1, 6)),
        conv1: factors(lokr_w1=(2, 2), lokr_w2_a=(4, 1), lokr_w2_b=(1, 36)),
    }
    te_weights = {"encoder.layers.0.self_attn.q_proj": factors(lokr_w1=(2, 2), lokr_w2=(4, 4))}
    unet_config = {**PATTERNED, "decompose_factor": 2}
    adapters = {
        "unet": (unet_config, peft_state(unet_weights, torch.bfloat16)),
        "text_encoder_one": ({"r": 4, "alpha": 1.0}, peft_state(te_weights)),
    }
    shapes = {
        "unet": {TO_Q: (8, 18), conv1: (8, 8, 3, 3), "conv_in": (320, 4, 3, 3)},  # conv_in: 4 / 2 > isqrt(4), unadapted
        "text_encoder_one": {"encoder.layers.0.self_attn.q_proj": (8, 8)},
    }
    out = kohya.lokr_to_kohya(adapters, SDXL_UNET, shapes, dtype=torch.float16)
    q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    c = "lora_unet_input_blocks_1_0_in_layers_2"
    t = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert list(out) == [
        f"{c}.lokr_w1", f"{c}.lokr_w2", f"{c}.alpha",
        f"{q}.lokr_w1", f"{q}.lokr_w2_a", f"{q}.lokr_w2_b", f"{q}.alpha",
        f"{t}.lokr_w1", f"{t}.lokr_w2", f"{t}.alpha",
    ]  # fmt: skip
    assert all(v.dtype == torch.float16 and v.is_contiguous() for v in out.values())
    bf16 = {m: {k: v.to(torch.bfloat16).float() for k, v in ws.items()} for m, ws in unet_weights.items()}
    # to_q: rank 8, alpha 2 (rank_pattern); conv1: rank 2, alpha 5; the text encoder: alpha 1 / r 4.
    torch.testing.assert_close(out[f"{q}.lokr_w1"].float(), bf16[TO_Q]["lokr_w1"] * 2.0 / 8, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(out[f"{c}.lokr_w1"].float(), bf16[conv1]["lokr_w1"] * 5.0 / 2, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(
        out[f"{t}.lokr_w1"].float(),
        te_weights["encoder.layers.0.self_attn.q_proj"]["lokr_w1"] / 4,
        rtol=1e-3,
        atol=1e-3,
    )
    assert out[f"{q}.lokr_w2_b"].shape == (1, 6) and out[f"{c}.lokr_w2"].shape == (4, 4, 3, 3)
    assert (out[f"{q}.alpha"].item(), out[f"{c}.alpha"].item(), out[f"{t}.alpha"].item()) == (1.0, 2.0, 4.0)


def test_non_contiguous_factors_export_to_a_file_safetensors_can_write(tmp_path):
    w2 = rand(6, 4).t()  # a transposed view, as a factor can come out of a state dict
    assert not w2.is_contiguous()
    state = peft_state({"encoder.layers.0.mlp.fc1": {"lokr_w1": rand(2, 3).t(), "lokr_w2": w2}})
    out = kohya.lokr_to_kohya(
        {"text_encoder_one": ({"r": 4, "alpha": 4.0}, state)},
        SDXL_UNET,
        {"text_encoder_one": {"encoder.layers.0.mlp.fc1": (12, 12)}},
    )
    save_file(out, str(tmp_path / "lokr.safetensors"))
    assert torch.equal(
        load_file(tmp_path / "lokr.safetensors")["lora_te1_text_model_encoder_layers_0_mlp_fc1.lokr_w2"], w2
    )


def test_a_module_the_base_model_lacks_is_refused():
    state = peft_state({"up_blocks.9.attentions.0.proj_in": factors(lokr_w1=(2, 2), lokr_w2=(2, 2))})
    message = "the base model has no up_blocks.9.attentions.0.proj_in for the adapter's weights: is it the run's base?"
    with pytest.raises(UserError) as raised:
        kohya.lokr_to_kohya({"unet": ({"r": 4, "alpha": 4.0}, state)}, SDXL_UNET, {"unet": {TO_Q: (4, 4)}})
    assert str(raised.value) == message
    with pytest.raises(UserError) as raised:  # no shapes at all for that model
        kohya.lokr_to_kohya({"unet": ({"r": 4, "alpha": 4.0}, state)}, SDXL_UNET, {})
    assert str(raised.value) == message


def test_the_export_refuses_a_large_factor_unless_allowed():
    state = peft_state({TO_Q: factors(lokr_w1=(16, 16), lokr_w2=(4, 4))})
    adapters = {"unet": ({"r": 4, "alpha": 4.0, "decompose_factor": 16}, state)}
    with pytest.raises(UserError) as raised:
        kohya.lokr_to_kohya(adapters, SDXL_UNET, {"unet": {TO_Q: (64, 64)}})
    assert str(raised.value) == large_factor_message(16, 64, TO_Q)
    out = kohya.lokr_to_kohya(adapters, SDXL_UNET, {"unet": {TO_Q: (64, 64)}}, allow_large_factor=True)
    assert out["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lokr_w1"].dtype == torch.float32


def test_grouped_factors_are_fp32_by_module():
    state = {"base_model.model.a.b.lokr_w1": torch.ones(2, 2, dtype=torch.float16), "a.b.lokr_w2": torch.ones(3, 3)}
    grouped = kohya.group_modules(state)
    assert list(grouped) == ["a.b"] and list(grouped["a.b"]) == ["lokr_w1", "lokr_w2"]
    assert all(v.dtype == torch.float32 for v in grouped["a.b"].values())


# --- metadata ---


def test_metadata_names_lycoris_lokr_with_the_folded_alpha():
    config = {"r": 8, "alpha": 4.0, "decompose_factor": 16, "decompose_both": True}
    assert kohya.kohya_metadata(config, "stabilityai/stable-diffusion-xl-base-1.0") == {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": '{"algo": "lokr", "factor": 16, "decompose_both": true}',
        "ss_network_dim": "8",
        "ss_network_alpha": "8",
        "difftune_peft_alpha": "4.0",
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": "stabilityai/stable-diffusion-xl-base-1.0",
    }


@pytest.mark.parametrize(
    ("config", "conv_modules", "args", "extra"),
    [
        ({"r": 4, "alpha": 2.0}, (), '{"algo": "lokr", "factor": -1}', {}),
        ({"r": 4, "alpha": 2.0, "decompose_both": False}, (), '{"algo": "lokr", "factor": -1}', {}),
        (
            PATTERNED,
            ["down_blocks.0.resnets.0.conv1", "up_blocks.1.resnets.2.conv1"],
            '{"algo": "lokr", "factor": -1, "conv_dim": 2, "conv_alpha": 2}',
            {"difftune_peft_conv_alpha": "5.0"},
        ),
        (  # the convs at the network's own rank and alpha: nothing more
            PATTERNED,
            ["down_blocks.0.resnets.0.conv2", "up_blocks.1.resnets.2.conv2"],
            '{"algo": "lokr", "factor": -1}',
            {},
        ),
        (  # at the network's rank, another alpha
            {**PATTERNED, "alpha_pattern": {"conv2": 3.0}},
            ["down_blocks.0.resnets.0.conv2"],
            '{"algo": "lokr", "factor": -1, "conv_dim": 4, "conv_alpha": 4}',
            {"difftune_peft_conv_alpha": "3.0"},
        ),
        (  # convs at different ranks: no one conv_dim
            PATTERNED,
            ["down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv2"],
            '{"algo": "lokr", "factor": -1}',
            {},
        ),
    ],
)
def test_metadata_gives_the_convs_own_rank_when_they_share_one(config, conv_modules, args, extra):
    assert kohya.kohya_metadata(config, None, conv_modules) == {
        "ss_network_module": "lycoris.kohya",
        "ss_network_args": args,
        "ss_network_dim": str(config["r"]),
        "ss_network_alpha": str(config["r"]),
        "difftune_peft_alpha": str(config["alpha"]),
        **extra,
        "ss_base_model_version": "sdxl_base_v1-0",
        "ss_sd_model_name": "",
    }


# --- reading the base model's shapes and the peft adapter ---

TINY_UNET = {
    "_class_name": "UNet2DConditionModel",
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 24,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
TINY_CLIP = {
    "hidden_size": 16,
    "intermediate_size": 20,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "projection_dim": 12,
    "vocab_size": 50,
    "max_position_embeddings": 8,
}


def test_module_shapes_lists_every_linear_and_conv_of_the_base_models(tmp_path):
    for folder, config in (("unet", TINY_UNET), ("text_encoder", TINY_CLIP), ("text_encoder_2", TINY_CLIP)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(json.dumps(config))
    unet_config, shapes = kohya.module_shapes(str(tmp_path), None, ["unet", "text_encoder_one", "text_encoder_two"])
    assert (unet_config["layers_per_block"], unet_config["up_block_types"]) == (1, ["CrossAttnUpBlock2D", "UpBlock2D"])
    assert list(shapes) == ["unet", "text_encoder_one", "text_encoder_two"]
    unet = shapes["unet"]
    assert unet["conv_in"] == (32, 4, 3, 3) and unet["conv_out"] == (4, 32, 3, 3)
    assert unet["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == (64, 24)
    assert "down_blocks.1.attentions.0.norm" not in unet  # a GroupNorm
    te1, te2 = shapes["text_encoder_one"], shapes["text_encoder_two"]
    assert te1 == {
        "encoder.layers.0.self_attn.k_proj": (16, 16),
        "encoder.layers.0.self_attn.v_proj": (16, 16),
        "encoder.layers.0.self_attn.q_proj": (16, 16),
        "encoder.layers.0.self_attn.out_proj": (16, 16),
        "encoder.layers.0.mlp.fc1": (20, 16),
        "encoder.layers.0.mlp.fc2": (16, 20),
    }
    assert te2["text_projection"] == (12, 16) and te2["text_model.encoder.layers.0.mlp.fc1"] == (20, 16)
    assert len(te2) == 7
    assert kohya.module_shapes(str(tmp_path), None, ["text_encoder_two"])[1].keys() == {"text_encoder_two"}


def test_read_peft_adapter_gives_its_config_and_weights(tmp_path):
    config = {"peft_type": "LOKR", "r": 4, "alpha": 2.0}
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    weights = {"base_model.model.to_q.lokr_w1": torch.arange(4.0).view(2, 2)}
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    got_config, got_weights = kohya.read_peft_adapter(tmp_path)
    assert got_config == config
    assert list(got_weights) == list(weights) and torch.equal(
        got_weights["base_model.model.to_q.lokr_w1"], weights["base_model.model.to_q.lokr_w1"]
    )


def test_module_shapes_reads_the_configs_at_the_base_s_revision(tmp_path, monkeypatch):
    """--revision picks the Hub revision of the base model: every config is read at it (recorded here, no Hub)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig

    for folder, config in (("unet", TINY_UNET), ("text_encoder", TINY_CLIP), ("text_encoder_2", TINY_CLIP)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text(json.dumps(config))
    read = []
    load_config, from_pretrained = UNet2DConditionModel.load_config, CLIPTextConfig.from_pretrained

    def unet_config(base, **kwargs):
        read.append(("unet", kwargs))
        return load_config(base, **kwargs)

    def clip_config(base, **kwargs):
        read.append(("clip", kwargs))
        return from_pretrained(base, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "load_config", unet_config)
    monkeypatch.setattr(CLIPTextConfig, "from_pretrained", clip_config)
    kohya.module_shapes(str(tmp_path), "refs/pr/7", ["unet", "text_encoder_one", "text_encoder_two"])
    assert read == [
        ("unet", {"subfolder": "unet", "revision": "refs/pr/7"}),
        ("clip", {"subfolder": "text_encoder", "revision": "refs/pr/7"}),
        ("clip", {"subfolder": "text_encoder_2", "revision": "refs/pr/7"}),
    ]
