"""Fault injection: a Train worker killed mid-run, and a driver killed and re-submitted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from medi_dist.config_loader import load_config
from medi_dist.tracking import client
from medi_dist.train.config import TrainConfig
from medi_dist.train.trainer import train

REPO = Path(__file__).resolve().parents[1]


def _checkpoint_steps(run_dir: Path) -> list[int]:
    import json

    return sorted(json.loads(p.read_text())["step"] for p in run_dir.glob("checkpoint_*/state.json"))


def _args(dataset, tmp_path, name, steps):
    return [
        f"data.dataset={dataset}",
        "model.preset=tiny",
        "model.resolution=16",
        "optim.batch_size=16",
        f"steps={steps}",
        f"run.name={name}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"run.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "run.log_every=5",
        "run.checkpoint_every=10",
    ]


def _registered_checkpoints(run_dir: Path) -> int:
    """Checkpoints the Train controller has registered (reports reach it asynchronously, so a file
    on disk alone does not mean a restart would find it)."""
    import json

    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return len(json.loads(snap.read_text()).get("checkpoint_results", []))
    except (OSError, ValueError):
        return 0


def _history(uri, run_id, key):
    return [m.value for m in client(uri).get_metric_history(run_id, key)]


def test_killed_train_worker_resumes_from_checkpoint(ray_cluster, proc_dataset, tmp_path):
    cfg = load_config(
        TrainConfig,
        None,
        _args(proc_dataset, tmp_path, "kill-worker", 40) + ["run.num_workers=2", "run.max_failures=2"],
    )
    killed = []

    def killer():
        # Workers of *this* test's Ray cluster are descendants of this process.
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            if _registered_checkpoints(tmp_path / "runs" / "kill-worker"):
                me = psutil.Process(os.getpid())
                for p in me.children(recursive=True):
                    try:
                        if "RayTrainWorker" in " ".join(p.cmdline()):
                            p.send_signal(signal.SIGKILL)
                            killed.append(p.pid)
                            break
                    except psutil.NoSuchProcess:
                        continue
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = train(cfg)
    t.join(timeout=5)
    assert killed, "no Train worker was found to kill"
    assert res.metrics["step"] == 40 and res.metrics["final"] and res.model_dir is not None
    assert res.metrics["ranks_in_sync"] == 1.0
    # exactly the requested steps' data, counted once: samples = steps x batch x workers
    assert res.metrics["samples_seen"] == 40 * 16 * 2
    resumed = _history(cfg.run.tracking_uri, res.mlflow_run_id, "resumed_from_step")
    assert resumed and all(s >= 10 and s % 10 == 0 for s in resumed), resumed


def test_killed_driver_resubmitted_resumes(proc_dataset, tmp_path):
    cmd = [sys.executable, "-m", "medi_dist", "train", *_args(proc_dataset, tmp_path, "kill-driver", 60)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.time() + 600
    while time.time() < deadline and not _registered_checkpoints(tmp_path / "runs" / "kill-driver"):
        assert first.poll() is None, "training ended before it could be killed"
        time.sleep(0.3)
    os.killpg(first.pid, signal.SIGKILL)  # the driver and the local Ray it started
    first.wait()
    done = _checkpoint_steps(tmp_path / "runs" / "kill-driver")
    assert done and max(done) < 60
    second = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "step 60 of 60" in second.stdout
    c = client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = c.search_runs([c.get_experiment_by_name("medi-dist").experiment_id])[0]
    resumed = _history(f"sqlite:///{tmp_path / 'mlflow.db'}", run.info.run_id, "resumed_from_step")
    assert resumed and min(resumed) >= min(done)


def test_second_driver_on_a_run_is_refused_naming_the_holder(proc_dataset, tmp_path, capsys):
    """A live driver (another process) holds the run's lease: a second `train` on the run name is
    refused with its host, pid and start, before Ray starts or the unregistered-checkpoint cleanup
    runs; once the holder is dead (this host) or silent past the ttl (any host) the lease is taken."""
    import json
    import socket

    import pytest

    from medi_dist import cli
    from medi_dist.train.lease import LEASE_FILE, RunLease, RunLeaseHeld
    from medi_dist.train.run_folder import SNAPSHOT, RunFolder

    runs, run_dir = tmp_path / "runs", tmp_path / "runs" / "twice"
    (run_dir / "checkpoint_000099").mkdir(parents=True)  # unlisted: the holder may still register it
    (run_dir / SNAPSHOT).write_text(json.dumps({"checkpoint_results": []}))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from medi_dist.train.lease import RunLease; "
            "from medi_dist.train.run_folder import RunFolder; RunLease(RunFolder(sys.argv[1], 'twice')).acquire(); "
            "print('held', flush=True); time.sleep(600)",
            str(runs),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        since = json.loads((run_dir / LEASE_FILE).read_text())["since"]
        rc = cli.main(["train", *_args(proc_dataset, tmp_path, "twice", 20)])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert f"is held by another driver (host {socket.gethostname()}, pid {holder.pid}, since {since}" in err
        assert (run_dir / "checkpoint_000099").is_dir()  # the cleanup did not run
    finally:
        holder.kill()
        holder.wait()
    folder = RunFolder(str(runs), "twice")
    with RunLease(folder, settle_s=0.1):  # the holder died on this host: no need to wait for the ttl
        assert json.loads((run_dir / LEASE_FILE).read_text())["pid"] == os.getpid()
    assert not (run_dir / LEASE_FILE).exists()

    # another host's lease: binding while it beats, taken over once silent past its ttl
    other = {"owner": "x", "host": "elsewhere", "pid": 1, "since": "2026-01-01T00:00:00+00:00", "ttl_s": 120}
    folder.write_json(LEASE_FILE, {**other, "heartbeat": time.time() - 5})
    with pytest.raises(RunLeaseHeld, match=r"host elsewhere, pid 1, since 2026-01-01T00:00:00\+00:00, heartbeat 5 s"):
        RunLease(folder, settle_s=0.1).acquire()
    folder.write_json(LEASE_FILE, {**other, "heartbeat": time.time() - 200})
    lease = RunLease(folder, ttl_s=0.4, settle_s=0.1).acquire()
    first = json.loads((run_dir / LEASE_FILE).read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads((run_dir / LEASE_FILE).read_text())["heartbeat"] > first  # renewed by its thread
    lease.release()

    # two drivers starting together: exactly one goes on
    won, refused = [], []

    def start():
        try:
            won.append(RunLease(folder, settle_s=0.5).acquire())
        except RunLeaseHeld as e:
            refused.append(e)

    threads = [threading.Thread(target=start) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(won), len(refused)) == (1, 1)
    won[0].release()
