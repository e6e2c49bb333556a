"""Datasets, pools, models and checkpoints on object storage, each test on both servers of
tests/objstore.py: S3 (moto_server, with credentials) and gs:// (a GCS emulator), reached through
the environment as a user sets it (AWS_* / STORAGE_EMULATOR_HOST, set before Ray starts, as on
every node of a cluster)."""

from __future__ import annotations

import json

import pytest

from medi_dist.data import sources
from medi_dist.data.ingest import ingest
from medi_dist.data.procedural import ProceduralConfig
from medi_dist.data.shards import MANIFEST, load_manifest, read_index
from medi_dist.data.split import SplitConfig
from medi_dist.data.stats import dataset_stats
from medi_dist.storage import Folder, local_copy, upload_folder
from objstore import one_line_error

SPLIT = SplitConfig(holdout_fraction=0.25, val_fraction=0.0, seed=1)


def _scan(n=200):
    return sources.procedural(ProceduralConfig(n_types=2, n_sites=4, n_tiles=n, size=32, seed=3))


@pytest.fixture(scope="module", params=["s3", "gs"])
def store(request):
    return request.getfixturevalue("object_store" if request.param == "s3" else "gcs")


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory):
    local = tmp_path_factory.mktemp("objds") / "local"
    ingest(_scan(), local, SPLIT, shard_mb=0.02)
    return local


@pytest.fixture(scope="module")
def remote_dataset(ray_cluster, store, local_dataset):
    """The same procedural tiles as `local_dataset`, ingested into the bucket by 2 Ray workers."""
    uri = store.uri("datasets", "proc")
    ingest(_scan(), uri, SPLIT, shard_mb=0.02, workers=2)
    return local_dataset, uri


def test_ingest_to_bucket_matches_local_ingest(store, remote_dataset):
    local, uri = remote_dataset
    remote = Folder(uri).files()
    here = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
    assert sorted(remote) == here and len([f for f in here if f.endswith(".tar")]) > 2
    for rel in here:  # byte for byte: 2 Ray workers into the bucket write what one local process does
        assert Folder(uri).read_bytes(rel) == (local / rel).read_bytes(), rel
    # The ingest's work folder is gone: the bucket holds the dataset and nothing else of this ingest.
    assert not [f for f in Folder(store.uri("datasets")).files() if not f.startswith("proc/")]
    assert load_manifest(uri) == load_manifest(local)
    s_remote, s_local = dataset_stats(uri, verify=True), dataset_stats(local, verify=True)
    assert s_remote["tiles"] == s_local["tiles"] == 200 and s_remote["verified"] == s_local["verified"]
    copy = local_copy(uri, load_manifest(uri)["shards"])
    assert copy != local and (copy / MANIFEST).read_bytes() == (local / MANIFEST).read_bytes()
    assert local_copy(uri, load_manifest(uri)["shards"]) == copy  # cached: downloaded once


def test_stream_reads_shards_from_the_bucket(remote_dataset):
    from medi_dist.data.stream import StreamConfig, tile_stream

    local, uri = remote_dataset
    stream = tile_stream(uri, ("train",), StreamConfig(resolution=16))
    keys = sorted(k for b in stream.dataset.iter_batches(batch_size=64) for k in b["key"])
    want = read_index(local)
    assert keys == sorted(want[want["split"] == "train"]["key"]) and keys
    assert stream.skipped()["skipped"] == 0


def _bad_gcs_credentials(tmp_path) -> dict[str, str]:
    """Credential files google-cloud-cpp (pyarrow's GCS client) refuses before sending a request:
    not JSON, a service-account file whose key is no key, a file that does not exist."""
    (tmp_path / "not-json.json").write_text("{not json")
    sa = {
        "type": "service_account",
        "project_id": "medi",
        "private_key_id": "k1",
        "private_key": "-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n",
        "client_email": "medi@medi.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": "https://oauth2.googleapis.com/token",
    }
    (tmp_path / "bad-key.json").write_text(json.dumps(sa))
    return {
        str(tmp_path / "not-json.json"): "does not contain a JSON object",
        str(tmp_path / "bad-key.json"): "Invalid ServiceAccountCredentials",
        str(tmp_path / "missing.json"): "Cannot open credentials file",
    }


def test_bad_object_storage_is_one_line_naming_the_uri(store, remote_dataset, capsys, monkeypatch, tmp_path):
    _, uri = remote_dataset
    s = store.scheme
    err = one_line_error(capsys, "data", "stats", f"{s}://no-such-bucket/ds")
    assert f"{s}://no-such-bucket/ds: bucket 'no-such-bucket' does not exist at {store.endpoint}" in err
    ingest_args = ["ingest", "--source", "procedural", "--tiles", "40", "--size", "32"]
    err = one_line_error(capsys, *ingest_args, "--out", f"{s}://no-such-bucket/ds")
    assert "bucket 'no-such-bucket' does not exist" in err
    err = one_line_error(capsys, *ingest_args, "--out", uri)
    assert f"{uri} already holds a dataset; choose another --out or pass --overwrite" in err
    with monkeypatch.context() as m:
        m.setenv(store.endpoint_var, "http://127.0.0.1:9")  # nothing listens there
        err = one_line_error(capsys, "data", "stats", uri)
        assert f"{uri}: cannot reach the object store at http://127.0.0.1:9; check {store.endpoint_var}" in err
    # Wrong credentials.
    if s == "s3":  # the server checks every request's signature
        with monkeypatch.context() as m:
            m.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
            err = one_line_error(capsys, "data", "stats", uri)
            assert f"{uri}: access denied; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY" in err
            err = one_line_error(capsys, *ingest_args, "--out", store.uri("new"))
            assert "access denied" in err
        return
    # The emulator checks none, so this is real GCS's code path (no STORAGE_EMULATOR_HOST): the
    # client refuses these files before it sends anything. (A well-formed key of an unknown account
    # is refused by Google's servers, which this sandbox cannot reach.)
    for path, reason in _bad_gcs_credentials(tmp_path).items():
        with monkeypatch.context() as m:
            m.delenv("STORAGE_EMULATOR_HOST")
            m.setenv("GOOGLE_APPLICATION_CREDENTIALS", path)
            for argv in (["data", "stats", uri], [*ingest_args, "--out", store.uri("new")]):
                err = one_line_error(capsys, *argv)
                assert f"gs://{store.bucket}" in err and "cannot authenticate (" in err and reason in err, err
                assert f"point GOOGLE_APPLICATION_CREDENTIALS (now {path}) at a valid service-account key" in err
    assert not Folder(store.uri("new")).files()  # nothing was written


def test_shard_deleted_from_the_bucket_is_named(store, capsys):
    uri = store.uri("datasets", "damaged")
    ingest(_scan(80), uri, SPLIT, shard_mb=0.02)
    shard = load_manifest(uri)["shards"][0]["path"]
    Folder(uri).delete(shard)
    err = one_line_error(capsys, "data", "stats", uri)
    assert f"shard {uri}/{shard} is missing from the bucket" in err
    with pytest.raises(OSError, match=f"shard {uri}/{shard} is missing from the bucket"):
        local_copy(uri, load_manifest(uri)["shards"])


def test_generate_from_and_into_the_bucket_then_evaluate_from_it(store, remote_dataset, tmp_path):
    """A model in the bucket, a pool written there (stopped after 1 shard, resumed by 2 workers), the
    same tiles as a local run; fidelity reads the real dataset and the pool from the bucket and
    writes its report there."""
    from medi_dist.evaluate.fidelity_job import FidelityConfig, evaluate_fidelity
    from medi_dist.generate.job import GenerateConfig, generate
    from test_generate import PLAN, SAMPLING, _model_dir

    local, uri = remote_dataset
    model = _model_dir(tmp_path / "rand", local)
    model_uri = store.uri("models", "rand")
    upload_folder(model, model_uri, last=("checksums.json",))
    pool = store.uri("pools", "rand")

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


def test_training_checkpoints_in_the_bucket_resume(store, remote_dataset, tmp_path):
    """run.storage_path in the bucket: Ray Train writes its checkpoints there (through the filesystem
    medi-dist opens, which names the emulator), a stopped run resumes from them, and the model
    directory is uploaded there."""
    from medi_dist.tracking import client
    from medi_dist.train.run_folder import RUN_FILE, RunFolder, registered_step
    from medi_dist.train.trainer import train
    from test_train import _cfg

    _, uri = remote_dataset
    runs = store.uri("runs")
    over = {"run.storage_path": runs, "run.checkpoint_every": 2, "run.log_every": 1, "run.sample_every": 0}
    cfg = _cfg(uri, tmp_path, "cut", steps=4, **over, **{"run.stop_after": 2})
    first = train(cfg)
    assert first.model_dir is None and first.metrics["step"] == 2
    folder = RunFolder(runs, "cut")
    assert registered_step(folder) == 2 and folder.checkpoint_dirs()
    assert any(f.startswith("cut/checkpoint_") for f in Folder(runs).files())  # in the bucket, not on disk
    cfg.run.stop_after = None
    second = train(cfg)  # the same run name: resumes from the checkpoint in the bucket
    assert second.metrics["step"] == 4 and second.model_dir == f"{runs}/cut/model"
    assert second.mlflow_run_id == first.mlflow_run_id
    steps = [m.step for m in client(cfg.run.tracking_uri).get_metric_history(second.mlflow_run_id, "loss")]
    assert sorted(steps) == [1, 2, 3, 4], steps  # steps 1-2 were not trained again
    assert Folder(second.model_dir).exists("checksums.json")
    assert folder.read_json(RUN_FILE)["finished"]["step"] == 4


def test_tune_reads_the_dataset_and_pools_from_the_bucket(store, ray_cluster, tmp_path):
    from medi_dist.tune.config import SearchSpace, StudyConfig
    from medi_dist.tune.study import run_study
    from synthetic_pools import ingest_procedural, make_pool

    real = ingest_procedural(tmp_path / "real", n_types=3, n_sites=12, n_tiles=420, val=0.2)
    pool = make_pool(real, tmp_path / "pool", per_pair=6)
    real_uri, pool_uri = store.uri("tune", "real"), store.uri("tune", "pool")
    upload_folder(real, real_uri)
    upload_folder(pool, pool_uri)
    cfg = StudyConfig(
        name="bucket",
        real=real_uri,
        space=SearchSpace(ratio=[1.0], allocation=["uniform"], pools=[pool_uri], C=[1.0]),
        num_samples=1,
        seeds=[0],
        max_per_class=30,
        max_concurrent_trials=1,
        final_eval=False,
        storage_path=str(tmp_path / "runs"),
        cache_dir=str(tmp_path / "cache"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    res = run_study(cfg)
    assert len(res.trials) == 1 and res.trials["complete"].all() and res.best["pool"] == pool_uri
    assert res.best["objective"] > 0 and res.best["seeds_done"] == 1, res.trials.to_dict("records")
