"""Two fixes to Ray Data 2.60's scheduling that the tile stream needs on a few cores (measured in
benchmarks/RESULTS.md, "Data stream"). `tune_ray_data` applies both, once per process; the stream
module calls it on import, so the driver and Ray Train's split coordinator (which imports the stream
to unpickle its datasource) both run with them. Other Ray Data pipelines in those processes get them too."""

from __future__ import annotations

import functools


def tune_ray_data() -> None:
    _start_executions_at_full_width()
    _free_finished_tasks_promptly()


def _start_executions_at_full_width(interval_s: float = 0.1) -> None:
    """Ray Data 2.60 starts every execution (every pass, every epoch) with zero resource limits:
    the cluster autoscaler's first answer (an async actor call) is not back when the resource
    manager first reads it, and the manager re-reads it only after `GLOBAL_LIMITS_UPDATE_INTERVAL_S`
    = 1 s. Until then it admits one read task at a time (timeline of the 3,000-tile benchmark: one
    task for the first ~1 s of each 2 s pass, on 2 CPUs). Each resource manager re-reads its limits
    every `interval_s` only until they are first non-zero, then every 1 s as Ray does (a fast
    refresh for the whole execution asks the autoscaling coordinator actor 10x as often, ~1.5
    CPU-s in one 8.5 s pass on the shared 2-core machine)."""
    try:
        from ray.data._internal.execution.resource_manager import ResourceManager
    except ImportError:  # a Ray without this class: nothing to do
        return
    original = ResourceManager.get_global_limits
    if getattr(original, "_medi_dist_fast_until_known", False) or not hasattr(
        ResourceManager, "GLOBAL_LIMITS_UPDATE_INTERVAL_S"
    ):
        return

    @functools.wraps(original)
    def get_global_limits(self):
        if self.__dict__.get("_medi_dist_limits_known"):
            return original(self)
        # An instance attribute shadows the class's interval while the limits are still unknown.
        self.GLOBAL_LIMITS_UPDATE_INTERVAL_S = min(interval_s, type(self).GLOBAL_LIMITS_UPDATE_INTERVAL_S)
        limits = original(self)
        if limits.cpu > 0 or limits.object_store_memory > 0:
            self._medi_dist_limits_known = True
            del self.GLOBAL_LIMITS_UPDATE_INTERVAL_S  # back to Ray's interval for the rest of the execution
        return limits

    get_global_limits._medi_dist_fast_until_known = True
    ResourceManager.get_global_limits = get_global_limits


def _free_finished_tasks_promptly() -> None:
    """Ray Data 2.60's scheduling loop hands a finished read task's CPU to the next task late: by
    default it fetches a finished block's metadata on a background thread, so the task counts as
    done (its CPU free) only at the loop step after the one that saw it finish, and each step
    waits (`ray.wait`) for *all* running tasks or 0.1 s. With two tasks of ~0.2 s on two CPUs the
    workers sat idle 0.02-0.3 s between tasks (1.3 of 2 cores busy at 12,000 tiles). We fetch the
    metadata inline (one small local object per read task: the stream's tasks make one block
    each), so a task's CPU is free in the step that sees it finish. Quiet 2-core machine, 12,000
    tiles (benchmarks/RESULTS.md): ~1,250 -> ~1,600 tiles/s, 1.3 -> 1.55 cores busy, no more CPU
    in the driver. Also shortening the step's wait to 0.02 s gave ~1,850 tiles/s but costs the
    loop ~0.05 core (50 steps/s), also in Ray Train's split coordinator during training; not kept."""
    try:
        from ray.data._internal.execution import metadata_fetcher
    except ImportError:  # a Ray without this module: nothing to do
        return
    if hasattr(metadata_fetcher, "_PREFETCH_ON_THREAD"):
        metadata_fetcher._PREFETCH_ON_THREAD = False
