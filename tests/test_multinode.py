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
def two_nodes(object_store):
    """The nodes start with the session's object-store endpoint and credentials in their environment,
    as cluster nodes get them from their pod spec or instance profile."""
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


def test_object_storage_pipeline_through_job_submit(two_nodes, object_store, tmp_path):
    """ingest -> train -> generate -> evaluate, each a `ray job submit` with the working dir, every
    dataset, run, model and pool an s3:// URI on the session's S3 server."""
    address, _ = two_nodes
    ds, runs, model, pool = (object_store.uri("multinode", p) for p in ("proc", "runs", "model", "pool"))
    steps = [
        [
            "ingest",
            "--source",
            "procedural",
            "--types",
            "2",
            "--sites",
            "6",
            "--tiles",
            "240",
            "--size",
            "16",
            "--holdout-fraction",
            "0.3",
            "--out",
            ds,
            "--workers",
            "2",
        ],
        [
            "train",
            "--config",
            str(REPO / "jobs/train_small.yaml"),
            f"data.dataset={ds}",
            "steps=6",
            "model.preset=tiny",
            "model.resolution=16",
            "optim.batch_size=8",
            "run.num_workers=2",
            "run.cpus_per_worker=1",
            f"run.storage_path={runs}",
            f"run.output={model}",
            f"run.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
            "run.name=s3-pipeline",
            "run.checkpoint_every=6",
            "run.sample_every=0",
        ],
        [
            "generate",
            "--model",
            model,
            "--out",
            pool,
            "--mode",
            "unseen-pairs",
            "--count",
            "2",
            "--steps",
            "2",
            "--sampler",
            "ddim",
            "--tiles-per-shard",
            "8",
            "--workers",
            "2",
        ],
        [
            "evaluate",
            "fidelity",
            "--real",
            ds,
            "--synthetic",
            pool,
            "--real-splits",
            "train",
            "holdout",
            "--no-conditional",
            "--no-mlflow",
            "--min-per-group",
            "2",
        ],
    ]
    for args in steps:
        r = _submit(address, ["python", "-m", "medi_dist", *args], working_dir=True)
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "succeeded" in out, f"{args[0]}: {out[-4000:]}"
    from medi_dist.data.shards import load_manifest
    from medi_dist.storage import Folder

    assert load_manifest(ds)["tiles"] == 240 and Folder(model).exists("checksums.json")
    assert load_manifest(pool)["generation"]["model"] == model
    assert b'"n_synth"' in Folder(pool).read_bytes("fidelity.json")
