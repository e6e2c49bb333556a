"""A run's MLflow calls through one retrying sender (RunLogger), so a tracking outage never ends a
training, generation or study; run creation retried with backoff (find_or_create_run, retrying);
calls the server did not take in time written to a spill file (write_spill; run_delivery uploads
them when the server is back).

Outages: a caller waits up to WAIT_S for its call, retries pause at most BACKOFF_MAX_S, and
finish()/flush() wait FINAL_WAIT_S for the server to come back before spilling; run creation waits
run_wait_s() ($MEDI_DIST_MLFLOW_WAIT_S). Which errors count as an outage: mlflow_store.transient.
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
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .mlflow_store import DEFAULT_EXPERIMENT, KIND_TAG, PARENT_TAG, _find_or_create_run, client, flatten, transient

log = logging.getLogger("medi_dist.tracking")  # one logger for all MLflow messages (tracking's)

# Outages: how long a caller waits for a call before leaving it queued, the longest pause between
# retries, and how long finish()/flush() wait for the server to come back before spilling to a file.
WAIT_S = 10.0
BACKOFF_MAX_S = 30.0
FINAL_WAIT_S = 300.0


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
