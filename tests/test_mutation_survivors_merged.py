"""Small fast tests written for the mutants `make mutation-auto` found alive in formats/merged_checkpoint.py
(docs/mutation.md): each asserts what a user sees (the single file's keys, tensors, dtypes, header, a refusal)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from helpers import module_tree
from peft import LoKrConfig, get_peft_model, get_peft_model_state_dict  # imported once, at collection (slow)
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from difftune.cli.errors import UserError
from difftune.formats import merged_checkpoint as mc

# SGM (original single-file) names, as ComfyUI / A1111 / diffusers' from_single_file read them (REFERENCE.md 10)
UNET_Q = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
UNET_CONV = "model.diffusion_model.input_blocks.4.0.in_layers.2.weight"
UNET_UP = "model.diffusion_model.output_blocks.2.2.conv.weight"  # up block 0 of SDXL has attention: position 2
CLIP_L_Q = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
G = "conditioner.embedders.1.model."
IN_PROJ_W, IN_PROJ_B = (
    G + "transformer.resblocks.0.attn.in_proj_weight",
    G + "transformer.resblocks.0.attn.in_proj_bias",
)
C_FC = G + "transformer.resblocks.0.mlp.c_fc.weight"
POSITION_IDS = "text_model.embeddings.position_ids"
SDXL_UNET_CONFIG = {"layers_per_block": 2, "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


def seeded(module: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    for p in module.parameters():
        nn.init.normal_(p)
    return module


def weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def models():
    """A tiny SDXL-named UNet and two text encoders: base weights, peft LoKr adapters, peft's own merge."""
    q, k, v = (f"text_model.encoder.layers.0.self_attn.{p}_proj" for p in "qkv")
    built = {
        "unet": seeded(
            module_tree({
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": nn.Linear(64, 64, bias=False),
                "down_blocks.1.resnets.0.conv1": nn.Conv2d(8, 8, 3),
                "up_blocks.0.upsamplers.0.conv": nn.Conv2d(2, 2, 1),
            }), 1),
        "text_encoder_one": seeded(module_tree({q: nn.Linear(4, 4)}), 2),
        "text_encoder_two": seeded(
            module_tree({q: nn.Linear(4, 4), k: nn.Linear(4, 4), v: nn.Linear(4, 4),
                  "text_model.encoder.layers.0.mlp.fc1": nn.Linear(4, 6),
                  "text_model.final_layer_norm": nn.LayerNorm(4), "text_projection": nn.Linear(4, 3, bias=False)}),
            3),
    }  # fmt: skip
    configs = {
        "unet": LoKrConfig(
            r=4, alpha=8, target_modules=["to_q", "conv1"], init_weights=False, decompose_both=True,
            rank_pattern={"to_q": 2}, alpha_pattern={"to_q": 3},
        ),
        "text_encoder_one": LoKrConfig(r=2, alpha=1, target_modules=["q_proj"], init_weights=False),
        "text_encoder_two": LoKrConfig(r=2, alpha=4, target_modules=["k_proj", "fc1"], init_weights=False),
    }  # fmt: skip
    base, adapters, merged = {}, {}, {}
    for i, (name, model) in enumerate(built.items()):
        base[name] = weights(model)
        torch.manual_seed(10 + i)
        wrapped = get_peft_model(model, configs[name])
        adapters[name] = (configs[name].to_dict(), dict(get_peft_model_state_dict(wrapped)))
        merged[name] = weights(wrapped.merge_and_unload())
    assert set(adapters["unet"][1]) >= {f"base_model.model.{part}" for part in ("down_blocks.1.attentions.0."
        "transformer_blocks.0.attn1.to_q.lokr_w1_a", "down_blocks.1.resnets.0.conv1.lokr_w2")}  # fmt: skip
    return base, adapters, merged


def expected_checkpoint(state: dict) -> dict[str, torch.Tensor]:
    """The SGM layout of the three models' weights, written out by hand."""
    unet, te1, te2 = state["unet"], state["text_encoder_one"], state["text_encoder_two"]
    layer = "text_model.encoder.layers.0."
    return {
        UNET_Q: unet["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"],
        UNET_CONV: unet["down_blocks.1.resnets.0.conv1.weight"],
        UNET_CONV.replace("weight", "bias"): unet["down_blocks.1.resnets.0.conv1.bias"],
        UNET_UP: unet["up_blocks.0.upsamplers.0.conv.weight"],
        UNET_UP.replace("weight", "bias"): unet["up_blocks.0.upsamplers.0.conv.bias"],
        CLIP_L_Q: te1[layer + "self_attn.q_proj.weight"],
        CLIP_L_Q.replace("weight", "bias"): te1[layer + "self_attn.q_proj.bias"],
        IN_PROJ_W: torch.cat([te2[layer + f"self_attn.{p}_proj.weight"] for p in "qkv"]),
        IN_PROJ_B: torch.cat([te2[layer + f"self_attn.{p}_proj.bias"] for p in "qkv"]),
        C_FC: te2[layer + "mlp.fc1.weight"],
        C_FC.replace("weight", "bias"): te2[layer + "mlp.fc1.bias"],
        G + "ln_final.weight": te2["text_model.final_layer_norm.weight"],
        G + "ln_final.bias": te2["text_model.final_layer_norm.bias"],
        G + "text_projection": te2["text_projection.weight"].t(),  # open_clip stores it transposed
    }


def write_folder(root, base: dict, variant: str | None = None, dtype=torch.float32) -> None:
    """A diffusers folder: unet / text_encoder / text_encoder_2 safetensors (+ position_ids), configs."""
    suffix = f".{variant}" if variant else ""
    files = {
        "unet": ("diffusion_pytorch_model", base["unet"]),
        "text_encoder": ("model", {**base["text_encoder_one"], POSITION_IDS: torch.arange(4)[None]}),
        "text_encoder_2": ("model", {**base["text_encoder_two"], POSITION_IDS: torch.arange(4)[None]}),
    }  # fmt: skip
    for folder, (stem, state) in files.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        state = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in state.items()}
        save_file(state, str(root / folder / f"{stem}{suffix}.safetensors"))
    (root / "unet" / "config.json").write_text(json.dumps(SDXL_UNET_CONFIG))


def assert_same(got: dict, expected: dict, **tolerance) -> None:
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key].shape == tensor.shape, key
        if tolerance:
            torch.testing.assert_close(got[key].float(), tensor.float(), **tolerance, msg=key)
        else:
            assert torch.equal(got[key], tensor), key


# --- the whole merge against peft's merge_and_unload ---


@pytest.mark.parametrize(
    ("base_dtype", "dtype", "code", "tolerance"),
    [
        (torch.float32, torch.float32, "F32", {"atol": 1e-5, "rtol": 1e-5}),
        (torch.float32, torch.float16, "F16", {"atol": 2e-2, "rtol": 2e-3}),
        (torch.float16, torch.float16, "F16", {"atol": 2e-2, "rtol": 2e-3}),  # an fp16 base, the default output
    ],
)
def test_the_merged_folder_equals_peft_merge_in_the_original_layout(
    tmp_path, models, base_dtype, dtype, code, tolerance
):
    base, adapters, merged = models
    write_folder(tmp_path / "base", base, dtype=base_dtype)
    entries = mc.folder_entries(tmp_path / "base", None)
    deltas = mc.patches(adapters, SDXL_UNET_CONFIG)
    assert sorted(deltas) == sorted([UNET_Q, UNET_CONV, CLIP_L_Q, IN_PROJ_W, C_FC])
    out = tmp_path / "merged.safetensors"
    mc.write_streaming(out, entries, mc.merged(entries, deltas, dtype), dtype, {"modelspec.title": "t"}, deltas)
    data = sum(t.numel() for t in expected_checkpoint(merged).values()) * torch.finfo(dtype).bits // 8
    assert out.stat().st_size == 8 + struct.unpack("<Q", out.read_bytes()[:8])[0] + data  # every tensor as stored
    got = load_file(str(out))
    assert {t.dtype for t in got.values()} == {dtype}
    assert_same(got, expected_checkpoint(merged), **tolerance)
    with safe_open(str(out), framework="pt") as handle:
        assert handle.metadata() == {"modelspec.title": "t"}
    header = json.loads(out.read_bytes()[8 : 8 + struct.unpack("<Q", out.read_bytes()[:8])[0]])
    assert {h["dtype"] for k, h in header.items() if k != "__metadata__"} == {code}


def test_the_base_is_copied_unchanged_where_nothing_is_merged(tmp_path, models):
    base, _, _ = models
    write_folder(tmp_path / "base", base)
    entries = mc.folder_entries(tmp_path / "base", None)
    assert {e.dtype for e in entries} == {"F32"}
    assert_same({e.key: e.load() for e in entries}, expected_checkpoint(base))
    assert {e.key: e.shape for e in entries}[G + "text_projection"] == (4, 3)
    assert {e.key: e.shape for e in entries}[IN_PROJ_W] == (12, 4)
    assert {e.key: e.shape for e in entries}[IN_PROJ_B] == (12,)


def test_a_variant_folder_reads_only_the_variant_files(tmp_path, models):
    base, _, _ = models
    write_folder(tmp_path / "base", base)  # the plain files beside the fp16 ones
    doubled = {name: {k: t * 2 for k, t in state.items()} for name, state in base.items()}
    write_folder(tmp_path / "base", doubled, variant="fp16", dtype=torch.float16)
    entries = mc.folder_entries(tmp_path / "base", "fp16")
    assert {e.dtype for e in entries} == {"F16"}
    expected = {k: t.half() for k, t in expected_checkpoint(doubled).items()}
    assert_same({e.key: e.load() for e in entries}, expected)
    plain = mc.folder_entries(tmp_path / "base", None)
    assert_same({e.key: e.load() for e in plain}, expected_checkpoint(base))


@pytest.mark.parametrize("variant", [None, "fp16"])
def test_a_folder_without_weights_is_refused(tmp_path, variant):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps(SDXL_UNET_CONFIG))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "unet" / "diffusion_pytorch_model.bf16.safetensors"))
    shown = ".fp16" if variant else ""
    with pytest.raises(UserError) as refused:
        mc.folder_entries(tmp_path, variant)
    assert str(refused.value) == f"{tmp_path / 'unet'} has no {shown} .safetensors weights to merge into"


def test_a_base_without_an_adapted_weight_is_refused():
    entries = [mc.Entry(UNET_UP, (2, 2, 1, 1), "F32", lambda: torch.zeros(2, 2, 1, 1))]
    deltas = {UNET_Q: [], CLIP_L_Q: []}
    with pytest.raises(UserError) as refused:
        next(mc.merged(entries, deltas, torch.float16))
    assert str(refused.value) == (
        f"the base model has no {CLIP_L_Q} for the adapter to merge into: is it the run's base?"
    )


def test_the_vae_gets_the_original_autoencoder_names(tmp_path):
    vae = tmp_path / "vae"
    vae.mkdir()
    (vae / "config.json").write_text(json.dumps({"down_block_types": ["DownEncoderBlock2D"] * 2}))
    state = {
        "decoder.mid_block.attentions.0.to_q.weight": torch.randn(4, 4),
        "decoder.mid_block.attentions.0.to_q.bias": torch.randn(4),
        "decoder.up_blocks.0.resnets.0.conv1.weight": torch.randn(2, 2, 3, 3),
        "encoder.mid_block.attentions.0.group_norm.weight": torch.randn(4),
    }
    save_file(state, str(vae / "diffusion_pytorch_model.safetensors"))
    save_file({k: t.half() * 0 for k, t in state.items()}, str(vae / "diffusion_pytorch_model.fp16.safetensors"))
    got = {e.key: (e.shape, e.dtype, e.load()) for e in mc.vae_entries(vae)}
    expected = {
        "first_stage_model.decoder.mid.attn_1.q.weight": state["decoder.mid_block.attentions.0.to_q.weight"]
        .reshape(4, 4, 1, 1),  # a 1x1 conv in the original autoencoder
        "first_stage_model.decoder.mid.attn_1.q.bias": state["decoder.mid_block.attentions.0.to_q.bias"],
        "first_stage_model.decoder.up.1.block.0.conv1.weight": state["decoder.up_blocks.0.resnets.0.conv1.weight"],
        "first_stage_model.encoder.mid.attn_1.norm.weight": state["encoder.mid_block.attentions.0.group_norm.weight"],
    }  # fmt: skip
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert got[key][0] == tuple(tensor.shape) and got[key][1] == "F32", key
        assert torch.equal(got[key][2], tensor), key
    fp16 = {e.key: (e.dtype, e.load()) for e in mc.vae_entries(vae, "fp16")}
    assert {d for d, _ in fp16.values()} == {"F16"} and all(not t.any() for _, t in fp16.values())


# --- a single-file base: every key kept (markers too), its VAE dropped when replaced, fp8 weights ---


@pytest.fixture
def single_file(tmp_path):
    torch.manual_seed(5)
    q = torch.randn(64, 64)
    state = {
        "first_stage_model.decoder.conv_in.weight": torch.randn(2, 2, 3, 3),
        UNET_Q: q.to(torch.float8_e4m3fn),  # adapted: merged in the asked dtype
        UNET_UP: torch.randn(2, 2, 1, 1).to(torch.float8_e5m2),  # not adapted: copied as it is
        "model.diffusion_model.out.0.weight": torch.randn(3).to(torch.bfloat16),
        "v_pred": torch.tensor([]),
        "ztsnr": torch.tensor([]),
    }
    path = tmp_path / "base.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.mark.parametrize("drop_vae", [False, True])
def test_a_single_file_base_keeps_every_key(single_file, drop_vae):
    path, state = single_file
    entries = mc.file_entries(path, drop_vae)
    kept = {k: t for k, t in state.items() if not (drop_vae and k.startswith("first_stage_model."))}
    codes = {"first_stage_model.decoder.conv_in.weight": "F32", UNET_Q: "F8_E4M3", UNET_UP: "F8_E5M2",
             "model.diffusion_model.out.0.weight": "BF16", "v_pred": "F32", "ztsnr": "F32"}  # fmt: skip
    assert sorted(e.key for e in entries) == sorted(kept)
    for entry in entries:
        assert entry.shape == tuple(kept[entry.key].shape) and entry.dtype == codes[entry.key], entry.key
        loaded = entry.load()
        assert loaded.dtype == kept[entry.key].dtype and torch.equal(loaded.float(), kept[entry.key].float())


def test_an_fp8_base_is_merged_in_the_asked_dtype_and_copied_elsewhere(tmp_path, single_file, models):
    path, state = single_file
    base, adapters, merged = models
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    delta = merged["unet"][name] - base["unet"][name]  # peft's merge minus the base
    entries = mc.file_entries(path, drop_vae=True)
    deltas = mc.patches({"unet": adapters["unet"]}, SDXL_UNET_CONFIG)
    deltas = {UNET_Q: deltas[UNET_Q]}
    out = tmp_path / "out.safetensors"
    mc.write_streaming(out, entries, mc.merged(entries, deltas, torch.bfloat16), torch.bfloat16, {}, deltas)
    got = load_file(str(out))
    assert sorted(got) == sorted([UNET_Q, UNET_UP, "model.diffusion_model.out.0.weight", "v_pred", "ztsnr"])
    assert got[UNET_Q].dtype == torch.bfloat16
    torch.testing.assert_close(got[UNET_Q].float(), state[UNET_Q].float() + delta, atol=0.05, rtol=0.01)
    assert got[UNET_UP].dtype == torch.float8_e5m2 and torch.equal(got[UNET_UP].float(), state[UNET_UP].float())
    assert got["v_pred"].dtype == torch.bfloat16 and got["v_pred"].shape == (0,)


@pytest.mark.parametrize(
    ("code", "merged_in", "stored"),
    [("F32", False, "F16"), ("BF16", True, "F16"), ("F64", False, "F16"), ("F8_E4M3", True, "F16"),
     ("F8_E5M2", False, "F8_E5M2"), ("F8_E4M3", False, "F8_E4M3"), ("I64", False, "I64"), ("I64", True, "I64")],
)  # fmt: skip
def test_the_stored_dtype(code, merged_in, stored):
    entry = mc.Entry("k", (1,), code, lambda: None)
    assert mc.stored_code(entry, {"k": []} if merged_in else {"other": []}, torch.float16) == stored


# --- the file format: safetensors' header and bytes, written by hand ---

ALL_DTYPES = [
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int64, torch.int32, torch.int16, torch.int8,
    torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2,
]  # fmt: skip


def test_every_dtype_is_written_readably(tmp_path):
    torch.manual_seed(0)
    state = {f"t{i}": (torch.randn(3, 5) * 9).to(d) for i, d in enumerate(ALL_DTYPES)}
    path = tmp_path / "base.safetensors"
    save_file(state, str(path))
    entries = mc.file_entries(path, drop_vae=False)
    out = tmp_path / "out.safetensors"
    mc.write_streaming(out, entries, mc.merged(entries, {}, torch.float32), torch.float32, {"a": "b"})
    got = load_file(str(out))
    assert sorted(got) == sorted(state)
    for key, tensor in state.items():
        floats = tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
        assert got[key].dtype == (torch.float32 if floats else tensor.dtype), key
        assert torch.equal(got[key], tensor.float() if floats else tensor), key


def test_the_header_is_compact_json_padded_to_8_bytes_with_the_offsets_in_order(tmp_path):
    entries = [
        mc.Entry("a", (2,), "F32", lambda: torch.tensor([1.0, 2.0])),
        mc.Entry("b", (3,), "I8", lambda: torch.tensor([1, 2, 3], dtype=torch.int8)),
        mc.Entry("c", (1, 1), "BOOL", lambda: torch.tensor([[True]])),
    ]
    out = tmp_path / "out.safetensors"
    mc.write_streaming(out, entries, mc.merged(entries, {}, torch.float32), torch.float32, {"k": "v"})
    header = (
        b'{"__metadata__":{"k":"v"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
        b'"b":{"dtype":"I8","shape":[3],"data_offsets":[8,11]},"c":{"dtype":"BOOL","shape":[1,1],"data_offsets":[11,12]}}'
    )
    header += b" " * (-len(header) % 8)
    data = struct.pack("<2f", 1.0, 2.0) + bytes([1, 2, 3, 1])
    assert out.read_bytes() == len(header).to_bytes(8, "little") + header + data


def test_a_dtype_the_file_cannot_hold_is_refused(tmp_path):
    entries = [mc.Entry("model.diffusion_model.x", (2,), "U32", lambda: torch.zeros(2))]
    with pytest.raises(UserError) as refused:
        mc.write_streaming(tmp_path / "out.safetensors", entries, iter([]), torch.float16, {})
    assert str(refused.value) == "model.diffusion_model.x is stored as U32, which the merged checkpoint cannot copy"
    assert not (tmp_path / "out.safetensors").exists()


def test_a_tensor_of_another_shape_than_announced_stops_the_write(tmp_path):
    entries = [mc.Entry("k", (2,), "F32", lambda: torch.zeros(3))]
    with pytest.raises(AssertionError, match=r"^k$"):
        mc.write_streaming(
            tmp_path / "out.safetensors", entries, mc.merged(entries, {}, torch.float32), torch.float32, {}
        )
