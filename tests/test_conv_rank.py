"""--conv_rank / --conv_alpha: spatial conv layers at their own rank and alpha (LyCORIS's conv_dim / conv_alpha),
through training, resume, peft's own loader, the kohya export and --init_adapter."""

import json

import pytest
import torch
from conftest import run_script
from helpers import adapter_weights, sdxl_args
from test_init_adapter import assert_same_deltas, deltas

# The tiny UNet's 3x3 convs (conv1, conv2) at rank 2, alpha 1; its 1x1 shortcut and attention at rank 4, alpha 8.
FLAGS = ("--target_modules", "to_q,to_k,conv1,conv2,conv_shortcut", "--rank", "4", "--alpha", "8",
         "--conv_rank", "2", "--conv_alpha", "1", "--use_ema")  # fmt: skip


@pytest.fixture(scope="module")
def conv_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv_rank") / "run"
    assert run_script("train_sdxl_lokr", sdxl_args(assets, out, *FLAGS, steps=2, checkpointing_steps=1)) == 0
    return out


def test_conv_layers_train_at_their_own_rank_and_alpha(conv_run):
    config = json.loads((conv_run / "step2" / "unet" / "adapter_config.json").read_text())
    assert (config["r"], config["alpha"]) == (4, 8)
    convs = {k for k in config["rank_pattern"]}
    assert convs and all(k.rsplit(".", 1)[-1] in ("conv1", "conv2") for k in convs)  # not the 1x1 shortcut
    assert set(config["rank_pattern"].values()) == {2} and set(config["alpha_pattern"].values()) == {1}
    assert convs == set(config["alpha_pattern"])
    weights = adapter_weights(conv_run / "step2")
    # 32 channels split 4 x 8: a 3x3 conv's w2 at rank 2 (2 < 8 / 2) is split; attention's at rank 4 is full.
    conv = "unet/base_model.model.down_blocks.1.resnets.0.conv1"
    assert weights[f"{conv}.lokr_w2_b"].shape == (2, 8 * 9)
    assert "down_blocks.1.resnets.0.conv1" in config["rank_pattern"]
    attention = "unet/base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert weights[f"{attention}.lokr_w2"].shape == (8, 8)


def test_peft_applies_each_layers_own_scale(conv_run, assets):
    """peft's loader (the users' snippet) reads the patterns: conv1 at 1 / 2, to_q and the shortcut at 8 / 4."""
    from peft import PeftModel
    from test_init_adapter import models_of

    model = PeftModel.from_pretrained(models_of(assets)["unet"], conv_run / "step2" / "unet")
    layers = dict(model.base_model.model.named_modules())
    assert layers["down_blocks.1.resnets.0.conv1"].scaling["default"] == 0.5
    assert layers["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"].scaling["default"] == 2.0
    assert layers["down_blocks.2.resnets.0.conv_shortcut"].scaling["default"] == 2.0


def test_a_resumed_conv_rank_run_equals_the_uninterrupted_one(conv_run, assets, tmp_path):
    resumed = tmp_path / "resumed"
    argv = sdxl_args(assets, resumed, *FLAGS, steps=2, checkpointing_steps=1)
    assert run_script("train_sdxl_lokr", [*argv, "--max_train_steps", "1"]) == 0
    assert run_script("train_sdxl_lokr", [*argv, "--resume_from_checkpoint", "latest"]) == 0
    for sub in ("step2", "step2/ema"):  # the EMA of mixed-rank weights too
        expected, got = adapter_weights(conv_run / sub), adapter_weights(resumed / sub)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (sub, key)


def test_the_kohya_export_reimports_to_the_same_deltas(conv_run, assets, tmp_path):
    exported = tmp_path / "lokr.safetensors"
    assert run_script("export", ["--checkpoint", conv_run / "step2", "--out", exported]) == 0
    argv = sdxl_args(assets, tmp_path / "again", "--init_adapter", exported, steps=1, lr="1e-30", checkpointing_steps=1)
    assert run_script("train_sdxl_lokr", argv) == 0
    assert_same_deltas(deltas(conv_run / "step2", assets), deltas(tmp_path / "again" / "step1", assets))


def test_a_new_run_from_the_checkpoint_keeps_each_layers_rank(conv_run, assets, tmp_path):
    argv = sdxl_args(
        assets, tmp_path / "again", "--init_adapter", conv_run / "step2", steps=1, lr="1e-30", checkpointing_steps=1
    )
    assert run_script("train_sdxl_lokr", argv) == 0
    assert_same_deltas(deltas(conv_run / "step2", assets), deltas(tmp_path / "again" / "step1", assets))
    before, after = (json.loads((d / "unet" / "adapter_config.json").read_text())
                     for d in (conv_run / "step2", tmp_path / "again" / "step1"))  # fmt: skip
    assert after["rank_pattern"] == before["rank_pattern"] and after["alpha_pattern"] == before["alpha_pattern"]
