"""The run lease: one driver at a time per run folder (local path or object storage).

A job submitted twice would otherwise run two drivers on one run name: both write the same
checkpoints, and each start's cleanup of unregistered checkpoints could delete the other's newest
one. The first driver writes medi-dist-lease.json (host, pid, since) into the run folder and renews
its heartbeat from a thread; a second driver is refused, naming the holder. A lease whose heartbeat
is older than its ttl, or whose holder is a dead process on this host, is stale and taken over, so
a crashed or killed driver never blocks a re-run for long (on this host: not at all).

Object stores have no create-if-absent, so acquiring is write, settle, re-read: of two drivers
starting within the settle time, only the last writer sees its own record and goes on.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime

from .run_folder import RunFolder

log = logging.getLogger("medi_dist.train")

LEASE_FILE = "medi-dist-lease.json"
TTL_S = 120.0  # a lease not renewed for this long belongs to a driver that is gone
SETTLE_S = 1.0  # time for a concurrent writer's record to land before re-reading


class RunLeaseHeld(ValueError):
    """Another live driver trains this run (the message names it and says what to do)."""


def _now() -> float:
    return time.time()  # wall clock: drivers on different hosts compare heartbeats


def _alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(-1, 0) would ask about every process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale(rec: dict, now: float) -> str | None:
    """Why a lease record no longer binds anyone (None: it does)."""
    if now - float(rec.get("heartbeat", 0)) > float(rec.get("ttl_s", TTL_S)):
        return f"no heartbeat for {now - float(rec.get('heartbeat', 0)):.0f} s"
    if rec.get("host") == socket.gethostname() and not _alive(int(rec.get("pid", -1))):
        return f"pid {rec.get('pid')} is not running on this host"
    return None


class RunLease:
    """`with RunLease(folder):` holds the run's lease for the block (raises RunLeaseHeld if taken)."""

    def __init__(self, folder: RunFolder, ttl_s: float = TTL_S, settle_s: float = SETTLE_S):
        self.folder, self.ttl_s, self.settle_s = folder, ttl_s, settle_s
        self.record = {
            "owner": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
            "ttl_s": ttl_s,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # another driver took the lease while we held it (we stalled past the ttl)

    def _refuse(self, rec: dict) -> RunLeaseHeld:
        age = _now() - float(rec.get("heartbeat", 0))
        return RunLeaseHeld(
            f"run {self.folder.display} is held by another driver (host {rec.get('host')}, pid {rec.get('pid')}, "
            f"since {rec.get('since')}, heartbeat {age:.0f} s ago); wait for it to end, stop it, or use another "
            f"run.name (a lease not renewed for {float(rec.get('ttl_s', TTL_S)):.0f} s expires)"
        )

    def _write(self) -> None:
        self.folder.write_json(LEASE_FILE, {**self.record, "heartbeat": _now()})

    def _mine(self, rec: dict | None) -> bool:
        return rec is not None and rec.get("owner") == self.record["owner"]

    def acquire(self) -> RunLease:
        rec = self.folder.read_json(LEASE_FILE)
        if rec is not None and not self._mine(rec):
            why = _stale(rec, _now())
            if why is None:
                raise self._refuse(rec)
            log.warning(
                "taking over the lease of run %s from host %s pid %s (%s)",
                self.folder.display,
                rec.get("host"),
                rec.get("pid"),
                why,
            )
        self._write()
        time.sleep(self.settle_s)
        rec = self.folder.read_json(LEASE_FILE)
        if not self._mine(rec):  # another driver wrote after us: it goes on, we stop
            raise self._refuse(rec or {})
        self._thread = threading.Thread(target=self._beat, name="run-lease", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                rec = self.folder.read_json(LEASE_FILE)
                if rec is not None and not self._mine(rec):
                    self.lost = True
                    log.error(
                        "run %s: the lease was taken by host %s pid %s (this driver stalled past %.0f s)",
                        self.folder.display,
                        rec.get("host"),
                        rec.get("pid"),
                        self.ttl_s,
                    )
                    return
                self._write()
            except OSError as e:  # storage briefly unreachable: the next beat retries before the ttl runs out
                log.warning("run %s: lease heartbeat failed (%s); retrying", self.folder.display, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if self._mine(self.folder.read_json(LEASE_FILE)):
                self.folder.remove_file(LEASE_FILE)
        except OSError as e:  # it expires on its own
            log.warning(
                "run %s: could not remove the lease (%s); it expires in %.0f s", self.folder.display, e, self.ttl_s
            )

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
