"""A real two-node Ray cluster on loopback (cluster/local_multinode.sh, token auth), a 2-worker
training run placed on both nodes, and jobs submitted with `ray job submit`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_block(n: int) -> int:
    """A base port with n free consecutive ports."""
    for base in range(40000, 50000, 10):
        try:
            socks = [socket.socket() for _ in range(n)]
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_nodes():
    temp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths have a length limit
    dash = _free_port()
    env = {
        **os.environ,
        "RAY": RAY,
        "GCS_PORT": str(_free_port()),
        "DASHBOARD_PORT": str(dash),
        "HEAD_AGENT_PORT": str(_free_port()),
        "CPUS_PER_NODE": "3",
        "TEMP_DIR": temp,
        "NODE2_PORT_BASE": str(_free_block(4)),
    }
    env.pop("RAY_ADDRESS", None)
    subprocess.run(
        ["bash", str(REPO / "cluster/local_multinode.sh"), "start"],
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )
    yield f"http://127.0.0.1:{dash}", temp
    # Stop only this cluster's processes and their children (`ray stop` would also end the test
    # session's own Ray instance).
    import psutil

    roots = [p for p in psutil.process_iter(["cmdline"]) if temp in " ".join(p.info["cmdline"] or [])]
    procs = {p for r in roots for p in [r, *r.children(recursive=True)] if p.pid != os.getpid()}
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs), timeout=10)
    for p in alive:  # gcs_server ignores SIGTERM
        p.kill()


def _submit(address: str, args: list[str], working_dir: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(RAY).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [RAY, "job", "submit", "--address", address]
    if working_dir:
        cmd += ["--working-dir", str(REPO), "--runtime-env", str(REPO / "jobs/runtime_env.yaml")]
    return subprocess.run(cmd + ["--", *args], env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_job_submit_with_working_dir(two_nodes, proc_dataset):
    address, _ = two_nodes
    r = _submit(address, ["python", "-m", "medi_dist", "data", "stats", str(proc_dataset)], working_dir=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "succeeded" in r.stdout + r.stderr and "tiles 600" in r.stdout
    # A real job's entrypoint sees the working_dir: relative paths would land in Ray's copy of it.
    r = _submit(address, ["python", "-m", "medi_dist", "train", "--config", "jobs/train_small.yaml"], working_dir=True)
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "relative paths land in Ray's temporary copy" in out, out[-3000:]
    assert "data.dataset=data/procedural, run.storage_path=medi-dist-runs" in out


def test_job_without_token_is_refused(two_nodes):
    address, _ = two_nodes
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--", "echo", "hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0


def test_two_worker_training_spans_both_nodes(two_nodes, proc_dataset, tmp_path):
    address, _ = two_nodes
    r = _submit(
        address,
        [
            "python",
            "-m",
            "medi_dist",
            "train",
            "--config",
            str(REPO / "jobs/train_small.yaml"),
            f"data.dataset={proc_dataset}",
            "steps=10",
            "model.preset=tiny",
            "model.resolution=16",
            "optim.batch_size=16",
            "run.num_workers=2",
            "run.cpus_per_worker=2",  # 3 CPUs per node: one worker each
            f"run.storage_path={tmp_path}/runs",
            f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            "run.name=two-nodes",
        ],
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "succeeded" in out, out[-4000:]
    assert "worker nodes: 2" in out and "ranks in sync: True" in out
    assert (tmp_path / "runs/two-nodes/model/model.safetensors").exists()
