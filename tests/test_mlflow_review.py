"""What a reviewer sees in MLflow, against a real `mlflow server` on 127.0.0.1: a named job with its
stages as child runs, dataset inputs with medi-dist's digests, a registered model that `generate
--model models:/NAME/VERSION` downloads and verifies, system metrics, and (headless Chromium) the UI
pages that show all of it."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from medi_dist import tracking
from medi_dist.cli import main
from medi_dist.data.shards import load_manifest
from medi_dist.metadata import ConditioningSpec
from medi_dist.model import EMA, ConditionedUNet, ModelConfig, save_model_dir
from medi_dist.registry import log_model_dir, resolve_model
from synthetic_pools import ingest_procedural, make_pool
from test_mlflow_server import serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve(tmp_path_factory.mktemp("server")) as (url, _):
        yield url


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    return ingest_procedural(tmp_path_factory.mktemp("review") / "data", n_types=2, n_sites=6, n_tiles=60)


def tiny_model(real: Path, out: Path, run_id: str) -> Path:
    spec = ConditioningSpec.load(real / "vocab.json").subset(["cancer_type", "tissue_source_site"])
    m = ConditionedUNet(ModelConfig.from_preset("tiny"), spec)  # untrained: these tests read records, not pixels
    # raw and EMA weights, as `medi-dist train` writes them (generate samples the EMA by default)
    save_model_dir(out, m, EMA(m), extra_info={"name": "tiny", "dataset": str(real), "mlflow_run_id": run_id})
    return out


def inputs(c, run_id: str) -> dict[str, tuple[str, str]]:
    """dataset name -> (digest, context) of a run's dataset inputs."""
    return {
        d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}["mlflow.data.context"])
        for d in c.get_run(run_id).inputs.dataset_inputs
    }


def test_named_job_registered_model_and_generation(ray_cluster, server, real, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv(tracking.PARENT_ENV, "chain")  # what --parent-run sets; restored afterwards
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    c = tracking.client(server)
    # the train stage as trainer.py records it (test_train.py runs the real one): dataset, model, registry
    train = tracking.RunLogger(
        server, tracking.find_or_create_run(server, "tiny-train", tags={"medi_dist.kind": "train"})
    )
    tracking.log_datasets(train, {"training": str(real)})
    version = log_model_dir(train, tiny_model(real, tmp_path / "model", train.run_id), "medi-tiny")
    train.finish()

    out, cache = tmp_path / "pool", tmp_path / "cache"
    gen = [
        "--parent-run",
        "chain",
        "generate",
        "--model",
        f"models:/medi-tiny/{version}",
        "--out",
        str(out),
        "--model-cache",
        str(cache),
        "--mode",
        "unseen-pairs",
        "--count",
        "2",
        "--steps",
        "2",
        "--system-metrics",
    ]
    assert main(gen) == 0, capsys.readouterr().err
    exp = c.get_experiment_by_name("medi-dist")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == tracking.MODEL_TRAINING
    (gen_run,) = c.search_runs([exp.experiment_id], "tags.`medi_dist.kind` = 'generate'")
    (job,) = c.search_runs([exp.experiment_id], "tags.`medi_dist.kind` = 'job'")
    assert job.info.run_name == "chain" and job.info.status == "FINISHED"
    for run in (c.get_run(train.run_id), gen_run):
        assert run.data.tags[tracking.PARENT_TAG] == job.info.run_id
    # the job lasts from its first stage's start to its last stage's end
    assert job.info.start_time <= c.get_run(train.run_id).info.start_time
    assert job.info.end_time >= gen_run.info.end_time > gen_run.info.start_time
    digest = tracking.dataset_digest
    assert inputs(c, gen_run.info.run_id) == {
        "data": (digest(load_manifest(real)), "training"),
        "pool": (digest(load_manifest(out)), "generated"),
    }
    assert inputs(c, train.run_id) == {"data": (digest(load_manifest(real)), "training")}
    # the model: an MLflow logged model made by the train stage, an output of it and of the job
    (model,) = c.search_logged_models([exp.experiment_id], filter_string="name = 'medi_model'")
    assert model.source_run_id == train.run_id
    for run_id in (train.run_id, job.info.run_id):
        assert [o.model_id for o in c.get_run(run_id).outputs.model_outputs] == [model.model_id]
    registered = json.loads(model.tags["mlflow.modelVersions"])  # its versions, as the UI reads them
    assert [(v["name"], str(v["version"])) for v in registered] == [("medi-tiny", version)]
    tags = gen_run.data.tags
    assert tags["medi_dist.model_run_id"] == train.run_id and f"runs/{train.run_id})" in tags["mlflow.note.content"]
    assert gen_run.data.params["model"] == f"models:/medi-tiny/{version}"
    assert any(k.startswith("system/cpu_utilization") for k in gen_run.data.metrics), sorted(gen_run.data.metrics)
    # the generated pool records the downloaded model, which the loader verified
    assert json.loads((out / "generation.json").read_text())["model"].startswith(str(cache.resolve()))

    # the registered pyfunc generates one tile per row of conditions (models-from-code, no pickle)
    import mlflow.pyfunc
    import pandas as pd
    from PIL import Image

    rows = pd.read_parquet(real / "index.parquet")[["cancer_type", "tissue_source_site"]].drop_duplicates()[:2]
    generator = mlflow.pyfunc.load_model(f"models:/medi-tiny/{version}")
    seeded = rows.assign(seed=[7, 8])
    got = generator.predict(seeded, params={"steps": 2})
    assert got["seed"].tolist() == [7, 8] and got["cancer_type"].tolist() == rows["cancer_type"].tolist()
    tiles = [Image.open(io.BytesIO(b)) for b in got["png"]]
    px = ModelConfig.from_preset("tiny").sample_size
    assert [t.size for t in tiles] == [(px, px)] * 2 and tiles[0].tobytes() != tiles[1].tobytes()
    # guidance on an interval covering neither of the 2 steps (t/T ~1 and ~0.5) draws the unguided tiles
    unguided = generator.predict(seeded, params={"steps": 2, "guidance": 3.0, "guidance_lo": 0.0, "guidance_hi": 0.4})
    guided = generator.predict(seeded, params={"steps": 2, "guidance": 3.0})
    assert unguided["png"].tolist() == got["png"].tolist() != guided["png"].tolist()
    with pytest.raises(ValueError, match="guidance interval 0.6 0.4: want 0 <= lo <= hi <= 1"):
        generator.predict(seeded, params={"guidance_lo": 0.6, "guidance_hi": 0.4})

    # runs:/ resolves too; a tampered download or an unknown name is one line, not a traceback
    by_run = resolve_model(f"runs:/{train.run_id}/medi_model", cache, server)
    assert (Path(by_run) / "checksums.json").is_file()
    (Path(by_run) / "model.safetensors").write_bytes(b"tampered")
    with pytest.raises(ValueError, match="checksum mismatch"):
        resolve_model(f"runs:/{train.run_id}/medi_model", cache, server)
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--model",
                "models:/no-such-model/1",
                "--out",
                str(tmp_path / "x"),
                "--model-cache",
                str(cache),
                "--mode",
                "unseen-pairs",
                "--count",
                "1",
                "--dry-run",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "models:/no-such-model/1" in err and "no-such-model" in err


def demo_like_store(uri: str, real: Path, tmp: Path) -> dict[str, str]:
    """What `medi-dist demo` records, in miniature and made directly (no training): a demo parent run
    with train / generate / evaluate children, dataset inputs, a registered model."""
    pool = make_pool(real, tmp / "synthetic-medi", per_pair=2)
    with tracking.job(uri, "demo-review", "demo") as parent:
        train = tracking.RunLogger(uri, tracking.find_or_create_run(uri, "demo-medi", tags={"medi_dist.kind": "train"}))
        tracking.log_datasets(train, {"training": str(real)})
        for step, loss in enumerate([0.9, 0.5, 0.3]):
            train.metrics({"loss": loss}, step)
        log_model_dir(train, tiny_model(real, tmp / "model", train.run_id), "demo-medi")
        train.finish()
        with tracking.stage(uri, "generate-synthetic-medi", "generate") as gen:
            tracking.log_datasets(gen, {"training": str(real), "generated": str(pool)})
        with tracking.stage(uri, "evaluate", "evaluate") as ev:
            tracking.log_datasets(ev, {"real": str(real), "synthetic": [str(pool)]})
            ev.metrics({"medi_synthetic.balanced_accuracy": 0.8})
        parent.artifact_bytes(b"arm  balanced_accuracy\n", "results.txt")
        tracking.log_datasets(parent, {"real": str(real), "synthetic": [str(pool)]})
    return {"parent": parent.run_id, "train": train.run_id, "generate": gen.run_id}


# No network here or in CI: nothing but the page's own requests (no updates, sync, QUIC probes, GPU).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1000",
    "--virtual-time-budget=20000",  # virtual time: the app's requests settle before the dump
]


def chromium(url: str, profiles: Path, *flags: str, text: bool = False) -> subprocess.CompletedProcess:
    """One headless Chromium launch with a fresh profile (--user-data-dir)."""
    profile = Path(tempfile.mkdtemp(prefix="profile-", dir=profiles))
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, url]
    return subprocess.run(cmd, capture_output=True, text=text, timeout=300, check=True)


def page_text(url: str, profiles: Path, screenshot: Path | None = None) -> str:
    """The rendered page's text; with `screenshot`, also a PNG of it."""
    if screenshot:
        chromium(url, profiles, f"--screenshot={screenshot}")
    dom = chromium(url, profiles, "--dump-dom", text=True).stdout
    text = re.sub(r"<style.*?</style>|<script.*?</script>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


def require_chromium() -> None:
    """Skipped loudly on a machine without chromium; under CI (where `make test` installs it) a failure."""
    if CHROMIUM is None:
        why = (
            "chromium is not installed, so the MLflow UI browser check did not run; `make install` "
            "installs it as root (apt-get install chromium)"
        )
        if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
            pytest.fail(f"CI is set: {why}")
        pytest.skip(f"LOUD SKIP: {why}")


def test_missing_chromium_fails_under_ci(monkeypatch):
    monkeypatch.setitem(globals(), "CHROMIUM", None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set: chromium is not installed"):
        require_chromium()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="LOUD SKIP"):
        require_chromium()


def test_mlflow_ui_in_a_browser(server, real, tmp_path):
    require_chromium()
    runs = demo_like_store(server, real, tmp_path)
    profiles, digest = tmp_path / "chromium", tracking.dataset_digest(load_manifest(real))
    profiles.mkdir()

    # the link medi-dist prints opens the experiment in Model training mode: Runs and the Model registry,
    # not the GenAI pages (Overview of traces, Evaluation runs)
    exp = page_text(tracking.ui_link(server), profiles, tmp_path / "experiment.png")
    assert "Model training" in exp and "Model registry" in exp and "Evaluation runs" not in exp, exp[:600]
    assert "demo-review" in exp and " Runs " in exp
    assert (tmp_path / "experiment.png").stat().st_size > 10_000

    parent = page_text(tracking.ui_link(server, runs["parent"]), profiles, tmp_path / "parent.png")
    children = re.search(r"Child runs (.*?) Source", parent)
    assert children, parent[:1500]
    assert {"demo-medi", "generate-synthetic-medi", "evaluate"} <= set(re.split(r"[ ,]+", children.group(1)))
    assert (tmp_path / "parent.png").stat().st_size > 10_000
    assert f"data ({digest}) real" in parent, parent[:1500]
    # the model its training child made and registered: the parent run lists it (an output) and its version
    assert re.search(r"Registered models demo-medi v1", parent), parent[:3000]
    assert "medi_model" in parent, parent[:3000]

    train = page_text(tracking.ui_link(server, runs["train"]), profiles)
    assert "Parent run demo-review" in train
    assert f"Datasets data ({digest}) training" in train, train[:1500]
    assert re.search(r"Registered models demo-medi v1", train), train[:1500]

    gen = page_text(tracking.ui_link(server, runs["generate"]), profiles)
    assert f"data ({digest}) training" in gen and "Parent run demo-review" in gen, gen[:1500]
