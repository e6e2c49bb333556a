"""The downstream protocol's fits as Ray tasks: Ray wiring kept out of downstream.py, which runs them
one after the other in-process."""

from __future__ import annotations

from .downstream import DownstreamConfig, DownstreamResult, SeedRun, run_seed
from .tile_reader import Inputs


def _seed_task(cfg: DownstreamConfig, inputs: Inputs, seed: int, stains) -> SeedRun:
    import torch

    torch.set_num_threads(1)  # a fit's predictions depend on its thread count: pinned, not the host's
    return run_seed(cfg, inputs, seed, stains)


def run_parallel(cfgs: dict[str, DownstreamConfig], inputs: Inputs) -> dict[str, DownstreamResult]:
    """Every (arm, seed) fit as a Ray task of one CPU and one torch thread, as many at once as the
    cluster has CPUs (a small CNN on 2 threads leaves much of the second core idle). Each fit is the
    same whichever worker runs it, and not the same as a fit on more threads."""
    import ray

    from ..ray_setup import ensure_ray

    ensure_ray()
    stains = None
    if any(c.augment == "restain-sites" for c in cfgs.values()):  # estimated once, not once per worker
        from ..data.stain_estimation import estimate_site_stains

        stains = estimate_site_stains(next(iter(cfgs.values())).real, inputs.train.X.shape[1])
    task, shared = ray.remote(num_cpus=1)(_seed_task), ray.put(inputs)
    pending = {label: [task.remote(c, shared, seed, stains) for seed in c.seeds] for label, c in cfgs.items()}
    return {label: DownstreamResult(cfgs[label], ray.get(refs)) for label, refs in pending.items()}
