"""MLflow: the default store (a sqlite file in the working directory), run lookup by name, artifacts,
parent runs for user-level jobs, dataset inputs and system metrics.

Workers log through `MlflowClient` with an explicit run id, so only rank 0 writes and a resumed job
keeps writing into the same MLflow run. `MLFLOW_TRACKING_URI` points everything at a server.

A user-level job is one parent run: `job()` (the demo) makes every run created inside its block a
child; `MEDI_DIST_PARENT_RUN=NAME` (or `--parent-run NAME`) does the same across separate commands
(train, generate, evaluate), the parent running from its first stage's start to its last stage's end.
"""

from __future__ import annotations

import io
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DEFAULT_EXPERIMENT = "medi-dist"
RUN_NAME_TAG = "medi_dist.run_name"
KIND_TAG = "medi_dist.kind"
PARENT_TAG = "mlflow.parentRunId"
PARENT_ENV = "MEDI_DIST_PARENT_RUN"  # name of a user-level job run that the runs of this process join
# The experiment's kind as MLflow records it: "Model training" (server JS: CUSTOM_MODEL_DEVELOPMENT).
# MLflow 3.17.2's UI stores it but picks its mode from the browser or ?workflowType= (see ui_link).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
_job_parent: str | None = None  # run id of the job() block this process is in


def tracking_uri(uri: str | None = None) -> str:
    """Explicit URI, else $MLFLOW_TRACKING_URI, else ./mlflow.db as an absolute sqlite URI (workers
    may run in another directory)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///') :]).resolve()}"  # workers run in other folders
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def artifact_root(uri: str) -> str | None:
    """With a local sqlite store, keep artifacts beside it (absolute, so every process agrees)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").resolve().as_uri()
    return None  # a server decides


def client(uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(uri))


def experiment_id(c, name: str = DEFAULT_EXPERIMENT) -> str:
    exp = c.get_experiment_by_name(name)
    if exp is None:
        return c.create_experiment(
            name, artifact_location=artifact_root(c.tracking_uri), tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
        )
    if EXPERIMENT_KIND_TAG not in exp.tags:  # made before this tag (or by someone else): a user's choice stays
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return exp.experiment_id


def find_or_create_run(
    uri: str,
    run_name: str,
    experiment: str = DEFAULT_EXPERIMENT,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    key: str | None = None,
) -> str:
    """The run tagged with `key` (default: the run name), so a resumed job keeps its run, or a new one.
    Without `parent_run_id` the run joins the current job (`job()` or $MEDI_DIST_PARENT_RUN), if any; a
    resumed run moves to the job that resumes it."""
    c = client(uri)
    exp = experiment_id(c, experiment)
    parent_run_id = parent_run_id or current_parent(uri, experiment)
    key = key or run_name
    found = c.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` = '{key}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        if parent_run_id and parent_run_id != run_id and found[0].data.tags.get(PARENT_TAG) != parent_run_id:
            c.set_tag(run_id, PARENT_TAG, parent_run_id)
        return run_id
    return new_run(c, exp, run_name, {RUN_NAME_TAG: key, **(tags or {})}, parent_run_id)


def new_run(c, exp: str, run_name: str, tags: dict[str, str], parent_run_id: str | None = None) -> str:
    """A run with MLflow's context tags (user, source command, git commit), as the fluent API sets them."""
    from mlflow.tracking.context.registry import resolve_tags

    if parent_run_id:
        tags = {**tags, PARENT_TAG: parent_run_id}
    return c.create_run(exp, run_name=run_name, tags=resolve_tags(tags)).info.run_id


def ui_link(uri: str, run_id: str | None = None, experiment: str = DEFAULT_EXPERIMENT) -> str:
    """A UI address that opens in "Model training" mode: MLflow 3.17's UI takes the mode from the
    browser (its GenAI | Model training switch, GenAI until switched) or this URL parameter, not
    from the experiment tag."""
    base = uri.rstrip("/") if uri.startswith("http") else "http://127.0.0.1:5000"  # `mlflow ui` on a local store
    exp = client(uri).get_experiment_by_name(experiment)
    where = f"/runs/{run_id}" if run_id else ""
    return f"{base}/#/experiments/{exp.experiment_id if exp else 0}{where}?workflowType=machine_learning"


def adopt_run(uri: str, key: str, experiment: str = DEFAULT_EXPERIMENT) -> str | None:
    """The run tagged with `key`, made a child of the current job (a stage done by an earlier job
    that this one reuses, e.g. a demo's finished training); None when there is no such run."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    found = exp and c.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_NAME_TAG}` = '{key}'", max_results=1)
    if not found:
        return None
    return find_or_create_run(uri, found[0].info.run_name, experiment, key=key)


def current_parent(uri: str, experiment: str = DEFAULT_EXPERIMENT) -> str | None:
    """The run id of the job this process works for: a `job()` block, else the run named by
    $MEDI_DIST_PARENT_RUN (created by the first stage, set RUNNING again by each later one)."""
    if _job_parent:
        return _job_parent
    name = os.environ.get(PARENT_ENV)
    if not name:
        return None
    c = client(uri)
    exp = experiment_id(c, experiment)
    found = c.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` = 'job/{name}'", max_results=1)
    if found:
        c.update_run(found[0].info.run_id, status="RUNNING")
        return found[0].info.run_id
    return new_run(c, exp, name, {RUN_NAME_TAG: f"job/{name}", KIND_TAG: "job"})


@contextmanager
def ended_as(log: RunLogger) -> Iterator[RunLogger]:
    """End the run with the block: FINISHED, KILLED on Ctrl-C, FAILED on an error."""
    try:
        yield log
    except KeyboardInterrupt:
        log.finish("KILLED")
        raise
    except BaseException:
        log.finish("FAILED")
        raise
    log.finish()


@contextmanager
def job(uri: str, name: str, kind: str, experiment: str = DEFAULT_EXPERIMENT) -> Iterator[RunLogger]:
    """A user-level job's parent run, from the start of the block to its end; every run created in
    this process meanwhile (find_or_create_run, stage) is its child."""
    global _job_parent
    log = RunLogger(
        uri,
        new_run(
            client(uri),
            experiment_id(client(uri), experiment),
            name,
            {RUN_NAME_TAG: f"{name}/{uuid.uuid4().hex[:8]}", KIND_TAG: kind},
        ),
    )
    previous, _job_parent = _job_parent, log.run_id
    try:
        with ended_as(log):
            yield log
    finally:
        _job_parent = previous


@contextmanager
def stage(
    uri: str, name: str, kind: str, experiment: str = DEFAULT_EXPERIMENT, system_metrics: bool = False
) -> Iterator[RunLogger]:
    """A new run for one stage (generate, evaluate), lasting as long as the block; a child of the current job."""
    c = client(uri)
    exp = experiment_id(c, experiment)
    log = RunLogger(
        uri,
        new_run(
            c,
            exp,
            name,
            {RUN_NAME_TAG: f"{name}/{uuid.uuid4().hex[:8]}", KIND_TAG: kind},
            current_parent(uri, experiment),
        ),
    )
    with ended_as(log), system_metrics_logged(log, system_metrics):
        yield log


@contextmanager
def system_metrics_logged(log: RunLogger, on: bool = True) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory, disk, network, GPU when there is one) of this machine,
    every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10), while the block runs."""
    if not on:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(log.run_id, resume_logging=True, tracking_uri=log.uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def dataset_digest(manifest: dict) -> str:
    """A dataset's digest from the shard sha256s its dataset.json records (nothing is re-read)."""
    import hashlib

    shards = sorted(f"{s['path']}:{s['sha256']}" for s in manifest["shards"])
    return hashlib.sha256("\n".join(shards).encode()).hexdigest()[:16]  # MLflow keeps 36 characters


def log_datasets(log: RunLogger, datasets: dict[str, str | list[str]]) -> None:
    """Dataset inputs: context (e.g. training, synthetic, evaluation) -> dataset dir(s); each is
    named by its folder, with its digest, tile count and condition columns."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import ColSpec, Schema

    from .data.shards import load_manifest

    inputs = []
    for context, roots in datasets.items():
        for root in [roots] if isinstance(roots, (str, Path)) else roots:
            m = load_manifest(root)
            schema = Schema(
                [ColSpec("string", c) for c in m.get("categorical", [])]
                + [ColSpec("double", c) for c in m.get("continuous", [])]
            )
            path = str(root) if "://" in str(root) else str(Path(root).resolve())
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path, either way
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(path)
            ds = MetaDataset(source, name=Path(path).name, digest=dataset_digest(m), schema=schema)
            inputs.append(
                DatasetInput(
                    ds._to_mlflow_entity(),
                    [InputTag("mlflow.data.context", context), InputTag("medi_dist.tiles", str(m["tiles"]))],
                )
            )
    log.c.log_inputs(log.run_id, datasets=inputs)


class RunLogger:
    """Thin wrapper over one MLflow run; safe to pickle into Ray workers (client made lazily)."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id, self._c = uri, run_id, None

    def __getstate__(self):
        return {"uri": self.uri, "run_id": self.run_id, "_c": None}

    @property
    def c(self):
        if self._c is None:
            self._c = client(self.uri)
        return self._c

    def params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.c.get_run(self.run_id).data.params
        new = [Param(k, str(v)[:6000]) for k, v in flatten(params).items() if k not in existing]
        for i in range(0, len(new), 100):
            self.c.log_batch(self.run_id, params=new[i : i + 100])

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        self.c.log_batch(self.run_id, metrics=batch)

    def tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.c.set_tag(self.run_id, k, str(v))

    def artifact_bytes(self, data: bytes, name: str, folder: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_bytes(data)
            self.c.log_artifact(self.run_id, str(p), folder)

    def figure(self, fig, name: str, folder: str | None = None) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        self.artifact_bytes(buf.getvalue(), name, folder)

    def status(self, status: str) -> None:
        self.c.update_run(self.run_id, status=status)

    def finish(self, status: str = "FINISHED") -> None:
        self.c.set_terminated(self.run_id, status)
        parent = self.c.get_run(self.run_id).data.tags.get(PARENT_TAG)
        if parent and self.c.get_run(parent).data.tags.get(KIND_TAG) == "job":  # a named job ends with its last stage
            self.c.set_terminated(parent, status)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
