"""gs:// datasets against a GCS emulator on loopback (tests/gcs_emulator.py), reached the way a
user points medi-dist at one: STORAGE_EMULATOR_HOST. The emulator checks no credentials, so wrong
credentials are tested on S3 only (tests/test_objstore.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from medi_dist import cli
from medi_dist.data import sources
from medi_dist.data.ingest import ingest
from medi_dist.data.procedural import ProceduralConfig
from medi_dist.data.shards import MANIFEST, load_manifest, read_index
from medi_dist.data.split import SplitConfig
from medi_dist.data.stats import dataset_stats
from medi_dist.storage import Folder, local_copy

REPO = Path(__file__).resolve().parents[1]
ARGS = ["ingest", "--source", "procedural", "--types", "3", "--sites", "8", "--tiles", "240", "--size", "16"]
ARGS += ["--val-fraction", "0.2", "--shard-mb", "0.01"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    import gcs_emulator

    emu = gcs_emulator.start(tmp_path_factory.mktemp("gcs"))
    saved = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = emu.endpoint
    yield emu
    emu.stop()
    if saved is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = saved


@pytest.fixture(scope="module")
def gcs_dataset(gcs, tmp_path_factory):
    """The same procedural tiles ingested locally in this process and to the emulator by
    `medi-dist ingest --workers 2` (Ray tasks in a Ray instance of its own), as a user runs it."""
    local = tmp_path_factory.mktemp("gcsds") / "local"
    assert cli.main([*ARGS, "--out", str(local)]) == 0
    uri = gcs.uri("datasets", "proc")
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO), "STORAGE_EMULATOR_HOST": gcs.endpoint}
    r = subprocess.run(
        [sys.executable, "-m", "medi_dist", *ARGS, "--workers", "2", "--out", uri],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path_factory.mktemp("cwd"),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return local, uri


def test_distributed_ingest_to_gcs_matches_local_ingest(gcs, gcs_dataset):
    local, uri = gcs_dataset
    remote = Folder(uri).files()
    here = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert sorted(remote) == here and len([f for f in here if f.endswith(".tar")]) > 2
    for rel in here:  # byte for byte: 2 Ray workers into the bucket write what one local process does
        assert Folder(uri).read_bytes(rel) == (local / rel).read_bytes(), rel
    # The ingest's work folder is gone: the bucket holds the dataset and nothing else.
    assert all(f.startswith("datasets/proc/") for f in Folder(gcs.uri()).files())
    s_remote, s_local = dataset_stats(uri, verify=True), dataset_stats(local, verify=True)
    assert s_remote["tiles"] == s_local["tiles"] == 240 and s_remote["verified"] == s_local["verified"]
    copy = local_copy(uri, load_manifest(uri)["shards"])
    assert (copy / MANIFEST).read_bytes() == (local / MANIFEST).read_bytes()


def test_training_stream_reads_shards_from_gcs(ray_cluster, gcs_dataset):
    from medi_dist.data.stream import StreamConfig, tile_stream

    local, uri = gcs_dataset
    stream = tile_stream(uri, ("train",), StreamConfig(resolution=16))
    keys = sorted(k for b in stream.dataset.iter_batches(batch_size=64) for k in b["key"])
    want = read_index(local)
    assert keys == sorted(want[want["split"] == "train"]["key"]) and keys
    assert stream.skipped()["skipped"] == 0


def _err(capsys, *argv) -> str:
    rc = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_data_stats_verify_and_bad_gcs_are_one_line(gcs, gcs_dataset, capsys, monkeypatch):
    _, uri = gcs_dataset
    assert cli.main(["data", "stats", "--verify", uri]) == 0
    assert "tiles 240" in capsys.readouterr().out
    err = _err(capsys, "data", "stats", "gs://no-such-bucket/ds")
    assert f"gs://no-such-bucket/ds: bucket 'no-such-bucket' does not exist at {gcs.endpoint}" in err
    err = _err(capsys, *ARGS, "--out", uri)
    assert f"{uri} already holds a dataset; choose another --out or pass --overwrite" in err
    damaged = gcs.uri("datasets", "damaged")
    scan = sources.procedural(ProceduralConfig(n_types=2, n_sites=4, n_tiles=80, size=16, seed=3))
    ingest(scan, damaged, SplitConfig(holdout_fraction=0.25, seed=1), shard_mb=0.01)
    shard = load_manifest(damaged)["shards"][0]["path"]
    Folder(damaged).delete(shard)
    assert f"shard {damaged}/{shard} is missing from the bucket" in _err(capsys, "data", "stats", damaged)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:9")  # nothing listens there
    err = _err(capsys, "data", "stats", uri)
    assert f"{uri}: cannot reach the object store at http://127.0.0.1:9; check STORAGE_EMULATOR_HOST" in err
