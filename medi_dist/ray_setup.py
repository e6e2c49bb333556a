"""Joining or starting Ray, the same way for every entry point (train, generate, tune, demo)."""

from __future__ import annotations

import logging


def ensure_ray(quiet: bool = True) -> None:
    """Inside `ray job submit` RAY_ADDRESS points at the cluster; otherwise a local instance starts
    (with token auth, Ray 2.60's default, and the dashboard on 127.0.0.1)."""
    import ray

    if quiet:  # Ray Data's per-operator progress logs drown the CLI's own output
        ray.data.DataContext.get_current().enable_progress_bars = False
        for name in ("ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if not ray.is_initialized():
        ray.init(log_to_driver=False, logging_level=logging.WARNING)
