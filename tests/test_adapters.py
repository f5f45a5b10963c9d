"""Adapters: a no-op at step 0 for both LoKr inits and LoRA; only adapter weights are trainable."""

import argparse

import pytest
import torch

from difftune import adapters
from difftune.errors import UserError


def lokr_args(**overrides) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    adapters.add_lokr_args(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


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
    trainable = [n for n, p in peft_unet.named_parameters() if p.requires_grad]
    assert trainable and all("lokr_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in adapters.trainable_parameters(peft_unet))
    assert any(".conv1.lokr_" in n for n in trainable)  # Conv2d layers take LoKr too


@pytest.mark.parametrize(("flag", "value"), [("rank", 0), ("alpha", -1.0), ("rank_dropout", 1.5)])
def test_bad_lokr_settings_are_refused(flag, value):
    with pytest.raises(UserError, match=f"--{flag}"):
        adapters.lokr_config(lokr_args(**{flag: value}), ["to_q"])


def test_unknown_target_module_is_a_user_error(assets):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(assets / "sdxl", subfolder="unet")
    with pytest.raises(UserError, match="target_modules"):
        adapters.attach(unet, adapters.lokr_config(lokr_args(), ["no_such_layer"]), "base")
