"""Noise schedule and the training loss (DDPM, linear betas, ε- or v-prediction, MSE, optionally
min-SNR weighted)."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from .config import ModelConfig
from .unet import unwrap


def schedule_kwargs(config: ModelConfig) -> dict:
    """The training noise schedule; every sampler is configured from the same numbers."""
    return dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        prediction_type=config.prediction_type,
    )


@lru_cache(maxsize=8)
def _scheduler(key: tuple) -> DDPMScheduler:
    return DDPMScheduler(**dict(key))


def noise_scheduler(config: ModelConfig) -> DDPMScheduler:
    # Cached: building a scheduler per step would recompute the beta tables every call.
    return _scheduler(tuple(sorted(schedule_kwargs(config).items())))


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    gdev = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=gdev, dtype=torch.float32).to(x.device)


def diffusion_loss(
    model: nn.Module,
    x0: torch.Tensor,
    cond: dict[str, torch.Tensor],
    generator: torch.Generator | None = None,
    *,
    drop_conditions: bool = True,
    min_snr_gamma: float = 0.0,
) -> torch.Tensor:
    """MSE between the model's prediction and ε (or v) at a uniformly drawn timestep.

    min_snr_gamma > 0: each sample's error weighted by min(SNR, γ) / SNR (ε) or / (SNR + 1) (v), Hang
    et al. 2023 ("Min-SNR"): the nearly clean timesteps, whose targets are easy and whose gradients
    fight the noisy ones', count less.

    x0: clean images in [-1, 1], (B, C, H, W). `model` may be wrapped (DDP/Accelerate/compile); it is
    called through the wrapper so gradient sync and autocast still apply. While the model is in
    training mode, condition dropout (the learned null token, for classifier-free guidance) is applied
    unless drop_conditions=False.
    """
    base = unwrap(model)
    sched = noise_scheduler(base.config)
    if drop_conditions and base.training:
        cond = base.drop_conditions(cond, generator)
    x0 = x0.float()
    b = x0.shape[0]
    gdev = generator.device if generator is not None else x0.device
    t = torch.randint(0, sched.config.num_train_timesteps, (b,), generator=generator, device=gdev).to(x0.device)
    noise = _randn_like(x0, generator)
    xt = sched.add_noise(x0, noise, t)
    target = noise if base.config.prediction_type == "epsilon" else sched.get_velocity(x0, noise, t)
    pred = model(xt, t, cond)
    if min_snr_gamma <= 0:
        return F.mse_loss(pred.float(), target.float())
    abar = sched.alphas_cumprod.to(x0.device)[t]
    snr = abar / (1 - abar)
    weight = snr.clamp(max=min_snr_gamma) / (snr if base.config.prediction_type == "epsilon" else snr + 1)
    return (weight * (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3))).mean()
