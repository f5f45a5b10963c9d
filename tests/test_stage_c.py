"""Stable Cascade stage C as Stability's trainer trains it: P2 loss weighting, timesteps and EfficientNet in fp32
under bf16, and validation / infer.py sampling the prior at the latent size it trained at."""

from __future__ import annotations

import argparse
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import adapter_weights, cascade_args, max_difference, resumed_copy

from difftune.train import args as flags
from difftune.train import objectives


def cosine_snr(t: float, s: float = 0.008) -> float:
    """Wuerstchen's / Stable Cascade's schedule (DDPMWuerstchenScheduler): alpha_bar(t) = cos((t + s) / (1 + s)
    * pi / 2)^2 / cos(s / (1 + s) * pi / 2)^2, clamped to [1e-4, 1 - 1e-4]; SNR = alpha_bar / (1 - alpha_bar)."""
    alpha_bar = math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    alpha_bar = min(max(alpha_bar, 1e-4), 1 - 1e-4)
    return alpha_bar / (1 - alpha_bar)


def test_p2_weights_each_sample_by_one_over_one_plus_snr():
    from diffusers import DDPMWuerstchenScheduler

    parser = argparse.ArgumentParser()
    flags.add_objective_args(parser)
    args = parser.parse_args([])
    args.loss_weighting, args.p2_k, args.p2_gamma = "p2", 1.0, 1.0
    objective = objectives.Objective(args, DDPMWuerstchenScheduler(), continuous=True)
    t = torch.tensor([0.05, 0.3, 0.7, 0.95])
    pred, target = torch.ones(4, 2, 3, 3), torch.zeros(4, 2, 3, 3)
    per_sample = objective.per_sample_loss(pred, target, t)  # plain squared error 1 everywhere: the weights
    expected = torch.tensor([1 / (1 + cosine_snr(v)) for v in t.tolist()])
    assert torch.allclose(per_sample, expected, rtol=1e-4), (per_sample, expected)
    args.p2_k, args.p2_gamma = 0.5, 2.0  # gdf's general form: (k + SNR)^-gamma
    expected = torch.tensor([(0.5 + cosine_snr(v)) ** -2.0 for v in t.tolist()])
    assert torch.allclose(objective.per_sample_loss(pred, target, t), expected, rtol=1e-4)


@pytest.mark.parametrize("other", [("--snr_gamma", "5"), ("--debiased_estimation",)])
def test_p2_with_another_snr_weighting_is_one_line(assets, tmp_path, run_main, capsys, other):
    from helpers import one_line_error

    argv = cascade_args(assets, tmp_path / "out", "--loss_weighting", "p2", *other)
    assert run_main("train_wuerstchen_lora", argv) == 2
    assert "both weight the loss by the SNR" in one_line_error(capsys)


def test_a_resumed_p2_run_equals_the_uninterrupted_one(assets, tmp_path, run_main):
    full = tmp_path / "full"
    assert run_main("train_wuerstchen_lora", cascade_args(assets, full, "--loss_weighting", "p2")) == 0
    resumed = tmp_path / "resumed"
    resumed_copy(full / "step2", resumed)
    argv = cascade_args(assets, resumed, "--loss_weighting", "p2", "--resume_from_checkpoint", "latest")
    assert run_main("train_wuerstchen_lora", argv) == 0
    assert max_difference(adapter_weights(resumed / "step4"), adapter_weights(full / "step4")) <= 1e-6


def test_bf16_keeps_t_and_efficientnet_in_fp32_and_samples_at_the_trained_latent(
    assets, tmp_path, run_main, monkeypatch
):
    """Every training call of the prior gets fp32 timestep ratios under bf16; the EfficientNet runs in fp32;
    validation and infer.py call the prior on latents of the training size (384 px: EfficientNet's 12 x 12, made
    by the pipeline at 512 px; at 384 px it would make 9 x 9)."""
    from diffusers import StableCascadeUNet

    from difftune.models import wuerstchen

    calls, encoder_inputs = [], []
    real_forward, real_encoder = StableCascadeUNet.forward, wuerstchen.EfficientNetEncoder.forward

    def forward(self, sample, timestep_ratio, *args, **kwargs):
        if self.config.in_channels == 16:  # stage C (stage B is the same class, with 4 channels)
            calls.append((tuple(sample.shape[-2:]), timestep_ratio.dtype, torch.is_grad_enabled()))
        return real_forward(self, sample, timestep_ratio, *args, **kwargs)

    def encode(self, pixels):
        encoder_inputs.append((pixels.dtype, next(self.parameters()).dtype))
        return real_encoder(self, pixels)

    monkeypatch.setattr(StableCascadeUNet, "forward", forward)
    monkeypatch.setattr(wuerstchen.EfficientNetEncoder, "forward", encode)
    out = tmp_path / "out"
    argv = cascade_args(
        assets, out, "--mixed_precision", "bf16", "--validation_prompt", "a shape", "--validation_steps", "1",
        "--num_validation_images", "1", "--validation_inference_steps", "2", steps=1, resolution=384,
    )  # fmt: skip
    assert run_main("train_wuerstchen_lora", argv) == 0
    training = [c for c in calls if c[2]]
    sampling = [c for c in calls if not c[2]]
    assert training and sampling
    # (sampling goes through diffusers' StableCascadePriorPipeline, which casts t to the prior's dtype itself)
    assert {c[1] for c in training} == {torch.float32}
    assert {c[0] for c in training} == {(12, 12)} and {c[0] for c in sampling} == {(12, 12)}
    assert encoder_inputs and set(encoder_inputs) == {(torch.float32, torch.float32)}
    calls.clear()
    image = tmp_path / "images"
    infer = ["--checkpoint", out / "step1", "--prompt", "a shape", "--num_inference_steps", "2", "--output_dir", image]
    assert run_main("infer", infer) == 0
    assert calls and {c[0] for c in calls} == {(12, 12)}


def test_sampling_side_gives_stabilitys_preview_size_at_real_scale():
    """At 768 px the EfficientNet makes 24 x 24; the prior pipeline (resolution_multiple 42.67) makes 24 x 24
    for 1024 px, the size Stability's trainer previews at."""
    from difftune.models import cascade

    pipe = SimpleNamespace(prior_pipe=SimpleNamespace(config=SimpleNamespace(resolution_multiple=42.67)))
    assert cascade.CASCADE.sampling_side(pipe, 768) == 1024
    assert math.ceil(1024 / 42.67) == 24
