"""Delivering what an MLflow outage held back: upload_spills sends the calls a RunLogger spilled to
a file, and the commands other than train open their run with open_run (an outage does not stop
the command: the run is made once the server answers) and end it with close (the last calls sent,
what is left spilled, then uploaded; ensure_run and deliver are its steps).
"""

from __future__ import annotations

import json
import logging

from . import mlflow_store
from .mlflow_store import DEFAULT_EXPERIMENT
from .run_logger import RunLogger, TrackingUnavailable, _fs, find_or_create_run, retrying, run_wait_s

log = logging.getLogger("medi_dist.tracking")  # one logger for all MLflow messages (tracking's)

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
    parent = mlflow_store._job_parent if parent_run_id is None else None  # a run made later stays the job's child
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
