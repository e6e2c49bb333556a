"""MLflow outages outside `train`: `evaluate fidelity`, `evaluate downstream`, `generate`, `tune` and
the demo's run go on while a real `mlflow server` is down, spill to their output folder and upload
when it is back, runs made then joining the job they were opened in; an upload cut short resumes
where it stopped (each point arrives once)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

import pytest
import requests

from medi_dist import run_delivery, tracking
from test_mlflow_server import _history, _runs_named, free_port, start_server, stop_server, two_trial_study


class Server:
    """A port for a real `mlflow server` that may be up or down; stopped at the end of the test."""

    def __init__(self, tmp_path: Path):
        self.tmp, self.port, self.proc = tmp_path, free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/api/2.0/mlflow"

    def up(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.proc = start_server(self.tmp, self.port)

    def kill(self) -> None:
        stop_server(self.proc, signal.SIGKILL)


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # our retry layer alone
    monkeypatch.setenv("MEDI_DIST_MLFLOW_WAIT_S", "2")  # the command gives up waiting at once
    s = Server(tmp_path)
    yield s
    if s.proc is not None:
        stop_server(s.proc)


def back_before(monkeypatch, server: Server, name: str) -> list:
    """run_delivery.<name> (deliver, ensure_run: where close and the study look them up) brings the
    server up (if down) before it runs: the command was down until its end. Returns the list of calls seen."""
    real, seen = getattr(run_delivery, name), []

    def wrapped(*a, **kw):
        server.up()
        seen.append(a)
        return real(*a, **kw)

    monkeypatch.setattr(run_delivery, name, wrapped)
    return seen


def spill_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _run(server: Server, run_id: str) -> dict:
    return requests.get(f"{server.api}/runs/get", params={"run_id": run_id}, timeout=10).json()["run"]


def test_upload_resumes_where_it_was_cut(server, tmp_path, monkeypatch):
    """The client fails after 3 metric batches: `.sent` records the lines that are in, and the next
    upload sends only the rest. Every point is sent once (counted at the client, not only deduplicated
    by the store), the artifact and tag arrive, and nothing is left in the spill folder."""
    from mlflow.tracking import MlflowClient

    spill = tmp_path / "spill"
    pending = tracking.RunLogger(server.url, None, str(spill))  # the server is down: all spilled
    pending.params({"lr": 0.1})
    for i in range(30):
        pending.metrics({"x": float(i), "y": -float(i)}, i)
    pending.artifact_bytes(b"hello", "note.txt", "notes")
    pending.tags({"t": "1"})
    assert pending.flush()
    server.up()
    run_id = tracking.find_or_create_run(server.url, "resumed")

    monkeypatch.setattr(run_delivery, "MAX_POINTS", 10)  # 5 calls of 2 points per batch: 6 batches
    real, points, cut = MlflowClient.log_batch, [], {"after": 3}

    def log_batch(self, run_id, **kw):
        if kw.get("metrics"):
            if cut["after"] is not None and len(points) >= cut["after"]:
                raise requests.ConnectionError("cut mid-upload")
            real(self, run_id, **kw)
            points.append(len(kw["metrics"]))
            return None
        return real(self, run_id, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    with pytest.raises(tracking.TrackingUnavailable):
        tracking.upload_spills(server.url, run_id, str(spill), wait_s=0)
    (sent,) = spill.glob("*.jsonl.sent")
    assert sent.read_text() == "16"  # params + 3 batches of 5 calls
    cut["after"] = None
    assert tracking.upload_spills(server.url, run_id, str(spill), wait_s=30) == 33 - 16  # of 33 calls
    assert points == [10] * 6  # 60 points, each sent once
    assert spill_files(spill) == []
    for key, sign in (("x", 1), ("y", -1)):
        hist = sorted((p["step"], p["value"]) for p in _history(server.api, run_id, key))
        assert hist == [(i, sign * float(i)) for i in range(30)]
    run = requests.get(f"{server.api}/runs/get", params={"run_id": run_id}, timeout=10).json()["run"]
    assert {t["key"]: t["value"] for t in run["data"]["tags"]}.get("t") == "1"
    arts = requests.get(f"{server.api}/artifacts/list", params={"run_id": run_id, "path": "notes"}, timeout=10)
    assert [f["path"] for f in arts.json()["files"]] == ["notes/note.txt"]


def test_fidelity_goes_on_and_uploads_when_the_server_is_back(server, proc_dataset, tmp_path, monkeypatch, caplog):
    """No server during `evaluate fidelity`: after the (short) wait the stage goes on, says where its
    calls are spilled, and writes them there; the server is back before the upload at its end, which
    makes the run and delivers every metric once, the params and the fidelity.json artifact."""
    from medi_dist.evaluate.fidelity_job import FidelityConfig, evaluate_fidelity

    seen = back_before(monkeypatch, server, "deliver")
    out = tmp_path / "fid" / "fidelity.json"
    cfg = FidelityConfig(
        real=str(proc_dataset),
        synthetic=str(proc_dataset),
        out=str(out),
        conditional=False,
        tracking_uri=server.url,
        run_name="fid-outage",
    )
    with caplog.at_level("WARNING", logger="medi_dist.tracking"):
        res = evaluate_fidelity(cfg)
    spill = (tmp_path / "fid").resolve() / "mlflow-spill" / "fid-outage"
    assert seen and res["mlflow_run_id"] and out.is_file()
    assert f"going on without it: calls are sent when the server is back, else written to {spill}" in caplog.text
    assert f"written to {spill}/" in caplog.text  # the spill happened, and was then uploaded
    assert spill_files(spill) == []
    assert [r["info"]["run_id"] for r in _runs_named(server.api, "medi-dist", "fid-outage")] == [res["mlflow_run_id"]]
    for key in ("fd_overall", "fd_mean_group"):
        assert len(_history(server.api, res["mlflow_run_id"], key)) == 1, key
    run = requests.get(f"{server.api}/runs/get", params={"run_id": res["mlflow_run_id"]}, timeout=10).json()["run"]
    assert run["info"]["status"] == "FINISHED" and "encoder" in {p["key"] for p in run["data"]["params"]}
    arts = requests.get(
        f"{server.api}/artifacts/list", params={"run_id": res["mlflow_run_id"], "path": "fidelity"}, timeout=10
    )
    assert [f["path"] for f in arts.json()["files"]] == ["fidelity/fidelity.json"]


def test_demo_run_survives_a_server_stopped_mid_logging(server, tmp_path, monkeypatch):
    """The demo's parent run (tracking.job, as run_demo opens it): the server dies right after the run
    is made; the demo's logging goes on, spills into <out>/mlflow-spill/<run name> and delivers each
    metric once when it is back, at the block's end. Its evaluate stage, opened while the server is
    down, is made when it is back, as the demo run's child."""
    server.up()
    back_before(monkeypatch, server, "deliver")
    spill = tmp_path / "mlflow-spill" / "demo-1"
    with tracking.job(server.url, "demo-1", "demo", spill_dir=str(spill)) as logger:
        run_id = logger.run_id
        server.kill()
        with tracking.stage(server.url, "evaluate", "evaluate", spill_dir=str(tmp_path / "mlflow-spill" / "ev")) as ev:
            assert ev.run_id is None  # made at the stage's end, when the server is back
            ev.metrics({"medi.balanced_accuracy": 0.7})
        logger.params({"tiles": 800})
        logger.metrics({"real_only.balanced_accuracy": 0.6, "MeDi.worst_site_accuracy": 0.4})
        logger.artifact_bytes(b"the table", "results.txt")
        logger.artifact_bytes(b"\x89PNG fake", "real_vs_generated.png")
        logger.metrics({"wall_minutes": 1.5})
    assert run_id and logger.run_id == run_id and spill_files(spill) == []
    assert [r["info"]["run_id"] for r in _runs_named(server.api, "medi-dist", "demo-1")] == [run_id]
    for key in ("real_only.balanced_accuracy", "MeDi.worst_site_accuracy", "wall_minutes"):
        assert len(_history(server.api, run_id, key)) == 1, key
    run = requests.get(f"{server.api}/runs/get", params={"run_id": run_id}, timeout=10).json()["run"]
    assert run["info"]["status"] == "FINISHED"
    files = requests.get(f"{server.api}/artifacts/list", params={"run_id": run_id}, timeout=10).json()["files"]
    assert {f["path"] for f in files} == {"results.txt", "real_vs_generated.png"}
    (child,) = _runs_named(server.api, "medi-dist", "evaluate")
    assert child["info"]["run_id"] == ev.run_id and _tags(child)[tracking.PARENT_TAG] == run_id
    assert len(_history(server.api, ev.run_id, "medi.balanced_accuracy")) == 1


def test_study_goes_on_while_the_server_is_down(ray_cluster, server, tmp_path, monkeypatch):
    """The server dies after the study's run and baseline are made, before the trials: every trial
    finishes (none fails on MLflow), spilling into <study>/mlflow-spill/<trial>; the server is back
    at the study's end, which makes the trial runs under the parent and delivers each point once."""
    from medi_dist.tune import report
    from medi_dist.tune.study import run_study
    from synthetic_pools import ingest_procedural, make_pool

    monkeypatch.setenv("MEDI_DIST_MLFLOW_WAIT_S", "600")  # the end of the study waits for the server
    real = ingest_procedural(tmp_path / "real", n_types=3, n_sites=12, n_tiles=300, val=0.2)
    pool = make_pool(real, tmp_path / "pool", per_pair=4)
    server.up()
    real_prepare = report.prepare

    def prepare_then_kill(*a, **kw):
        out = real_prepare(*a, **kw)
        server.kill()
        return out

    monkeypatch.setattr(report, "prepare", prepare_then_kill)
    back_before(monkeypatch, server, "ensure_run")
    cfg = two_trial_study("outage-study", real, pool, tmp_path, tracking_uri=server.url, final_eval=False)
    res = run_study(cfg)
    assert (res.trials["error"] == "").all() and (res.trials["seeds_done"] >= 1).all(), res.trials  # none failed
    spill = tmp_path / "runs" / "outage-study" / "mlflow-spill"
    assert {p.name for p in spill.iterdir()} >= set(res.trials["trial_id"])  # the trials did spill
    assert spill_files(spill) == []  # and all of it was delivered
    for row in res.trials.itertuples():
        runs = _runs_named(server.api, "medi-dist", f"outage-study/{row.trial_id}")
        assert [r["info"]["run_id"] for r in runs] == [row.mlflow_run_id]
        tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == res.parent_run_id and runs[0]["info"]["status"] == "FINISHED"
        hist = _history(server.api, row.mlflow_run_id, "val_mcc")
        assert sorted(p["step"] for p in hist) == list(range(row.seeds_done))  # one point per seed, once
    best = res.best["mlflow_run_id"]
    files = requests.get(f"{server.api}/artifacts/list", params={"run_id": best}, timeout=10).json()["files"]
    assert {"subgroups_val.csv", "site_accuracy_val.png"} <= {f["path"] for f in files}
    parent = requests.get(f"{server.api}/runs/get", params={"run_id": res.parent_run_id}, timeout=10).json()["run"]
    assert "best_val_objective" in {m["key"] for m in parent["data"]["metrics"]}


def test_generate_goes_on_and_its_run_joins_its_job_when_the_server_is_back(
    ray_cluster, server, proc_dataset, tmp_path, monkeypatch, caplog
):
    """A model's training run exists, then the server dies. A job (as the demo's parent run) and its
    `generate` stage both start without it: after the short wait the generation goes on and writes
    every planned tile exactly once, its calls spilled into <out>/mlflow-spill/generate-<out>. The
    server is back before the stage's upload, which makes the job's run, then the generate run as its
    child (once), linked to the training run, with each metric once and both dataset inputs."""
    import pandas as pd

    from medi_dist.data.shards import verify_shards
    from medi_dist.generate.job import GenerateConfig, build_tasks, generate
    from medi_dist.generate.tile_list import task_tiles
    from test_generate import PLAN, SAMPLING, _model_dir

    server.up()
    train_run = tracking.find_or_create_run(server.url, "rand-training")
    model = _model_dir(tmp_path / "model", proc_dataset, mlflow_run_id=train_run)
    server.kill()
    seen = back_before(monkeypatch, server, "deliver")
    out = tmp_path / "gen"
    cfg = GenerateConfig(
        model=str(model),
        out=str(out),
        plan=PLAN,
        sampling=SAMPLING,
        tiles_per_shard=10,
        workers=1,
        log_mlflow=True,
        tracking_uri=server.url,
    )
    job_spill = tmp_path / "mlflow-spill" / "chain-gen"
    with caplog.at_level("WARNING", logger="medi_dist.tracking"):
        with tracking.job(server.url, "chain-gen", "demo", spill_dir=str(job_spill)) as job:
            res = generate(cfg)
    assert seen and res.complete and res.tiles == 48
    index = pd.read_parquet(out / "index.parquet")
    tasks, _, _, _ = build_tasks(cfg)
    planned = [t["key"] for task in tasks for t in task_tiles(task)]
    assert sorted(index["key"]) == sorted(planned) and not index["key"].duplicated().any()
    verify_shards(out, checksums=True)
    spill = out.resolve() / "mlflow-spill" / "generate-gen"
    assert f"written to {spill}/" in caplog.text  # the stage spilled, and then delivered
    assert spill_files(spill) == [] and spill_files(job_spill) == []
    assert [r["info"]["run_id"] for r in _runs_named(server.api, "medi-dist", "chain-gen")] == [job.run_id]
    (run,) = _runs_named(server.api, "medi-dist", "generate-gen")
    run_id, tags = run["info"]["run_id"], _tags(run)
    assert tags[tracking.PARENT_TAG] == job.run_id and tags["medi_dist.model_run_id"] == train_run
    assert f"trained in run [{train_run}](#/runs/{train_run})" in tags["mlflow.note.content"]
    run = _run(server, run_id)
    assert run["info"]["status"] == "FINISHED"
    assert {"model", "plan.mode", "sampling.steps", "tiles"} <= {p["key"] for p in run["data"]["params"]}
    for key in ("tiles_planned", "shards_generated", "seconds"):
        assert len(_history(server.api, run_id, key)) == 1, key
    assert _history(server.api, run_id, "tiles_planned")[0]["value"] == 48
    contexts = {
        t["value"] for d in run["inputs"]["dataset_inputs"] for t in d["tags"] if t["key"] == "mlflow.data.context"
    }
    assert contexts == {"training", "generated"}


@pytest.mark.usefixtures("one_torch_thread")
def test_downstream_goes_on_and_joins_its_chain_when_the_server_is_back(server, tmp_path, monkeypatch, caplog):
    """`evaluate downstream --mlflow-run` in a named job ($MEDI_DIST_PARENT_RUN) with no server until
    its end: the evaluation finishes and writes its results; its calls go to
    <out>/mlflow-spill/<run> and, the server back before the upload, the run is made once (a child of
    the job's run, made then too) with each metric once, its params and its table."""
    from medi_dist.evaluate.command import add_downstream_parser
    from synthetic_pools import ingest_procedural, make_pool

    real = ingest_procedural(tmp_path / "real", n_types=3, n_sites=12, n_tiles=240, val=0.0)
    pool = make_pool(real, tmp_path / "pool", per_pair=4)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    monkeypatch.setenv(tracking.PARENT_ENV, "chain-ds")
    seen = back_before(monkeypatch, server, "deliver")
    parser = argparse.ArgumentParser()
    add_downstream_parser(parser.add_subparsers(dest="cmd"))
    out = tmp_path / "out"
    args = parser.parse_args(
        ["downstream", "--real", str(real), "--synthetic", str(pool), "--ratio", "1", "--seeds", "0", "1"]
        + ["--k-sites", "4", "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--mlflow-run", "ds-outage"]
    )
    with caplog.at_level("WARNING", logger="medi_dist.tracking"):
        args.func(args)
    spill = out.resolve() / "mlflow-spill" / "ds-outage"
    assert seen and (out / "results.json").is_file()
    assert f"going on without it: calls are sent when the server is back, else written to {spill}" in caplog.text
    assert f"written to {spill}/" in caplog.text and spill_files(spill) == []
    (job,) = _runs_named(server.api, "medi-dist", "chain-ds")
    (run,) = _runs_named(server.api, "medi-dist", "ds-outage")
    run_id = run["info"]["run_id"]
    assert _tags(run)[tracking.PARENT_TAG] == job["info"]["run_id"]
    run = _run(server, run_id)
    assert run["info"]["status"] == "FINISHED" and {"real", "ratios"} <= {p["key"] for p in run["data"]["params"]}
    for key in ("test_balanced_accuracy", "test_balanced_accuracy_sem"):
        assert len(_history(server.api, run_id, key)) == 1, key
    files = requests.get(f"{server.api}/artifacts/list", params={"run_id": run_id}, timeout=10).json()["files"]
    assert {"table.txt", "subgroups_test.csv"} <= {f["path"] for f in files}
