"""MLflow: the default store (a sqlite file in the working directory), run lookup by name, artifacts.

Workers log through `MlflowClient` with an explicit run id, so only rank 0 writes and a resumed job
keeps writing into the same MLflow run. `MLFLOW_TRACKING_URI` points everything at a server.
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
from collections import deque
from pathlib import Path
from typing import Any

log = logging.getLogger("medi_dist.tracking")

DEFAULT_EXPERIMENT = "medi-dist"
RUN_NAME_TAG = "medi_dist.run_name"


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
    if exp is not None:
        return exp.experiment_id
    return c.create_experiment(name, artifact_location=artifact_root(c.tracking_uri))


def find_or_create_run(
    uri: str,
    run_name: str,
    experiment: str = DEFAULT_EXPERIMENT,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    key: str | None = None,
) -> str:
    """The run tagged with `key` (default: the run name), so a resumed job keeps its run, or a new one."""
    c = client(uri)
    exp = experiment_id(c, experiment)
    key = key or run_name
    found = c.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = {RUN_NAME_TAG: key, **(tags or {})}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    return c.create_run(exp, run_name=run_name, tags=tags).info.run_id


# Outages: how long a caller waits for a call before leaving it queued, the longest pause between
# retries, and how long finish()/flush() wait for the server to come back before spilling to a file.
WAIT_S = 10.0
BACKOFF_MAX_S = 30.0
FINAL_WAIT_S = 300.0
# MLflow error codes of a server that is down, restarting or overloaded (retried; others are the caller's)
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}


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


class RunLogger:
    """One MLflow run; safe to pickle into Ray workers (client and sender made lazily).

    A tracking outage never ends a training, generation or study: every call goes through one sender
    thread, in order, retried with backoff while the server is unreachable. A caller waits up to
    WAIT_S for its call (so while the server is up, logging is synchronous and a refused call raises
    as before); past that it goes on and the call stays queued, and later calls queue behind it
    without waiting, until the server is back. finish()/flush() wait up to FINAL_WAIT_S for the queue
    to drain, then write what is left to a JSON-lines file and say where."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id, self._c = uri, run_id, None
        self._queue: deque[_Call] = deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self.retries = 0  # failed attempts that were retried (outages seen)

    def __getstate__(self):
        return {"uri": self.uri, "run_id": self.run_id}

    def __setstate__(self, state):
        self.__init__(state["uri"], state["run_id"])

    @property
    def c(self):
        if self._c is None:
            self._c = client(self.uri)
        return self._c

    # -- the sender ---------------------------------------------------------------------------------

    def _send(self, kind: str, **payload) -> None:
        call = _Call(kind, payload)
        with self._cv:
            backlog = bool(self._queue)
            self._queue.append(call)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mlflow-sender", daemon=True)
                self._thread.start()
                atexit.register(self.flush)  # a process that ends without finish() still delivers
            self._cv.notify()
        if not backlog and call.done.wait(WAIT_S) and call.error is not None:
            raise call.error  # refused by a reachable server (a bad value): the caller's mistake, as before

    def _run(self) -> None:
        delay = 1.0
        while True:
            with self._cv:
                while not self._queue:
                    self._cv.wait()
                call = self._queue[0]
            try:
                self._do(call.kind, **call.payload)
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
                log.warning("MLflow refused %s for run %s: %s", call.kind, self.run_id, e)
            delay = 1.0
            with self._cv:
                self._queue.popleft()
                self._cv.notify_all()
            call.done.set()

    def _do(self, kind: str, **p) -> None:
        from mlflow.entities import Metric, Param

        c = self.c
        if kind == "params":
            existing = c.get_run(self.run_id).data.params
            new = [Param(k, v) for k, v in p["params"].items() if k not in existing]
            for i in range(0, len(new), 100):
                c.log_batch(self.run_id, params=new[i : i + 100])
        elif kind == "metrics":
            c.log_batch(self.run_id, metrics=[Metric(k, v, p["ts"], p["step"]) for k, v in p["metrics"].items()])
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
        elif kind == "terminated":
            c.set_terminated(self.run_id, p["status"])

    def flush(self, timeout: float | None = None) -> Path | None:
        """Wait for every queued call (up to FINAL_WAIT_S); what is left goes to a JSON-lines file,
        whose path is returned (None: all delivered)."""
        deadline = time.time() + (FINAL_WAIT_S if timeout is None else timeout)
        with self._cv:
            while self._queue and time.time() < deadline:
                self._cv.wait(min(1.0, max(deadline - time.time(), 0.01)))
            left = list(self._queue)
        if not left:
            return None
        spill = Path(tempfile.gettempdir()) / f"medi-dist-mlflow-{self.run_id}-{os.getpid()}.jsonl"
        with open(spill, "a") as f:
            for call in left:
                if call.kind != "artifact":  # artifacts are counted, not copied
                    f.write(json.dumps({"run_id": self.run_id, "kind": call.kind, **call.payload}, default=str) + "\n")
        log.warning(
            "MLflow at %s still unreachable after %.0f s: %d call(s) of run %s not delivered "
            "(%d artifacts dropped); written to %s",
            self.uri,
            FINAL_WAIT_S if timeout is None else timeout,
            len(left),
            self.run_id,
            sum(c.kind == "artifact" for c in left),
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

    def finish(self, status: str = "FINISHED") -> None:
        self._send("terminated", status=status)
        self.flush()


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
