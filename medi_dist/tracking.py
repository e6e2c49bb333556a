"""MLflow: the default store (a sqlite file in the working directory), run lookup by name, artifacts,
parent runs for user-level jobs, dataset inputs and system metrics.

Workers log through `MlflowClient` with an explicit run id, so only rank 0 writes and a resumed job
keeps writing into the same MLflow run. `MLFLOW_TRACKING_URI` points everything at a server.

A user-level job is one parent run: `job()` (the demo) makes every run created inside its block a
child; `MEDI_DIST_PARENT_RUN=NAME` (or `--parent-run NAME`) does the same across separate commands
(train, generate, evaluate), the parent running from its first stage's start to its last stage's end.
"""

from __future__ import annotations

import atexit
import io
import json
import logging
import os
import tempfile
import threading
import time
import uuid
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("medi_dist.tracking")
# MLflow's client retries a refused connection itself for about 4 minutes (7 tries, backoff up to
# 120 s) before a call returns; our retries (retrying, RunLogger) bound the waits, so MLflow's own
# are kept short (about 5 s) unless the user set them.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")

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
        return find_or_create_run(uri, found[0].info.run_name, experiment, key=key, wait_s=WAIT_S)
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


# Outages: how long a caller waits for a call before leaving it queued, the longest pause between
# retries, and how long finish()/flush() wait for the server to come back before spilling to a file.
WAIT_S = 10.0
BACKOFF_MAX_S = 30.0
FINAL_WAIT_S = 300.0
# MLflow error codes of a server that is down, restarting or overloaded (retried; others are the caller's)
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


class TrackingUnavailable(RuntimeError):
    """The tracking server stayed unreachable for the whole wait (run creation, RunLogger.call)."""


def run_wait_s() -> float:
    """How long run creation waits for an unreachable server ($MEDI_DIST_MLFLOW_WAIT_S, default FINAL_WAIT_S)."""
    return float(os.environ.get("MEDI_DIST_MLFLOW_WAIT_S", FINAL_WAIT_S))


def retrying(fn, what: str, uri: str, wait_s: float | None = None):
    """fn(), retried with backoff (1 s doubling to BACKOFF_MAX_S) while its errors are transient, for
    up to `wait_s` (default run_wait_s()); then TrackingUnavailable. Other errors raise at once."""
    deadline = time.time() + (run_wait_s() if wait_s is None else wait_s)
    delay = 1.0
    while True:
        try:
            return fn()
        except Exception as e:
            if not transient(e):
                raise
            left = deadline - time.time()
            first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            if left <= 0:
                raise TrackingUnavailable(f"{what}: MLflow at {uri} unreachable ({first})") from e
            log.warning("%s: MLflow at %s unreachable (%s); retrying in %.0f s", what, uri, first, min(delay, left))
            time.sleep(min(delay, left))
            delay = min(delay * 2, BACKOFF_MAX_S)


def transient(e: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return e.error_code in TRANSIENT_CODES
    return isinstance(e, (OSError, ConnectionError, TimeoutError)) or type(e).__module__.startswith(
        ("requests", "urllib3", "sqlalchemy")
    )


class _Call:
    """One queued MLflow call; `done` is set once it was delivered or refused."""

    def __init__(self, kind: str, payload: dict):
        self.kind, self.payload, self.error = kind, payload, None
        self.done = threading.Event()
        self.result: Any = None  # what the call returned (RunLogger.call)
        self.cancelled = False  # its caller stopped waiting (RunLogger.call): dropped, not sent

    @property
    def what(self) -> str:
        return self.payload.get("what", self.kind)


class RunLogger:
    """One MLflow run; safe to pickle into Ray workers (client and sender made lazily).

    A tracking outage never ends a training, generation or study: every call goes through one sender
    thread, in order, retried with backoff while the server is unreachable. A caller waits up to
    WAIT_S for its call (so while the server is up, logging is synchronous and a refused call raises
    as before); past that it goes on and the call stays queued, and later calls queue behind it
    without waiting, until the server is back. finish()/flush() wait up to FINAL_WAIT_S for the queue
    to drain, then write what is left to a JSON-lines file and say where: in `spill_dir` (a training
    passes its run folder; upload_spills delivers it later), else the temp folder.

    `run_id` None: the run could not be created (server down). With `spec` (find_or_create_run's
    arguments, see open_run) the sender creates it once the server answers, and the calls follow;
    without, every call goes to the spill file. `parent`: the logger of the job the run was opened in
    (job()); a run made later is its child (the job's run made first if need be)."""

    def __init__(
        self,
        uri: str,
        run_id: str | None,
        spill_dir: str | None = None,
        spec: dict | None = None,
        parent: RunLogger | None = None,
    ):
        self.uri, self.run_id, self.spill_dir, self.spec, self._c = uri, run_id, spill_dir, spec, None
        self.parent = parent
        self._making = threading.Lock()  # the sender and ensure_run may both make the run: once
        self._queue: deque[_Call] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self.retries = 0  # failed attempts that were retried (outages seen)

    def __getstate__(self):
        return {
            "uri": self.uri,
            "run_id": self.run_id,
            "spill_dir": self.spill_dir,
            "spec": self.spec,
            "parent": self.parent,
        }

    def __setstate__(self, state):
        self.__init__(state["uri"], state["run_id"], state.get("spill_dir"), state.get("spec"), state.get("parent"))

    @property
    def c(self):
        if self._c is None:
            self._c = client(self.uri)
        return self._c

    # -- the sender ---------------------------------------------------------------------------------

    def _send(self, kind: str, **payload) -> None:
        call = _Call(kind, payload)
        backlog = self._enqueue(call)
        if not backlog and call.done.wait(WAIT_S) and call.error is not None:
            raise call.error  # refused by a reachable server (a bad value): the caller's mistake, as before

    def _enqueue(self, call: _Call) -> bool:
        """Queue `call` for the sender; True when calls were waiting before it (an outage)."""
        with self._cv:
            backlog = bool(self._queue)
            self._queue.append(call)
            if self.run_id is None and self.spec is None:  # no run to send to: kept for the spill file
                if len(self._queue) == 1:
                    atexit.register(self.flush)
                return True  # nothing to wait for
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)
                self._thread.start()
                atexit.register(self.flush)  # a process that ends without finish() still delivers
            self._cv.notify()
        return backlog

    def call(self, what: str, fn: Callable[[Any], Any], timeout: float | None = None) -> Any:
        """`fn(client)` through the sender, after every call queued before it and retried like them
        while the server is unreachable (for calls that must finish before the caller goes on, e.g.
        uploading a folder that is removed afterwards): its result, or the error of a server that
        refused it. Past `timeout` (FINAL_WAIT_S) the call is dropped and TrackingUnavailable raised;
        at once when there is no run (the server was down when it was to be created, and no spec to make it)."""
        if self.run_id is None and self.spec is None:
            raise TrackingUnavailable(
                f"MLflow at {self.uri}: no run (the server was down when it was to be created): {what} not done"
            )
        call = _Call("call", {"what": what, "fn": fn})
        self._enqueue(call)
        wait = FINAL_WAIT_S if timeout is None else timeout
        if not call.done.wait(wait):
            call.cancelled = True
            if not call.done.is_set():
                raise TrackingUnavailable(f"MLflow at {self.uri} unreachable for {wait:.0f} s: {what} not done")
        if call.error is not None:
            raise call.error
        return call.result

    def _run(self) -> None:
        delay = 1.0
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                call = self._queue[0]
            if call.cancelled:  # its caller gave up on it: nothing to deliver
                with self._cv:
                    self._queue.popleft()
                    self._cv.notify_all()
                call.done.set()
                continue
            try:
                call.result = self._do(call.kind, **call.payload)
            except Exception as e:  # noqa: BLE001 - a logging failure must not end the job
                if transient(e):
                    self.retries += 1
                    log.warning(
                        "MLflow at %s unreachable (%s); %d call(s) queued, retrying in %.0f s",
                        self.uri,
                        str(e).splitlines()[0][:200],
                        len(self._queue),
                        delay,
                    )
                    time.sleep(delay)
                    delay = min(delay * 2, BACKOFF_MAX_S)
                    continue
                call.error = e
                log.warning("MLflow refused %s for run %s: %s", call.what, self.run_id, e)
            delay = 1.0
            with self._cv:
                if self._queue and self._queue[0] is call:  # not already spilled by flush()
                    self._queue.popleft()
                self._cv.notify_all()
            call.done.set()

    def _do(self, kind: str, **p) -> Any:
        from mlflow.entities import Metric, Param

        c = self.c
        self.make_run()
        if kind == "params":
            existing = c.get_run(self.run_id).data.params
            new = [Param(k, v) for k, v in p["params"].items() if k not in existing]
            for i in range(0, len(new), 100):
                c.log_batch(self.run_id, params=new[i : i + 100])
        elif kind == "metrics":
            c.log_batch(self.run_id, metrics=[Metric(k, v, p["ts"], p["step"]) for k, v in p["metrics"].items()])
        elif kind == "points":  # several metrics calls joined by upload_spills: (key, value, ts, step)
            c.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in p["points"]])
        elif kind == "tags":
            for k, v in p["tags"].items():
                c.set_tag(self.run_id, k, v)
        elif kind == "artifact":
            with tempfile.TemporaryDirectory() as d:
                f = Path(d) / p["name"]
                f.write_bytes(p["data"])
                c.log_artifact(self.run_id, str(f), p["folder"])
        elif kind == "status":
            c.update_run(self.run_id, status=p["status"])
        elif kind == "inputs":
            c.log_inputs(self.run_id, datasets=[_dataset_input(d) for d in p["datasets"]])
        elif kind == "call":
            return p["fn"](c)
        elif kind == "terminated":
            c.set_terminated(self.run_id, p["status"])
            parent = c.get_run(self.run_id).data.tags.get(PARENT_TAG)
            if parent and c.get_run(parent).data.tags.get(KIND_TAG) == "job":  # a named job ends with its last stage
                c.set_terminated(parent, p["status"])

    def make_run(self) -> str:
        """The run, made now (or found, if made by an earlier try) if the server was down when it was
        opened, as a child of `parent` (made first if need be); one try, errors raise. None: no run
        and no spec to make one."""
        with self._making:
            if self.run_id is None and self.spec is not None:
                spec = self.spec
                if spec.get("parent_run_id") is None and self.parent is not None:
                    spec = {**spec, "parent_run_id": self.parent.make_run() or ""}
                self.run_id = _find_or_create_run(self.uri, **spec)
            return self.run_id

    def flush(self, timeout: float | None = None) -> str | None:
        """Wait for every queued call (up to FINAL_WAIT_S); what is left leaves the queue for a
        JSON-lines file, whose path is returned (None: all delivered). A call in flight at that moment
        may still arrive as well (then it is there twice after upload_spills)."""
        deadline = time.time() + (FINAL_WAIT_S if timeout is None else timeout)
        with self._cv:
            while self._queue and (self.run_id or self.spec) and time.time() < deadline:
                self._cv.wait(min(1.0, max(deadline - time.time(), 0.01)))
            left = list(self._queue)
            self._queue.clear()  # spilled below, uploaded later: not also sent (nor waited for at exit)
        for call in left:
            call.done.set()
        if not left:
            return None
        stem = f"medi-dist-mlflow-{self.run_id or 'no-run'}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        lines = []
        for i, call in enumerate(left):
            p = call.payload
            if call.kind == "call":  # a function (an upload whose caller gave up): counted, not copied
                continue
            if call.kind == "artifact":  # its bytes in a file beside, written first (the line names it)
                write_spill(self.spill_dir, f"{stem}.{i}.artifact", p["data"])
                p = {"file": f"{stem}.{i}.artifact", "name": p["name"], "folder": p["folder"]}
            lines.append(json.dumps({"run_id": self.run_id, "kind": call.kind, **p}, default=str) + "\n")
        spill = write_spill(self.spill_dir, f"{stem}.jsonl", "".join(lines))
        why = (
            "unreachable when the run was to be created"
            if self.run_id is None and self.spec is None
            else f"still unreachable after {FINAL_WAIT_S if timeout is None else timeout:.0f} s"
        )
        log.warning(
            "MLflow at %s %s: %d call(s) of run %s not delivered (%d uploads dropped); written to %s "
            "(upload_spills delivers them)",
            self.uri,
            why,
            len(left),
            self.run_id,
            sum(c.kind == "call" for c in left),
            spill,
        )
        return spill

    # -- what callers log ---------------------------------------------------------------------------

    def params(self, params: dict[str, Any]) -> None:
        self._send("params", params={k: str(v)[:6000] for k, v in flatten(params).items()})

    def metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        # stamped now: buffered points keep the time they were measured
        self._send(
            "metrics", metrics={k: float(v) for k, v in metrics.items()}, ts=int(time.time() * 1000), step=step or 0
        )

    def tags(self, tags: dict[str, str]) -> None:
        self._send("tags", tags={k: str(v) for k, v in tags.items()})

    def artifact_bytes(self, data: bytes, name: str, folder: str | None = None) -> None:
        self._send("artifact", data=data, name=name, folder=folder)

    def figure(self, fig, name: str, folder: str | None = None) -> None:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        self.artifact_bytes(buf.getvalue(), name, folder)

    def status(self, status: str) -> None:
        self._send("status", status=status)

    def inputs(self, datasets: list) -> None:
        """Dataset inputs (mlflow.entities.DatasetInput), as log_datasets builds them; queued as plain
        dicts, so a spilled call is JSON and upload_spills sends it as it was."""
        self._send("inputs", datasets=[d.to_dictionary() for d in datasets])

    def finish(self, status: str = "FINISHED", timeout: float | None = None) -> None:
        self._send("terminated", status=status)  # a named job's parent run ends with it (see _do)
        self.flush(timeout)


def _dataset_input(d: dict):
    """A DatasetInput from its to_dictionary() form (MLflow's from_dictionary does not read that back)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    return DatasetInput(Dataset.from_dictionary(d["dataset"]), [InputTag(k, v) for k, v in d["tags"].items()])


# -- calls that could not be delivered: a JSON-lines file each, uploaded when the server is back --------


def _fs(folder: str):
    """(pyarrow filesystem, path) of a local folder or an object-storage URI."""
    import pyarrow.fs as pafs

    from .storage import filesystem

    return filesystem(folder) if "://" in folder else (pafs.LocalFileSystem(), folder)


def write_spill(folder: str | None, name: str, data: str | bytes) -> str:
    """Write `data` as `folder`/`name` (default: the temp folder); returns where."""
    folder = folder or tempfile.gettempdir()
    fs, root = _fs(folder)
    fs.create_dir(root, recursive=True)
    with fs.open_output_stream(f"{root}/{name}") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return f"{folder.rstrip('/')}/{name}"


MAX_POINTS = 1000  # metric points per log_batch when uploading (MLflow's limit per request)


def upload_spills(uri: str, run_id: str, folder: str, wait_s: float | None = None) -> int:
    """Deliver the calls spilled into `folder` (RunLogger.flush) to run `run_id`, oldest file first,
    each request retried while the server is unreachable (up to `wait_s` each); consecutive metrics
    calls go as one log_batch of up to MAX_POINTS points. After each request `<file>.sent` records how
    many lines are in, so an upload cut short (TrackingUnavailable, a killed process) resumes after
    them instead of sending the file again; a file is removed once all its calls are in. A file
    written when its run existed goes to that run (an earlier attempt's leftovers, e.g. of a stage that
    makes a new run each time, are not mixed into this one); one written before any run was made goes
    to `run_id`. Returns the calls delivered by this upload."""
    import pyarrow.fs as pafs

    fs, root = _fs(folder)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    files = sorted((i for i in infos if i.base_name.endswith(".jsonl")), key=lambda i: (i.mtime_ns or 0, i.path))
    senders, n = {}, 0
    for info in files:
        with fs.open_input_stream(info.path) as f:
            calls = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
        to = (calls[0].get("run_id") if calls else None) or run_id  # one flush of one logger: one run
        sender = senders.setdefault(to, RunLogger(uri, to))
        sent_path = info.path + ".sent"
        done = start = _read_count(fs, sent_path)
        while done < len(calls):
            end, kind, payload = _next_request(calls, done)
            if kind == "artifact":
                with fs.open_input_stream(f"{root}/{payload.pop('file')}") as f:
                    payload["data"] = f.read()
            retrying(lambda k=kind, p=payload, s=sender: s._do(k, **p), f"uploading spilled {kind}", uri, wait_s)
            n, done = n + end - done, end
            with fs.open_output_stream(sent_path) as f:  # confirmed: not sent again by a later upload
                f.write(str(done).encode())
        fs.delete_file(info.path)
        for call in calls:  # the artifacts' files, once their lines are all in
            if call["kind"] == "artifact":
                fs.delete_file(f"{root}/{call['file']}")
        if done:
            fs.delete_file(sent_path)
        log.info("MLflow: %d spilled call(s) from %s delivered to run %s", done - start, info.path, to)
    return n


def _read_count(fs, path: str) -> int:
    try:
        with fs.open_input_stream(path) as f:
            return int(f.read().decode() or 0)
    except OSError:  # none yet (pyarrow: FileNotFoundError locally, OSError on object storage)
        return 0


def _next_request(calls: list[dict], i: int) -> tuple[int, str, dict]:
    """(index after the request, kind, payload) of the request that delivers calls[i:]: one call, or
    the consecutive metrics calls from i joined into `points` (at most MAX_POINTS, at least one call)."""
    call = {k: v for k, v in calls[i].items() if k not in ("run_id", "kind")}
    if calls[i]["kind"] != "metrics":
        return i + 1, calls[i]["kind"], call
    points: list = []
    while i < len(calls) and calls[i]["kind"] == "metrics":
        c = calls[i]
        new = [(k, v, c["ts"], c["step"]) for k, v in c["metrics"].items()]
        if points and len(points) + len(new) > MAX_POINTS:
            break
        points += new
        i += 1
    return i, "points", {"points": points}


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
            log.warning("%s; MLflow calls left in %s (tracking.upload_spills delivers them)", e, logger.spill_dir)
    return logger.run_id


def deliver(logger: RunLogger, wait_s: float | None = None) -> str | None:
    """After logger.finish(): the run (made now if the server was down until now) receives what was
    spilled into logger.spill_dir. A server still down for `wait_s` leaves the files there, with a
    warning; returns the run id (None: never made)."""
    if ensure_run(logger, wait_s) is not None:
        try:
            upload_spills(logger.uri, logger.run_id, logger.spill_dir, wait_s)
        except TrackingUnavailable as e:
            log.warning("%s; MLflow calls left in %s (tracking.upload_spills delivers them)", e, logger.spill_dir)
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
