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


def check_resource(kind: str, need: float, what: str, advice: str) -> None:
    """On a fixed-size cluster, say up front what cannot run: Ray Train workers that take every CPU
    starve Ray Data's decode tasks, and tasks asking for GPUs the cluster lacks wait forever.
    (Skipped on autoscaling clusters, which add GPU nodes on demand.)"""
    import ray

    have = ray.cluster_resources().get(kind, 0.0)
    if need > have:
        raise ValueError(f"{what} needs {need:g} {kind}(s) but the Ray cluster has {have:g}; {advice}")
