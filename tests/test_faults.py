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
