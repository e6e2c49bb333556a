"""The resilient MLflow run logger: every call of a run goes through one sender thread, in order,
retried with backoff while the tracking server is down or restarting (RunLogger, retrying); what the
server never took is spilled to JSON-lines files (write_spill) and delivered when it is back
(upload_spills).

The run lifecycle (store, run lookup and creation, job parents, open_run/close) is in tracking.py,
which imports this module: the few lifecycle names used here (client, run creation, flatten, the run
tags) are imported where they are used, never when this module is imported.
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

# the logger of all MLflow tracking messages (this module's and tracking.py's), as before the split
log = logging.getLogger("medi_dist.tracking")
# MLflow's client retries a refused connection itself for about 4 minutes (7 tries, backoff up to
# 120 s) before a call returns; our retries (retrying, RunLogger) bound the waits, so MLflow's own
# are kept short (about 5 s) unless the user set them.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")

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
            from .tracking import client

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

        from .tracking import KIND_TAG, PARENT_TAG

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
        from .tracking import _find_or_create_run

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
        from .tracking import flatten

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
