"""Distributed ingest: units of work as Ray tasks give the same bytes as one process, whatever the
worker count, locally and on object storage; an ingest killed halfway resumes from its finished
units and ends with the same dataset as an uninterrupted one."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest

from medi_dist.data import sources
from medi_dist.data.ingest import Stopped, ingest
from medi_dist.data.procedural import ProceduralConfig
from medi_dist.data.records import SkipLog
from medi_dist.data.split import SplitConfig
from medi_dist.data.wsi import WSIConfig
from medi_dist.storage import Folder

SPLIT = SplitConfig(holdout_fraction=0.25, val_fraction=0.0, seed=5)
PROC = ProceduralConfig(n_types=3, n_sites=6, n_tiles=1100, size=16, seed=2)  # 3 units of <= 512 tiles


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_bytes_for_any_worker_count_and_on_object_storage(ray_cluster, object_store, tmp_path):
    scan = sources.procedural(PROC)
    assert len(scan.units) == 3
    out = {w: tmp_path / f"w{w}" for w in (0, 1, 2)}
    for w, path in out.items():
        ingest(sources.procedural(PROC), path, SPLIT, shard_mb=0.004, workers=w)
    ref = _files(out[0])
    assert len([f for f in ref if f.endswith(".tar")]) > 6  # several shards per unit and split
    assert _files(out[1]) == ref and _files(out[2]) == ref
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w0", "w1", "w2"]  # work folders removed
    uri = object_store.uri("ray-ingest", "w2")
    ingest(sources.procedural(PROC), uri, SPLIT, shard_mb=0.004, workers=2)
    remote = Folder(uri)
    assert sorted(remote.files()) == sorted(ref)
    assert all(remote.read_bytes(f) == b for f, b in ref.items())
    index = pd.read_parquet(out[0] / "index.parquet")
    assert len(index) == 1100 and index["key"].is_unique


def test_wsi_slides_as_ray_tasks(ray_cluster, tmp_path):
    from test_wsi import _plain_slide

    rows = []
    for i in range(4):
        _plain_slide(tmp_path / f"s{i}.png", i)
        rows.append(
            {"path": f"s{i}.png", "slide_id": f"s{i}", "cancer_type": "AB"[i % 2], "tissue_source_site": f"S{i}"}
        )
    pd.DataFrame(rows).to_csv(tmp_path / "slides.csv", index=False)
    cfg = WSIConfig(tile_px=64, mpp=0.5, assume_mpp=0.5)
    for w in (0, 2):
        scan = sources.wsi_scan(tmp_path / "slides.csv", cfg, SkipLog())
        assert len(scan.units) == 4  # one per slide
        ingest(scan, tmp_path / f"wsi{w}", SplitConfig(0.5, seed=1), workers=w)
    assert _files(tmp_path / "wsi0") == _files(tmp_path / "wsi2")


def test_ingest_stopped_halfway_resumes_with_the_same_result(tmp_path):
    """Stopped after 2 of 4 units (as a kill would leave it: a unit's record is written whole, last),
    then run again: the finished units are not redone and the dataset is byte for byte the same."""
    cfg = ProceduralConfig(n_types=3, n_sites=6, n_tiles=2000, size=16, seed=2)  # 4 units
    out = tmp_path / "killed" / "ds"
    with pytest.raises(Stopped, match="stopped after 2 units of 4; run again to finish"):
        ingest(
            sources.procedural(cfg),
            out,
            SplitConfig(holdout_fraction=0.25, val_fraction=0.0, seed=5),
            shard_mb=0.05,
            stop_after_units=2,
        )
    finished = sorted(p.name for p in out.parent.glob(".ds.ingest-*/unit-*.json"))
    assert len(finished) == 2 and not out.exists()  # nothing looks like a dataset
    calls = []
    scan = sources.procedural(cfg)
    scan.units = [lambda s, u=u, i=i: calls.append(i) or u(s) for i, u in enumerate(scan.units)]
    ingest(scan, out, SplitConfig(holdout_fraction=0.25, val_fraction=0.0, seed=5), shard_mb=0.05)
    assert len(calls) == 4 - len(finished)  # finished units were not redone
    ingest(
        sources.procedural(cfg),
        tmp_path / "whole",
        SplitConfig(holdout_fraction=0.25, val_fraction=0.0, seed=5),
        shard_mb=0.05,
    )
    assert _files(out) == _files(tmp_path / "whole")
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds"]


def test_ingest_killed_halfway_resumes_with_the_same_index(tmp_path):
    """A real kill: `medi-dist ingest` in a subprocess gets SIGKILL once some, not all, units are
    finished; the same ingest run again redoes only the others and writes the same index (and
    bytes) as an uninterrupted ingest. Nothing named like the dataset exists after the kill."""
    import subprocess
    import sys
    import time

    n_tiles, out = 4096, tmp_path / "killed" / "ds"  # 8 units of 512 tiles
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "medi_dist", "ingest", "--source", "procedural", "--tiles", str(n_tiles)]
    cmd += ["--size", "16", "--shard-mb", "0.05", "--out", str(out)]
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600  # imports alone can take minutes on a loaded machine
    try:
        while time.time() < deadline and proc.poll() is None:
            if list(out.parent.glob(".ds.ingest-*/unit-*.json")):
                break
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    finished = sorted(p.name for p in out.parent.glob(".ds.ingest-*/unit-*.json"))
    assert 1 <= len(finished) < 8, (finished, proc.stderr.read().decode()[-2000:])  # killed halfway
    assert not out.exists() and not list(tmp_path.rglob("dataset.json"))
    cfg = ProceduralConfig(n_types=4, n_sites=12, n_tiles=n_tiles, size=16, seed=0)  # the CLI's defaults
    split = SplitConfig(holdout_fraction=0.3, val_fraction=0.0, seed=0)
    calls = []
    scan = sources.procedural(cfg)
    scan.units = [lambda s, u=u, i=i: calls.append(i) or u(s) for i, u in enumerate(scan.units)]
    ingest(scan, out, split, shard_mb=0.05)
    assert len(calls) == 8 - len(finished)  # the finished units were not redone
    ingest(sources.procedural(cfg), tmp_path / "whole", split, shard_mb=0.05)
    a, b = pd.read_parquet(out / "index.parquet"), pd.read_parquet(tmp_path / "whole" / "index.parquet")
    assert len(a) == n_tiles and a.equals(b)
    assert _files(out) == _files(tmp_path / "whole")
    assert sorted(p.name for p in out.parent.iterdir()) == ["ds"]  # the work folder is gone


def test_index_in_row_groups_has_the_content_of_one_frame(tmp_path, monkeypatch):
    """Past CHUNK_ROWS tiles the index is written in row groups, never whole in memory (soak): the
    same rows, columns and dtypes as one DataFrame of every row (ages with gaps in some chunks and
    none in others: float64 throughout), and the same vocab, split report and manifest bytes."""
    import pyarrow.parquet as pq

    from medi_dist.data import index_writer

    ingest(sources.procedural(PROC), tmp_path / "one", SPLIT, shard_mb=0.05)
    monkeypatch.setattr(index_writer, "CHUNK_ROWS", 10)
    ingest(sources.procedural(PROC), tmp_path / "many", SPLIT, shard_mb=0.05)
    assert pq.ParquetFile(tmp_path / "one" / "index.parquet").metadata.num_row_groups == 1
    assert pq.ParquetFile(tmp_path / "many" / "index.parquet").metadata.num_row_groups == 110
    a, b = (pd.read_parquet(tmp_path / d / "index.parquet") for d in ("one", "many"))
    assert list(a.columns) == list(b.columns) and a.dtypes.equals(b.dtypes) and a.equals(b)
    assert str(a["age"].dtype) == "float64" and a["age"].isna().any()
    chunk_has_gap = [b["age"][i : i + 10].isna().any() for i in range(0, 1100, 10)]
    assert any(chunk_has_gap) and not all(chunk_has_gap)  # some chunks alone would infer int64
    one, many = _files(tmp_path / "one"), _files(tmp_path / "many")
    assert {f: v for f, v in one.items() if f != "index.parquet"} == {
        f: v for f, v in many.items() if f != "index.parquet"
    }


def test_duplicate_key_across_units_is_refused_naming_both(tmp_path):
    """Keys are checked across units by 8-byte hashes, then by name: the error names the key and both origins."""
    from medi_dist.metadata import SchemaError

    scan = sources.procedural(PROC)
    first = next(iter(scan.units[0](SkipLog())))
    again = sources.TileRecord(first.key, first.image_bytes, first.image_format, first.meta, "elsewhere")
    u2 = scan.units[2]
    scan.units[2] = lambda s: [*u2(s), again]
    named = rf"duplicate tile key '{first.key}' from elsewhere and {re.escape(first.origin)}"
    with pytest.raises(SchemaError, match=named):
        ingest(scan, tmp_path / "dup", SPLIT, shard_mb=0.05)
    assert not (tmp_path / "dup").exists()
