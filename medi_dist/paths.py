"""Paths that may be URIs: a local path is made absolute (Ray workers and Tune trials run in other
folders), a URI (s3://, gs://, ...) is passed through as written."""

from __future__ import annotations

from pathlib import Path


def is_uri(path: str | Path) -> bool:
    return "://" in str(path)


def absolute(path: str) -> str:
    """`path` made absolute unless it is a URI; an empty path stays empty."""
    return str(Path(path).expanduser().resolve()) if path and not is_uri(path) else path
