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

from local_ray import free_port, processes_under

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


@pytest.fixture(scope="module")
def two_nodes(object_store):
    """The nodes start with the session's object-store endpoint and credentials in their environment,
    as cluster nodes get them from their pod spec or instance profile."""
    temp = tempfile.mkdtemp(prefix="rmn", dir="/tmp")  # short: Ray's socket paths have a length limit
    dash = free_port()
    env = {
        **os.environ,
        "RAY": RAY,
        "GCS_PORT": str(free_port()),
        "DASHBOARD_PORT": str(dash),
        "HEAD_AGENT_PORT": str(free_port()),
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
    (Path(temp) / "gcs_port").write_text(env["GCS_PORT"])
    yield f"http://127.0.0.1:{dash}", temp
    # `stop` ends the processes of this cluster's temp root only (`ray stop` would also end the
    # test session's own Ray instance).
    r = subprocess.run(
        ["bash", str(REPO / "cluster/local_multinode.sh"), "stop"], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "stopped" in r.stdout, r.stdout + r.stderr
    left = processes_under(temp)
    assert not left, left


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


def _readme_cluster_commands() -> list[list[str]]:
    """The commands of the README's "Run on a cluster" block, one argv each."""
    import shlex

    block = (REPO / "README.md").read_text().split("## Run on a cluster", 1)[1].split("```bash\n", 1)[1]
    block = block.split("```", 1)[0].replace("\\\n", " ")
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_status_of_the_two_nodes(two_nodes):
    """`cluster/local_multinode.sh status` (`start` and `stop` run in the fixture)."""
    address, temp = two_nodes
    env = {**os.environ, "RAY": RAY, "GCS_PORT": (Path(temp) / "gcs_port").read_text().strip()}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run(
        ["bash", str(REPO / "cluster/local_multinode.sh"), "status"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.count("node_") == 2, r.stdout  # two active nodes


def test_readme_cluster_commands_on_two_nodes_and_s3(two_nodes, object_store, tmp_path):
    """The README's cluster commands as written, against the two-node cluster and the session's S3
    server, each job with `--working-dir . --runtime-env jobs/runtime_env.yaml`: the placeholders
    filled in (BUCKET, the MLflow server, /mnt/shared, the dashboard address) and, after each
    command, overrides that shrink it to 2 CPU cores (tiny model, a few steps, no GPU). Before
    them, `medi-dist ingest` writes the dataset they name; after generate, `evaluate fidelity`
    reads the dataset and the pool from the bucket."""
    address, _ = two_nodes
    bucket = f"s3://{object_store.bucket}/"
    subs = {
        "http://127.0.0.1:8265": address,
        "s3://BUCKET/": bucket,
        "/mnt/shared": str(tmp_path / "shared"),
        "http://mlflow:5000": f"sqlite:///{tmp_path}/mlflow.db",
    }

    def fill(arg: str) -> str:
        for a, b in subs.items():
            arg = arg.replace(a, b)
        return arg

    cmds = [[fill(a) for a in c] for c in _readme_cluster_commands()]
    assert [c[:2] for c in cmds] == [
        ["ray", "get-auth-token"],
        ["export", "RAY_AUTH_MODE=token"],
        ["medi-dist", "check-ray"],
        ["ray", "job"],
        ["ray", "job"],
        ["ray", "job"],
    ], cmds
    train, gen, tune = (c[c.index("--") + 1 :] for c in cmds[3:])
    assert train[:2] == ["medi-dist", "train"] and gen[:2] == ["medi-dist", "generate"] and tune[1] == "tune"
    ds, model = bucket + "medi-dist/datasets/tcga-ut", bucket + "medi-dist/models/medi-deep-tcga"
    pool = next(a for a in gen if a.startswith(bucket + "medi-dist/datasets/"))
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO)}
    env["PATH"] = f"{Path(RAY).parent}:{env['PATH']}"
    env.pop("RAY_ADDRESS", None)

    def run(argv: list[str], timeout: int = 900) -> str:
        r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"{argv[:6]}: {out[-4000:]}"
        return out

    run([RAY, *cmds[0][1:]])
    assert "accepts this client's token" in run([sys.executable, "-m", "medi_dist", *cmds[2][1:]], timeout=300)
    submit = cmds[3][: cmds[3].index("--")]
    assert submit[:3] == ["ray", "job", "submit"] and "--working-dir" in submit and "--runtime-env" in submit
    submit = [RAY, *submit[1:], "--"]
    ingest = ["medi-dist", "ingest", "--source", "procedural", "--types", "3", "--sites", "12", "--tiles", "420"]
    ingest += ["--size", "16", "--val-fraction", "0.2", "--out", ds, "--workers", "2"]
    jobs = [
        ingest,
        train
        + [
            f"data.dataset={ds}",  # jobs/train_cluster.yaml's BUCKET placeholders, filled in
            f"run.storage_path={bucket}medi-dist/runs",
            f"run.output={model}",
            "steps=6",
            "model.preset=tiny",
            "model.resolution=16",
            "optim.batch_size=8",
            "optim.fused=false",
            "data.cpus_per_decode=0.5",
            "run.num_workers=2",
            "run.use_gpu=false",
            "run.cpus_per_worker=2",  # 3 CPUs per node: one worker each
            "run.mixed_precision=no",
            "run.channels_last=false",
            "run.compile=false",
            "run.checkpoint_every=6",
            "run.sample_every=0",
        ],
        gen
        + ["--count", "2", "--steps", "2", "--sampler", "ddim", "--tiles-per-shard", "8"]
        + ["--workers", "2", "--gpus-per-worker", "0"],
        ["medi-dist", "evaluate", "fidelity", "--real", ds, "--synthetic", pool, "--real-splits", "train", "holdout"]
        + ["--no-conditional", "--no-mlflow", "--min-per-group", "2"],
        tune
        + ["num_samples=1", "seeds=[0]", "space.ratio=[1.0]", "space.allocation=[uniform]", "space.C=[1.0]"]
        + ["max_per_class=30", "max_concurrent_trials=1", "final_eval=false"],
    ]
    outs = {}
    for job in jobs:
        outs[job[1]] = out = run(submit + job)
        assert "succeeded" in out, f"{job[:2]}: {out[-4000:]}"
    train_line = [line for line in outs["train"].splitlines() if "worker nodes:" in line]
    assert train_line and "worker nodes: 2" in train_line[0] and "ranks in sync: True" in train_line[0], train_line
    from medi_dist.data.shards import load_manifest
    from medi_dist.storage import Folder

    assert load_manifest(ds)["tiles"] == 420 and Folder(model).exists("checksums.json")
    assert load_manifest(pool)["generation"]["model"] == model
    assert b'"n_synth"' in Folder(pool).read_bytes("fidelity.json")
