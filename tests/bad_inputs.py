"""Helpers for the bad-input tests (test_bad_tiles.py, test_bad_artifacts.py): tiles in odd
formats, manifests, ingest, shard rewriting, the CLI, and the good dataset both suites start from."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medi_dist.data import sources
from medi_dist.data.ingest import ingest
from medi_dist.data.procedural import render_tile
from medi_dist.data.records import SkipLog
from medi_dist.data.shards import INDEX, MANIFEST, file_sha256
from medi_dist.data.split import SplitConfig

REPO = Path(__file__).resolve().parents[1]
SITES = [f"S{i}" for i in range(6)]
N_GOOD = 24


def tile_bytes(seed: int, size: int | tuple[int, int] = 32, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    w, h = (size, size) if isinstance(size, int) else size
    arr = render_tile("GLAND", "A1", np.random.default_rng(seed), max(w, h))[:h, :w]
    im = Image.fromarray(arr)
    im = im if mode == "RGB" else im.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_raw(width: int, height: int, depth: int, color: int, raw: bytes) -> bytes:
    """A PNG by hand: PIL writes neither 16-bit RGB nor a header that lies about its size."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(raw))
        + _png_chunk(b"IEND", b"")
    )


def png16_rgb(arr: np.ndarray) -> bytes:
    h, w, _ = arr.shape
    return png_raw(w, h, 16, 2, b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h)))


def write_manifest(root: Path, extra=(), rows_meta: dict[int, dict] | None = None, **all_meta) -> Path:
    """A manifest CSV of N_GOOD good 32-px JPEG tiles (2 types x 6 sites) plus `extra` rows
    ({"name": file name, "data": bytes, **metadata}); rows_meta overrides metadata of given rows."""
    rows = []

    def add(name: str, data: bytes, **meta) -> None:
        p = root / "img" / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        i = len(rows)
        rows.append(
            {
                "path": f"img/{name}",
                "cancer_type": "AB"[i % 2],
                "tissue_source_site": SITES[i % 6],
                "slide_id": f"slide{i // 4}",
                "age": 40 + i,
                "key": "",
                **all_meta,
                **(rows_meta or {}).get(i, {}),
                **meta,
            }
        )

    for i in range(N_GOOD):
        add(f"t{i}.jpg", tile_bytes(i))
    for e in extra:
        add(**e)
    path = root / "m.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def ingest_csv(csv: Path, out: Path, **kw) -> tuple[SkipLog, pd.DataFrame, dict]:
    skips = SkipLog()
    manifest = ingest(sources.manifest(csv, skips), out, SplitConfig(0.3, seed=0), skips, **kw)
    return skips, pd.read_parquet(out / INDEX), manifest


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*")) if p.is_file()}


def rewrite_shard(ds: Path, change) -> Path:
    """Rewrite the dataset's first shard as change([(name, bytes), ...]) and update dataset.json to
    match, as a hand-made or foreign shard would look (so only structure checks can catch it)."""
    manifest = json.loads((ds / MANIFEST).read_text())
    entry = manifest["shards"][0]
    path = ds / entry["path"]
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # in memory only
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in change(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    entry["bytes"], entry["sha256"] = path.stat().st_size, file_sha256(path)
    (ds / MANIFEST).write_text(json.dumps(manifest))
    return path


def run_cli(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "medi_dist.cli", *args],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"},
    )


def one_error_line(proc: subprocess.Popen, *needles: str) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, (out, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def good_csv(tmp_path_factory) -> Path:
    return write_manifest(tmp_path_factory.mktemp("good"))


@pytest.fixture
def good_ds(tmp_path, good_csv) -> Path:
    out = tmp_path / "ds"
    ingest_csv(good_csv, out, shard_mb=0.02)
    return out
