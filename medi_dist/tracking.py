"""MLflow: the default store (a sqlite file in the working directory), run lookup by name, artifacts,
parent runs for user-level jobs, dataset inputs and system metrics.

Workers log through `MlflowClient` with an explicit run id, so only rank 0 writes and a resumed job
keeps writing into the same MLflow run. `MLFLOW_TRACKING_URI` points everything at a server.

A user-level job is one parent run: `job()` (the demo) makes every run created inside its block a
child; `MEDI_DIST_PARENT_RUN=NAME` (or `--parent-run NAME`) does the same across separate commands
(train, generate, evaluate), the parent running from its first stage's start to its last stage's end.

Every call of a run goes through run_logger.RunLogger (retried while the server is down, spilled to
files and uploaded when it is back); this module decides which run, and opens and closes it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import run_logger
from .run_logger import RunLogger, TrackingUnavailable, retrying, run_wait_s, transient, upload_spills

log = logging.getLogger("medi_dist.tracking")

DEFAULT_EXPERIMENT = "medi-dist"
SPILL_DIR = "mlflow-spill"  # where calls the server did not take wait (upload_spills delivers them)
RUN_NAME_TAG = "medi_dist.run_name"
KIND_TAG = "medi_dist.kind"
PARENT_TAG = "mlflow.parentRunId"
PARENT_ENV = "MEDI_DIST_PARENT_RUN"  # name of a user-level job run that the runs of this process join
# The experiment's kind as MLflow records it: "Model training" (server JS: CUSTOM_MODEL_DEVELOPMENT).
# MLflow 3.17.2's UI stores it but picks its mode from the browser or ?workflowType= (see ui_link).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
_job_parent: RunLogger | None = None  # the job() block this process is in (its run made later if the server was down)


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
    wait_s: float | None = None,
) -> str:
    """The run tagged with `key` (default: the run name), so a resumed job keeps its run, or a new one.
    Without `parent_run_id` (None; "" for no parent) the run joins the current job (`job()` or
    $MEDI_DIST_PARENT_RUN), if any; a resumed run moves to the job that resumes it. A server that is
    down or restarting is retried with backoff for up to `wait_s` (default run_wait_s()); then
    TrackingUnavailable. Found by its tag on every try, so a create whose answer was lost is not made
    twice."""
    return retrying(
        lambda: _find_or_create_run(uri, run_name, experiment, tags, parent_run_id, key),
        f"creating MLflow run {run_name!r}",
        uri,
        wait_s,
    )


def _find_or_create_run(uri, run_name, experiment, tags, parent_run_id, key) -> str:
    c = client(uri)
    exp = experiment_id(c, experiment)
    if parent_run_id is None:
        parent_run_id = current_parent(uri, experiment)
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
    try:
        exp = client(uri).get_experiment_by_name(experiment)
    except Exception as e:  # a server that is down: the link without the experiment's id, not an error
        if not transient(e):
            raise
        exp = None
    where = f"/runs/{run_id}" if run_id else ""
    return f"{base}/#/experiments/{exp.experiment_id if exp else 0}{where}?workflowType=machine_learning"


def adopt_run(uri: str, key: str, experiment: str = DEFAULT_EXPERIMENT) -> str | None:
    """The run tagged with `key`, made a child of the current job (a stage done by an earlier job
    that this one reuses, e.g. a demo's finished training); None when there is no such run, or the
    server is down (a warning: the job goes on without it)."""
    try:
        c = client(uri)
        exp = c.get_experiment_by_name(experiment)
        filt = f"tags.`{RUN_NAME_TAG}` = '{key}'"
        found = exp and c.search_runs([exp.experiment_id], filter_string=filt, max_results=1)
        if not found:
            return None
        return find_or_create_run(uri, found[0].info.run_name, experiment, key=key, wait_s=run_logger.WAIT_S)
    except Exception as e:
        if not (transient(e) or isinstance(e, TrackingUnavailable)):
            raise
        log.warning("MLflow at %s unreachable: run %s not made a child of this job (%s)", uri, key, e)
        return None


def current_parent(uri: str, experiment: str = DEFAULT_EXPERIMENT) -> str | None:
    """The run id of the job this process works for: a `job()` block's (made now if the server was
    down when the block began), else the run named by $MEDI_DIST_PARENT_RUN (created by the first
    stage, set RUNNING again by each later one)."""
    if _job_parent is not None:
        return _job_parent.make_run()
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
    """End the run with the block: FINISHED, KILLED on Ctrl-C, FAILED on an error (tracking.close:
    what a server that is down did not take is spilled and uploaded when it is back)."""
    try:
        yield log
    except KeyboardInterrupt:
        close(log, "KILLED")
        raise
    except BaseException:
        close(log, "FAILED")
        raise
    close(log)


def _keyed_logger(uri: str, name: str, kind: str, experiment: str, spill_dir: str | None, top: bool) -> RunLogger:
    """A logger on a new run under a key made once (`name`/random), created with find_or_create_run's
    retries: a create whose answer was lost is found by its key on the next try, not made twice. With
    `spill_dir`, a server that stays down does not stop the job (as open_run: made later, calls spilled;
    a child of the job it was opened in, `top`: of none)."""
    key = f"{name}/{uuid.uuid4().hex[:8]}"
    parent = (lambda: None) if top else (lambda: current_parent(uri, experiment))
    try:
        return RunLogger(uri, _new_keyed_run(uri, name, kind, experiment, parent, key), spill_dir)
    except TrackingUnavailable as e:
        if spill_dir is None:
            raise
        _going_on(e, spill_dir)
        spec = {
            "run_name": name,
            "experiment": experiment,
            "tags": {KIND_TAG: kind},
            "parent_run_id": "" if top else None,
            "key": key,
        }
        return RunLogger(uri, None, spill_dir, spec, None if top else _job_parent)


def _new_keyed_run(uri: str, name: str, kind: str, experiment: str, parent: Callable[[], str | None], key: str) -> str:
    def create() -> str:
        c = client(uri)
        exp = experiment_id(c, experiment)
        found = c.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` = '{key}'", max_results=1)
        if found:
            return found[0].info.run_id
        return new_run(c, exp, name, {RUN_NAME_TAG: key, KIND_TAG: kind}, parent())

    return retrying(create, f"creating MLflow run {name!r}", uri)


@contextmanager
def job(
    uri: str, name: str, kind: str, experiment: str = DEFAULT_EXPERIMENT, spill_dir: str | None = None
) -> Iterator[RunLogger]:
    """A user-level job's parent run, from the start of the block to its end; every run created in
    this process meanwhile (find_or_create_run, stage, open_run) is its child, also one made later
    because the server was down (the job's run is then made first, if it was not yet)."""
    global _job_parent
    log = _keyed_logger(uri, name, kind, experiment, spill_dir, top=True)
    previous, _job_parent = _job_parent, log
    try:
        with ended_as(log):
            yield log
    finally:
        _job_parent = previous


@contextmanager
def stage(
    uri: str,
    name: str,
    kind: str,
    experiment: str = DEFAULT_EXPERIMENT,
    system_metrics: bool = False,
    spill_dir: str | None = None,
) -> Iterator[RunLogger]:
    """A new run for one stage (generate, evaluate), lasting as long as the block; a child of the current job."""
    log = _keyed_logger(uri, name, kind, experiment, spill_dir, top=False)
    with ended_as(log), system_metrics_logged(log, system_metrics):
        yield log


@contextmanager
def system_metrics_logged(log: RunLogger, on: bool = True) -> Iterator[None]:
    """MLflow's system metrics (CPU, memory, disk, network, GPU when there is one) of this machine,
    every $MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10) while the block runs, and once
    at its end. MLflow's collectors and names (system/..., its System metrics tab), sent through the
    run's retrying sender: MLflow's own monitor stops for good at the first request an outage fails."""
    if not on:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    # never started; without a run (server down at creation) its points go to the spill file from 0
    monitor = SystemMetricsMonitor(log.run_id, resume_logging=log.run_id is not None, tracking_uri=log.uri)
    stop = threading.Event()

    def sample(step: int) -> None:
        monitor.collect_metrics()
        values = monitor.aggregate_metrics()
        for m in monitor.monitors:
            m.clear_metrics()
        try:
            log.metrics({f"system/{k}": v for k, v in values.items()}, step)
        except Exception as e:  # noqa: BLE001 - refused by the server: the job goes on
            logging.getLogger(__name__).warning("system metrics of run %s not logged: %s", log.run_id, e)

    def loop() -> None:
        step = getattr(monitor, "_logging_step", 0)  # after the points of an earlier (resumed) attempt
        monitor.collect_metrics()  # CPU use is measured from one sample to the next
        for m in monitor.monitors:
            m.clear_metrics()
        last = time.time()
        while not stop.wait(monitor.sampling_interval):
            sample(step)
            step, last = step + 1, time.time()
        if time.time() - last >= 1.0:  # the block's last stretch (a short block: its only point)
            sample(step)

    thread = threading.Thread(target=loop, name="mlflow-system-metrics", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


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
    log.inputs(inputs)


# -- commands other than train: open a run that an outage does not stop, deliver its calls at the end ---


def open_run(
    uri: str,
    run_name: str,
    spill_dir: str,
    experiment: str = DEFAULT_EXPERIMENT,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    key: str | None = None,
    wait_s: float | None = None,
) -> RunLogger:
    """A RunLogger on the run find_or_create_run finds or makes (after delivering what an earlier
    attempt left in `spill_dir`). If the server stays down for `wait_s`, the command goes on: the
    logger keeps its calls, makes the run and sends them once the server answers, and spills what is
    left at its end into `spill_dir`; close()/deliver() upload that. `wait_s` 0: nothing is asked
    now, the first call makes the run (for callers that must not stall, e.g. a Tune trial)."""
    spec = {"run_name": run_name, "experiment": experiment, "tags": tags, "parent_run_id": parent_run_id, "key": key}
    parent = _job_parent if parent_run_id is None else None  # a run made later stays the job's child
    if wait_s == 0:
        return RunLogger(uri, None, spill_dir, spec, parent)
    try:
        run_id = find_or_create_run(uri, wait_s=wait_s, **spec)
        upload_spills(uri, run_id, spill_dir, wait_s)
    except TrackingUnavailable as e:
        _going_on(e, spill_dir)
        return RunLogger(uri, None, spill_dir, spec, parent)
    return RunLogger(uri, run_id, spill_dir, spec, parent)


def _going_on(e: TrackingUnavailable, spill_dir: str) -> None:
    log.warning(
        "%s; going on without it: calls are sent when the server is back, else written to %s and "
        "uploaded at the end (or by upload_spills)",
        e,
        spill_dir,
    )


def close(logger: RunLogger, status: str = "FINISHED", wait_s: float | None = None) -> str | None:
    """End an open_run run: its last calls sent (waiting up to `wait_s`, default run_wait_s(), for a
    server that is down), what is left spilled, then delivered. Returns the run id (None: never made)."""
    wait_s = run_wait_s() if wait_s is None else wait_s
    logger.finish(status, timeout=wait_s)
    return deliver(logger, wait_s) if logger.spill_dir else logger.run_id


def ensure_run(logger: RunLogger, wait_s: float | None = None) -> str | None:
    """The logger's run id, made now if the server answers within `wait_s`: its queued calls go first
    (through the sender, which makes the run, so it is made once), what is left is spilled, then a run
    still missing is found or made here. None: the server stayed down."""
    logger.flush(wait_s)
    if logger.run_id is None and logger.spec is not None:
        try:
            retrying(logger.make_run, f"creating MLflow run {logger.spec['run_name']!r}", logger.uri, wait_s)
        except TrackingUnavailable as e:
            log.warning("%s; MLflow calls left in %s (run_logger.upload_spills delivers them)", e, logger.spill_dir)
    return logger.run_id


def deliver(logger: RunLogger, wait_s: float | None = None) -> str | None:
    """After logger.finish(): the run (made now if the server was down until now) receives what was
    spilled into logger.spill_dir. A server still down for `wait_s` leaves the files there, with a
    warning; returns the run id (None: never made)."""
    if ensure_run(logger, wait_s) is not None:
        try:
            upload_spills(logger.uri, logger.run_id, logger.spill_dir, wait_s)
        except TrackingUnavailable as e:
            log.warning("%s; MLflow calls left in %s (run_logger.upload_spills delivers them)", e, logger.spill_dir)
    return logger.run_id


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
