"""Joining or starting Ray, the same way for every entry point (train, generate, tune, demo)."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0
# Ray's connect attempts to a GCS that answers (~1 s apart; Ray's default 20): enough for a busy head,
# while a refused token or a version mismatch still ends in seconds.
CONNECT_TRIES = "3"
# An HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS) answers with SETTINGS.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
TOKEN_PLACES = "RAY_AUTH_TOKEN, a file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"


class RayJoinError(ConnectionError):
    """The cluster to join is dead, unreachable or refuses this client: one line naming the address,
    where it came from and the fix."""


def ensure_ray(quiet: bool = True) -> bool:
    """Inside `ray job submit` RAY_ADDRESS points at the cluster; otherwise a local instance starts
    (with token auth, Ray 2.60's default, and the dashboard on 127.0.0.1). True when local."""
    import ray

    if quiet:  # Ray Data's per-operator progress logs drown the CLI's own output
        ray.data.DataContext.get_current().enable_progress_bars = False
        for name in ("ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if not ray.is_initialized():
        _join(ray)
    return len(ray.nodes()) == 1


def ray_address() -> tuple[str | None, str]:
    """The address ray.init() would join, and where it comes from, resolved as Ray does: RAY_ADDRESS,
    else the cluster `ray start` recorded in <temp dir>/ray_current_cluster (kept when its head dies
    without `ray stop`). None: a new local instance."""
    env = os.environ.get("RAY_ADDRESS", "")
    if env == "local":
        return None, "RAY_ADDRESS=local"
    if env and env != "auto":
        return env, (
            "RAY_ADDRESS, set by `ray job submit` for this job" if os.environ.get(JOB_CONFIG_ENV) else "RAY_ADDRESS"
        )
    from ray._common.utils import get_ray_address_file

    record = get_ray_address_file(None)
    try:
        recorded = Path(record).read_text().strip()
    except OSError:
        recorded = ""
    if recorded:
        return recorded, f"the local cluster recorded in {record} by `ray start`"
    return None, "no RAY_ADDRESS and no recorded local cluster"


def _join(ray) -> None:
    address, where = ray_address()
    if address is None:
        ray.init(log_to_driver=False, logging_level=logging.WARNING)
        return

    def fail(why: str, fix: str) -> RayJoinError:
        return RayJoinError(f"cannot join Ray at {address} ({where}): {why}; {fix}")

    if urlparse(address).scheme in ("http", "https"):
        raise fail(
            "that is a dashboard/job API address (for `ray job submit --address`), not a cluster to join",
            "unset RAY_ADDRESS (or set RAY_ADDRESS=local) to run here, or submit the command with "
            f"`ray job submit --address {address} -- medi-dist ...`",
        )
    why = _probe(address)
    if why:
        raise fail(why, _fix_unreachable(where))
    try:
        with _env_default("RAY_gcs_server_port_wait_time_s", CONNECT_TRIES), _held_stderr():
            ray.init(log_to_driver=False, logging_level=logging.WARNING)
    except Exception as e:
        raise fail(*_explain(e)) from e


def check_ray(job_api: str | None = None) -> str:
    """`medi-dist check-ray`: the cluster the commands would join (joined to check), or with
    job_api what `ray job submit --address URL` meets; a RayJoinError line when it would fail."""
    if job_api:
        return check_job_api(job_api)
    address, where = ray_address()
    if address is None:
        return f"{where}: medi-dist commands start a local Ray instance"
    import ray

    ensure_ray()
    res = ray.cluster_resources()
    return (
        f"joined Ray at {address} ({where}): {len(ray.nodes())} node(s), {res.get('CPU', 0):g} CPU, "
        f"{res.get('GPU', 0):g} GPU"
    )


def check_job_api(url: str) -> str:
    """GET URL/api/version with the token `ray job submit` would send: Ray's CLI answers a dead head or a
    wrong port with a traceback after ~10 s; this says which in one line."""
    import urllib.error
    import urllib.request

    from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

    def fail(why: str, fix: str) -> RayJoinError:
        return RayJoinError(f"`ray job submit --address {url}` would fail: {why}; {fix}")

    port_fix = "--address is the head's dashboard, http://HOST:8265 by default (not the GCS port 6379)"
    if urlparse(url).scheme not in ("http", "https"):
        raise fail("the job API address is an http:// URL", port_fix)
    req = urllib.request.Request(url.rstrip("/") + "/api/version", headers=get_auth_headers_if_auth_enabled({}))
    try:
        with urllib.request.urlopen(req, timeout=PROBE_TIMEOUT_S) as r:
            version = json.loads(r.read()).get("ray_version")
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            raise fail(*_token_problem()) from None
        raise fail(f"HTTP {e.code} for /api/version: that is not Ray's dashboard", port_fix) from None
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        why = (
            "nothing listens there (connection refused)"
            if isinstance(reason, ConnectionRefusedError)
            else f"no answer from Ray's dashboard ({reason})"
        )
        raise fail(
            why, "start the head, or the tunnel (`ray dashboard CLUSTER.yaml`, `kubectl port-forward`); " + port_fix
        ) from None
    return f"Ray {version} job API at {url} answers and accepts this client's token"


def _probe(address: str) -> str | None:
    """Why nothing usable answers at host:port, or None. Ray's own client retries a dead address for
    about 14 minutes; a socket connect and a gRPC (HTTP/2) greeting take a few seconds at most."""
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return "not a host:port address"
    try:
        s = socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S)
    except ConnectionRefusedError:
        return "nothing listens there (connection refused)"
    except TimeoutError:
        return f"no answer within {PROBE_TIMEOUT_S:g} s (host down, or a firewall drops the port)"
    except OSError as e:
        return f"cannot connect ({e.strerror or e})"
    with s:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return None  # a TLS handshake comes first; Ray reports its own errors there
        try:
            s.sendall(H2_PREFACE)
            head = s.recv(9)
        except OSError:
            head = b""
    if len(head) < 4 or head[3] != 4:
        return "something listens there but it does not answer as a Ray cluster (no gRPC)"
    return None


def _fix_unreachable(where: str) -> str:
    if where.startswith("the local cluster"):
        from ray._common.utils import get_ray_address_file

        record = get_ray_address_file(None)
        return (
            f"its head stopped without `ray stop`: run `ray stop` (or delete {record}) and medi-dist starts "
            "a local Ray instance of its own, or set RAY_ADDRESS=local to start one now"
        )
    if "ray job submit" in where:
        return "the job's cluster is not reachable from this node: check the head with `ray status` and resubmit"
    return (
        "start that cluster or correct RAY_ADDRESS (the head's GCS address, host:6379 by default, not the "
        "dashboard's :8265); "
        "unset it or set RAY_ADDRESS=local to start a local Ray instance instead"
    )


def _explain(e: BaseException) -> tuple[str, str]:
    """(why, fix) for a failed ray.init on a cluster that answered."""
    chain = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = "\n".join(str(x) for x in chain)
    if "InvalidAuthToken" in text or "no authentication token was found" in text:
        return _token_problem()
    versions = re.findall(r"Ray: (\S+)\s+Python: (\S+)", text)
    if "Version mismatch" in text and len(versions) >= 2:
        (ray_c, py_c), (ray_me, py_me) = versions[:2]
        return (
            f"version mismatch: the cluster runs Ray {ray_c} on Python {py_c}, this environment Ray {ray_me} "
            f"on Python {py_me}",
            f"install the cluster's versions here (pip install ray=={ray_c}, Python "
            f"{py_c}) or run the command on the cluster with `ray job submit`",
        )
    last = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (
        f"Ray says: {last[-1][:300] if last else type(chain[0]).__name__}",
        "check the cluster with `ray status`, or unset RAY_ADDRESS (or set RAY_ADDRESS=local) to run locally",
    )


def _token_problem() -> tuple[str, str]:
    from ray._raylet import AuthenticationMode, get_authentication_mode

    fix = f"give this client the cluster's token (`ray get-auth-token` on the head) in {TOKEN_PLACES}"
    if get_authentication_mode() != AuthenticationMode.TOKEN:
        return (
            "the cluster requires token authentication and this client sent no token (RAY_AUTH_MODE is not "
            "token; Ray sends one to an explicit address only with RAY_AUTH_MODE=token)",
            f"export RAY_AUTH_MODE=token and {fix}",
        )
    if os.environ.get("RAY_AUTH_TOKEN"):
        found = "the token in RAY_AUTH_TOKEN"
    elif os.environ.get("RAY_AUTH_TOKEN_PATH"):
        found = f"the token in {os.environ['RAY_AUTH_TOKEN_PATH']} (RAY_AUTH_TOKEN_PATH)"
    elif (Path.home() / ".ray" / "auth_token").exists():
        found = f"the token in {Path.home() / '.ray' / 'auth_token'}"
    else:
        return "token authentication is on but this client has no token", fix
    return f"the cluster refused {found}: it is not the cluster's token", fix


@contextmanager
def _env_default(name: str, value: str):
    """Set an environment variable for the block unless the user set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


@contextmanager
def _held_stderr():
    """Ray's C++ client writes a warning per failed attempt straight to file descriptor 2: hold that
    output back so a refusal reads as one line; pass it on when the join works."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if ok:
                held.seek(0)
                os.write(2, held.read())


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
SHARED_EXAMPLES = "/mnt/shared/... or s3://BUCKET/...; for MLflow http://mlflow:5000 or sqlite:////mnt/shared/mlflow.db"


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
        raise JobPathError(
            f"running under `ray job submit --working-dir`, relative paths land in Ray's temporary "
            f"copy of the working dir and are lost on a Ray restart or code change: {', '.join(bad)}; "
            f"pass absolute paths or URIs on shared storage (e.g. {SHARED_EXAMPLES})"
        )
