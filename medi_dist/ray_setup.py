"""Joining or starting Ray, the same way for every entry point (train, generate, tune, demo)."""

from __future__ import annotations

import json
import logging
import os
from urllib.parse import urlparse


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


# Set by `ray job submit`'s job supervisor for the entrypoint: {"runtime_env": {...}, "metadata": {...}}.
# Same name as ray._private.runtime_env.constants.RAY_JOB_CONFIG_JSON_ENV_VAR (a test checks), copied so
# the check needs no Ray import.
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
SHARED_EXAMPLES = ("/mnt/shared/... or s3://BUCKET/...; for MLflow http://mlflow:5000 or "
                   "sqlite:////mnt/shared/mlflow.db")


class JobPathError(ValueError):
    pass


def job_working_dir() -> str | None:
    """The runtime env's working_dir (gcs://_ray_pkg_<hash>.zip) when this process is the entrypoint of
    `ray job submit --working-dir`, else None. Its current directory is then Ray's unpacked copy
    (.../runtime_resources/working_dir_files/_ray_pkg_<hash>/): a new folder whenever the code changes,
    gone with the Ray session."""
    raw = os.environ.get(JOB_CONFIG_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return None
    return str(runtime_env["working_dir"]) if runtime_env.get("working_dir") else None


def _relative_path(path: str | None) -> bool:
    return bool(path) and "://" not in str(path) and not os.path.isabs(os.path.expanduser(str(path)))


def _relative_store(uri: str) -> bool:
    """An MLflow store URI that names a file relative to the current directory."""
    if uri.startswith("sqlite:///"):
        return not uri.startswith("sqlite:////")
    if uri.startswith("file:"):
        return not os.path.isabs(urlparse(uri).path)
    return _relative_path(uri) and not uri.startswith("databricks")


def check_job_paths(paths: dict[str, str | None], stores: dict[str, str | None] | None = None) -> None:
    """Inside `ray job submit --working-dir`, refuse relative paths: they would resolve inside Ray's
    temporary copy of the working dir, so checkpoints, outputs and MLflow runs vanish with it (and a
    re-submitted job would not find them to resume). `paths`: label -> path or URI; `stores`: label ->
    MLflow tracking URI (None: $MLFLOW_TRACKING_URI, else ./mlflow.db)."""
    if job_working_dir() is None:
        return
    bad = [f"{k}={v}" for k, v in paths.items() if _relative_path(v)]
    for label, uri in (stores or {}).items():
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            bad.append(f"{label} (default ./mlflow.db)")
        elif _relative_store(uri):
            bad.append(f"{label}={uri}")
    if bad:
        raise JobPathError(f"running under `ray job submit --working-dir`, relative paths land in Ray's temporary "
                           f"copy of the working dir and are lost on a Ray restart or code change: {', '.join(bad)}; "
                           f"pass absolute paths or URIs on shared storage (e.g. {SHARED_EXAMPLES})")
