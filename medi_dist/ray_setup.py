"""Joining or starting Ray, the same way for every entry point (train, generate, tune, demo)."""

from __future__ import annotations

import logging


def ensure_ray(quiet: bool = True) -> bool:
    """Inside `ray job submit` RAY_ADDRESS points at the cluster; otherwise a local instance starts
    (with token auth, Ray 2.60's default, and the dashboard on 127.0.0.1). True when local."""
    import ray

    if quiet:  # Ray Data's per-operator progress logs drown the CLI's own output
        ray.data.DataContext.get_current().enable_progress_bars = False
        for name in ("ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if not ray.is_initialized():
        ray.init(log_to_driver=False, logging_level=logging.WARNING)
    return len(ray.nodes()) == 1


def check_cpus(need: float, what: str, advice: str) -> None:
    """Ray Train workers that take every CPU starve Ray Data's decode tasks and the job hangs
    silently; on a fixed-size cluster say so up front."""
    import ray

    have = ray.cluster_resources().get("CPU", 0.0)
    if need > have:
        raise ValueError(f"{what} needs {need:g} CPUs but the Ray cluster has {have:g}; {advice}")
