"""The factored LoKr forward gives peft's outputs, gradients, random draws and trained weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from difftune.adapters import lokr

# Every adapted Linear shape of real SDXL (in, out): attention at 320/640/1280, cross-attention k/v from
# 2048, and the CLIP-L (768) / OpenCLIP-bigG (1280) text-encoder projections.
SDXL_SHAPES = [(320, 320), (640, 640), (1280, 1280), (2048, 320), (2048, 640), (2048, 1280), (768, 768)]

LAYOUTS = {
    "w1 full, w2 full": dict(r=64),
    "w1 full, w2 split": dict(r=4),
    "w1 split, w2 split": dict(r=4, decompose_both=True),
    "decompose_factor 8": dict(r=4, decompose_factor=8, decompose_both=True),
    "alpha != rank, lycoris init": dict(r=8, alpha=3.0, init_weights="lycoris"),
    "rank and module dropout": dict(r=4, rank_dropout=0.3, module_dropout=0.3),
    "scaled rank dropout": dict(r=4, rank_dropout=0.5, rank_dropout_scale=True),
}


def peft_pair(in_features: int, out_features: int, options: dict) -> tuple[nn.Module, nn.Module]:
    """The same peft LoKr layer twice: peft's forward and the factored one. Random, non-zero factors."""
    from peft import LoKrConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(in_features, out_features))
    config = LoKrConfig(target_modules=["0"], **{"init_weights": False, **options})
    reference = get_peft_model(base, config)
    factored = copy.deepcopy(reference)
    assert lokr.use_factored_forward(factored) == 1
    return reference, factored


def run(model: nn.Module, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    x = x.clone().requires_grad_(True)
    y = model(x)
    weights = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * weights).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    grads["input"] = x.grad
    # The random stream must be left where peft leaves it: the next draw is the same.
    return y, grads, torch.rand(1)


def assert_close(actual: torch.Tensor | None, expected: torch.Tensor | None) -> None:
    if expected is None:  # module dropout skipped the adapter: no gradient on either path
        assert actual is None
        return
    scale = expected.abs().max().clamp_min(1e-12)
    assert (actual - expected).abs().max() / scale <= 1e-5


@pytest.mark.parametrize("in_features,out_features", SDXL_SHAPES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_factored_lokr_matches_peft(in_features, out_features, layout):
    reference, factored = peft_pair(in_features, out_features, LAYOUTS[layout])
    x = torch.randn(2, 3, in_features)
    for seed in (1, 2, 3):  # several seeds, so dropout both fires and not
        y_ref, g_ref, next_ref = run(reference, x, seed)
        y_fac, g_fac, next_fac = run(factored, x, seed)
        assert_close(y_fac, y_ref)
        assert g_fac.keys() == g_ref.keys() and len(g_ref) >= 3
        for name in g_ref:
            assert_close(g_fac[name], g_ref[name])
        assert torch.equal(next_fac, next_ref)
        reference.zero_grad()
        factored.zero_grad()


@pytest.mark.parametrize("layout", ["w1 full, w2 split", "w1 split, w2 split"])
def test_factored_lokr_under_bf16_autocast_matches_peft(layout):
    # What --mixed_precision bf16 runs: fp32 adapter weights, the matmuls in bf16. Both paths round
    # differently, so they agree to bf16's precision (8 bits of mantissa), not to fp32's.
    reference, factored = peft_pair(640, 640, LAYOUTS[layout])
    x = torch.randn(2, 16, 640)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, g_ref, _ = run(reference, x, 1)
        y_fac, g_fac, _ = run(factored, x, 1)
    assert y_fac.dtype == y_ref.dtype == x.dtype  # peft casts the result back to the input's dtype
    for name, expected in {"output": y_ref, **g_ref}.items():
        actual = y_fac if name == "output" else g_fac[name]
        assert actual.dtype == expected.dtype, name
        error = (actual.float() - expected.float()).abs().max() / expected.float().abs().max()
        assert error <= 2e-2, (name, error.item())


def test_factored_lokr_eval_merge_and_save_are_peft_s():
    reference, factored = peft_pair(640, 640, LAYOUTS["w1 full, w2 split"])
    x = torch.randn(4, 640)
    factored.eval(), reference.eval()
    with torch.no_grad():
        expected = reference(x)
        assert_close(factored(x), expected)
        assert reference.state_dict().keys() == factored.state_dict().keys()
        merged = factored.merge_and_unload()
        assert_close(merged(x), expected)
        assert type(merged[0]) is nn.Linear


def test_conv_layers_keep_peft_s_path():
    from peft import LoKrConfig, get_peft_model
    from peft.tuners.lokr.layer import Conv2d, Linear

    model = get_peft_model(nn.Sequential(nn.Conv2d(8, 8, 3), nn.Linear(8, 8)), LoKrConfig(target_modules=["0", "1"]))
    assert lokr.use_factored_forward(model) == 1
    conv, linear = model.base_model.model
    assert type(conv) is Conv2d  # peft's own class and forward
    assert type(linear) is not Linear and type(linear).__bases__ == (Linear,)
    assert type(linear)._get_delta_activations is not Linear._get_delta_activations


def test_tiny_training_run_gives_peft_s_weights(assets, tmp_path, run_main, monkeypatch):
    """Every random draw (noise, timesteps, module and rank dropout) lines up, so the checkpoints agree."""
    from helpers import sdxl_args
    from safetensors.torch import load_file

    options = [
        "--rank", "2", "--alpha", "3", "--decompose_both", "--rank_dropout", "0.3", "--module_dropout", "0.3",
        "--gradient_checkpointing", "--target_modules", "to_q,to_k,to_v,to_out.0,conv1",
        # Adam's first steps are about sign(grad) * lr: a larger epsilon keeps entries whose gradient is ~1e-9
        # from turning rounding-level differences into lr-sized ones.
        "--adam_epsilon", "1e-4",
    ]  # fmt: skip
    switched = []
    real_switch = lokr.use_factored_forward
    monkeypatch.setattr(lokr, "use_factored_forward", lambda model: switched.append(real_switch(model)))
    assert run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "factored", *options, steps=2)) == 0
    assert switched and switched[0] > 0  # the UNet's LoKr Linear layers ran factored
    monkeypatch.setattr(lokr, "use_factored_forward", lambda model: 0)  # peft's own forward
    assert run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "peft", *options, steps=2)) == 0

    expected = load_file(tmp_path / "peft" / "step2" / "unet" / "adapter_model.safetensors")
    got = load_file(tmp_path / "factored" / "step2" / "unet" / "adapter_model.safetensors")
    assert got.keys() == expected.keys() and any(".lokr_w1_a" in k for k in expected)
    for key in expected:
        # Whole-tensor relative error: after a deep fp32 UNet's backward the two summation orders differ at
        # ~1e-6, which one small entry of a tensor can show at ~1e-5 of the tensor's largest.
        assert (got[key] - expected[key]).norm() <= 1e-5 * expected[key].norm(), key
