"""Shared fixtures: one local Ray cluster per test session, small procedural datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TEST_DATA = Path(__file__).resolve().parent / "data"  # small public fixtures, shipped with the tests
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """A real S3-compatible server on 127.0.0.1 (tests/objstore.py) with one bucket; its endpoint and
    credentials are set in the environment as a user would (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...),
    before the session's Ray cluster starts, so Ray's workers read them the same way."""
    import objstore

    store = objstore.start(tmp_path_factory.mktemp("objstore"))
    env = {**store.env(), "MEDI_DIST_CACHE": str(tmp_path_factory.mktemp("cache"))}
    with objstore.environment(env):
        yield store
    store.stop()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A GCS emulator on 127.0.0.1 (tests/objstore.py) with one bucket, named by
    STORAGE_EMULATOR_HOST before the session's Ray cluster starts, as on every node of a cluster."""
    import objstore

    emu = objstore.start_gcs(tmp_path_factory.mktemp("gcs"))
    with objstore.environment(emu.env()):
        yield emu
    emu.stop()


@pytest.fixture(scope="session")
def ray_cluster(object_store, gcs):
    import ray

    # 4 logical CPUs on 2 cores: Train workers and Ray Data tasks each get an explicit slice.
    ray.init(
        num_cpus=4, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}}
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def proc_dataset(tmp_path_factory) -> Path:
    """600 procedural 32-px tiles, 4 types x 8 sites, holdout and val splits."""
    from medi_dist.data import sources
    from medi_dist.data.ingest import ingest
    from medi_dist.data.procedural import ProceduralConfig
    from medi_dist.data.split import SplitConfig

    out = tmp_path_factory.mktemp("data") / "proc"
    scan = sources.procedural(ProceduralConfig(n_types=4, n_sites=8, n_tiles=600, size=32, seed=1))
    ingest(scan, out, SplitConfig(holdout_fraction=0.25, val_fraction=0.0, seed=1), shard_mb=0.05)
    return out


@pytest.fixture(scope="session")
def tcga_metadata() -> Path:
    """The GDC slide metadata sample (tests/data/README.md)."""
    return TEST_DATA / "tcga_slide_metadata_sample.csv"


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for tiny-tensor tests: on a busy 2-core machine OpenMP spin-waits made them
    up to 50x slower (57 s vs 0.7 s for one loss test). Restored afterwards."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
