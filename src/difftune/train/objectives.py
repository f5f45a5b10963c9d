"""Training-objective options shared by both scripts: timestep sampling, noise, loss type and weighting.

SDXL trains on DDPMScheduler's discrete timesteps 0..T-1; the Wuerstchen prior on continuous
t in (0, 1) of DDPMWuerstchenScheduler. Both have an alphas-cumprod, hence an SNR, so every option
here applies to both; for the continuous schedule, timestep-bias indices are 1000 equal bins of
(0, 1). Every draw comes from torch's global RNG, which the loop re-seeds per micro-batch
(exact resume); the order of draws is noise, timesteps, input perturbation.
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from difftune.cli.errors import UserError
from difftune.data.masks import on_grid
from difftune.train.args import add_objective_args  # (the flags live with the others, and load no torch)

CONTINUOUS_BINS = 1000  # timestep-bias indices for a continuous schedule: bins of (0, 1)
SNR_CLAMP = 1000.0  # debiased estimation: snr is infinite at t = 0 (kohya's limit)


def check_timestep_range(args: argparse.Namespace, num_timesteps: Callable[[], int]) -> None:
    """--timestep_bias_end within the schedule (`num_timesteps()` reads its length from the model's
    config), checked before any model loads."""
    if args.timestep_bias_strategy == "range" and args.timestep_bias_end > (length := num_timesteps()):
        raise UserError(f"--timestep_bias_end {args.timestep_bias_end} is above the schedule's {length} timesteps")


def timestep_weights(strategy: str, num_timesteps: int, multiplier: float, portion: float, begin: int, end: int):
    """Sampling weights over timestep indices (diffusers' generate_timestep_weights), summing to 1."""
    weights = torch.ones(num_timesteps)
    count = int(portion * num_timesteps)
    if strategy == "later" and count:
        weights[-count:] *= multiplier
    elif strategy == "earlier" and count:
        weights[:count] *= multiplier
    elif strategy == "range":
        if end > num_timesteps:
            raise UserError(f"--timestep_bias_end {end} is above the schedule's {num_timesteps} timesteps")
        weights[begin:end] *= multiplier
    return weights / weights.sum()


def pyramid_noise(noise: torch.Tensor, iterations: int, discount: float) -> torch.Tensor:
    """Multi-resolution noise (kohya's pyramid_noise_like): upsampled coarser noise, discount^i per level,
    at a random size ratio in [2, 4), then rescaled to unit std. The ratio is drawn from torch's RNG."""
    batch, channels, height, width = noise.shape
    for i in range(iterations):
        ratio = torch.rand(1, device=noise.device).item() * 2 + 2
        h, w = max(1, int(height / ratio**i)), max(1, int(width / ratio**i))
        coarse = torch.randn(batch, channels, h, w, device=noise.device, dtype=noise.dtype)
        noise = noise + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**i
        if h == 1 or w == 1:
            break
    return noise / noise.std()


def elementwise_loss(pred: torch.Tensor, target: torch.Tensor, loss_type: str, c: torch.Tensor) -> torch.Tensor:
    """l2, or kohya's pseudo-Huber 2c(sqrt(d^2 + c^2) - c) / smooth L1 2(sqrt(d^2 + c^2) - c); c per sample."""
    diff = pred.float() - target.float()
    if loss_type == "l2":
        return diff**2
    c = c.float().view(-1, *([1] * (diff.ndim - 1)))
    root = torch.sqrt(diff**2 + c**2) - c
    return 2 * c * root if loss_type == "huber" else 2 * root


@dataclass
class Objective:
    """The objective flags bound to one noise schedule (`continuous`: Wuerstchen's t in (0, 1))."""

    args: argparse.Namespace
    scheduler: object
    continuous: bool = False

    def __post_init__(self) -> None:
        a = self.args
        self.num_timesteps = CONTINUOUS_BINS if self.continuous else self.scheduler.config.num_train_timesteps
        self.bias = None
        if a.timestep_bias_strategy != "none":
            self.bias = timestep_weights(
                a.timestep_bias_strategy, self.num_timesteps, a.timestep_bias_multiplier,
                a.timestep_bias_portion, a.timestep_bias_begin, a.timestep_bias_end,
            )  # fmt: skip

    @property
    def prediction_type(self) -> str:
        return "epsilon" if self.continuous else self.scheduler.config.prediction_type

    @functools.cached_property
    def plain(self) -> Objective:
        """The same schedule with every option off: plain noise and MSE (for the held-out loss)."""
        parser = argparse.ArgumentParser()
        add_objective_args(parser)
        return Objective(parser.parse_args([]), self.scheduler, self.continuous)

    def draw(self, x0: torch.Tensor, fractions: torch.Tensor | None = None) -> Draw:
        """A batch's noise, timesteps and noisy input: drawn with the options (training), or, at given
        fractions of the schedule, by the plain objective (the held-out loss)."""
        objective = self if fractions is None else self.plain
        noise = objective.noise(x0)
        # Continuous t (Wuerstchen, Stable Cascade) stays fp32 in every precision: the prior's sinusoid of
        # t * 10000 in bf16 loses its high frequencies (Stability's trainer and ComfyUI compute it in fp32).
        dtype = torch.float32 if self.continuous else x0.dtype
        if fractions is None:
            timesteps = self.timesteps(x0.shape[0], x0.device, dtype)
        else:
            timesteps = self.at_fractions(fractions, dtype)
        return Draw(objective, noise, timesteps, objective.noisy_input(x0, noise, timesteps))

    def at_fractions(self, fractions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Timesteps at fractions of the schedule (the held-out loss's fixed spread, cubic sampling)."""
        if self.continuous:
            return fractions.to(dtype)
        return (fractions * self.num_timesteps).long().clamp(0, self.num_timesteps - 1)

    def noise(self, x0: torch.Tensor) -> torch.Tensor:
        """Gaussian noise by shape (not randn_like, which follows the memory layout), with offset and pyramid."""
        a = self.args
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype)
        if a.noise_offset:
            noise = noise + a.noise_offset * torch.randn(
                x0.shape[0], x0.shape[1], 1, 1, device=x0.device, dtype=x0.dtype
            )
        if a.multires_noise_iterations:
            noise = pyramid_noise(noise, a.multires_noise_iterations, a.multires_noise_discount)
        return noise

    def timesteps(self, batch_size: int, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Discrete indices (SDXL) or continuous t (Wuerstchen), uniform, cubic or biased."""
        if self.bias is not None:
            index = torch.multinomial(self.bias, batch_size, replacement=True).to(device)
            if not self.continuous:
                return index
            return (index + torch.rand(batch_size, device=device)).div(self.num_timesteps).to(dtype)
        if self.args.timestep_sampling == "cubic":
            return self.at_fractions(1 - torch.rand(batch_size, device=device) ** 3, dtype)
        if self.continuous:
            return torch.rand(batch_size, device=device, dtype=dtype)
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model predicts: the noise (epsilon) or the velocity (v_prediction)."""
        kind = self.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, timesteps)
        raise UserError(f"unsupported prediction type {kind!r}: use epsilon or v_prediction")

    def noisy_input(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t; with --input_perturbation the input's noise is perturbed, the target's is not."""
        if self.args.input_perturbation:
            extra = torch.randn(noise.shape, device=noise.device, dtype=noise.dtype)
            noise = noise + self.args.input_perturbation * extra
        return self.scheduler.add_noise(x0, noise, timesteps)

    def alphas_cumprod(self, timesteps: torch.Tensor) -> torch.Tensor:
        if self.continuous:
            return self.scheduler._alpha_cumprod(timesteps.float(), timesteps.device).flatten()
        return self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        acp = self.alphas_cumprod(timesteps)
        return acp / (1 - acp)

    def huber_c(self, timesteps: torch.Tensor) -> torch.Tensor:
        """c per sample: constant, c^(t/T) (exponential), or (1 - c) / (1 + sigma_t)^2 + c (snr)."""
        c = self.args.huber_c
        schedule = self.args.huber_schedule
        if schedule == "constant":
            return torch.full(timesteps.shape, c, device=timesteps.device)
        if schedule == "exponential":
            fraction = timesteps.float() if self.continuous else timesteps.float() / self.num_timesteps
            return c**fraction
        sigma = torch.sqrt(1 / self.snr(timesteps))
        return (1 - c) / (1 + sigma) ** 2 + c

    def sample_weights(self, timesteps: torch.Tensor) -> torch.Tensor | None:
        """Per-sample loss weights: min-SNR-gamma and / or debiased estimation, or P2 (None: all ones)."""
        a = self.args
        p2 = getattr(a, "loss_weighting", "constant") == "p2"
        if a.snr_gamma is None and not a.debiased_estimation and not p2:
            return None
        snr = self.snr(timesteps)
        if p2:  # Stability's stage C trainer: gdf's P2LossWeight, (k + SNR)^-gamma
            return (a.p2_k + snr) ** -a.p2_gamma
        v_prediction = self.prediction_type == "v_prediction"
        weights = torch.ones_like(snr)
        if a.snr_gamma is not None:
            clipped = torch.clamp(snr, max=a.snr_gamma)
            weights = weights * clipped / ((snr + 1) if v_prediction else snr)
        if a.debiased_estimation:
            snr_t = torch.clamp(snr, max=SNR_CLAMP)
            weights = weights / ((snr_t + 1) if v_prediction else torch.sqrt(snr_t))
        return weights

    def loss(
        self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The batch's loss, in fp32: element loss (times the --masked_loss `mask`) averaged per sample,
        weighted, averaged."""
        masked = mask is not None and getattr(self.args, "masked_loss", False)
        if self.args.loss_type == "l2" and self.sample_weights(timesteps) is None and not masked:
            return F.mse_loss(pred.float(), target.float())
        return self.per_sample_loss(pred, target, timesteps, mask).mean()

    def per_sample_loss(
        self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each sample's loss, in fp32: its element loss (times the --masked_loss `mask`, reduced to the latent
        grid) averaged, weighted. The plain objective (held-out loss) ignores the mask."""
        a = self.args
        weights = self.sample_weights(timesteps)
        c = self.huber_c(timesteps) if a.loss_type != "l2" else None
        elements = elementwise_loss(pred, target, a.loss_type, c)
        if mask is not None and getattr(a, "masked_loss", False):  # kohya's apply_masked_loss: not renormalised
            elements = elements * on_grid(mask.to(elements.device), elements.shape[-2:])
        per_sample = elements.mean(dim=list(range(1, pred.ndim)))
        return per_sample if weights is None else per_sample * weights


def prior_preservation_loss(
    per_sample: torch.Tensor, is_class: torch.Tensor, weight: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DreamBooth's loss: the instance samples' mean + `weight` x the class samples' mean (a part without samples
    adds nothing), and each part's mean (detached) by name: "instance", "prior"."""
    total, parts = per_sample.new_zeros(()), {}
    for name, chosen, factor in (("instance", ~is_class, 1.0), ("prior", is_class, weight)):
        if chosen.any():
            mean = per_sample[chosen].mean()
            total = total + factor * mean
            parts[name] = mean.detach()
    return total, parts


@dataclass
class Draw:
    """One batch's noise, timesteps and noisy input, with the objective that drew them and scores the result."""

    objective: Objective
    noise: torch.Tensor
    timesteps: torch.Tensor
    noisy_input: torch.Tensor

    def loss(self, pred: torch.Tensor, x0: torch.Tensor, batch: dict | None = None) -> torch.Tensor:
        """The loss of `pred` (weighted by batch["mask"] with --masked_loss); a batch with class samples (prior
        preservation) gets each part reduced apart, and their means put in batch["loss_parts"] for the log; a
        batch of a kohya data set with regularisation images weights each sample by batch["loss_weight"] (kohya's
        loss_weights: --prior_loss_weight for those images) before the mean, as kohya does."""
        target = self.objective.target(x0, self.noise, self.timesteps)
        mask = None if batch is None else batch.get("mask")
        if batch is not None and "loss_weight" in batch:  # kohya's regularisation images: one weighted mean
            per_sample = self.objective.per_sample_loss(pred, target, self.timesteps, mask)
            return (per_sample * batch["loss_weight"].to(per_sample)).mean()
        if batch is None or "is_class" not in batch:
            return self.objective.loss(pred, target, self.timesteps, mask)
        per_sample = self.objective.per_sample_loss(pred, target, self.timesteps, mask)
        weight = getattr(self.objective.args, "prior_loss_weight", 1.0)
        loss, batch["loss_parts"] = prior_preservation_loss(per_sample, batch["is_class"], weight)
        return loss


def batch_loss(compute_loss: Callable[..., torch.Tensor], batch: dict, models: dict) -> tuple[torch.Tensor, dict]:
    """The micro-batch's loss and its prior-preservation parts ({} without class samples): a batch whose
    instance and class samples differ in size (buckets) runs as two parts, whose losses add up."""
    if "parts" not in batch:
        loss = compute_loss(batch, models)
        return loss, batch.get("loss_parts", {})
    loss, parts = 0.0, {}
    for part in batch["parts"]:
        loss = loss + compute_loss(part, models)
        parts.update(part.get("loss_parts", {}))
    return loss, parts
