"""Objective options: each formula against an independent re-implementation of its reference, the
sampled-timestep distributions, caption dropout, and bad values refused before any model loads."""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import one_line_error, sdxl_args, wuerstchen_args

from difftune.train.objectives import Objective, add_objective_args, pyramid_noise


def objective_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_objective_args(parser)
    return parser.parse_args(list(argv))


def ddpm():
    from diffusers import DDPMScheduler

    # SDXL's training schedule.
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def wuerstchen_scheduler():
    from diffusers import DDPMWuerstchenScheduler

    return DDPMWuerstchenScheduler()


def reference_timestep_weights(strategy, num, multiplier, portion, begin=0, end=1000):
    """diffusers train_text_to_image_sdxl.py generate_timestep_weights, restated."""
    weights = torch.ones(num)
    n = int(portion * num)
    chosen = {"later": slice(num - n, num), "earlier": slice(0, n), "range": slice(begin, end)}[strategy]
    weights[chosen] *= multiplier
    return weights / weights.sum()


@pytest.mark.parametrize(
    ("strategy", "extra", "biased"),
    [("later", (), slice(750, 1000)), ("earlier", (), slice(0, 250)), ("range", ("300", "500"), slice(300, 500))],
)
def test_timestep_bias_weights_and_histogram(strategy, extra, biased):
    flags = ["--timestep_bias_strategy", strategy, "--timestep_bias_multiplier", "4", "--timestep_bias_portion", "0.25"]
    if extra:
        flags += ["--timestep_bias_begin", extra[0], "--timestep_bias_end", extra[1]]
    objective = Objective(objective_args(*flags), ddpm())
    begin, end = (int(extra[0]), int(extra[1])) if extra else (0, 1000)
    expected = reference_timestep_weights(strategy, 1000, 4.0, 0.25, begin, end)
    assert torch.allclose(objective.bias, expected)
    torch.manual_seed(0)
    t = objective.timesteps(40_000, torch.device("cpu"))
    share = ((t >= biased.start) & (t < biased.stop)).float().mean().item()
    width = biased.stop - biased.start
    assert share == pytest.approx(4 * width / (4 * width + 1000 - width), abs=0.01)
    # Wuerstchen: the same weights over 1000 bins of (0, 1).
    objective = Objective(objective_args(*flags), wuerstchen_scheduler(), continuous=True)
    t = objective.timesteps(40_000, torch.device("cpu"))
    assert t.min() > 0 and t.max() < 1
    share = ((t >= biased.start / 1000) & (t < biased.stop / 1000)).float().mean().item()
    assert share == pytest.approx(4 * width / (4 * width + 1000 - width), abs=0.01)


def test_cubic_sampling_favours_noisy_steps():
    # t = (1 - u^3) T: P(t < T/2) = 1 - 0.5^(1/3), E[t] = 3T/4.
    torch.manual_seed(0)
    t = Objective(objective_args("--timestep_sampling", "cubic"), ddpm()).timesteps(40_000, torch.device("cpu"))
    assert t.dtype == torch.int64 and t.min() >= 0 and t.max() <= 999
    assert (t < 500).float().mean().item() == pytest.approx(1 - 0.5 ** (1 / 3), abs=0.01)
    assert t.float().mean().item() == pytest.approx(749.5, abs=5)
    continuous = Objective(objective_args("--timestep_sampling", "cubic"), wuerstchen_scheduler(), continuous=True)
    t = continuous.timesteps(40_000, torch.device("cpu"))
    assert (t < 0.5).float().mean().item() == pytest.approx(1 - 0.5 ** (1 / 3), abs=0.01)


def kohya_conditional_loss(pred, target, loss_type, c):
    """kohya sd-scripts conditional_loss (reduction none), restated."""
    if loss_type == "l2":
        return (pred - target) ** 2
    if loss_type == "huber":
        return 2 * c * (torch.sqrt((pred - target) ** 2 + c**2) - c)
    return 2 * (torch.sqrt((pred - target) ** 2 + c**2) - c)


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
@pytest.mark.parametrize("schedule", ["constant", "exponential", "snr"])
def test_huber_losses_with_min_snr_match_the_references(loss_type, schedule):
    scheduler = ddpm()
    flags = ["--loss_type", loss_type, "--huber_schedule", schedule, "--huber_c", "0.2", "--snr_gamma", "5"]
    objective = Objective(objective_args(*flags), scheduler)
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 4, 5, 5, generator=generator), torch.randn(3, 4, 5, 5, generator=generator)
    timesteps = torch.tensor([5, 400, 990])
    acp = scheduler.alphas_cumprod[timesteps]
    snr = acp / (1 - acp)
    # diffusers research_projects/scheduled_huber_loss_training: c per timestep.
    if schedule == "constant":
        c = torch.full((3,), 0.2)
    elif schedule == "exponential":
        c = torch.exp(-(-math.log(0.2) / 1000) * timesteps.float())
    else:
        sigmas = ((1 - acp) / acp) ** 0.5
        c = (1 - 0.2) / (1 + sigmas) ** 2 + 0.2
    per_sample = torch.stack([kohya_conditional_loss(pred[i], target[i], loss_type, c[i]).mean() for i in range(3)])
    min_snr = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    expected = (per_sample * min_snr).mean()
    assert torch.allclose(objective.loss(pred, target, timesteps), expected, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_debiased_estimation_matches_kohya(prediction_type):
    scheduler = ddpm()
    scheduler.register_to_config(prediction_type=prediction_type)
    objective = Objective(objective_args("--debiased_estimation"), scheduler)
    generator = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 4, 5, 5, generator=generator), torch.randn(3, 4, 5, 5, generator=generator)
    timesteps = torch.tensor([0, 300, 999])
    all_snr = (scheduler.alphas_cumprod.sqrt() / (1 - scheduler.alphas_cumprod).sqrt()) ** 2  # kohya's all_snr
    snr_t = torch.minimum(all_snr[timesteps], torch.full((3,), 1000.0))
    weight = 1 / (snr_t + 1) if prediction_type == "v_prediction" else 1 / torch.sqrt(snr_t)
    expected = (F.mse_loss(pred, target, reduction="none").mean(dim=[1, 2, 3]) * weight).mean()
    assert torch.allclose(objective.loss(pred, target, timesteps), expected, rtol=1e-5)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_for_both_parameterisations(prediction_type):
    # Min-SNR-gamma (Hang et al. 2023): min(snr, gamma) / snr for epsilon, min(snr, gamma) / (snr + 1) for v.
    scheduler = ddpm()
    scheduler.register_to_config(prediction_type=prediction_type)
    objective = Objective(objective_args("--snr_gamma", "5"), scheduler)
    generator = torch.Generator().manual_seed(2)
    pred, target = torch.randn(4, 4, 5, 5, generator=generator), torch.randn(4, 4, 5, 5, generator=generator)
    timesteps = torch.tensor([3, 100, 600, 990])  # snr from ~300 down to ~5e-3: gamma clips the first two
    acp = scheduler.alphas_cumprod[timesteps].double()
    snr = acp / (1 - acp)
    assert (snr > 5).sum() == 2
    weight = torch.clamp(snr, max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    expected = ((pred - target) ** 2).mean(dim=[1, 2, 3]).double() @ weight / 4
    assert objective.loss(pred, target, timesteps).item() == pytest.approx(expected.item(), rel=1e-5)


def test_noise_offset_adds_one_value_per_sample_and_channel():
    objective = Objective(objective_args("--noise_offset", "0.1"), ddpm())
    x0 = torch.zeros(2, 4, 6, 6)
    torch.manual_seed(4)
    got = objective.noise(x0)
    torch.manual_seed(4)
    plain = torch.randn(2, 4, 6, 6)
    offset = torch.randn(2, 4, 1, 1)  # drawn after the noise (diffusers' order)
    assert torch.allclose(got, plain + 0.1 * offset, atol=1e-7)
    shift = got - plain
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-7)  # constant over the image
    assert shift[:, :, 0, 0].unique().numel() == 8  # and distinct per sample and channel


def kohya_pyramid_noise_like(noise, iterations, discount):
    """kohya's pyramid_noise_like, its random ratio taken from torch's RNG (difftune's resumable draw)."""
    b, c, w, h = noise.shape
    upsample = torch.nn.Upsample(size=(w, h), mode="bilinear")
    for i in range(iterations):
        r = torch.rand(1).item() * 2 + 2
        wn, hn = max(1, int(w / (r**i))), max(1, int(h / (r**i)))
        noise = noise + upsample(torch.randn(b, c, wn, hn)) * discount**i
        if wn == 1 or hn == 1:
            break
    return noise / noise.std()


def test_pyramid_noise_matches_kohya_and_has_unit_std():
    torch.manual_seed(3)
    base = torch.randn(2, 4, 32, 32)
    got = pyramid_noise(base.clone(), 6, 0.3)
    torch.manual_seed(3)
    torch.randn(2, 4, 32, 32)
    expected = kohya_pyramid_noise_like(base.clone(), 6, 0.3)
    assert torch.allclose(got, expected, atol=1e-6)
    assert got.std().item() == pytest.approx(1.0, abs=1e-5)
    # The coarser levels (i >= 1) added something beyond the doubled full-size noise of level 0.
    doubled = 2 * base
    assert (got - doubled / doubled.std()).abs().max() > 1e-2


def test_input_perturbation_perturbs_the_input_not_the_target():
    scheduler = ddpm()
    objective = Objective(objective_args("--input_perturbation", "0.1"), scheduler)
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    torch.manual_seed(5)
    noisy = objective.noisy_input(x0, noise, t)
    torch.manual_seed(5)
    expected = scheduler.add_noise(x0, noise + 0.1 * torch.randn(2, 4, 8, 8), t)
    assert torch.equal(noisy, expected)
    assert torch.equal(objective.target(x0, noise, t), noise)


def test_caption_dropout_share_and_determinism():
    from difftune.data import CaptionedImageDataset, sample_rng

    dataset = CaptionedImageDataset.__new__(CaptionedImageDataset)
    dataset.seed, dataset.epoch, dataset.empty_prompt_share = 7, 0, 0.2
    drops = [dataset.drops_caption(i) for i in range(20_000)]
    assert sum(drops) / len(drops) == pytest.approx(0.2, abs=0.01)
    assert drops == [dataset.drops_caption(i) for i in range(20_000)]  # a function of (seed, epoch, index)
    assert drops[:8] == [sample_rng(7, 0, i, "empty-prompt").random() < 0.2 for i in range(8)]
    dataset.epoch = 1
    assert drops != [dataset.drops_caption(i) for i in range(20_000)]


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--timestep_bias_multiplier", "0", "--timestep_bias_multiplier must be positive"),
        ("--timestep_bias_portion", "1.5", "--timestep_bias_portion must be in [0, 1]"),
        ("--timestep_bias_begin", "600", "must be >= 0 and below --timestep_bias_end 500"),
        ("--proportion_empty_prompts", "-0.1", "--proportion_empty_prompts must be in [0, 1]"),
        ("--huber_schedule", "cosine", "invalid choice: 'cosine'"),
        ("--timestep_sampling", "cubic", "both pick timesteps: use one"),
    ],
)
@pytest.mark.parametrize("script", ["train_sdxl_lokr", "train_wuerstchen_lora"])
def test_bad_objective_values_are_one_line_errors(run_main, capsys, tmp_path, script, flag, value, message):
    make = sdxl_args if script == "train_sdxl_lokr" else wuerstchen_args
    argv = make(tmp_path / "no-assets", tmp_path / "out", "--timestep_bias_strategy", "range")
    argv += ["--timestep_bias_end", "500", flag, value]
    assert run_main(script, argv) == 2
    assert message in one_line_error(capsys)
