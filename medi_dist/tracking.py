"""MLflow for user-level jobs: a job's parent run (job), a stage's child run (stage, ended_as), an
earlier job's run adopted into this one (adopt_run), dataset inputs (log_datasets) and system
metrics (system_metrics_logged).

A user-level job is one parent run: `job()` (the demo) makes every run created inside its block a
child; `MEDI_DIST_PARENT_RUN=NAME` (or `--parent-run NAME`) does the same across separate commands
(train, generate, evaluate), the parent running from its first stage's start to its last stage's end.

The layers below: mlflow_store (the store, runs by name, parent runs), run_logger (RunLogger: every
call of a run through one retrying sender; outages) and run_delivery (spilled calls uploaded;
open_run/close for the commands other than train). The names of theirs that other modules use are
imported from here as well (__all__); their tuning constants (WAIT_S, FINAL_WAIT_S, MAX_POINTS) are
not: they are read, and set, where they are defined.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import mlflow_store, run_logger
from .mlflow_store import (
    DEFAULT_EXPERIMENT,
    EXPERIMENT_KIND_TAG,
    KIND_TAG,
    MODEL_TRAINING,
    PARENT_ENV,
    PARENT_TAG,
    RUN_NAME_TAG,
    SPILL_DIR,
    client,
    current_parent,
    experiment_id,
    flatten,
    new_run,
    tracking_uri,
    transient,
    ui_link,
)
from .run_delivery import _going_on, close, open_run, upload_spills
from .run_logger import RunLogger, TrackingUnavailable, find_or_create_run, retrying, run_wait_s

log = logging.getLogger("medi_dist.tracking")

__all__ = [  # this module's own names, and those that other modules import from it
    "EXPERIMENT_KIND_TAG",
    "MODEL_TRAINING",
    "PARENT_ENV",
    "PARENT_TAG",
    "SPILL_DIR",
    "RunLogger",
    "TrackingUnavailable",
    "adopt_run",
    "client",
    "close",
    "dataset_digest",
    "ended_as",
    "find_or_create_run",
    "flatten",
    "job",
    "log_datasets",
    "open_run",
    "retrying",
    "run_wait_s",
    "stage",
    "system_metrics_logged",
    "tracking_uri",
    "transient",
    "ui_link",
    "upload_spills",
]


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
        return RunLogger(uri, None, spill_dir, spec, None if top else mlflow_store._job_parent)


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
    log = _keyed_logger(uri, name, kind, experiment, spill_dir, top=True)
    previous, mlflow_store._job_parent = mlflow_store._job_parent, log  # read by current_parent, open_run
    try:
        with ended_as(log):
            yield log
    finally:
        mlflow_store._job_parent = previous


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
