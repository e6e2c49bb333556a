"""Sampling with diffusers schedulers, classifier-free guidance and per-tile seeds.

Each tile's initial noise (and, for DDPM, its per-step noise) comes from its own torch.Generator
seeded with that tile's seed, so a tile's trajectory does not depend on which batch it lands in.
Batched kernels (oneDNN, cuDNN) may still sum in a batch-size-dependent order, which moves a rare
pixel by one uint8 level; per_tile=True evaluates the denoiser one tile at a time (slower) and makes
the pixels bitwise independent of batching.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from ..metadata import CONDITION_PREFIX, CONTINUOUS_PREFIX, ConditioningSpec, UnknownValueError
from .config import ModelConfig
from .diffusion import schedule_kwargs
from .unet import ConditionedUNet, unwrap

SAMPLERS = ("ddpm", "ddim", "dpmsolver++")


def make_sampler(config: ModelConfig, sampler: str):
    """A fresh scheduler for `sampler`, configured from the model's training noise schedule."""
    kw = schedule_kwargs(config)
    if sampler == "ddpm":
        return DDPMScheduler(**kw)
    if sampler == "ddim":
        return DDIMScheduler(**kw)
    if sampler == "dpmsolver++":
        # thresholding keeps x0 estimates in range, as DDIM/DDPM clip them; without it a briefly
        # trained epsilon model drifts to saturated colours
        return DPMSolverMultistepScheduler(
            **kw, algorithm_type="dpmsolver++", solver_order=2, thresholding=True, sample_max_value=1.0
        )
    raise ValueError(f"unknown sampler {sampler!r}; choose from {SAMPLERS}")


def check_interval(interval) -> tuple[float, float]:
    """A guidance interval (lo, hi) in diffusion time t / T (1: pure noise), or a one-line ValueError."""
    lo, hi = (float(v) for v in interval)
    if not 0 <= lo <= hi <= 1:
        raise ValueError(f"guidance interval {lo:g} {hi:g}: want 0 <= lo <= hi <= 1 (diffusion time t/T, 1: noise)")
    return lo, hi


def guided(timesteps, interval: tuple[float, float], total: int) -> list[bool]:
    """Which sampling steps a guidance interval (lo, hi) in diffusion time t / total covers."""
    lo, hi = check_interval(interval)
    return [lo <= float(t) / total <= hi for t in timesteps]


def encode_conditions(
    spec: ConditioningSpec, rows: Sequence[Mapping[str, Any]], *, strict: bool = False
) -> dict[str, torch.Tensor]:
    """Condition tensors for metadata rows via spec.encode_row (unseen values raise UnknownValueError
    listing the valid ones). A column that is absent or None is null (-1 / NaN: unconditional for that
    column); pass the string "Unknown" to ask for the Unknown token. strict=True also rejects keys
    that are not condition columns (catches typos such as "site" for "tissue_source_site")."""
    names = set(spec.categorical_names) | set(spec.continuous_names)
    cols: dict[str, list] = {CONDITION_PREFIX + n: [] for n in spec.categorical_names}
    cols.update({CONTINUOUS_PREFIX + n: [] for n in spec.continuous_names})
    subsets: dict[tuple, ConditioningSpec] = {}
    for row in rows:
        if strict and set(row) - names:
            raise UnknownValueError(f"not condition columns: {sorted(set(row) - names)}; have {sorted(names)}")
        present = tuple(n for n in spec.categorical_names + spec.continuous_names if row.get(n) is not None)
        if present not in subsets:
            subsets[present] = spec.subset(
                [n for n in spec.categorical_names if n in present], [n for n in spec.continuous_names if n in present]
            )
        enc = subsets[present].encode_row(row)
        for key, values in cols.items():
            values.append(enc.get(key, -1 if key.startswith(CONDITION_PREFIX) else math.nan))
    return {
        k: torch.tensor(v, dtype=torch.long if k.startswith(CONDITION_PREFIX) else torch.float32)
        for k, v in cols.items()
    }


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _batch_size(cond: Mapping[str, torch.Tensor], seeds, generators) -> int:
    for v in (seeds, generators, *cond.values()):
        if v is not None:
            return len(v)
    raise ValueError("cannot tell the batch size: pass seeds, generators or a non-empty cond")


@torch.no_grad()
def sample(
    model: ConditionedUNet,
    cond: Mapping[str, torch.Tensor],
    *,
    seeds: Sequence[int] | None = None,
    generators: Sequence[torch.Generator] | None = None,
    sampler: str = "dpmsolver++",
    steps: int = 25,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    size: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    per_tile: bool = False,
    return_tensor: bool = False,
    directions: Sequence[tuple[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], float]] = (),
) -> np.ndarray | torch.Tensor:
    """Generate one tile per row of `cond` (keys cond_<name>/cont_<name>; absent columns are null).

    seeds: one integer per tile (preferred; reproducible across batchings) or generators: one CPU
    torch.Generator per tile. guidance_scale s: eps = eps_u + s (eps_c - eps_u), eps_u with every
    column null; s == 1 skips the unconditional pass. guidance_interval (lo, hi): guided only at timesteps
    t with lo <= t / T <= hi (T the training timesteps, 1 pure noise; Kynkäänniemi et al. 2024), one pass
    at the others: guidance costs a second pass only where it is on. per_tile=True: bitwise batch-independent
    pixels (one denoiser call per tile and step). Returns uint8 (B, H, W, 3), or the float
    tensor in [-1, 1] with return_tensor=True.

    directions: composable conditioning (Liu et al. 2022), (plus, minus, w) condition sets added to
    the prediction for `cond` as w * (eps(plus) - eps(minus)); e.g. a site's stain taken where the
    model saw it: cond = (type, no site), plus = (site's own type, site), minus = (its type, no site).
    """
    base = unwrap(model)
    b = _batch_size(cond, seeds, generators)
    if generators is None:
        if seeds is None:
            seeds = torch.randint(0, 2**62, (b,)).tolist()  # non-reproducible on purpose: no seeds given
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    if len(generators) != b:
        raise ValueError(f"got {len(generators)} seeds/generators for a batch of {b}")
    device = next(base.parameters()).device
    size = size or base.config.sample_size
    sched = make_sampler(base.config, sampler)
    sched.set_timesteps(steps, device=device)

    def full(given: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = base.null_conditions(b, device)
        out.update({k: v.to(device) for k, v in given.items()})
        return out

    # one forward pass over [cond; plus_1; minus_1; ...; uncond]
    sets = [full(cond)] + [full(d) for plus, minus, _ in directions for d in (plus, minus)]
    guiding = guidance_scale != 1.0
    if guiding:
        sets.append(base.null_conditions(b, device))
    c = {k: torch.cat([s_[k] for s_ in sets]) for k in sets[0]}

    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    reps = len(sets)

    def predict(xin: torch.Tensor, t: torch.Tensor, n: int) -> torch.Tensor:
        """Model output for the first n condition sets' rows ([cond; ...; uncond], uncond left out
        where a step is not guided)."""
        if not per_tile:
            with amp:
                return model(xin.repeat(n, 1, 1, 1), t, {k: v[: n * b] for k, v in c.items()}).float()
        outs = []
        for i in range(b):  # every call sees the same shapes whatever the batch: [tile] or [tile; tile]
            with amp:
                outs.append(model(xin[i : i + 1].repeat(n, 1, 1, 1), t, {k: v[i::b][:n] for k, v in c.items()}).float())
        return torch.cat([o[j : j + 1] for j in range(n) for o in outs])

    shape = (base.config.in_channels, size, size)
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device) * sched.init_noise_sigma
    was_training = base.training
    base.eval()
    try:
        on = guided(sched.timesteps, guidance_interval, base.config.num_train_timesteps)
        for t, guide in zip(sched.timesteps, on):
            guide = guide and guiding
            n = reps - (guiding and not guide)  # the unconditional rows are last: left out where unguided
            parts = predict(sched.scale_model_input(x, t), t, n).chunk(n)
            out = parts[0]
            for i, (_, _, w) in enumerate(directions):
                out = out + w * (parts[1 + 2 * i] - parts[2 + 2 * i])
            if guide:
                out = parts[-1] + guidance_scale * (out - parts[-1])
            if sampler == "ddpm":  # stochastic: per-tile step noise from each tile's own generator
                x = torch.cat(
                    [
                        sched.step(out[i : i + 1], t, x[i : i + 1], generator=g).prev_sample
                        for i, g in enumerate(generators)
                    ]
                )
            else:  # DDIM (eta=0) and DPM-Solver++ are deterministic given the initial noise
                x = sched.step(out, t, x).prev_sample
    finally:
        base.train(was_training)
    return x if return_tensor else to_uint8(x)
