"""Helpers for tests that start their own Ray processes beside the session's cluster."""

from __future__ import annotations

import socket

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_under(root: str) -> list[psutil.Process]:
    """Live processes whose command line names `root` (a Ray temp dir). Zombies are left out: they
    have ended and wait only for their parent to reap them, which on a machine whose PID 1 does not
    reap (some CI containers) may be never."""
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if p.info["status"] != psutil.STATUS_ZOMBIE and root in " ".join(p.info["cmdline"] or []):
            found.append(p)
    return found
