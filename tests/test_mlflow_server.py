"""A real `mlflow server` (sqlite backend, served artifacts) on 127.0.0.1: a small study logs to it
through MLFLOW_TRACKING_URI, and its runs, metrics, parent/child tags and artifacts are read back
through the server's REST API only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
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


def start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port over tmp_path/server.db; returns once /health answers."""
    exe = Path(sys.executable).parent / "mlflow"
    log = open(tmp_path / "server.log", "a")
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
            str(tmp_path / "server-artifacts"),
        ],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # own group: we stop all of it
    deadline = time.time() + 400  # a restart on a loaded 2-core machine can take minutes
    while True:
        if proc.poll() is not None:
            raise AssertionError((tmp_path / "server.log").read_text()[-3000:])
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except requests.RequestException:  # not listening yet, or too slow to answer under load
            pass
        if time.time() > deadline:
            stop_server(proc)
            raise AssertionError("mlflow server did not come up")
        time.sleep(0.5)


def stop_server(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is not None:  # already stopped (killed by the test)
        return
    os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def serve(tmp_path: Path):
    """A real `mlflow server` on a free loopback port; yields (url, artifacts folder)."""
    port = free_port()
    proc = start_server(tmp_path, port)
    try:
        yield f"http://127.0.0.1:{port}", tmp_path / "server-artifacts"
    finally:
        stop_server(proc)


@pytest.fixture
def mlflow_server(tmp_path):
    with serve(tmp_path) as server:
        yield server


def two_trial_study(name, real, pool, tmp_path, **kw):
    """A 2-trial, 2-seed study of one pool at two ratios, both trials at once (the server tests' study)."""
    return StudyConfig(
        name=name,
        real=str(real),
        space=SearchSpace(ratio=[0.5, 1.0], pools=[str(pool)]),
        num_samples=2,
        seeds=[0, 1],
        k_sites=4,
        cpus_per_trial=1,
        max_concurrent_trials=2,
        storage_path=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache"),
        **kw,
    )


def test_study_logs_to_mlflow_server(ray_cluster, mlflow_server, tmp_path, monkeypatch):
    url, art = mlflow_server
    real = ingest_procedural(tmp_path / "real", n_types=3, n_sites=12, n_tiles=300, val=0.2)
    pool = make_pool(real, tmp_path / "pool", per_pair=4)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    cfg = two_trial_study("server-study", real, pool, tmp_path, experiment="server-exp")
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


def _history(api: str, run_id: str, key: str) -> list[dict]:
    r = requests.get(f"{api}/metrics/get-history", params={"run_id": run_id, "metric_key": key}, timeout=10)
    return r.json().get("metrics", [])


def test_tracking_outage_neither_ends_nor_loses_a_run(ray_cluster, proc_dataset, tmp_path, monkeypatch):
    """The real server is killed and restarted: a RunLogger keeps going (a caller waits at most
    WAIT_S, later calls queue at once) and delivers its queue when the server is back; a training
    whose server dies after its first loss point ends at the requested step with every loss point."""
    from medi_dist import run_logger, tracking
    from medi_dist.config_loader import load_config
    from medi_dist.train.config import TrainConfig
    from medi_dist.train.trainer import train

    port = free_port()
    url, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api/2.0/mlflow"
    server = start_server(tmp_path, port)
    try:
        # 1. our retry layer alone (MLflow's own HTTP retries off): never blocks past WAIT_S
        with monkeypatch.context() as m:
            m.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            m.setattr(run_logger, "WAIT_S", 1.0)
            run_id = tracking.find_or_create_run(url, "outage-direct")
            logger = tracking.RunLogger(url, run_id)
            logger.metrics({"x": 0.0}, 0)
            stop_server(server, signal.SIGKILL)
            t0 = time.time()
            for i in range(1, 6):
                logger.metrics({"x": float(i)}, i)
            assert time.time() - t0 < 5 and logger.retries > 0  # queued, not blocked
            server = start_server(tmp_path, port)
            assert logger.flush(120) is None
            assert sorted(p["step"] for p in _history(api, run_id, "x")) == [0, 1, 2, 3, 4, 5]

        # 2. a real training, server killed after its first loss point and restarted
        cfg = load_config(
            TrainConfig,
            None,
            [
                f"data.dataset={proc_dataset}",
                "model.preset=tiny",
                "model.resolution=16",
                "optim.batch_size=16",
                "steps=60",
                "run.name=outage",
                f"run.storage_path={tmp_path / 'runs'}",
                f"run.tracking_uri={url}",
                "run.log_every=2",
                "run.checkpoint_every=30",
            ],
        )
        done: dict = {}
        t = threading.Thread(target=lambda: done.update(res=train(cfg)), daemon=True)
        t.start()
        run_id, deadline = None, time.time() + 600
        while time.time() < deadline and t.is_alive():
            exp = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "medi-dist"}, timeout=10)
            ids = [exp.json()["experiment"]["experiment_id"]] if exp.status_code == 200 else []
            found = (
                requests.post(f"{api}/runs/search", json={"experiment_ids": ids, "max_results": 5}, timeout=10)
                .json()
                .get("runs", [])
                if ids
                else []
            )
            run_id = next((r["info"]["run_id"] for r in found if r["info"]["run_name"] == "outage"), None)
            if run_id and _history(api, run_id, "loss"):
                break
            time.sleep(0.2)
        assert run_id and t.is_alive(), "training ended before the server could be stopped"
        stop_server(server, signal.SIGKILL)
        down = time.time()
        time.sleep(5)
        server = start_server(tmp_path, port)
        up = time.time()
        t.join(timeout=900)
        res = done["res"]
        assert res.metrics["step"] == 60 and res.model_dir is not None
        loss = _history(api, run_id, "loss")
        steps = sorted(p["step"] for p in loss)  # every point (a call cut by the kill may land twice)
        assert sorted(set(steps)) == list(range(2, 61, 2)) and len(steps) <= 31, steps
        assert any(down * 1000 <= p["timestamp"] <= up * 1000 for p in loss), "no point was logged during the outage"
        info = requests.get(f"{api}/runs/get", params={"run_id": run_id}, timeout=10).json()["run"]["info"]
        assert info["status"] == "FINISHED"
    finally:
        stop_server(server)


def test_model_upload_and_registration_wait_out_an_outage(proc_dataset, tmp_path, monkeypatch, caplog):
    """The model logging at a training's end goes through the run's retrying sender: with the server
    killed, a caller that gives up (FINAL_WAIT_S) gets a warning, not an error, and the queue is not
    blocked by the dropped upload; a caller that waits sees the model uploaded and registered once
    the server is back, as one version."""
    from medi_dist import run_logger, tracking
    from medi_dist.config_loader import load_config
    from medi_dist.metadata import ConditioningSpec
    from medi_dist.model import EMA, ConditionedUNet, ModelConfig, save_model_dir
    from medi_dist.registry import MODEL_ARTIFACT, log_model_dir
    from medi_dist.train.config import TrainConfig
    from medi_dist.train.trainer import _log_model

    spec = ConditioningSpec.load(proc_dataset / "vocab.json").subset(["cancer_type", "tissue_source_site"])
    m = ConditionedUNet(ModelConfig.from_preset("tiny"), spec)
    model = tmp_path / "model"
    save_model_dir(model, m, EMA(m), extra_info={"name": "tiny", "dataset": str(proc_dataset)})
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our retries only: fast attempts
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    try:
        logger = tracking.RunLogger(url, tracking.find_or_create_run(url, "outage-model"))
        logger.metrics({"loss": 1.0}, 0)
        stop_server(server, signal.SIGKILL)

        # 1. the trainer's step gives up after FINAL_WAIT_S: a warning naming the model directory
        cfg = load_config(TrainConfig, None, [f"data.dataset={proc_dataset}", "run.name=outage-model"])
        with monkeypatch.context() as mp:
            mp.setattr(run_logger, "FINAL_WAIT_S", 2.0)
            mp.setattr(run_logger, "WAIT_S", 1.0)
            t0 = time.time()
            _log_model(cfg, logger, model, model)
            assert time.time() - t0 < 60
        assert "was not logged to MLflow" in caplog.text and str(model) in caplog.text
        assert "unreachable" in caplog.text

        # 2. a caller that waits: done once the server is back, one version
        done: dict = {}
        t = threading.Thread(target=lambda: done.update(version=log_model_dir(logger, model, "outage-model")))
        t.start()
        time.sleep(3)
        assert t.is_alive() and not done  # waiting for the server, not failed
        server = start_server(tmp_path, port)
        t.join(timeout=400)
        assert done.get("version") == "1", done
        assert logger.flush(120) is None
        c = tracking.client(url)
        assert [v.version for v in c.search_model_versions("name = 'outage-model'")] == ["1"]
        exp = c.get_run(logger.run_id).info.experiment_id
        (model,) = c.search_logged_models([exp], filter_string=f"name = '{MODEL_ARTIFACT}'")  # one, READY
        assert model.source_run_id == logger.run_id and str(model.status) == "READY"
        files = {a.path for a in c.list_logged_model_artifacts(model.model_id)}
        assert "MLmodel" in files, files
        run = c.get_run(logger.run_id)
        assert run.data.tags["medi_dist.registered_model"] == "outage-model/1"
        assert "medi_dist.model_logging_error" in run.data.tags  # step 1's note, delivered after the outage
        assert [p.step for p in c.get_metric_history(logger.run_id, "loss")] == [0]
    finally:
        stop_server(server)


def _runs_named(api: str, experiment: str, name: str) -> list[dict]:
    exp = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": experiment}, timeout=10)
    if exp.status_code != 200:
        return []
    ids = [exp.json()["experiment"]["experiment_id"]]
    found = requests.post(f"{api}/runs/search", json={"experiment_ids": ids, "max_results": 100}, timeout=10)
    return [r for r in found.json().get("runs", []) if r["info"]["run_name"] == name]


def test_run_creation_retries_until_the_server_is_back(tmp_path, monkeypatch):
    """No server yet: creating a run retries with backoff. A short wait ends in TrackingUnavailable
    (never a raw connection error); a long one gets the run once the server comes up, made once."""
    from medi_dist import tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our retry layer alone
    port = free_port()
    url, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api/2.0/mlflow"
    t0 = time.time()
    with pytest.raises(tracking.TrackingUnavailable, match="creating MLflow run 'early'.*unreachable"):
        tracking.find_or_create_run(url, "early", wait_s=2)
    assert time.time() - t0 < 30
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(id=tracking.find_or_create_run(url, "late", wait_s=600)))
    t.start()
    time.sleep(3)
    assert t.is_alive()  # still retrying: nothing to talk to
    server = start_server(tmp_path, port)
    try:
        t.join(timeout=300)
        assert not t.is_alive() and got["id"]
        assert [r["info"]["run_id"] for r in _runs_named(api, "medi-dist", "late")] == [got["id"]]
        assert tracking.find_or_create_run(url, "late") == got["id"]  # found again, not made twice
    finally:
        stop_server(server)


def test_spilled_calls_are_uploaded_when_the_server_is_back(tmp_path, monkeypatch):
    """Calls that could not be delivered go to the given folder (not the temp folder): those of a
    logger without a run (server down at creation) and those left after flush's wait. upload_spills
    delivers them to the run, timestamps and steps kept, and removes the files."""
    from medi_dist import run_logger, tracking

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setattr(run_logger, "WAIT_S", 1.0)
    port = free_port()
    url, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api/2.0/mlflow"
    spill = tmp_path / "run" / "mlflow-spill"
    pending = tracking.RunLogger(url, None, str(spill))  # no run: the server was down
    pending.params({"lr": 0.1})
    pending.metrics({"x": 1.0}, 1)
    pending.metrics({"x": 2.0}, 2)
    first = pending.flush()
    assert first and Path(first).parent == spill and len(Path(first).read_text().splitlines()) == 3
    server = start_server(tmp_path, port)
    try:
        run_id = tracking.find_or_create_run(url, "spilled")
        live = tracking.RunLogger(url, run_id, str(spill))
        live.metrics({"x": 3.0}, 3)
        stop_server(server, signal.SIGKILL)
        ts = time.time()
        live.metrics({"x": 4.0}, 4)  # queued: the server is down
        second = live.flush(timeout=2)
        assert second and Path(second).parent == spill and len(list(spill.glob("*.jsonl"))) == 2
        with pytest.raises(tracking.TrackingUnavailable):
            tracking.upload_spills(url, run_id, str(spill), wait_s=1)
        assert len(list(spill.glob("*.jsonl"))) == 2  # nothing delivered, nothing lost
        server = start_server(tmp_path, port)
        assert tracking.upload_spills(url, run_id, str(spill)) == 4
        assert list(spill.glob("*.jsonl")) == []
        hist = _history(api, run_id, "x")
        assert sorted((p["step"], p["value"]) for p in hist) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0)]
        point4 = next(p for p in hist if p["step"] == 4)
        assert abs(int(point4["timestamp"]) / 1000 - ts) < 5  # when it was measured, not uploaded
        run = requests.get(f"{api}/runs/get", params={"run_id": run_id}, timeout=10).json()["run"]
        assert {p["key"]: p["value"] for p in run["data"]["params"]} == {"lr": "0.1"}
    finally:
        stop_server(server)


def test_training_started_while_the_server_is_down(ray_cluster, proc_dataset, tmp_path, monkeypatch):
    """No server when the training starts: after its wait (MEDI_DIST_MLFLOW_WAIT_S) the training goes
    on without a run, its metrics written to the run folder. The server comes up mid-training; at the
    end the run is created and receives every loss point, its params and its final status."""
    from medi_dist.config_loader import load_config
    from medi_dist.train.config import TrainConfig
    from medi_dist.train.trainer import train

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MEDI_DIST_MLFLOW_WAIT_S", "2")
    port = free_port()
    url, api = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/api/2.0/mlflow"
    cfg = load_config(
        TrainConfig,
        None,
        [
            f"data.dataset={proc_dataset}",
            "model.preset=tiny",
            "model.resolution=16",
            "optim.batch_size=16",
            "steps=40",
            "run.name=down-at-start",
            f"run.storage_path={tmp_path / 'runs'}",
            f"run.tracking_uri={url}",
            "run.log_every=2",
            "run.checkpoint_every=20",
        ],
    )
    run_dir = tmp_path / "runs" / "down-at-start"
    done: dict = {}
    t = threading.Thread(target=lambda: done.update(res=train(cfg)), daemon=True)
    t.start()
    deadline = time.time() + 600
    while time.time() < deadline and t.is_alive() and not list(run_dir.glob("checkpoint_*")):
        time.sleep(0.2)  # a checkpoint: the driver gave up on the run long ago and the workers train
    assert t.is_alive(), "training ended before the server was started"
    monkeypatch.setenv("MEDI_DIST_MLFLOW_WAIT_S", "600")  # the end of the training waits for the server
    server = start_server(tmp_path, port)
    try:
        t.join(timeout=900)
        res = done["res"]
        assert res.metrics["step"] == 40 and res.model_dir is not None and res.mlflow_run_id
        assert [r["info"]["run_id"] for r in _runs_named(api, "medi-dist", "down-at-start")] == [res.mlflow_run_id]
        steps = sorted({p["step"] for p in _history(api, res.mlflow_run_id, "loss")})
        assert steps == list(range(2, 41, 2)), steps
        run = requests.get(f"{api}/runs/get", params={"run_id": res.mlflow_run_id}, timeout=10).json()["run"]
        assert run["info"]["status"] == "FINISHED"
        assert {"steps", "seed"} <= {p["key"] for p in run["data"]["params"]}
        assert not list((run_dir / "mlflow-spill").glob("*.jsonl"))  # delivered, then removed
        assert (run_dir / "medi-dist-run.json").read_text().count(res.mlflow_run_id) == 1
    finally:
        stop_server(server)
