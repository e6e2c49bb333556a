"""`medi-dist demo --out s3://…` (or gs://): the demo runs in a local staging folder, kept in the
cache (MEDI_DIST_CACHE/demo/<hash of the URI>) so an interrupted run continues there, and its
output folder is uploaded at the end. results.json is the marker: an earlier output's marker is
removed before anything is replaced and the new one is uploaded last, so an upload cut short never
looks like a finished demo. The demo's classifier-feature cache (`cache/`) stays local."""

from __future__ import annotations

import hashlib
from pathlib import Path

from .demo import OUTPUTS
from .storage import Folder, cache_dir, upload_folder, upload_names

MARKERS = ("results.txt", "results.json")  # written last by the demo; results.json marks it complete
LOCAL_ONLY = ("cache",)


def staging_dir(uri: str) -> Path:
    return cache_dir() / "demo" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


def check_remote_out(uri: str) -> None:
    """Like demo.check_out for a URI: only an earlier demo's output may be replaced."""
    dest = Folder(uri)
    dest.check_bucket()
    top = sorted({rel.split("/", 1)[0] for rel in dest.files()})
    if "dataset.json" in top or "index.parquet" in top:
        raise FileExistsError(f"--out {uri} is a dataset directory, not a demo output; choose a new URI")
    foreign = [n for n in top if n not in OUTPUTS]
    if foreign:
        raise FileExistsError(
            f"--out {uri} holds files that are not the demo's ({', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''}); choose a new URI, or an earlier demo's output"
        )


def upload_demo(staging: Path, uri: str) -> None:
    """Replace what `uri` holds by the demo output in `staging` (markers last; see the module doc)."""
    dest = Folder(uri)
    dest.check_bucket()
    for name in reversed(MARKERS):  # the earlier output stops reading as complete first
        if dest.exists(name):
            dest.delete(name)
    keep = set(upload_names(staging, LOCAL_ONLY))
    for rel in dest.files():  # an earlier run's files this one did not write
        if rel not in keep:
            dest.delete(rel)
    upload_folder(staging, uri, last=MARKERS, leave_out=LOCAL_ONLY)
