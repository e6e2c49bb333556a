"""A real `mlflow server` (sqlite backend, served artifacts) on 127.0.0.1: a small study logs to it
through MLFLOW_TRACKING_URI, and its runs, metrics, parent/child tags and artifacts are read back
through the server's REST API only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from medi_dist.tune.config import SearchSpace, StudyConfig
from medi_dist.tune.study import run_study
from synthetic_pools import ingest_procedural, make_pool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port, art = free_port(), tmp_path / "server-artifacts"
    exe = Path(sys.executable).parent / "mlflow"
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [
            str(exe),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--serve-artifacts",
            "--artifacts-destination",
            str(art),
        ],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # own group: we stop all of it
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or too slow to answer under load
                pass
            assert time.time() < deadline, "mlflow server did not come up"
            time.sleep(0.5)
        yield url, art
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_study_logs_to_mlflow_server(ray_cluster, mlflow_server, tmp_path, monkeypatch):
    url, art = mlflow_server
    real = ingest_procedural(tmp_path / "real", n_types=3, n_sites=12, n_tiles=300, val=0.2)
    pool = make_pool(real, tmp_path / "pool", per_pair=4)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    cfg = StudyConfig(
        name="server-study",
        real=str(real),
        space=SearchSpace(ratio=[0.5, 1.0], pools=[str(pool)]),
        num_samples=2,
        seeds=[0, 1],
        k_sites=4,
        cpus_per_trial=1,
        max_concurrent_trials=2,
        storage_path=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache"),
        experiment="server-exp",
    )
    res = run_study(cfg)
    assert not (tmp_path / "mlflow.db").exists()  # everything went to the server

    api = f"{url}/api/2.0/mlflow"
    exp = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "server-exp"}, timeout=10)
    exp_id = exp.json()["experiment"]["experiment_id"]
    runs = requests.post(f"{api}/runs/search", json={"experiment_ids": [exp_id], "max_results": 100}, timeout=10)
    runs = runs.json()["runs"]
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs}
    metrics = {r["info"]["run_id"]: {m["key"]: m["value"] for m in r["data"].get("metrics", [])} for r in runs}
    parent = [rid for rid, t in tags.items() if t.get("medi_dist.kind") == "tune-study"]
    assert parent == [res.parent_run_id]
    children = [rid for rid, t in tags.items() if t.get("mlflow.parentRunId") == res.parent_run_id]
    assert sorted(tags[c]["medi_dist.kind"] for c in children) == ["tune-baseline", "tune-trial", "tune-trial"]
    assert [c for c in children if tags[c].get("medi_dist.best") == "true"] == [res.best["mlflow_run_id"]]
    assert {"test_site_balanced_accuracy", "test_mcc", "best_val_objective"} <= set(metrics[res.parent_run_id])

    best = res.best["mlflow_run_id"]
    assert 0 <= metrics[best]["val_site_balanced_accuracy"] <= 1
    hist = requests.get(f"{api}/metrics/get-history", params={"run_id": best, "metric_key": "val_mcc"}, timeout=10)
    assert sorted(m["step"] for m in hist.json()["metrics"]) == [0, 1]  # one point per seed

    listed = requests.get(f"{api}/artifacts/list", params={"run_id": best}, timeout=10).json()
    files = {f["path"] for f in listed.get("files", [])}
    assert {"subgroups_val.csv", "site_accuracy_val.png", "confusion_val.png", "pool_samples.png"} <= files
    parent_files = {
        f["path"]
        for f in requests.get(f"{api}/artifacts/list", params={"run_id": res.parent_run_id}, timeout=10).json()["files"]
    }
    assert {"trials.csv", "test_table.txt", "subgroups_test.csv", "site_accuracy_test.png"} <= parent_files
    # download through the artifact proxy; the bytes live under the server's --artifacts-destination
    csv = requests.get(
        f"{url}/api/2.0/mlflow-artifacts/artifacts/{exp_id}/{best}/artifacts/subgroups_val.csv", timeout=10
    )
    assert csv.status_code == 200 and csv.text.startswith("cancer_type,tissue_source_site,n,accuracy")
    assert (art / exp_id / best / "artifacts" / "subgroups_val.csv").is_file()
