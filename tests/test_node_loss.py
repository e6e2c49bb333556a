"""A whole worker node lost: a two-node local cluster (`ray start --head` plus `ray start --address`,
token auth, its own RAY_TMPDIR) where the worker node's raylet and every process under it are
SIGKILLed mid-training and mid-generation, as when a machine dies. A replacement node then joins
(as an autoscaler or an operator would add one). Training must resume from its last registered
checkpoint and end at the requested step; generation must end with every planned tile exactly once.

The head has 1 CPU and the work asks for 2, so the work can only run on a worker node: the kill
always hits it. The driver is a separate `medi-dist` process joined through RAY_ADDRESS (the test
session's own Ray is never touched)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from local_ray import free_port, processes_under

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")
TOKEN = "medi-dist-node-loss-token-0123456789abcdef"


class LocalCluster:
    """Head (1 CPU) plus worker nodes (2 CPUs each) on loopback, under one temp root."""

    def __init__(self):
        self.tmp = tempfile.mkdtemp(prefix="rnl", dir="/tmp")  # short: Ray's socket paths have a length limit
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAY_TMPDIR"))}
        self.env = {
            **env,
            "RAY_TMPDIR": self.tmp,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": TOKEN,
            # a dead raylet is declared dead after ~3 s instead of ~15-30 s
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        port = free_port()
        self._ray(
            "--head",
            "--port",
            str(port),
            "--num-cpus",
            "1",
            "--include-dashboard",
            "false",
        )
        self.address = (Path(self.tmp) / "ray" / "ray_current_cluster").read_text().strip()
        self.head_pids = {p.pid for p in self.processes()}
        self.nodes: list[list[int]] = []  # per worker node: the pids `ray start` left running

    def _ray(self, *args: str) -> None:
        subprocess.run(
            [
                RAY,
                "start",
                "--node-ip-address",
                "127.0.0.1",
                "--object-store-memory",
                "80000000",
                "--disable-usage-stats",
                *args,
            ],
            env=self.env,
            check=True,
            capture_output=True,
            timeout=180,
        )

    def processes(self) -> list[psutil.Process]:
        return processes_under(self.tmp)

    def add_node(self) -> None:
        before = {p.pid for p in self.processes()}
        self._ray(
            "--address",
            self.address,
            "--num-cpus",
            "2",
            "--dashboard-agent-listen-port",
            str(free_port()),
            "--dashboard-agent-grpc-port",
            str(free_port()),
            "--runtime-env-agent-port",
            str(free_port()),
            "--metrics-export-port",
            str(free_port()),
        )
        # the new node's roots: its raylet and log monitor (workers and agents are the raylet's children)
        self.nodes.append([p.pid for p in self.processes() if p.pid not in before and self._is_root(p)])

    def _is_root(self, p: psutil.Process) -> bool:
        try:
            return not any(a.pid in self.head_pids for a in p.parents())
        except psutil.NoSuchProcess:
            return False

    def node_processes(self, i: int) -> list[psutil.Process]:
        procs = []
        for pid in self.nodes[i]:
            try:
                root = psutil.Process(pid)
                procs += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return procs

    def kill_node(self, i: int) -> list[str]:
        """SIGKILL the node's raylet and everything under it at once (a machine lost, no goodbye)."""
        procs = self.node_processes(i)
        names = []
        for p in procs:
            try:
                names.append(" ".join(p.cmdline())[:120])
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=10)
        return names

    def stop(self, keep_logs: Path | None = None) -> None:
        if keep_logs is not None:  # Ray's logs of this cluster, kept beside the test's files
            shutil.copytree(Path(self.tmp) / "ray" / "session_latest" / "logs", keep_logs, dirs_exist_ok=True)
        procs = {q for p in self.processes() for q in [p, *p.children(recursive=True)] if q.pid != os.getpid()}
        for i in range(len(self.nodes)):
            procs |= set(self.node_processes(i))
        for p in procs:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(procs), timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def cluster(tmp_path):
    c = LocalCluster()
    try:
        c.add_node()
        yield c
    finally:
        c.stop(keep_logs=tmp_path / "ray-logs")


def _driver(cluster: LocalCluster, args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    return subprocess.Popen(
        [sys.executable, "-m", "medi_dist", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for(what: str, ready, driver: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ready():
        if driver.poll() is not None:
            raise AssertionError(f"the driver ended before {what}:\n{driver.stdout.read()[-4000:]}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _finish(driver: subprocess.Popen, timeout: float = 600) -> str:
    try:
        out, _ = driver.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, 9)
        out, _ = driver.communicate()
        raise AssertionError(f"the driver did not finish:\n{out[-4000:]}") from None
    assert driver.returncode == 0, out[-4000:]
    return out


def _registered_steps(run_dir: Path) -> list[int]:
    """Steps of the checkpoints the Train controller registered (a restart resumes from the last)."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    steps = []
    for r in snap.get("checkpoint_results", []):
        path = Path(json.loads(r)["checkpoint_dir_name"] if isinstance(r, str) else r["checkpoint_dir_name"])
        state = run_dir / path / "state.json"
        if state.exists():
            steps.append(json.loads(state.read_text())["step"])
    return sorted(steps)


def test_training_survives_losing_its_node(cluster, proc_dataset, tmp_path):
    from medi_dist.tracking import client

    steps, name = 40, "node-loss"
    run_dir = tmp_path / "runs" / name
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "train",
        f"data.dataset={proc_dataset}",
        "model.preset=tiny",
        "model.resolution=16",
        "optim.batch_size=16",
        f"steps={steps}",
        f"run.name={name}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"run.tracking_uri={db}",
        "run.log_every=5",
        "run.checkpoint_every=10",
        "run.num_workers=1",
        "run.cpus_per_worker=2",  # more than the head has: the worker runs on the worker node
        "run.max_failures=3",
    ]
    driver = _driver(cluster, args, tmp_path)
    t0 = time.time()
    _wait_for("a registered checkpoint", lambda: bool(_registered_steps(run_dir)), driver)
    before = _registered_steps(run_dir)
    killed = cluster.kill_node(0)
    t_kill = time.time() - t0
    assert any("raylet" in k for k in killed), killed
    assert driver.poll() is None and max(before) < steps, "training ended before its node was lost"
    cluster.add_node()  # the replacement node
    out = _finish(driver)
    assert f"step {steps} of {steps}" in out, out[-3000:]
    assert (run_dir / "model" / "model.safetensors").exists()
    c = client(db)
    run = c.search_runs([c.get_experiment_by_name("medi-dist").experiment_id])[0]
    resumed = [m.value for m in c.get_metric_history(run.info.run_id, "resumed_from_step")]
    # resumed once (the node was lost once), from a checkpoint registered when the node died or later
    assert len(resumed) == 1 and resumed[0] >= max(before) and resumed[0] % 10 == 0, (resumed, before)
    loss_steps = sorted({int(m.step) for m in c.get_metric_history(run.info.run_id, "loss")})
    assert loss_steps == list(range(5, steps + 1, 5)), loss_steps
    print(f"node killed {t_kill:.0f} s in (checkpoints {before}); resumed from {resumed}")


def _random_model(dataset: Path, out: Path) -> Path:
    from medi_dist.metadata import ConditioningSpec
    from medi_dist.model import EMA, ConditionedUNet, ModelConfig, save_model_dir

    spec = ConditioningSpec.load(dataset / "vocab.json").subset(["cancer_type", "tissue_source_site"], [])
    net = ConditionedUNet(ModelConfig.from_preset("tiny"), spec)
    save_model_dir(out, net, EMA(net), extra_info={"name": "rand", "dataset": str(dataset)})
    return out


def test_generation_survives_losing_its_node(cluster, proc_dataset, tmp_path):
    from medi_dist.generate.writer import shard_path

    model = _random_model(proc_dataset, tmp_path / "model")
    index = pd.read_parquet(proc_dataset / "index.parquet")
    t, s = index[index["split"] == "train"][["cancer_type", "tissue_source_site"]].value_counts().index[0]
    out, per_shard, n = tmp_path / "gen", 4, 48
    args = [
        "generate",
        "--model",
        str(model),
        "--dataset",
        str(proc_dataset),
        "--out",
        str(out),
        "--row",
        f"cancer_type={t},tissue_source_site={s},count={n}",
        "--sampler",
        "ddim",
        "--steps",
        "20",
        "--batch-size",
        "4",
        "--tiles-per-shard",
        str(per_shard),
        "--workers",
        "1",
        "--cpus-per-worker",
        "2",  # more than the head has: the actor runs on the worker node
    ]
    driver = _driver(cluster, args, tmp_path)
    shards = (out / shard_path(0)).parent

    def written() -> list[Path]:
        return sorted(shards.glob("*.tar")) if shards.exists() else []

    _wait_for("a written shard", lambda: len(written()) >= 1, driver)
    done = len(written())
    killed = cluster.kill_node(0)
    assert any("raylet" in k for k in killed), killed
    assert driver.poll() is None and done < n // per_shard, "generation ended before its node was lost"
    cluster.add_node()
    out_text = _finish(driver)
    assert "stopped early" not in out_text, out_text[-3000:]
    manifest = json.loads((out / "dataset.json").read_text())
    gen = pd.read_parquet(out / "index.parquet")
    plan = json.loads((out / "generation.json").read_text())
    # every planned tile exactly once: the count, the keys (no duplicate) and each tile's plan position
    assert manifest["tiles"] == n and len(gen) == n and gen["key"].is_unique
    assert sorted(gen["plan_index"]) == list(range(n)) and plan["tiles"] == n
    assert len(written()) == n // per_shard == len(manifest["shards"])
    assert not list(shards.glob(".*")), "a killed actor's temporary file was left in the dataset"
    print(f"{done} of {n // per_shard} shards written when the node was lost")
