"""The bad-input suite (issue 7), artifacts: shards out of order, empty, escaping their folder or
altered; interrupted ingest; unknown conditions; bad configs; a full disk. Each ends in a clear error
naming the file and what to do, and an existing dataset is never touched. Tiles and metadata:
test_bad_tiles.py.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from bad_inputs import (  # noqa: F401 (pytest fixtures, used by name)
    N_GOOD,
    REPO,
    SITES,
    good_csv,
    good_ds,
    one_error_line,
    rewrite_shard,
    run_cli,
    snapshot,
    tile_bytes,
)
from medi_dist.config_loader import ConfigError, load_config
from medi_dist.data import sources
from medi_dist.data.ingest import ingest
from medi_dist.data.procedural import ProceduralConfig
from medi_dist.data.records import SkipLog
from medi_dist.data.shards import MANIFEST, file_sha256, verify_shards
from medi_dist.data.split import SplitConfig
from medi_dist.data.stream import StreamConfig, tile_stream
from medi_dist.metadata import ConditioningSpec, SchemaError, UnknownValueError, Vocab
from medi_dist.train.config import TrainConfig

# ---- shards --------------------------------------------------------------------------------------


def test_members_out_of_order_are_refused_naming_the_shard(ray_cluster, good_ds):
    def images_then_jsons(members):
        return sorted(members, key=lambda m: (m[0].endswith(".json"), m[0]))

    shard = rewrite_shard(good_ds, images_then_jsons)
    verify_shards(good_ds)  # sizes match dataset.json: only the structure check can tell
    with pytest.raises(SchemaError, match=rf"shard {re.escape(str(shard))}: the members of key '.+' are not adjacent"):
        verify_shards(good_ds, checksums=True)
    proc = run_cli("data", "stats", "--verify", str(good_ds), cwd=good_ds.parent)
    s = tile_stream(good_ds, ("train", "holdout"), StreamConfig(resolution=8))
    with pytest.raises(Exception, match=rf"shard {re.escape(str(shard))}: the members of key '.+' are not adjacent"):
        s.dataset.take_all()  # the stream's reader stops with the shard named
    one_error_line(proc, "medi-dist data: error:", str(shard), "not adjacent")


def test_empty_shards_are_refused_by_name(good_ds):
    shard = rewrite_shard(good_ds, lambda members: [])  # a valid tar with no tiles
    verify_shards(good_ds)
    with pytest.raises(SchemaError, match=rf"shard {re.escape(str(shard))} holds no tiles"):
        verify_shards(good_ds, checksums=True)
    shard.write_bytes(b"")  # 0 bytes, and dataset.json agrees
    manifest = json.loads((good_ds / MANIFEST).read_text())
    manifest["shards"][0].update(bytes=0, sha256=file_sha256(shard))
    (good_ds / MANIFEST).write_text(json.dumps(manifest))
    for check in (lambda: verify_shards(good_ds), lambda: tile_stream(good_ds, ("train", "holdout"))):
        with pytest.raises(SchemaError, match=rf"shard {re.escape(str(shard))} is empty \(0 bytes\)"):
            check()  # tile_stream refuses before Ray (whose own error, 'empty file', names no file)


def test_member_paths_leaving_the_folder_are_never_written(ray_cluster, good_ds, tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    tag = uuid.uuid4().hex[:8]
    evil = [f"../evil{tag}", f"../../evil{tag}", str(outside / f"abs{tag}")]
    jpg = tile_bytes(7)

    def add_evil(members):
        return members + [(f"{e}.{ext}", jpg if ext == "jpg" else b"{}") for e in evil for ext in ("jpg", "json")]

    shard = rewrite_shard(good_ds, add_evil)
    with pytest.raises(SchemaError, match=rf"shard {re.escape(str(shard))}: member '\.\./evil{tag}\.jpg' is a path"):
        verify_shards(good_ds, checksums=True)
    monkeypatch.chdir(shard.parent)  # where a naive extractor would resolve '../'
    before = {p for p in tmp_path.rglob("*")}
    seen = {s["__key__"] for s in wds.WebDataset([str(shard)], shardshuffle=False)}
    import ray

    seen_ray = {r["__key__"] for r in ray.data.read_webdataset([str(shard)], decoder=None).take_all()}
    assert set(evil) <= seen and set(evil) <= seen_ray  # read (in memory) ...
    assert {p for p in tmp_path.rglob("*")} == before  # ... and nothing written anywhere
    assert not any(Path(f"{e}.jpg").exists() or Path(f"{e}.json").exists() for e in evil)
    assert not list(Path("/").glob(f"*evil{tag}*")) and not list(Path.cwd().parent.parent.glob(f"*evil{tag}*"))


def test_altered_tile_bytes_are_never_loaded(ray_cluster, good_ds):
    """A bit flip that keeps the shard's size and the JPEG decodable: `--verify` names the shard, and
    the stream skips and counts the tile (its sha256 rides in its json) instead of training on it."""
    state = {}

    def flip_quant_table(members):
        out = []
        for name, data in members:
            if name.endswith(".jpg") and not state:
                i = data.index(b"\xff\xdb") + 5 + 10  # DQT marker, length, table id, then the table
                data = data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
                state["key"] = name.split(".")[0]
                Image.open(io.BytesIO(data)).load()  # still a valid JPEG
            out.append((name, data))
        return out

    manifest = json.loads((good_ds / MANIFEST).read_text())
    shard = rewrite_shard(good_ds, flip_quant_table)
    (good_ds / MANIFEST).write_text(json.dumps(manifest))  # dataset.json as ingest wrote it
    assert shard.stat().st_size == manifest["shards"][0]["bytes"]
    verify_shards(good_ds)
    with pytest.raises(SchemaError, match=rf"shard {re.escape(str(shard))} fails its sha256 check"):
        verify_shards(good_ds, checksums=True)
    s = tile_stream(good_ds, ("train", "holdout"), StreamConfig(resolution=8, max_bad_fraction=0.5))
    keys = {k for b in s.dataset.iter_batches(batch_format="numpy") for k in b["key"]}
    assert state["key"] not in keys and len(keys) == N_GOOD - 1
    [bad] = s.skipped()["bad"]
    assert bad["key"] == state["key"] and f"{shard.parent.name}/{shard.name}" in bad["shard"]
    assert "sha256" in bad["error"]


def test_interrupted_ingest_leaves_nothing_that_looks_complete(tmp_path, good_csv):
    out = tmp_path / "ds"
    scan = sources.manifest(good_csv, SkipLog())
    records = scan.records

    def dies_midway():
        for i, rec in enumerate(records()):
            if i == 20:
                raise KeyboardInterrupt  # a killed job
            yield rec

    scan.records, scan.units = dies_midway, None  # one piece of work, killed in the middle
    with pytest.raises(KeyboardInterrupt):
        ingest(scan, out, SplitConfig(0.3), shard_mb=0.01)
    # at most the hidden work folder a re-run resumes from: nothing named like the dataset, no manifest
    assert all(p.name.startswith(".ds.ingest-") for p in tmp_path.iterdir())
    assert not list(tmp_path.rglob("dataset.json"))


# ---- conditions ----------------------------------------------------------------------------------


def test_unknown_site_at_generation_lists_the_models_sites(tmp_path):
    import torch

    from medi_dist.model import (
        ConditionedUNet,
        ModelConfig,
        encode_conditions,
        load_model_dir,
        save_model_dir,
    )

    spec = ConditioningSpec([Vocab("cancer_type", ["A", "B"]), Vocab("tissue_source_site", SITES)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        save_model_dir(tmp_path / "model", ConditionedUNet(ModelConfig.from_preset("tiny"), spec))
        _, _, model_spec = load_model_dir(tmp_path / "model")  # generation reads the vocabularies from here
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(UnknownValueError, match=r"unknown tissue_source_site 'S9'; valid values \(6\): S0, S1, .*, S5"):
        encode_conditions(
            model_spec,
            [{"cancer_type": "A", "tissue_source_site": "S0"}, {"cancer_type": "B", "tissue_source_site": "S9"}],
        )
    # a site of the model's vocabulary (whitespace trimmed) maps to the model's index, not a rebuilt one
    cond = encode_conditions(model_spec, [{"cancer_type": "B", "tissue_source_site": " S4 "}])
    assert cond["cond_tissue_source_site"].tolist() == [4] and cond["cond_cancer_type"].tolist() == [1]


# ---- config --------------------------------------------------------------------------------------


def test_bad_configs_give_one_clear_line(tmp_path):
    malformed = tmp_path / "malformed.yaml"
    malformed.write_text("steps: 10\nrun:\n  name: [a, b\n")
    negative = tmp_path / "negative.yaml"
    negative.write_text("steps: -1\n")
    # the CLI runs start first: each imports torch and Ray (slow on a busy machine), so they overlap
    procs = [run_cli("train", "--config", str(f), cwd=tmp_path) for f in (malformed, negative)]
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(malformed))} is not valid YAML: .*line 4"):
        load_config(TrainConfig, malformed)
    with pytest.raises(ValueError, match=rf"{re.escape(str(negative))}: steps must be positive, got -1"):
        load_config(TrainConfig, negative)
    for over, msg in (
        (["steps=-1"], "steps must be positive"),
        (["run.num_workers=0"], "num_workers"),
        (["steps=[1]"], r"override 'steps=\[1\]': expected int, got \[1\]"),
        (["run=3"], "override 'run=3': expected a mapping"),
        (["stepz=3"], r"unknown field\(s\) \['stepz'\]"),
        (["steps=[1,"], "override 'steps=\\[1,': the value is not valid YAML"),
    ):
        with pytest.raises(ConfigError, match=msg):
            load_config(TrainConfig, None, over)
    one_error_line(procs[0], "medi-dist train: error: config file", str(malformed), "line 4")
    one_error_line(procs[1], "medi-dist train: error:", str(negative), "steps must be positive, got -1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["malformed.yaml", "negative.yaml"]  # no run started


# ---- a full disk ---------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (root can mount one); None where mounting is not allowed."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        yield None
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if r.returncode != 0:
        yield None
        return
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


FILL_DISK = """
import json, sys
from medi_dist.data import sources
from medi_dist.data.ingest import ingest
from medi_dist.data.procedural import ProceduralConfig
from medi_dist.data.split import SplitConfig
try:
    ingest(sources.procedural(ProceduralConfig(n_types=2, n_sites=6, n_tiles=int(sys.argv[2]), size=32, seed=1)),
           sys.argv[1], SplitConfig(0.3), shard_mb=float(sys.argv[3]), overwrite=True)
except OSError as e:
    print(json.dumps({"errno": e.errno, "message": str(e)}))
"""


def _fill(out: Path, tiles: int, shard_mb: float, fsize_limit: int | None = None) -> dict:
    """Ingest `tiles` procedural tiles into `out`; in a subprocess with a file-size limit when given."""
    if fsize_limit is None:
        try:
            ingest(
                sources.procedural(ProceduralConfig(n_types=2, n_sites=6, n_tiles=tiles, size=32, seed=1)),
                out,
                SplitConfig(0.3),
                shard_mb=shard_mb,
                overwrite=True,
            )
        except OSError as e:
            return {"errno": e.errno, "message": str(e)}
        return {}
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_limit, fsize_limit))  # Python ignores SIGXFSZ

    r = subprocess.run(
        [sys.executable, "-c", FILL_DISK, str(out), str(tiles), str(shard_mb)],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=300,
    )
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.stdout.strip() else {"stderr": r.stderr}


def test_full_disk_while_writing_shards(small_disk, tmp_path):
    """ENOSPC on a 1 MiB tmpfs (or, where mounting is not allowed, EFBIG under RLIMIT_FSIZE): a clear
    error naming the dataset, no half-written shard or dataset directory, the old dataset untouched."""
    disk = small_disk or tmp_path / "disk"
    limit = None if small_disk else 256 << 10
    want = errno.ENOSPC if small_disk else errno.EFBIG
    out = disk / "ds"
    assert _fill(out, 60, 0.05) == {}  # an existing, complete dataset (~0.2 MiB)
    before = snapshot(out)
    got = _fill(out, 1500, 0.1 if small_disk else 1.0, limit)  # ~4 MiB of shards: does not fit
    assert got.get("errno") == want, got
    assert got["message"].startswith(f"[Errno {want}] {os.strerror(want)} while writing dataset {out}")
    assert f"the existing {out} is untouched" in got["message"]
    assert "Free space or choose another --out" in got["message"]
    assert snapshot(out) == before and verify_shards(out, checksums=True)
    assert sorted(p.name for p in disk.iterdir()) == ["ds"]  # no temporary dataset or shard left
    got = _fill(disk / "fresh", 1500, 0.1 if small_disk else 1.0, limit)
    assert got.get("errno") == want and f"{disk / 'fresh'} was not created" in got["message"]
    assert sorted(p.name for p in disk.iterdir()) == ["ds"]
