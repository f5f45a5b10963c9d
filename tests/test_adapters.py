"""Adapters: the peft config each flag sets, a no-op at step 0 with the factor each --lokr_init zeroes, only
adapter weights trainable, the optimizer groups, and bad adapter flags refused in one line."""

import argparse
from pathlib import Path

import pytest
import torch
from conftest import load_script
from helpers import sdxl_args, wuerstchen_args

from difftune import adapters
from difftune.cli.errors import UserError


def lokr_args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    adapters.add_lokr_args(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def parsed(script: str, argv: list) -> argparse.Namespace:
    """A training script's flags as it parses them."""
    return load_script(script).parse_args([str(a) for a in argv])


def unet_inputs(unet):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    added = {"text_embeds": torch.randn(2, 32, generator=generator), "time_ids": torch.tensor([[64.0] * 6] * 2)}
    return sample, torch.tensor([10, 500]), hidden, added


@pytest.mark.parametrize("init", ["peft", "lycoris"])
@pytest.mark.parametrize("decompose_both", [False, True])
def test_lokr_is_a_noop_at_step_zero_and_only_it_trains(assets, init, decompose_both):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(assets / "sdxl", subfolder="unet")
    sample, t, hidden, added = unet_inputs(unet)
    # Frozen first, as attach leaves it: on some CPUs a weight's requires_grad picks another kernel (~1e-6).
    unet.requires_grad_(False)
    with torch.no_grad():
        expected = unet(sample, t, hidden, added_cond_kwargs=added).sample
    config = adapters.lokr_config(
        lokr_args(lokr_init=init, decompose_both=decompose_both, rank=2), ["to_q", "to_k", "to_v", "to_out.0", "conv1"]
    )
    peft_unet = adapters.attach(unet, config, "base")
    with torch.no_grad():
        got = peft_unet(sample, t, hidden, added_cond_kwargs=added).sample
    assert torch.equal(got, expected)
    # Both inits are no-ops, each by zeroing its own factor (peft: w1, LyCORIS: w2), the other one random.
    zero, random = ("lokr_w1", "lokr_w2") if init == "peft" else ("lokr_w2", "lokr_w1")
    layers = [m for m in peft_unet.modules() if hasattr(m, "lokr_w1") and "default" in m.scaling]
    assert layers
    for layer in layers:
        factors = {n.split(".")[0]: p for n, p in layer.named_parameters() if n.startswith("lokr_")}
        # A split factor is zeroed through one half (peft: w1_a, LyCORIS: w2_b).
        zeroed = factors.get(zero, factors.get(f"{zero}_a" if init == "peft" else f"{zero}_b"))
        assert zeroed is not None and not zeroed.any(), sorted(factors)
        others = [p for n, p in factors.items() if n.startswith(random)]
        assert others and all(p.any() for p in others)
    trainable = [n for n, p in peft_unet.named_parameters() if p.requires_grad]
    assert trainable and all("lokr_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in adapters.trainable_parameters(peft_unet))
    assert any(".conv1.lokr_" in n for n in trainable)  # Conv2d layers take LoKr too


def test_adapters_on_a_bf16_model_are_fp32(assets):
    """Mixed precision freezes the base in bf16 before the adapters are attached; they must train in fp32 (with
    one process the optimizer's flat buffer would hide a bf16 adapter, under DDP nothing does)."""
    from transformers import CLIPTextModelWithProjection

    encoder = CLIPTextModelWithProjection.from_pretrained(assets / "sdxl", subfolder="text_encoder_2")
    encoder = encoder.to(torch.bfloat16)
    peft_encoder = adapters.attach(encoder, adapters.lokr_config(lokr_args(), ["q_proj", "fc1"]), "base")
    dtypes = {name: p.dtype for name, p in peft_encoder.named_parameters()}
    assert {d for n, d in dtypes.items() if "lokr_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lokr_" not in n} == {torch.bfloat16}


def test_lokr_config_has_every_flag_s_value():
    """A distinct value for every LoKr flag, parsed by the SDXL script, lands in the peft field it names."""
    argv = sdxl_args(
        Path("assets"), Path("out"), "--rank", "3", "--alpha", "5", "--decompose_both", "--decompose_factor", "4",
        "--rank_dropout", "0.125", "--module_dropout", "0.25", "--lokr_init", "lycoris",
        "--target_modules", "to_k,conv1", "--text_encoder_target_modules", "k_proj,fc1",
    )  # fmt: skip
    args = parsed("train_sdxl_lokr", argv)
    config = adapters.lokr_config(args, args.target_modules)
    assert (config.r, config.alpha, config.decompose_both, config.decompose_factor) == (3, 5.0, True, 4)
    assert (config.rank_dropout, config.module_dropout, config.init_weights) == (0.125, 0.25, "lycoris")
    assert set(config.target_modules) == {"to_k", "conv1"}
    assert set(adapters.lokr_config(args, args.text_encoder_target_modules).target_modules) == {"k_proj", "fc1"}
    defaults = adapters.lokr_config(parsed("train_sdxl_lokr", sdxl_args(Path("a"), Path("o"))), ["to_q"])
    assert (defaults.r, defaults.alpha, defaults.decompose_both, defaults.decompose_factor) == (8, 8.0, False, -1)
    assert defaults.init_weights is True  # peft's init: w1 starts at zero


def test_lora_config_has_every_flag_s_value():
    argv = wuerstchen_args(
        Path("assets"), Path("out"), "--rank", "3", "--lora_alpha", "7", "--lora_dropout", "0.125",
        "--target_modules", "to_q,out.1",
    )  # fmt: skip
    args = parsed("train_wuerstchen_lora", argv)
    config = adapters.lora_config(args, args.target_modules)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (3, 7.0, 0.125)
    assert set(config.target_modules) == {"to_q", "out.1"} and config.init_lora_weights is True


def test_text_encoder_lr_sets_the_text_encoders_group():
    unet, one, two = (torch.nn.Linear(2, 2) for _ in range(3))
    args = argparse.Namespace(learning_rate=1e-3, text_encoder_lr=5e-2)
    groups = adapters.param_groups(args, unet, [one, two])
    expected = [[unet.weight, unet.bias], [one.weight, one.bias, two.weight, two.bias]]
    assert [list(g["params"]) for g in groups] == expected
    assert "lr" not in groups[0] and groups[1]["lr"] == 5e-2  # the unet's group takes the optimizer's lr
    args.text_encoder_lr = None
    assert adapters.param_groups(args, unet, [one, two])[1]["lr"] == 1e-3


@pytest.mark.parametrize(
    ("flag", "value"),
    [("rank", 0), ("alpha", -1.0), ("rank_dropout", 1.5), ("module_dropout", -0.5), ("decompose_factor", 0),
     ("decompose_factor", -2), ("text_encoder_lr", -1.0)],
)  # fmt: skip
def test_bad_lokr_settings_are_refused(flag, value):
    with pytest.raises(UserError, match=f"^--{flag} must"):
        adapters.lokr_config(lokr_args(**{flag: value}), ["to_q"])


def test_bad_lora_settings_are_refused():
    parser = argparse.ArgumentParser()
    adapters.add_lora_args(parser)
    for flag, value in (("rank", "-4"), ("lora_alpha", "0"), ("lora_dropout", "1")):
        with pytest.raises(UserError, match=f"^--{flag} must"):
            adapters.lora_config(parser.parse_args([f"--{flag}", value]), ["to_q"])


def test_unknown_target_module_is_a_user_error(assets):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(assets / "sdxl", subfolder="unet")
    with pytest.raises(UserError, match="target_modules"):
        adapters.attach(unet, adapters.lokr_config(lokr_args(), ["no_such_layer"]), "base")


@pytest.mark.parametrize(
    ("script", "flags", "flag"),
    [
        # Names that match modules peft cannot adapt (peft raises TypeError): a ModuleList, a norm, an
        # attention block, a whole down block.
        ("train_sdxl_lokr", ("--target_modules", "to_out"), "--target_modules to_out "),
        ("train_sdxl_lokr", ("--target_modules", "norm1"), "--target_modules norm1 "),
        ("train_sdxl_lokr", ("--target_modules", "attn1"), "--target_modules attn1 "),
        ("train_sdxl_lokr", ("--target_modules", "0"), "--target_modules 0 "),
        ("train_sdxl_lokr", ("--train_text_encoder", "--text_encoder_target_modules", "layer_norm1"),
         "--text_encoder_target_modules layer_norm1 "),
        ("train_wuerstchen_lora", ("--target_modules", "to_out"), "--target_modules to_out "),
        ("train_sdxl_lokr", ("--decompose_factor", "0"), "--decompose_factor "),
    ],
)  # fmt: skip
def test_bad_adapter_flags_are_one_line_errors(assets, tmp_path, run_main, capsys, script, flags, flag):
    make = sdxl_args if script == "train_sdxl_lokr" else wuerstchen_args
    assert run_main(script, make(assets, tmp_path / "out", *flags, steps=1)) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {flag}"), errors
    assert "cannot be adapted" in errors[0] or "must be -1" in errors[0]
    assert "Traceback" not in err and not (tmp_path / "out" / "step1").exists()
