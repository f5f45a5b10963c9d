"""Small fast tests written for the mutants `make mutation-auto` found alive in adapters/init_adapter.py
(docs/mutation.md): each asserts what a user sees (a value, a name, a count, a refusal), on tiny synthetic
state dicts and tiny torch modules built here (no model loaded from disk)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys

import peft.tuners.lokr.layer  # noqa: F401 - (with difftune's lokr, lora, kohya below) see the note there
import pytest
import torch
from helpers import module_tree
from peft import LoKrConfig, LoraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

# What init_adapter imports where used (peft takes seconds), peft's LoKr layer above too: imported once here, when
# mutmut's fork server collects the tests, not again in each mutant's run.
import difftune.adapters.lokr
import difftune.adapters.lora
import difftune.formats.kohya  # noqa: F401
from difftune.adapters import init_adapter, injection
from difftune.cli.errors import UserError

SDXL = ["unet", "text_encoder_one", "text_encoder_two"]
WUERSTCHEN = ["prior", "text_encoder"]


def rand(*shape, seed=[0]):  # noqa: B006 - one generator for the whole file: distinct values everywhere
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0])) * 0.1


# --- the flag and the flags typed ---


def test_the_flag_is_added_with_its_help_and_no_default():
    parser = argparse.ArgumentParser()
    init_adapter.add_init_adapter_args(parser.add_argument_group("model"))
    assert parser.parse_args([]).init_adapter is None
    assert parser.parse_args(["--init_adapter", "x.safetensors"]).init_adapter == "x.safetensors"
    (action,) = [a for a in parser._actions if a.dest == "init_adapter"]
    assert action.option_strings == ["--init_adapter"]
    assert action.help == (
        "Start from this adapter (new run, step 0): a difftune checkpoint folder, or for SDXL a kohya / LyCORIS "
        "LoKr .safetensors, for Wuerstchen a diffusers pytorch_lora_weights.safetensors. Rank, factors and targets "
        "come from it."
    )


def test_explicit_flags_are_the_double_dash_words_typed(monkeypatch, tmp_path):
    argv = ["--rank=3", "--alpha", "4", "-v", "x--y", tmp_path / "--not_a_flag_path", "--decompose_both"]
    assert init_adapter.explicit_flags(argv) == {"rank", "alpha", "decompose_both"}
    from pathlib import Path

    assert init_adapter.explicit_flags([Path("--rank=2")]) == {"rank"}  # a Path typed is read as its text
    monkeypatch.setattr(sys, "argv", ["train.py", "--conv_rank", "2", "--lr=1"])
    assert init_adapter.explicit_flags(None) == {"conv_rank", "lr"}
    monkeypatch.setattr(sys, "argv", ["--script_name_is_not_a_flag"])
    assert init_adapter.explicit_flags(None) == set()


def test_a_source_defaults_to_an_unmapped_lokr_with_no_weights():
    source = init_adapter.Source({"r": 2})
    assert (source.settings, source.weights, source.kohya, source.lokr) == ({"r": 2}, {}, False, True)
    assert init_adapter.Source({}).weights is not source.weights


# --- one module's LoKr factors: layout, rank, ComfyUI's scale, refusals ---

SPLIT_W2 = {"lokr_w1": (4, 6), "lokr_w2_a": (12, 2), "lokr_w2_b": (2, 8)}
SPLIT_W1 = {"lokr_w1_a": (4, 3), "lokr_w1_b": (3, 6), "lokr_w2": (12, 8)}
BOTH_SPLIT = {"lokr_w1_a": (4, 3), "lokr_w1_b": (3, 6), "lokr_w2_a": (12, 5), "lokr_w2_b": (5, 8)}
BOTH_FULL = {"lokr_w1": (4, 6), "lokr_w2": (12, 8)}
CONV_FULL = {"lokr_w1": (4, 6), "lokr_w2": (12, 8, 3, 3)}


def factors(shapes: dict, alpha: float | None = None) -> dict[str, torch.Tensor]:
    weights = {k: rand(*s) for k, s in shapes.items()}
    if alpha is not None:
        weights["alpha"] = torch.tensor(alpha)
    return weights


@pytest.mark.parametrize(
    ("shapes", "expected"),
    [
        (SPLIT_W2, ((4, 6), (12, 8), False, True)),
        (SPLIT_W1, ((4, 6), (12, 8), True, False)),
        (BOTH_SPLIT, ((4, 6), (12, 8), True, True)),
        (BOTH_FULL, ((4, 6), (12, 8), False, False)),
        (CONV_FULL, ((4, 6), (12, 8), False, False)),
    ],
)
def test_layout_reads_the_factor_sides_whichever_are_split(shapes, expected):
    assert init_adapter.layout(factors(shapes)) == expected


@pytest.mark.parametrize(
    ("shapes", "alpha", "rank", "scale"),
    [
        (SPLIT_W2, 3.0, 2, 1.5),  # alpha / dim with dim the split w2's rank
        (SPLIT_W1, 1.5, 3, 0.5),  # ... or the split w1's
        (BOTH_SPLIT, 2.0, 5, 0.4),  # both split: w2_b's rank is the dim
        (BOTH_FULL, 3.0, None, 1.0),  # no split factor: ComfyUI ignores the alpha
        (SPLIT_W2, None, 2, 1.0),  # no alpha stored: 1
    ],
)
def test_comfyuis_scale_and_the_split_rank(shapes, alpha, rank, scale):
    weights = factors(shapes, alpha)
    assert init_adapter.split_rank(weights) == rank
    assert init_adapter.comfyui_scale(weights) == pytest.approx(scale)
    assert isinstance(init_adapter.comfyui_scale(weights), float)


@pytest.mark.parametrize(
    ("shapes", "message"),
    [
        (
            {**SPLIT_W2, "dora_scale": (1, 6), "lokr_t2": (2, 2, 3, 3)},  # DoRA is named first
            "--init_adapter my.safetensors: m1 is a DoRA LoKr (dora_scale: LyCORIS's dora_wd), whose weight norm "
            "peft's LoKr cannot hold: start from a LoKr trained without dora_wd, or merge this one into the base "
            "model first",
        ),
        (
            {**SPLIT_W2, "lokr_t2": (2, 2, 3, 3)},
            "--init_adapter my.safetensors: m1 uses Tucker conv factors (lokr_t2: LyCORIS's use_tucker / use_cp), "
            "which peft's LoKr cannot hold: start from a LoKr trained without them, or merge this one into the base "
            "model first",
        ),
        *[
            (
                shapes,
                "--init_adapter my.safetensors: m1 is not a LoKr module (no lokr_w1 / lokr_w2): pass a LoKr file",
            )
            for shapes in (
                {"lokr_w1": (4, 6)},
                {"lokr_w1_a": (4, 3), "lokr_w1_b": (3, 6)},
                {"lokr_w2": (12, 8)},
                {"lokr_w2_a": (12, 2), "lokr_w2_b": (2, 8)},
                {"lora_down": (2, 6), "lora_up": (12, 2)},
            )
        ],
    ],
)
def test_lokr_variants_peft_cannot_hold_are_refused(shapes, message):
    with pytest.raises(UserError) as error:
        init_adapter.check_lokr_module("m1", factors(shapes), "my.safetensors")
    assert str(error.value) == message


@pytest.mark.parametrize("shapes", [SPLIT_W2, SPLIT_W1, BOTH_SPLIT, BOTH_FULL, CONV_FULL])
def test_every_lokr_layout_passes_the_check(shapes):
    init_adapter.check_lokr_module("m1", factors(shapes, 1.0), "my.safetensors")


def module(rank: int | None, w1_split: bool = False) -> dict[str, torch.Tensor]:
    """A 48 x 48 LoKr module: w1 4 x 6, w2 12 x 8; w2 split at `rank` (None: full)."""
    weights = {"lokr_w1": rand(4, 6)} if not w1_split else {"lokr_w1_a": rand(4, rank), "lokr_w1_b": rand(rank, 6)}
    if rank is None:
        weights["lokr_w2"] = rand(12, 8)
    else:
        weights |= {"lokr_w2_a": rand(12, rank), "lokr_w2_b": rand(rank, 8)}
    return weights


@pytest.mark.parametrize(
    ("ranks", "w1_split", "metadata", "expected"),
    [
        ([2, 2, 4], [False] * 3, {}, {"r": 2, "alpha": 2, "decompose_both": False}),  # the most common rank
        ([2, 4, None], [False] * 3, {}, {"r": 4, "alpha": 4, "decompose_both": False}),  # a tie: the larger
        ([4, 2, 2], [False, True, False], {}, {"r": 2, "alpha": 2, "decompose_both": True}),  # any w1 split
        ([2, None], [True, False], {"ss_network_dim": "16"}, {"r": 2, "alpha": 2, "decompose_both": True}),
        # both full everywhere: the file's ss_network_dim, else half the largest w2 side (12 / 2)
        ([None, None], [False] * 2, {"ss_network_dim": "16"}, {"r": 16, "alpha": 16, "decompose_both": False}),
        ([None, None], [False] * 2, {}, {"r": 6, "alpha": 6, "decompose_both": False}),
        ([None], [False], {"ss_network_dim": ""}, {"r": 6, "alpha": 6, "decompose_both": False}),
        ([None], [False], {"ss_network_dim": "0"}, {"r": 6, "alpha": 6, "decompose_both": False}),
    ],
)
def test_kohya_settings_take_the_files_rank(ranks, w1_split, metadata, expected):
    modules = {f"m{i}": module(r, s) for i, (r, s) in enumerate(zip(ranks, w1_split, strict=True))}
    settings = init_adapter.kohya_settings(modules, metadata, "f.safetensors")
    assert settings == expected
    assert all(type(v) is type(expected[k]) for k, v in settings.items())


@pytest.mark.parametrize(
    ("w2", "expected"),
    [((5, 3), 3), ((3, 7), 4), ((2, 2), 1)],  # ceil(max(b, d) / 2)
)
def test_kohya_settings_of_full_factors_keep_the_largest_side_full(w2, expected):
    modules = {
        "m0": {"lokr_w1": rand(2, 2), "lokr_w2": rand(*w2)},
        "m1": {"lokr_w1": rand(2, 2), "lokr_w2": rand(1, 1)},
    }
    assert init_adapter.kohya_settings(modules, {}, "f")["r"] == expected


def test_kohya_settings_check_every_module():
    modules = {"ok": module(2), "bad": {**module(2), "dora_scale": rand(1, 48)}}
    with pytest.raises(UserError, match=r"^--init_adapter f.safetensors: bad is a DoRA LoKr"):
        init_adapter.kohya_settings(modules, {}, "f.safetensors")


# --- per-module ranks and peft's decompose_factor, on tiny modules ---


@pytest.mark.parametrize(
    ("settings", "layer", "shapes", "expected"),
    [
        ({"r": 2}, nn.Linear(48, 48), BOTH_FULL, 6),  # full factors: the smallest rank keeping w2 (12 x 8) full
        ({"r": 6}, nn.Linear(48, 48), BOTH_FULL, None),  # the source's rank keeps them full
        ({"r": 8}, nn.Linear(48, 48), BOTH_FULL, None),
        ({"r": 2}, nn.Conv2d(48, 48, 3), CONV_FULL, 6),  # a conv's w2 is (b, d, k, k)
        ({"r": 2}, nn.Linear(9, 10), {"lokr_w1": (2, 3), "lokr_w2": (5, 3)}, 3),  # ceil(5 / 2)
        ({"r": 2, "decompose_both": True}, nn.Linear(9, 10), {"lokr_w1": (2, 3), "lokr_w2": (5, 3)}, 3),
        ({"r": 1}, nn.Linear(2, 2), {"lokr_w1": (1, 1), "lokr_w2": (2, 2)}, None),  # full at rank 1
        ({"r": 1, "decompose_both": True}, nn.Linear(2, 2), {"lokr_w1": (1, 1), "lokr_w2": (2, 2)}, None),
        # w1 (12 x 6) is larger than w2 (8 x 8): it counts only when peft decomposes both
        ({"r": 2}, nn.Linear(48, 96), {"lokr_w1": (12, 6), "lokr_w2": (8, 8)}, 4),
        ({"r": 2, "decompose_both": False}, nn.Linear(48, 96), {"lokr_w1": (12, 6), "lokr_w2": (8, 8)}, 4),
        ({"r": 2, "decompose_both": True}, nn.Linear(48, 96), {"lokr_w1": (12, 6), "lokr_w2": (8, 8)}, 6),
        ({"r": 2}, nn.Linear(48, 48), SPLIT_W2, None),  # split at the source's rank
        ({"r": 4}, nn.Linear(48, 48), SPLIT_W2, 2),  # split at its own rank
        ({"r": 4}, nn.Linear(48, 48), SPLIT_W1, 3),
        ({"r": 3}, nn.Linear(48, 48), BOTH_SPLIT, 5),
    ],
)
def test_module_patterns_give_each_module_its_own_rank(settings, layer, shapes, expected):
    source = init_adapter.Source(settings, {"block.layer": factors(shapes, 1.0)})
    patterns = init_adapter.module_patterns(source, module_tree({"block.layer": layer}))
    assert patterns == ({} if expected is None else {"block.layer": expected})


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ({"a": ((32, 32), (4, 4))}, -1),  # sqrt rule builds 4 x 8: -1 (a tie with 4 goes to -1)
        ({"a": ((64, 64), (4, 4))}, 4),  # sqrt would build 8 x 8
        ({"a": ((64, 32), (4, 4))}, 4),  # the sqrt rule builds 8 of 64 (c alone fits): not built
        ({"a": ((64, 64), (8, 8)), "b": ((64, 64), (4, 4)), "c": ((64, 64), (4, 4))}, 4),  # most modules
        ({"a": ((64, 64), (8, 8)), "b": ((64, 64), (8, 8)), "c": ((64, 64), (4, 4))}, -1),
        ({"a": ((64, 64), (2, 2)), "b": ((64, 64), (4, 4))}, 2),  # a tie between factors: the first (smaller)
        ({"a": ((32, 64), (8, 8)), "b": ((32, 64), (8, 8))}, 8),  # a from out 32, c from in 64: both by 8
        ({"a": ((64, 16), (8, 2))}, -1),  # no single factor builds it: -1
        ({"a": ((48, 40), (4, 5))}, 5),  # 5 does not divide 48: peft's search below 5 gives 4 x 12, w1's a; c is 5
        ({"a": ((7, 7), (1, 1))}, -1),  # 1 builds it as the sqrt rule does (7 is prime): -1
    ],
)
def test_decompose_factor_builds_most_stored_shapes(layers, expected):
    model = module_tree({name: nn.Linear(i, o, bias=False) for name, ((o, i), _) in layers.items()})
    weights = {
        name: {"lokr_w1": rand(a, c), "lokr_w2": rand(o // a, i // c)} for name, ((o, i), (a, c)) in layers.items()
    }
    assert init_adapter.decompose_factor(init_adapter.Source({}, weights), model) == expected


def test_peft_state_names_each_weight_under_the_peft_model():
    w1, w2 = rand(2, 2), rand(2, 2)
    source = init_adapter.Source({}, {"a.b": {"lokr_w1": w1}, "c": {"lokr_w2": w2}})
    assert init_adapter.peft_state(source) == {"base_model.model.a.b.lokr_w1": w1, "base_model.model.c.lokr_w2": w2}


def test_check_targets_refuses_a_module_the_flag_does_not_name():
    init_adapter.check_targets(["to_q", "conv1"], ["down.0.to_q", "conv1"], "target_modules")
    with pytest.raises(UserError) as error:
        init_adapter.check_targets(["to_q"], ["down.0.to_q", "down.0.xto_q", "down.0.conv1"], "target_modules")
    assert str(error.value) == (
        "--init_adapter adapts down.0.xto_q, which --target_modules does not name: drop --target_modules"
    )
    with pytest.raises(UserError, match=r"^--init_adapter adapts q_proj, which --text_encoder_target_modules"):
        init_adapter.check_targets(["k_proj"], ["q_proj"], "text_encoder_target_modules")


# --- files: our checkpoint folders, kohya / LyCORIS files, diffusers LoRA files ---


def peft_folder(folder, config: dict, state: dict) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(state, folder / injection.ADAPTER_WEIGHTS)


LOKR_CONFIG = {
    "peft_type": "LOKR", "r": 4, "alpha": 8.0, "lora_alpha": 8, "decompose_both": True, "decompose_factor": 4,
    "target_modules": ["to_q"], "rank_pattern": {"x": 2}, "alpha_pattern": {"x": 2.0}, "module_dropout": 0.5,
    "use_effective_conv2d": False, "base_model_name_or_path": "base",
}  # fmt: skip


def test_a_peft_folder_gives_its_settings_and_fp32_weights(tmp_path):
    w1, w2 = rand(4, 4).half(), rand(8, 8)
    state = {"base_model.model.down.to_q.lokr_w1": w1, "base_model.model.down.to_q.lokr_w2": w2}
    peft_folder(tmp_path / "unet", LOKR_CONFIG, state)
    source = init_adapter.read_peft_folder(tmp_path / "unet")
    assert source.settings == {
        "r": 4, "alpha": 8.0, "lora_alpha": 8, "decompose_both": True, "decompose_factor": 4,
        "target_modules": ["to_q"], "peft_type": "LOKR", "rank_pattern": {"x": 2}, "alpha_pattern": {"x": 2.0},
    }  # fmt: skip
    assert source.weights.keys() == {"down.to_q"} and source.weights["down.to_q"].keys() == {"lokr_w1", "lokr_w2"}
    assert source.weights["down.to_q"]["lokr_w1"].dtype == torch.float32
    assert torch.equal(source.weights["down.to_q"]["lokr_w1"], w1.float())
    assert torch.equal(source.weights["down.to_q"]["lokr_w2"], w2)
    assert (source.lokr, source.kohya) == (True, False)

    peft_folder(tmp_path / "tucker", {**LOKR_CONFIG, "use_effective_conv2d": True}, state)
    assert init_adapter.read_peft_folder(tmp_path / "tucker").settings["use_effective_conv2d"] is True
    lora = {"peft_type": "LORA", "r": 4, "lora_alpha": 16}
    peft_folder(tmp_path / "lora", lora, {"base_model.model.q.lora_A.weight": rand(4, 8)})
    source = init_adapter.read_peft_folder(tmp_path / "lora")
    assert (source.settings, source.lokr) == (lora, False)
    assert source.weights.keys() == {"q.lora_A"}
    peft_folder(tmp_path / "no_type", {"r": 4}, state)
    assert init_adapter.read_peft_folder(tmp_path / "no_type").lokr is False


def test_a_step_folder_gives_every_adapter_and_a_model_folder_its_own(tmp_path):
    state = {"base_model.model.q.lokr_w1": rand(2, 2)}
    peft_folder(tmp_path / "step4" / "unet", LOKR_CONFIG, state)
    peft_folder(tmp_path / "step4" / "text_encoder_two", {**LOKR_CONFIG, "r": 2}, state)
    peft_folder(tmp_path / "step4" / "other", {**LOKR_CONFIG, "r": 3}, state)
    found = init_adapter.read_folder(tmp_path / "step4", SDXL)
    assert list(found) == ["unet", "text_encoder_two"]
    assert (found["unet"].settings["r"], found["text_encoder_two"].settings["r"]) == (4, 2)
    found = init_adapter.read_source(str(tmp_path / "step4" / "text_encoder_two"), SDXL)
    assert list(found) == ["text_encoder_two"] and found["text_encoder_two"].settings["r"] == 2


def test_a_folder_without_this_scripts_adapters_is_refused(tmp_path):
    peft_folder(tmp_path / "step4" / "prior", LOKR_CONFIG, {"base_model.model.q.lokr_w1": rand(2, 2)})
    with pytest.raises(UserError) as error:
        init_adapter.read_folder(tmp_path / "step4" / "prior", SDXL)
    assert str(error.value) == (
        f"--init_adapter {tmp_path / 'step4' / 'prior'} is a prior/ adapter; this script trains unet, "
        "text_encoder_one, text_encoder_two"
    )
    with pytest.raises(UserError) as error:
        init_adapter.read_folder(tmp_path / "step4", SDXL)
    assert str(error.value) == (
        f"--init_adapter {tmp_path / 'step4'} holds no unet/ or text_encoder_one/ or text_encoder_two/ adapter: "
        "pass a checkpoint's step<N> folder"
    )


def test_files_that_are_missing_or_not_safetensors_are_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(UserError) as error:
        init_adapter.read_source("~/missing.safetensors", SDXL)
    assert str(error.value) == (
        f"--init_adapter {tmp_path / 'missing.safetensors'} does not exist: pass a checkpoint folder or an adapter "
        ".safetensors file"
    )
    (tmp_path / "lokr.pt").write_bytes(b"x")
    with pytest.raises(UserError) as error:
        init_adapter.read_source("~/lokr.pt", SDXL)
    assert str(error.value) == (
        f"--init_adapter {tmp_path / 'lokr.pt'}: difftune loads adapters only from .safetensors files or checkpoint "
        "folders"
    )
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file at all")
    for names in (SDXL, WUERSTCHEN):
        with pytest.raises(UserError) as error:
            init_adapter.read_source("~/broken.safetensors", names)
        assert (
            str(error.value) == f"--init_adapter {tmp_path / 'broken.safetensors'} is not a readable .safetensors file"
        )
        assert error.value.__cause__ is None and error.value.__suppress_context__


Q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # down_blocks.1.attentions.0...to_q
CONV = "lora_unet_input_blocks_4_0_in_layers_2"  # down_blocks.1.resnets.0.conv1
EXTRA = "lycoris_extra_proj"  # LyCORIS's create_lycoris name of extra.proj
K = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k"  # kohya on diffusers' UNet paths
TE1 = "lora_te1_encoder_layers_0_self_attn_q_proj"  # LyCORIS under transformers 5: no text_model_


def kohya_state() -> dict[str, torch.Tensor]:
    return {
        f"{Q}.lokr_w1": rand(4, 4), f"{Q}.lokr_w2_a": rand(8, 2), f"{Q}.lokr_w2_b": rand(2, 8),
        f"{Q}.alpha": torch.tensor(3.0),  # s = 3 / 2
        f"{CONV}.lokr_w1": rand(4, 4), f"{CONV}.lokr_w2": rand(8, 8, 3, 3),
        f"{CONV}.alpha": torch.tensor(3.0),  # both full: ComfyUI ignores it (s = 1)
        f"{EXTRA}.lokr_w1": rand(2, 2), f"{EXTRA}.lokr_w2": rand(2, 2),  # no alpha: s = 1
        f"{K}.lokr_w1": rand(8, 4), f"{K}.lokr_w2_a": rand(4, 2), f"{K}.lokr_w2_b": rand(2, 8),
        f"{K}.alpha": torch.tensor(1.0),  # unbalanced: w1 8 x 4 (peft builds 4 x 4); s = 1 / 2
        f"{TE1}.lokr_w1_a": rand(4, 1), f"{TE1}.lokr_w1_b": rand(1, 4), f"{TE1}.lokr_w2_a": rand(8, 1),
        f"{TE1}.lokr_w2_b": rand(1, 8), f"{TE1}.alpha": torch.tensor(0.5).half(),  # both split at 1: s = 0.5
    }  # fmt: skip


def comfyui_delta(state: dict, name: str, shape) -> torch.Tensor:
    """ComfyUI's / A1111's LoKr delta, written out: s * kron(w1, w2), s = alpha / dim with an alpha and a split
    factor (dim: w2_b's rank, else w1_b's), else 1."""
    get = state.get
    w1 = get(f"{name}.lokr_w1") if f"{name}.lokr_w1" in state else get(f"{name}.lokr_w1_a") @ get(f"{name}.lokr_w1_b")
    w2 = get(f"{name}.lokr_w2") if f"{name}.lokr_w2" in state else get(f"{name}.lokr_w2_a") @ get(f"{name}.lokr_w2_b")
    split = get(f"{name}.lokr_w2_b", get(f"{name}.lokr_w1_b"))
    alpha = get(f"{name}.alpha")
    scale = float(alpha) / split.shape[0] if alpha is not None and split is not None else 1.0
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return scale * torch.kron(w1.float(), w2.float()).reshape(shape)


def test_a_kohya_file_gives_each_model_its_modules_with_comfyuis_scale_folded(tmp_path):
    state = kohya_state()
    path = tmp_path / "lokr.safetensors"
    save_file(state, path, metadata={"ss_network_dim": "16"})
    sources = init_adapter.read_source(str(path), SDXL)
    assert sorted(sources) == ["text_encoder_one", "unet"]
    unet, te1 = sources["unet"], sources["text_encoder_one"]
    assert (unet.kohya, unet.lokr, te1.kohya) == (True, True, True)
    assert unet.settings == {"r": 2, "alpha": 2, "decompose_both": False}
    assert te1.settings == {"r": 1, "alpha": 1, "decompose_both": True}
    assert set(unet.weights) == {Q, CONV, EXTRA, K} and set(te1.weights) == {TE1}
    assert unet.weights[Q].keys() == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}  # the alpha is folded, not kept
    assert te1.weights[TE1].keys() == {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}
    expected = {
        (Q, "lokr_w1"): state[f"{Q}.lokr_w1"] * 1.5, (Q, "lokr_w2_a"): state[f"{Q}.lokr_w2_a"],
        (Q, "lokr_w2_b"): state[f"{Q}.lokr_w2_b"], (CONV, "lokr_w1"): state[f"{CONV}.lokr_w1"],
        (CONV, "lokr_w2"): state[f"{CONV}.lokr_w2"], (EXTRA, "lokr_w1"): state[f"{EXTRA}.lokr_w1"],
        (K, "lokr_w1"): state[f"{K}.lokr_w1"] * 0.5, (K, "lokr_w2_b"): state[f"{K}.lokr_w2_b"],
    }  # fmt: skip
    for (name, suffix), value in expected.items():
        assert torch.allclose(unet.weights[name][suffix], value, rtol=0, atol=1e-7), (name, suffix)
    assert torch.allclose(te1.weights[TE1]["lokr_w1_a"], state[f"{TE1}.lokr_w1_a"] * 0.5, rtol=0, atol=1e-7)
    assert torch.equal(te1.weights[TE1]["lokr_w1_b"], state[f"{TE1}.lokr_w1_b"])  # only w1_a takes s
    assert torch.equal(te1.weights[TE1]["lokr_w2_a"], state[f"{TE1}.lokr_w2_a"])


@pytest.mark.parametrize(
    "key",
    [
        "lora_unet_x.lora_down.weight",  # a kohya LoRA, not a LoKr
        "lora_te3_x.lokr_w1",
        "text_encoder.x.lokr_w1",
        "unet.lora_unet_x.lokr_w1",
        "base_model.model.lora_unet_x.lokr_w1",  # a peft prefix is not a kohya name
    ],
)
def test_a_file_of_other_modules_is_refused(tmp_path, key):
    path = tmp_path / "other.safetensors"
    save_file({key: rand(2, 2), f"{Q}.lokr_w1": rand(4, 4), f"{Q}.lokr_w2": rand(8, 8)}, path)
    with pytest.raises(UserError) as error:
        init_adapter.read_source(str(path), SDXL)
    assert str(error.value) == (
        f"--init_adapter {path}: {key.rpartition('.')[0]} is not a kohya / LyCORIS LoKr "
        "module (lora_unet_*, lora_te1_*, lora_te2_* or lycoris_* with lokr_w1 / lokr_w2): pass an SDXL LoKr file"
    )


def test_a_kohya_file_of_full_factors_takes_its_rank_from_the_metadata(tmp_path):
    path = tmp_path / "full.safetensors"
    save_file({f"{Q}.lokr_w1": rand(4, 4), f"{Q}.lokr_w2": rand(8, 8)}, path, metadata={"ss_network_dim": "16"})
    assert init_adapter.read_source(str(path), SDXL)["unet"].settings == {"r": 16, "alpha": 16, "decompose_both": False}
    save_file({f"{Q}.lokr_w1": rand(4, 4), f"{Q}.lokr_w2": rand(8, 8)}, path)  # no metadata: w2's 8 kept full
    assert init_adapter.read_source(str(path), SDXL)["unet"].settings == {"r": 4, "alpha": 4, "decompose_both": False}


def test_a_kohya_file_with_a_tucker_module_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "tucker.safetensors"
    save_file({f"{Q}.lokr_w1": rand(4, 4), f"{Q}.lokr_w2_a": rand(8, 2), f"{Q}.lokr_t2": rand(2, 2, 3, 3)}, path)
    with pytest.raises(UserError, match=f"^--init_adapter {path}: {Q} uses Tucker conv factors"):
        init_adapter.read_source(str(path), SDXL)


def lora_file(path, parts: dict[str, dict[str, tuple]], metadata: dict | None = None) -> dict[str, torch.Tensor]:
    state = {f"{model}.{key}": rand(*shape) for model, keys in parts.items() for key, shape in keys.items()}
    save_file(state, path, metadata=None if metadata is None else {"lora_adapter_metadata": json.dumps(metadata)})
    return state


PRIOR = {"blocks.0.attn.to_q.lora_A.weight": (4, 16), "blocks.0.attn.to_q.lora_B.weight": (16, 4)}
TEXT = {"layers.0.q_proj.lora_A.weight": (2, 8), "layers.0.q_proj.lora_B.weight": (8, 2)}


@pytest.mark.parametrize(
    ("metadata", "alphas"),
    [
        (None, (4, 2)),  # no alpha stored: scale 1 (alpha = rank)
        ({"lora_alpha": 8}, (8, 8)),
        ({"prior.lora_alpha": 16, "text_encoder.lora_alpha": 1, "lora_alpha": 8}, (16, 1)),
        ({"prior.lora_alpha": 16}, (16, 2)),
    ],
)
def test_a_diffusers_lora_file_gives_the_prior_and_text_encoder(tmp_path, metadata, alphas):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    state = lora_file(path, {"prior": PRIOR, "text_encoder": TEXT}, metadata)
    sources = init_adapter.read_source(str(path), WUERSTCHEN)
    assert list(sources) == ["prior", "text_encoder"]
    prior, text = sources["prior"], sources["text_encoder"]
    assert prior.settings == {"r": 4, "lora_alpha": alphas[0]}
    assert text.settings == {"r": 2, "lora_alpha": alphas[1]}
    assert (prior.lokr, prior.kohya, text.lokr) == (False, False, False)
    assert prior.weights.keys() == {"blocks.0.attn.to_q.lora_A", "blocks.0.attn.to_q.lora_B"}
    assert torch.equal(
        prior.weights["blocks.0.attn.to_q.lora_B"]["weight"], state["prior.blocks.0.attn.to_q.lora_B.weight"]
    )
    assert text.weights.keys() == {"layers.0.q_proj.lora_A", "layers.0.q_proj.lora_B"}


def test_a_diffusers_file_of_the_prior_alone(tmp_path):
    path = tmp_path / "lora.safetensors"
    lora_file(path, {"prior": PRIOR})
    assert list(init_adapter.read_source(str(path), WUERSTCHEN)) == ["prior"]
    # keys are read as diffusers reads them: a peft wrapper's prefix stays in the module name (no module has it)
    lora_file(path, {"prior": {"base_model.model." + k: v for k, v in PRIOR.items()}})
    assert init_adapter.read_source(str(path), WUERSTCHEN)["prior"].weights.keys() == {
        "base_model.model.blocks.0.attn.to_q.lora_A",
        "base_model.model.blocks.0.attn.to_q.lora_B",
    }


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ({"text_encoder": TEXT}, "holds no prior.* LoRA weights: pass a Wuerstchen pytorch_lora_weights file"),
        ({"unet": PRIOR}, "holds no prior.* LoRA weights: pass a Wuerstchen pytorch_lora_weights file"),
        (
            {"prior": {**PRIOR, "blocks.1.to_k.lora_A.weight": (2, 16)}},
            "is not a diffusers LoRA file (lora_A / lora_B, one rank per model)",
        ),
        (
            {"prior": {"blocks.0.to_q.lora_B.weight": (16, 4)}},
            "is not a diffusers LoRA file (lora_A / lora_B, one rank per model)",
        ),
        (
            {"prior": {**PRIOR, "blocks.0.to_q.lokr_w1": (2, 2)}},
            "is not a diffusers LoRA file (lora_A / lora_B, one rank per model)",
        ),
        (
            {"prior": PRIOR, "text_encoder": {**TEXT, "layers.0.k_proj.weight": (2, 2)}},
            "is not a diffusers LoRA file (lora_A / lora_B, one rank per model)",
        ),
    ],
)
def test_a_diffusers_file_that_is_not_a_prior_lora_is_refused(tmp_path, parts, message):
    path = tmp_path / "lora.safetensors"
    lora_file(path, parts)
    with pytest.raises(UserError) as error:
        init_adapter.read_source(str(path), WUERSTCHEN)
    assert str(error.value) == f"--init_adapter {path} {message}"


# --- prepare: the flags the source decides ---


def lokr_args(**values) -> argparse.Namespace:
    defaults = {
        "init_adapter": "src.safetensors", "rank": 8, "alpha": 8.0, "conv_rank": None, "conv_alpha": None,
        "decompose_both": False, "decompose_factor": -1, "rank_dropout": 0.0, "module_dropout": 0.0,
        "lokr_init": "peft", "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
        "text_encoder_target_modules": ["q_proj", "k_proj", "v_proj", "out_proj"], "train_text_encoder": False,
        "text_encoder_lr": None, "learning_rate": 1e-4, "gradient_checkpointing": False,
        "cache_text_embeddings": False,
    }  # fmt: skip
    return argparse.Namespace(**(defaults | values))


def prepared(monkeypatch, sources: dict, argv: list[str], names=SDXL, **values) -> argparse.Namespace:
    monkeypatch.setattr(init_adapter, "read_source", lambda path, names: sources)
    args = lokr_args(**values)
    assert init_adapter.prepare(args, argv, names) is sources
    return args


def test_prepare_takes_the_first_models_settings(monkeypatch):
    unet = init_adapter.Source({"r": 4, "alpha": 4, "decompose_both": True})
    args = prepared(monkeypatch, {"unet": unet}, [])
    assert (args.rank, args.alpha, args.decompose_both, args.decompose_factor) == (4, 4, True, -1)
    assert args.train_text_encoder is False  # no text-encoder adapter in the source
    # flags typed that agree with the source are fine
    args = prepared(monkeypatch, {"unet": unet}, ["--rank", "4", "--alpha=4", "--decompose_both"], rank=4, alpha=4.0,
                    decompose_both=True)  # fmt: skip
    assert (args.rank, args.alpha) == (4, 4)
    # a key the first model lacks but another has: the flag's own value stays
    te = init_adapter.Source({"r": 4, "decompose_factor": 8})
    args = prepared(monkeypatch, {"unet": init_adapter.Source({"r": 4}), "text_encoder_one": te}, [])
    assert (args.rank, args.decompose_factor, args.train_text_encoder) == (4, -1, True)


def test_prepare_accepts_a_typed_flag_the_source_says_nothing_about(monkeypatch):
    """A kohya file stores no decompose_factor (it is worked out from the factor shapes): --decompose_factor stays."""
    unet = init_adapter.Source({"r": 4, "alpha": 4, "decompose_both": False})
    args = prepared(monkeypatch, {"unet": unet}, ["--decompose_factor", "4"], decompose_factor=4)
    assert (args.rank, args.decompose_factor) == (4, 4)


def test_prepare_skips_settings_this_script_has_no_flag_for(monkeypatch):
    prior = init_adapter.Source({"r": 4, "lora_alpha": 16}, lokr=False)
    monkeypatch.setattr(init_adapter, "read_source", lambda path, names: {"prior": prior})
    args = argparse.Namespace(init_adapter="f", rank=8, lora_alpha=16.0, train_text_encoder=False)
    init_adapter.prepare(args, ["--lora_alpha", "16"], WUERSTCHEN)
    assert vars(args) == {"init_adapter": "f", "rank": 4, "lora_alpha": 16, "train_text_encoder": False}


@pytest.mark.parametrize(
    ("sources", "argv", "values", "message"),
    [
        ({"unet": {"r": 4}}, ["--rank", "3"], {"rank": 3}, "--rank 3 contradicts --init_adapter (r 4)"),
        (
            {"unet": {"r": 4}, "text_encoder_two": {"r": 2}},  # one flag for both models: either differs
            ["--rank", "4"], {"rank": 4}, "--rank 4 contradicts --init_adapter (r 2)",
        ),
        (
            {"unet": {"r": 4, "alpha": 4}}, ["--alpha=2"], {"alpha": 2.0},
            "--alpha 2.0 contradicts --init_adapter (alpha 4)",
        ),
        (
            {"unet": {"r": 4, "decompose_both": True}}, ["--decompose_both"], {"decompose_both": False},
            "--decompose_both False contradicts --init_adapter (decompose_both True)",
        ),
        (
            {"unet": {"r": 4, "decompose_factor": 4}}, ["--decompose_factor", "8"], {"decompose_factor": 8},
            "--decompose_factor 8 contradicts --init_adapter (decompose_factor 4)",
        ),
    ],
)  # fmt: skip
def test_prepare_refuses_a_flag_that_contradicts_the_source(monkeypatch, sources, argv, values, message):
    built = {name: init_adapter.Source(settings) for name, settings in sources.items()}
    flag = message.split()[0]
    with pytest.raises(UserError) as error:
        prepared(monkeypatch, built, argv, **values)
    assert str(error.value) == f"{message}: drop {flag}, the adapter's settings come from it"


def test_prepare_refuses_a_lora_alpha_that_contradicts_the_source(monkeypatch):
    monkeypatch.setattr(
        init_adapter, "read_source", lambda path, names: {"prior": init_adapter.Source({"lora_alpha": 16})}
    )
    args = argparse.Namespace(init_adapter="f", rank=8, lora_alpha=8.0, train_text_encoder=False)
    with pytest.raises(UserError, match=r"^--lora_alpha 8.0 contradicts --init_adapter \(lora_alpha 16\): drop"):
        init_adapter.prepare(args, ["--lora_alpha", "8"], WUERSTCHEN)


@pytest.mark.parametrize("flag", ["conv_rank", "conv_alpha"])
def test_prepare_refuses_conv_rank_and_conv_alpha(monkeypatch, flag):
    with pytest.raises(UserError) as error:
        prepared(monkeypatch, {"unet": init_adapter.Source({"r": 4})}, [f"--{flag}", "2"])
    assert str(error.value) == (
        f"--{flag} contradicts --init_adapter: every module's rank and alpha come from it: drop --{flag}"
    )


def test_prepare_without_the_flag_reads_nothing(monkeypatch):
    monkeypatch.setattr(init_adapter, "read_source", lambda path, names: pytest.fail("read"))
    for value in (None, ""):
        args = lokr_args(init_adapter=value, rank=3)
        assert init_adapter.prepare(args, ["--conv_rank", "2"], SDXL) is None
        assert args.rank == 3


def test_prepare_refuses_a_source_without_the_first_model(monkeypatch):
    with pytest.raises(UserError) as error:
        prepared(monkeypatch, {"text_encoder_one": init_adapter.Source({"r": 4})}, [], init_adapter="te.safetensors")
    assert str(error.value) == "--init_adapter te.safetensors has no unet adapter"


@pytest.mark.parametrize("encoder", ["text_encoder_one", "text_encoder_two"])
def test_text_encoder_adapters_in_the_source_train(monkeypatch, encoder):
    sources = {"unet": init_adapter.Source({"r": 4}), encoder: init_adapter.Source({"r": 4})}
    assert prepared(monkeypatch, sources, []).train_text_encoder is True
    with pytest.raises(UserError) as error:
        prepared(monkeypatch, sources, [], cache_text_embeddings=True)
    assert str(error.value) == ("--init_adapter holds text-encoder adapters, which train: drop --cache_text_embeddings")
    monkeypatch.setattr(init_adapter, "read_source", lambda path, names: sources)
    args = lokr_args()
    del args.cache_text_embeddings  # the Wuerstchen script has no such flag
    init_adapter.prepare(args, [], SDXL)
    assert args.train_text_encoder is True


# --- module names of kohya files, and the adapters built from a source ---

UNET_CONFIG = {"up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "layers_per_block": 2}
Q_PATH = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
K_PATH = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k"
CONV_PATH = "down_blocks.1.resnets.0.conv1"


class TinyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = dict(UNET_CONFIG)
        self.checkpointing = False
        module_tree(
            {
                Q_PATH: nn.Linear(32, 32), K_PATH: nn.Linear(32, 32), CONV_PATH: nn.Conv2d(32, 32, 3, padding=1),
                "extra.proj": nn.Linear(4, 4), "extra.norm": nn.LayerNorm(4),
            },
            self,
        )  # fmt: skip

    def enable_gradient_checkpointing(self):
        self.checkpointing = True


class TinyTextEncoder(nn.Module):
    def __init__(self, root: str = ""):
        super().__init__()
        self.checkpointing = None
        layers = {"encoder.layers.0.self_attn.q_proj": nn.Linear(32, 32), "encoder.layers.0.mlp.fc1": nn.Linear(4, 8)}
        module_tree({root + k: v for k, v in layers.items()}, self)

    def gradient_checkpointing_enable(self, kwargs):
        self.checkpointing = kwargs


def test_kohya_names_cover_sgm_diffusers_and_lycoris_paths():
    expected = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": Q_PATH,
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": Q_PATH,
        "lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q": Q_PATH,
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k": K_PATH,
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k": K_PATH,
        "lycoris_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k": K_PATH,
        "lora_unet_input_blocks_4_0_in_layers_2": CONV_PATH,
        "lora_unet_down_blocks_1_resnets_0_conv1": CONV_PATH,
        "lycoris_down_blocks_1_resnets_0_conv1": CONV_PATH,
        "lora_unet_extra_proj": "extra.proj",  # no SGM name: only the diffusers-path forms
        "lycoris_extra_proj": "extra.proj",
    }
    assert init_adapter.kohya_names("unet", TinyUNet(), UNET_CONFIG) == expected
    # CLIPTextModel under transformers 5 (no text_model.): kohya's name adds it, LyCORIS's does not
    assert init_adapter.kohya_names("text_encoder_one", TinyTextEncoder(), {}) == {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": "encoder.layers.0.self_attn.q_proj",
        "lora_te1_encoder_layers_0_self_attn_q_proj": "encoder.layers.0.self_attn.q_proj",
        "lora_te1_text_model_encoder_layers_0_mlp_fc1": "encoder.layers.0.mlp.fc1",
        "lora_te1_encoder_layers_0_mlp_fc1": "encoder.layers.0.mlp.fc1",
    }
    assert init_adapter.kohya_names("text_encoder_two", TinyTextEncoder("text_model."), {}) == {
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj": "text_model.encoder.layers.0.self_attn.q_proj",
        "lora_te2_encoder_layers_0_self_attn_q_proj": "text_model.encoder.layers.0.self_attn.q_proj",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1": "text_model.encoder.layers.0.mlp.fc1",
        "lora_te2_encoder_layers_0_mlp_fc1": "text_model.encoder.layers.0.mlp.fc1",
    }


def test_resolve_kohya_maps_the_names_or_refuses_the_first_unknown():
    w = {"lokr_w1": rand(2, 2)}
    source = init_adapter.Source({}, {Q: w, "lycoris_extra_proj": w}, kohya=True)
    init_adapter.resolve_kohya(source, "unet", TinyUNet(), UNET_CONFIG, "f.safetensors")
    assert source.weights == {Q_PATH: w, "extra.proj": w} and source.kohya is False
    source = init_adapter.Source({}, {Q: w, "lora_unet_zz": w, "lora_unet_b": w, "lora_unet_extra_norm": w}, kohya=True)
    with pytest.raises(UserError) as error:
        init_adapter.resolve_kohya(source, "unet", TinyUNet(), UNET_CONFIG, "f.safetensors")
    assert str(error.value) == (
        "--init_adapter f.safetensors: lora_unet_b names no module of this unet (another architecture?)"
    )


def tiny_sdxl():
    return TinyUNet(), {"text_encoder_one": TinyTextEncoder(), "text_encoder_two": TinyTextEncoder("text_model.")}


def deltas(trained: dict) -> dict[tuple[str, str], torch.Tensor]:
    out = {}
    for model_name, model in trained.items():
        for name, layer in model.base_model.model.named_modules():
            if hasattr(layer, "get_delta_weight") and "default" in layer.scaling:
                out[model_name, name] = layer.get_delta_weight("default")
    return out


def test_attach_all_starts_each_kohya_module_at_comfyuis_delta(tmp_path, caplog):
    state = kohya_state()
    path = tmp_path / "lokr.safetensors"
    save_file(state, path)
    unet, encoders = tiny_sdxl()
    argv = ["--init_adapter", str(path)]
    args = lokr_args(init_adapter=str(path), text_encoder_lr=5e-5, gradient_checkpointing=True)
    sources = init_adapter.prepare(args, argv, SDXL)
    with caplog.at_level(logging.INFO, logger="difftune"):
        trained, groups = init_adapter.attach_all(
            args, injection.lokr_config, "base", ("unet", unet), encoders, sources, argv
        )
    assert list(trained) == SDXL  # text_encoder_two (not in the file) starts fresh from the flags
    got = deltas(trained)
    modules = {
        ("unet", Q_PATH): Q, ("unet", K_PATH): K, ("unet", CONV_PATH): CONV, ("unet", "extra.proj"): EXTRA,
        ("text_encoder_one", "encoder.layers.0.self_attn.q_proj"): TE1,
    }  # fmt: skip
    fresh = {("text_encoder_two", "text_model.encoder.layers.0.self_attn.q_proj")}
    assert got.keys() == modules.keys() | fresh
    for key, name in modules.items():
        layer = trained[key[0]].base_model.model.get_submodule(key[1])
        expected = comfyui_delta(state, name, layer.get_base_layer().weight.shape)
        assert expected.abs().max() > 0
        assert (got[key] - expected).abs().max() <= 1e-6, key
    assert all(not got[key].any() for key in fresh)
    ranks = {key: trained[key[0]].base_model.model.get_submodule(key[1]).r["default"] for key in got}
    assert ranks == {
        ("unet", Q_PATH): 2, ("unet", K_PATH): 2, ("unet", CONV_PATH): 4, ("unet", "extra.proj"): 2,
        ("text_encoder_one", "encoder.layers.0.self_attn.q_proj"): 1,
        ("text_encoder_two", "text_model.encoder.layers.0.self_attn.q_proj"): 2,
    }  # fmt: skip
    scalings = {key: trained[key[0]].base_model.model.get_submodule(key[1]).scaling["default"] for key in got}
    assert set(scalings.values()) == {1.0}  # alpha = rank everywhere: s is folded into w1
    assert args.target_modules == sorted([Q_PATH, K_PATH, CONV_PATH, "extra.proj"])  # recorded in args.json
    assert args.text_encoder_target_modules == ["encoder.layers.0.self_attn.q_proj"]
    config = trained["unet"].peft_config["default"]
    assert (config.r, config.alpha, config.decompose_both, config.decompose_factor) == (2, 2, False, -1)
    assert config.rank_pattern == config.alpha_pattern == {CONV_PATH: 4}
    assert trained["text_encoder_one"].peft_config["default"].decompose_both is True
    assert {m.peft_config["default"].base_model_name_or_path for m in trained.values()} == {"base"}
    messages = [r.getMessage() for r in caplog.records if r.name == "difftune"]
    assert messages == [
        f"--init_adapter {path}: unet starts from its 4 adapted modules (rank 2/4, LoKr)",
        f"--init_adapter: 1 unet modules keep factor shapes peft does not build (e.g. {K_PATH}): the run's "
        "checkpoints load with infer.py, export.py and --resume_from_checkpoint, not PeftModel.from_pretrained",
        f"--init_adapter {path}: text_encoder_one starts from its 1 adapted modules (rank 1, LoKr)",
    ]
    # optimizer groups: the UNet's adapter, then both text encoders' at --text_encoder_lr; checkpointing on
    assert len(groups) == 2 and groups[1]["lr"] == 5e-5
    assert len(groups[0]["params"]) == 3 + 2 + 3 + 2  # to_q, to_k (w1, w2_a, w2_b), conv1, extra (w1, w2)
    assert len(groups[1]["params"]) == 4 + 3  # TE1 both split; the fresh one w1, w2_a, w2_b
    assert unet.checkpointing is True
    assert encoders["text_encoder_one"].checkpointing == encoders["text_encoder_two"].checkpointing
    assert encoders["text_encoder_one"].checkpointing == {"use_reentrant": False}


def test_attach_all_without_text_encoder_training_adapts_the_unet_alone(tmp_path, caplog):
    path = tmp_path / "lokr.safetensors"
    state = {f"{Q}.lokr_w1": rand(4, 4), f"{Q}.lokr_w2": rand(8, 8)}
    save_file(state, path)
    unet, encoders = tiny_sdxl()
    args = lokr_args(init_adapter=str(path))
    sources = init_adapter.prepare(args, [], SDXL)
    assert args.rank == 4  # the rank that keeps the 8 x 8 w2 full
    trained, groups = init_adapter.attach_all(
        args, injection.lokr_config, "base", ("unet", unet), encoders, sources, []
    )
    assert list(trained) == ["unet"] and len(groups) == 1
    assert unet.checkpointing is False and encoders["text_encoder_one"].checkpointing is None
    (delta,) = deltas(trained).values()
    assert torch.allclose(delta, torch.kron(state[f"{Q}.lokr_w1"], state[f"{Q}.lokr_w2"]), rtol=0, atol=1e-7)


def test_attach_all_adapts_each_model_the_source_holds_past_one_it_lacks():
    w = {"lokr_w1": rand(4, 4), "lokr_w2": rand(8, 8)}
    path = "text_model.encoder.layers.0.self_attn.q_proj"
    sources = {"unet": init_adapter.Source({"r": 4, "alpha": 4}, {Q_PATH: dict(w)}),
               "text_encoder_two": init_adapter.Source({"r": 4, "alpha": 4}, {path: dict(w)})}  # fmt: skip
    unet, encoders = tiny_sdxl()
    args = lokr_args(init_adapter="f", train_text_encoder=False)
    trained, groups = init_adapter.attach_all(args, injection.lokr_config, "b", ("unet", unet), encoders, sources, [])
    assert list(trained) == ["unet", "text_encoder_two"] and len(groups) == 2
    expected = torch.kron(w["lokr_w1"], w["lokr_w2"])
    assert torch.allclose(deltas(trained)["text_encoder_two", path], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    "held, fresh", [("text_encoder_one", "text_encoder_two"), ("text_encoder_two", "text_encoder_one")]
)
def test_a_text_encoder_the_source_lacks_starts_fresh_on_the_flags_modules(held, fresh):
    w = {"lokr_w1": rand(4, 4), "lokr_w2": rand(8, 8)}
    path = {"text_encoder_one": "", "text_encoder_two": "text_model."}[held] + "encoder.layers.0.self_attn.q_proj"
    sources = {"unet": init_adapter.Source({"r": 4, "alpha": 4}, {Q_PATH: dict(w)}),
               held: init_adapter.Source({"r": 4, "alpha": 4}, {path: dict(w)})}  # fmt: skip
    unet, encoders = tiny_sdxl()
    args = lokr_args(init_adapter="f", train_text_encoder=True)
    trained, _ = init_adapter.attach_all(args, injection.lokr_config, "b", ("unet", unet), encoders, sources, [])
    assert set(trained[held].peft_config["default"].target_modules) == {path}
    assert set(trained[fresh].peft_config["default"].target_modules) == {"q_proj", "k_proj", "v_proj", "out_proj"}


def test_each_text_encoder_is_checked_against_the_typed_flag_not_the_other_encoders_modules():
    w = {"lokr_w1": rand(4, 4), "lokr_w2": rand(8, 8)}
    fc1 = {"lokr_w1": rand(2, 2), "lokr_w2": rand(4, 2)}
    one, two = "encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.mlp.fc1"
    sources = {"unet": init_adapter.Source({"r": 4, "alpha": 4}, {Q_PATH: dict(w)}),
               "text_encoder_one": init_adapter.Source({"r": 4, "alpha": 4}, {one: dict(w)}),
               "text_encoder_two": init_adapter.Source({"r": 4, "alpha": 4}, {two: fc1})}  # fmt: skip
    unet, encoders = tiny_sdxl()
    argv = ["--text_encoder_target_modules", "q_proj,fc1"]
    args = lokr_args(init_adapter="f", train_text_encoder=True, text_encoder_target_modules=["q_proj", "fc1"])
    trained, _ = init_adapter.attach_all(args, injection.lokr_config, "b", ("unet", unet), encoders, sources, argv)
    assert set(trained["text_encoder_two"].peft_config["default"].target_modules) == {two}
    assert args.text_encoder_target_modules == [two]  # recorded: the modules the (last) encoder adapts


def test_attach_all_refuses_a_module_this_model_lacks_or_a_weight_peft_does_not_hold(tmp_path):
    path = tmp_path / "other.safetensors"
    other = "lora_unet_middle_block_9_proj"
    save_file({f"{Q}.lokr_w1": rand(4, 4), f"{Q}.lokr_w2": rand(8, 8), f"{other}.lokr_w1": rand(2, 2),
               f"{other}.lokr_w2": rand(2, 2)}, path)  # fmt: skip
    args = lokr_args(init_adapter=str(path))
    sources = init_adapter.prepare(args, [], SDXL)
    unet, encoders = tiny_sdxl()
    with pytest.raises(UserError) as error:
        init_adapter.attach_all(args, injection.lokr_config, "b", ("unet", unet), encoders, sources, [])
    assert str(error.value) == (
        f"--init_adapter {path}: lora_unet_middle_block_9_proj names no module of this unet (another architecture?)"
    )
    weights = {"lokr_w1": rand(4, 4), "lokr_w2": rand(8, 8), "dora_norm": rand(32)}
    sources = {"unet": init_adapter.Source({"r": 4, "alpha": 4}, {Q_PATH: weights})}
    unet, encoders = tiny_sdxl()
    with pytest.raises(UserError) as error:
        init_adapter.attach_all(args, injection.lokr_config, "b", ("unet", unet), encoders, sources, [])
    assert str(error.value) == (
        f"--init_adapter {path}: base_model.model.{Q_PATH}.dora_norm does not fit this model's adapter"
    )


def test_attach_all_builds_the_decompose_factor_of_the_stored_factors(caplog):
    w = {"lokr_w1": rand(2, 2), "lokr_w2": rand(16, 16)}  # 32 = 2 x 16: decompose_factor 2, not the sqrt rule's 4 x 8
    sources = {"unet": init_adapter.Source({"r": 8, "alpha": 8}, {Q_PATH: dict(w)})}
    unet, encoders = tiny_sdxl()
    with caplog.at_level(logging.INFO, logger="difftune"):
        trained, _ = init_adapter.attach_all(
            lokr_args(init_adapter="f"), injection.lokr_config, "b", ("unet", unet), encoders, sources, []
        )
    assert trained["unet"].peft_config["default"].decompose_factor == 2
    assert [r.getMessage() for r in caplog.records if r.name == "difftune"] == [
        "--init_adapter f: unet starts from its 1 adapted modules (rank 8, LoKr)"  # no refitted factors
    ]
    assert torch.allclose(deltas(trained)["unet", Q_PATH], torch.kron(w["lokr_w1"], w["lokr_w2"]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("typed", [False, True])
@pytest.mark.parametrize(
    ("targets", "refused"),
    [(["to_q", "extra.proj"], None), (["attn1.to_q", "proj"], None), (["to_q"], "extra.proj"), (["q"], Q_PATH)],
)
def test_attach_all_checks_the_target_modules_typed(tmp_path, targets, refused, typed):
    path = tmp_path / "lokr.safetensors"
    save_file({f"{Q}.lokr_w1": rand(4, 4), f"{Q}.lokr_w2": rand(8, 8), f"{EXTRA}.lokr_w1": rand(2, 2),
               f"{EXTRA}.lokr_w2": rand(2, 2)}, path)  # fmt: skip
    unet, encoders = tiny_sdxl()
    argv = ["--init_adapter", str(path), "--target_modules", ",".join(targets)] if typed else []
    args = lokr_args(init_adapter=str(path), target_modules=targets)
    sources = init_adapter.prepare(args, argv, SDXL)
    if typed and refused:
        with pytest.raises(UserError) as error:
            init_adapter.attach_all(args, injection.lokr_config, "base", ("unet", unet), encoders, sources, argv)
        assert str(error.value) == (
            f"--init_adapter adapts {refused}, which --target_modules does not name: drop --target_modules"
        )
    else:  # not typed: the file's modules, whatever the flag's default
        init_adapter.attach_all(args, injection.lokr_config, "base", ("unet", unet), encoders, sources, argv)
        assert args.target_modules == [Q_PATH, "extra.proj"]


def test_attach_all_keeps_a_peft_folders_own_settings(tmp_path, caplog):
    """Our checkpoint: its rank_pattern and decompose_factor as saved (not worked out again)."""
    w = {"lokr_w1": rand(4, 4), "lokr_w2_a": rand(8, 1), "lokr_w2_b": rand(1, 8)}
    conv = {"lokr_w1": rand(4, 4), "lokr_w2": rand(8, 8, 3, 3)}
    settings = {
        "r": 1,
        "alpha": 2.0,
        "decompose_factor": 4,
        "rank_pattern": {CONV_PATH: 4},
        "alpha_pattern": {CONV_PATH: 8.0},
    }
    source = init_adapter.Source(settings, {Q_PATH: w, CONV_PATH: conv})
    unet, encoders = tiny_sdxl()
    args = lokr_args(init_adapter="step4/unet", train_text_encoder=True)
    with caplog.at_level(logging.INFO, logger="difftune"):
        trained, _ = init_adapter.attach_all(
            args, injection.lokr_config, "base", ("unet", unet), encoders, {"unet": source}, []
        )
    assert list(trained) == SDXL
    config = trained["unet"].peft_config["default"]
    assert (config.r, config.alpha, config.decompose_factor) == (1, 2.0, 4)
    assert (config.rank_pattern, config.alpha_pattern) == ({CONV_PATH: 4}, {CONV_PATH: 8.0})
    got = deltas(trained)
    expected_q = 2.0 * torch.kron(w["lokr_w1"], w["lokr_w2_a"] @ w["lokr_w2_b"])  # peft's alpha / r
    assert torch.allclose(got["unet", Q_PATH], expected_q, rtol=0, atol=1e-6)
    expected_conv = 2.0 * torch.kron(conv["lokr_w1"][:, :, None, None], conv["lokr_w2"])
    assert torch.allclose(got["unet", CONV_PATH], expected_conv, rtol=0, atol=1e-6)
    assert [r.getMessage() for r in caplog.records if r.name == "difftune"] == [
        "--init_adapter step4/unet: unet starts from its 2 adapted modules (rank 1/4, LoKr)"
    ]


class TinyPrior(nn.Module):
    def __init__(self):
        super().__init__()
        module_tree({"blocks.0.attn.to_q": nn.Linear(16, 16), "blocks.0.attn.to_k": nn.Linear(16, 16)}, self)


def lora_args(**values) -> argparse.Namespace:
    defaults = {
        "init_adapter": "lora.safetensors", "rank": 8, "lora_alpha": 8.0, "lora_dropout": 0.0,
        "target_modules": ["to_q", "to_k", "to_v", "to_out.0"], "text_encoder_target_modules": ["q_proj"],
        "train_text_encoder": False, "text_encoder_lr": None, "learning_rate": 1e-4, "gradient_checkpointing": False,
    }  # fmt: skip
    return argparse.Namespace(**(defaults | values))


def test_attach_all_starts_a_lora_from_a_diffusers_file(tmp_path, caplog):
    path = tmp_path / "lora.safetensors"
    text = {
        "encoder.layers.0.self_attn.q_proj.lora_A.weight": (2, 32),
        "encoder.layers.0.self_attn.q_proj.lora_B.weight": (32, 2),
    }
    state = lora_file(path, {"prior": PRIOR, "text_encoder": text}, {"lora_alpha": 8})
    args = lora_args(init_adapter=str(path))
    sources = init_adapter.prepare(args, [], WUERSTCHEN)
    assert (args.rank, args.lora_alpha, args.train_text_encoder) == (4, 8, True)
    prior, encoder = TinyPrior(), TinyTextEncoder()
    with caplog.at_level(logging.INFO, logger="difftune"):
        trained, groups = init_adapter.attach_all(
            args, injection.lora_config, "base", ("prior", prior), {"text_encoder": encoder}, sources, []
        )
    got = deltas(trained)
    assert got.keys() == {("prior", "blocks.0.attn.to_q"), ("text_encoder", "encoder.layers.0.self_attn.q_proj")}
    a, b = state["prior.blocks.0.attn.to_q.lora_A.weight"], state["prior.blocks.0.attn.to_q.lora_B.weight"]
    assert torch.allclose(got["prior", "blocks.0.attn.to_q"], b @ a * (8 / 4), rtol=0, atol=1e-6)  # lora_alpha / r
    a = state["text_encoder.encoder.layers.0.self_attn.q_proj.lora_A.weight"]
    b = state["text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.weight"]
    assert torch.allclose(got["text_encoder", "encoder.layers.0.self_attn.q_proj"], b @ a * (8 / 2), rtol=0, atol=1e-6)
    assert args.target_modules == ["blocks.0.attn.to_q"]
    assert args.text_encoder_target_modules == ["encoder.layers.0.self_attn.q_proj"]
    assert [r.getMessage() for r in caplog.records if r.name == "difftune"] == [
        f"--init_adapter {path}: prior starts from its 1 adapted modules (rank 4, LoRA)",
        f"--init_adapter {path}: text_encoder starts from its 1 adapted modules (rank 2, LoRA)",
    ]
    assert len(groups) == 2 and groups[1]["lr"] == 1e-4


def test_attach_all_without_a_source_is_the_plain_injection(monkeypatch):
    seen = []
    monkeypatch.setattr(injection, "attach_all", lambda *a: seen.append(a) or "plain")
    args, unet, encoders = lokr_args(), TinyUNet(), {}
    assert init_adapter.attach_all(args, injection.lokr_config, "b", ("unet", unet), encoders, None, []) == "plain"
    assert seen == [(args, injection.lokr_config, "b", ("unet", unet), encoders)]


# --- config_for and load_into ---


def test_config_for_takes_the_sources_settings_over_the_flags():
    args = lokr_args(conv_rank=16, conv_alpha=16.0, rank_dropout=0.25)
    model = module_tree({"conv": nn.Conv2d(4, 4, 3), "q": nn.Linear(4, 4)})
    settings = {
        "r": 2,
        "alpha": 2,
        "decompose_both": True,
        "decompose_factor": 4,
        "rank_pattern": {"q": 1},
        "alpha_pattern": {"q": 1.0},
    }
    config = init_adapter.config_for(args, injection.lokr_config, settings, ["conv", "q"], model)
    assert (config.r, config.alpha, config.decompose_both, config.decompose_factor) == (2, 2, True, 4)
    assert (config.rank_pattern, config.alpha_pattern) == ({"q": 1}, {"q": 1.0})  # not --conv_rank's
    assert config.target_modules == {"conv", "q"} and config.rank_dropout == 0.25
    assert (args.rank, args.alpha, args.decompose_both) == (8, 8.0, False)  # the flags themselves stay
    for patterns in ({}, {"rank_pattern": None, "alpha_pattern": None}):
        config = init_adapter.config_for(args, injection.lokr_config, {"r": 2, "alpha": 2, **patterns}, ["conv"], model)
        assert (config.r, config.rank_pattern, config.alpha_pattern) == (2, {}, {})
    lora = init_adapter.config_for(lora_args(), injection.lora_config, {"r": 4, "lora_alpha": 16}, ["q"], model)
    assert (lora.r, lora.lora_alpha, lora.rank_pattern, lora.alpha_pattern) == (4, 16, {}, {})


@pytest.fixture(scope="module")
def tiny_peft():
    """A LoKr (w1 4 x 4, w2 split at 2) and a LoRA on a 32 x 32 Linear."""
    lokr = get_peft_model(
        module_tree({"proj": nn.Linear(32, 32), "other": nn.Linear(4, 4)}),
        LoKrConfig(r=2, alpha=2, target_modules=["proj"]),
    )
    lora = get_peft_model(
        module_tree({"proj": nn.Linear(32, 32)}), LoraConfig(r=2, lora_alpha=2, target_modules=["proj"])
    )
    return lokr, lora


LOKR_STATE = {
    "base_model.model.proj.lokr_w1": (4, 4),
    "base_model.model.proj.lokr_w2_a": (8, 2),
    "base_model.model.proj.lokr_w2_b": (2, 8),
}


def test_load_into_loads_a_fitting_state(tiny_peft):
    lokr, _ = tiny_peft
    state = {k: rand(*s) for k, s in LOKR_STATE.items()}
    init_adapter.load_into(lokr, state, "f")
    assert torch.equal(lokr.base_model.model.proj.lokr_w1["default"], state["base_model.model.proj.lokr_w1"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"base_model.model.proj.lokr_w1": (3, 3)},
            "--init_adapter f.safetensors does not fit the adapter built from it: \tsize mismatch for "
            "base_model.model.proj.lokr_w1.default: copying a param with shape torch.Size([3, 3]) from checkpoint, "
            "the shape in current model is torch.Size([4, 4]).",
        ),
        (
            {"base_model.model.proj.lokr_w1": (3, 3), "base_model.model.proj.lokr_w2_b": (2, 9)},  # the last named
            "--init_adapter f.safetensors does not fit the adapter built from it: \tsize mismatch for "
            "base_model.model.proj.lokr_w2_b.default: copying a param with shape torch.Size([2, 9]) from checkpoint, "
            "the shape in current model is torch.Size([2, 8]).",
        ),
        (
            {"base_model.model.other.lokr_w1": (2, 2)},
            "--init_adapter f.safetensors: base_model.model.other.lokr_w1 does not fit this model's adapter",
        ),
        (
            {"base_model.model.proj.lokr_w2_b": None},
            "--init_adapter f.safetensors: no weight for base_model.model.proj.lokr_w2_b.default",
        ),
    ],
)
def test_load_into_refuses_a_state_that_does_not_fit(tiny_peft, change, message):
    lokr, _ = tiny_peft
    shapes = {k: s for k, s in (LOKR_STATE | change).items() if s is not None}
    with pytest.raises(UserError) as error:
        init_adapter.load_into(lokr, {k: rand(*s) for k, s in shapes.items()}, "f.safetensors")
    assert str(error.value) == message
    assert error.value.__cause__ is None and error.value.__suppress_context__ == ("size mismatch" in message)


def test_load_into_refuses_a_lora_without_its_b(tiny_peft):
    _, lora = tiny_peft
    with pytest.raises(UserError) as error:
        init_adapter.load_into(lora, {"base_model.model.proj.lora_A.weight": rand(2, 32)}, "f")
    assert str(error.value) == "--init_adapter f: no weight for base_model.model.proj.lora_B.default.weight"


def test_load_into_ignores_the_frozen_weights_it_does_not_hold(tiny_peft):
    """The base layers' weights are missing from every adapter file: not a refusal."""
    _, lora = tiny_peft
    init_adapter.load_into(
        lora,
        {"base_model.model.proj.lora_A.weight": rand(2, 32), "base_model.model.proj.lora_B.weight": rand(32, 2)},
        "f",
    )


def test_group_strips_the_peft_prefix_and_reads_fp32():
    w = torch.ones(2, 2, dtype=torch.bfloat16)
    grouped = init_adapter._group(
        {"base_model.model.a.b.lokr_w1": w, "base_model.model.a.b.alpha": torch.tensor(2), "c.w": w}
    )
    assert list(grouped) == ["a.b", "c"]
    assert grouped["a.b"].keys() == {"lokr_w1", "alpha"} and grouped["a.b"]["alpha"].dtype == torch.float32
    assert grouped["c"]["w"].dtype == torch.float32
    assert list(init_adapter._group({"base_model.model.a.w": w}, prefix="")) == ["base_model.model.a"]
    assert math.isclose(float(grouped["a.b"]["alpha"]), 2.0)
