"""Datasets on object storage: a real S3-compatible server on loopback (tests/objstore.py), reached
with credentials and endpoint from the environment, as a user sets them."""

from __future__ import annotations

import pytest

from medi_dist import cli
from medi_dist.data import sources
from medi_dist.data.ingest import ingest
from medi_dist.data.procedural import ProceduralConfig
from medi_dist.data.shards import MANIFEST, load_manifest, read_index
from medi_dist.data.split import SplitConfig
from medi_dist.data.stats import dataset_stats
from medi_dist.storage import Folder, local_copy

SPLIT = SplitConfig(holdout_fraction=0.25, val_fraction=0.0, seed=1)


def _scan(n=200):
    return sources.procedural(ProceduralConfig(n_types=2, n_sites=4, n_tiles=n, size=32, seed=3))


@pytest.fixture(scope="module")
def s3_dataset(object_store, tmp_path_factory):
    """The same procedural tiles ingested locally and to the bucket."""
    local = tmp_path_factory.mktemp("s3ds") / "local"
    ingest(_scan(), local, SPLIT, shard_mb=0.02)
    uri = object_store.uri("datasets", "proc")
    ingest(_scan(), uri, SPLIT, shard_mb=0.02)
    return local, uri


def test_ingest_to_bucket_matches_local_ingest(s3_dataset):
    local, uri = s3_dataset
    remote = Folder(uri).files()
    here = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert sorted(remote) == here
    for rel in here:  # byte for byte: the bucket holds what a local ingest writes
        assert Folder(uri).read_bytes(rel) == (local / rel).read_bytes(), rel
    assert load_manifest(uri) == load_manifest(local)
    s_remote, s_local = dataset_stats(uri, verify=True), dataset_stats(local, verify=True)
    assert s_remote["tiles"] == s_local["tiles"] == 200 and s_remote["verified"] == s_local["verified"]
    copy = local_copy(uri, load_manifest(uri)["shards"])
    assert copy != local and (copy / MANIFEST).read_bytes() == (local / MANIFEST).read_bytes()
    assert local_copy(uri, load_manifest(uri)["shards"]) == copy  # cached: downloaded once


def test_stream_reads_shards_from_the_bucket(ray_cluster, s3_dataset):
    from medi_dist.data.stream import StreamConfig, tile_stream

    local, uri = s3_dataset
    stream = tile_stream(uri, ("train",), StreamConfig(resolution=16))
    keys = sorted(k for b in stream.dataset.iter_batches(batch_size=64) for k in b["key"])
    want = read_index(local)
    assert keys == sorted(want[want["split"] == "train"]["key"])
    assert stream.skipped()["skipped"] == 0


def _err(capsys, *argv) -> str:
    rc = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err


def test_bad_object_storage_is_one_line_naming_the_uri(s3_dataset, object_store, capsys, monkeypatch):
    _, uri = s3_dataset
    err = _err(capsys, "data", "stats", "s3://no-such-bucket/ds")
    assert "s3://no-such-bucket/ds: bucket 'no-such-bucket' does not exist" in err
    ingest_args = ["ingest", "--source", "procedural", "--tiles", "40", "--size", "32"]
    err = _err(capsys, *ingest_args, "--out", "s3://no-such-bucket/ds")
    assert "bucket 'no-such-bucket' does not exist" in err
    err = _err(capsys, *ingest_args, "--out", uri)
    assert f"{uri} already holds a dataset; choose another --out or pass --overwrite" in err
    with monkeypatch.context() as m:
        m.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        err = _err(capsys, "data", "stats", uri)
        assert f"{uri}" in err and "access denied; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in err
        err = _err(capsys, *ingest_args, "--out", object_store.uri("new"))
        assert "access denied" in err
    with monkeypatch.context() as m:
        m.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
        err = _err(capsys, "data", "stats", uri)
        assert f"{uri}: cannot reach the object store at http://127.0.0.1:9; check AWS_ENDPOINT_URL" in err


def test_shard_deleted_from_the_bucket_is_named(object_store, tmp_path, capsys):
    uri = object_store.uri("datasets", "damaged")
    ingest(_scan(80), uri, SPLIT, shard_mb=0.02)
    shard = load_manifest(uri)["shards"][0]["path"]
    Folder(uri).delete(shard)
    err = _err(capsys, "data", "stats", uri)
    assert f"shard {uri}/{shard} is missing from the bucket" in err
    with pytest.raises(OSError, match=f"shard {uri}/{shard} is missing from the bucket"):
        local_copy(uri, load_manifest(uri)["shards"])


def test_generate_from_and_into_the_bucket_then_evaluate_from_it(ray_cluster, object_store, s3_dataset, tmp_path):
    """A model on S3, a pool written to S3 (stopped after 2 shards, resumed), the same tiles as a local
    run; fidelity reads the real dataset and the pool from the bucket and writes its report there."""
    from medi_dist.evaluate.fidelity_job import FidelityConfig, evaluate_fidelity
    from medi_dist.generate.job import GenerateConfig, generate
    from medi_dist.storage import upload_folder
    from test_generate import PLAN, SAMPLING, _model_dir

    local, uri = s3_dataset
    model = _model_dir(tmp_path / "rand", local)
    model_uri = object_store.uri("models", "rand")
    upload_folder(model, model_uri, last=("checksums.json",))
    pool = object_store.uri("pools", "rand")

    def gen(out, **kw):
        return GenerateConfig(
            model=model_uri, out=out, plan=PLAN, sampling=SAMPLING, tiles_per_shard=4, dataset=uri, **kw
        )

    first = generate(gen(pool, max_shards=1))
    assert not first.complete and first.shards >= 3 and not Folder(pool).exists(MANIFEST)
    assert len([f for f in Folder(pool).files() if f.endswith(".tar")]) == 1
    second = generate(gen(pool, workers=2))
    assert second.complete and second.skipped == 1 and second.out == pool
    ref = generate(gen(str(tmp_path / "ref")))
    a, b = read_index(pool).set_index("key"), read_index(ref.out).set_index("key")
    assert len(a) == first.tiles and sorted(a.index) == sorted(b.index)
    assert (a["sha256"] == b.loc[a.index, "sha256"]).all()  # the same tiles as a local run
    assert load_manifest(pool)["generation"]["model"] == model_uri
    res = evaluate_fidelity(
        FidelityConfig(
            real=uri,
            synthetic=pool,
            real_splits=["train"],
            conditional=False,
            resolution=16,
            min_per_group=1,
            log_mlflow=False,
        )
    )
    assert res["fd"]["n_synth"] == first.tiles
    report = Folder(pool).read_bytes("fidelity.json")
    assert f'"n_synth": {first.tiles}'.encode() in report
