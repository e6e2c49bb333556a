"""The Ray Tune study: >= 4 trials on 2 CPUs, killed mid-study and resumed, no test-site tile read
during selection, MLflow parent/child runs with the best trial tagged, errors before any work."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pytest

from medi_dist.evaluate.downstream import DownstreamError
from medi_dist.tune.config import SearchSpace, StudyConfig
from medi_dist.tune.study import run_study
from synthetic_pools import empty_pool, ingest_procedural, make_pool

DRIVER = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
from medi_dist.config_loader import from_dict
from medi_dist.tune.study import StudyConfig, run_study
run_study(from_dict(StudyConfig, json.loads(sys.argv[2])))
"""


@pytest.fixture(scope="module")
def tune_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    real = ingest_procedural(root / "real", n_types=3, n_sites=12, n_tiles=420, val=0.2)
    pools = [
        make_pool(real, root / "pool-medi", per_pair=6, model="medi", steps=25),
        make_pool(real, root / "pool-classonly", per_pair=6, model="class-only", steps=50, seed=9),
    ]
    return {"root": root, "real": real, "pools": pools}


def study_config(tune_data, tmp_path, **kw) -> StudyConfig:
    base = dict(
        name="study",
        real=str(tune_data["real"]),
        space=SearchSpace(ratio=[0.0, 0.5, 1.0], pools=[str(p) for p in tune_data["pools"]]),
        num_samples=4,
        seeds=[0, 1, 2],
        k_sites=4,
        max_per_class=30,
        cpus_per_trial=1,
        max_concurrent_trials=2,  # 2 trials x 1 CPU: the study runs on 2 CPUs
        storage_path=str(tmp_path / "runs"),
        cache_dir=str(tune_data["root"] / "cache"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    base.update(kw)
    return StudyConfig(**base)


def audits(audit_dir: Path) -> dict[str, list[dict]]:
    return {p.stem: json.loads(p.read_text()) for p in audit_dir.glob("*.json")}


def test_study_resumes_after_kill_and_never_reads_test_sites(ray_cluster, tune_data, tmp_path):
    cfg = study_config(tune_data, tmp_path)
    audit_dir = Path(cfg.storage_path) / cfg.name / "audit"
    log = open(tmp_path / "driver.log", "w")
    gcs = ray_cluster.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER, gcs, json.dumps(asdict(cfg))], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT
    )
    done_before: set[str] = set()
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not done_before:
        time.sleep(0.5)
        done_before = {t for t, es in audits(audit_dir).items() if any(len(e["seeds"]) == 3 for e in es)}
    assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    time.sleep(1.0)  # let that trial's last report land
    proc.kill()  # a hard interruption: no cleanup in the driver
    proc.wait()
    killed_at = time.time()

    res = run_study(cfg)  # same storage_path + name: restores the study
    trials = res.trials
    assert len(trials) == 4 and not trials["error"].any()
    # a trial interrupted before its first report may get a second folder; ids stay the same
    ids = {"_".join(d.name.split("_")[2:4]) for d in (Path(cfg.storage_path) / cfg.name).glob("run_trial_*")}
    assert ids == set(trials["trial_id"])
    assert trials["complete"].any() and (trials["seeds_done"] >= 1).all()
    entries = audits(audit_dir)
    for t in done_before:  # finished before the kill: its seeds were never computed again
        computed = [s for e in entries[t] for s in e["computed"]]
        assert sorted(computed) == [0, 1, 2], entries[t]
    assert any(e["start"] > killed_at - 1 for es in entries.values() for e in es), "nothing ran after the restore"

    # No holdout tile during selection: trials and the driver's warm-up read train/val/pool shards only.
    real = tune_data["real"].resolve()
    index = pd.read_parquet(real / "index.parquet")
    holdout_sites = set(json.loads((real / "split.json").read_text())["sites"]["holdout"])
    holdout_keys = set(index.loc[index["tissue_source_site"].isin(holdout_sites), "key"])
    val_keys = set(index.loc[index["split"] == "val", "key"])
    assert holdout_keys and val_keys
    for name, es in entries.items():
        keys = {k for e in es for k in e["keys"].get(str(real), [])}
        shards = {s for e in es for s in e["shards"]}
        if name == "final":  # after selection: the one look at the test sites
            assert keys & holdout_keys and any("/shards/holdout/" in s for s in shards)
            continue
        assert not keys & holdout_keys, f"{name} read test-site tiles"
        assert not any(s.startswith(str(real / "shards" / "holdout")) for s in shards), name
        assert keys & val_keys, f"{name} did not read the val sites it is scored on"

    # MLflow: parent study run, one child per trial plus the real-only baseline, best tagged once.
    from mlflow.tracking import MlflowClient

    c = MlflowClient(cfg.tracking_uri)
    exp = c.get_experiment_by_name(cfg.experiment)
    children = c.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{res.parent_run_id}'")
    kinds = sorted(r.data.tags["medi_dist.kind"] for r in children)
    assert kinds == ["tune-baseline"] + ["tune-trial"] * 4
    best = [r for r in children if r.data.tags.get("medi_dist.best") == "true"]
    assert [r.info.run_id for r in best] == [res.best["mlflow_run_id"]]
    for r in children:
        assert r.info.status == "FINISHED"
        arts = {a.path for a in c.list_artifacts(r.info.run_id)}
        assert {"subgroups_val.csv", "site_accuracy_val.png", "confusion_val.png"} <= arts
        if r.data.tags["medi_dist.kind"] == "tune-trial":
            assert "val_site_balanced_accuracy" in r.data.metrics and "ratio" in r.data.params
            if float(r.data.params["ratio"]) > 0:
                assert "pool_samples.png" in arts and r.data.params["pool.model"] in ("medi", "class-only")
    parent = c.get_run(res.parent_run_id)
    assert parent.data.tags["best_trial"] == res.best["trial_id"]
    assert {"test_site_balanced_accuracy", "test_real_only_site_balanced_accuracy"} <= set(parent.data.metrics)
    assert res.test is not None and set(res.test.results) == {"real only", "best"}

    again = run_study(replace(cfg, max_concurrent_trials=1))  # finished: nothing reruns, holdout not scored twice
    assert again.best["trial_id"] == res.best["trial_id"] and again.test is None
    with pytest.raises(DownstreamError, match="other settings .*num_samples"):
        run_study(replace(cfg, num_samples=6))  # Tune would quietly keep the old search: refuse


def test_study_bad_inputs_fail_before_any_work(tune_data, tmp_path):
    cfg = study_config(tune_data, tmp_path)
    store = Path(cfg.storage_path)
    with pytest.raises(DownstreamError, match="negative ratio"):
        run_study(replace(cfg, space=replace(cfg.space, ratio=[-1.0, 1.0])))
    empty = empty_pool(tune_data["real"], tmp_path / "empty-pool")
    with pytest.raises(DownstreamError, match="empty"):
        run_study(replace(cfg, space=replace(cfg.space, pools=[str(empty)])))
    with pytest.raises(FileNotFoundError, match="/no/such/model.safetensors"):
        run_study(replace(cfg, encoder="openclip:ViT-B-32:/no/such/model.safetensors"))
    no_val = ingest_procedural(tmp_path / "no-val", n_types=3, n_sites=6, n_tiles=60)
    with pytest.raises(DownstreamError, match="val-fraction"):
        run_study(replace(cfg, real=str(no_val)))
    with pytest.raises(DownstreamError, match="space.pools is empty"):
        run_study(replace(cfg, space=replace(cfg.space, pools=[])))
    assert not store.exists() and not (tmp_path / "mlflow.db").exists()


def test_baselines_in_the_search_space(tune_data, tmp_path):
    from medi_dist.tune.study import base_config, check_study, param_space
    from medi_dist.tune.trial import trial_config

    cfg = study_config(tune_data, tmp_path)
    assert "baseline" not in param_space(cfg)  # a study without baselines keeps its earlier space
    both = replace(cfg, space=replace(cfg.space, baseline=["none", "type-site-balance"]))
    check_study(both)
    assert param_space(both)["baseline"] is not None
    chosen = trial_config(
        base_config(both),
        {"ratio": 0.5, "allocation": "uniform", "pool": "", "C": 1.0, "baseline": "type-site-balance"},
    )
    assert chosen.balance == "type-site" and chosen.augment == "none"
    with pytest.raises(DownstreamError, match="use --classifier cnn"):  # pixel transforms need the CNN
        check_study(replace(cfg, space=replace(cfg.space, baseline=["hed-jitter"])))


def test_example_config_loads():
    from medi_dist.config_loader import load_config

    cfg = load_config(StudyConfig, Path(__file__).parents[1] / "jobs" / "tune_small.yaml", ["num_samples=2"])
    assert cfg.num_samples == 2 and cfg.space.allocation == ["unseen-pairs", "inverse-frequency", "uniform"]


def test_checkpointed_seeds_round_trip_as_json(tune_data):
    from medi_dist.evaluate.downstream import DownstreamConfig, run_downstream
    from medi_dist.tune.trial import runs_from_json, runs_to_json

    res = run_downstream(
        DownstreamConfig(
            str(tune_data["real"]),
            synthetic=[str(tune_data["pools"][0])],
            ratio=0.5,
            seeds=[0, 1],
            k_sites=3,
            cache_dir=str(tune_data["root"] / "cache"),
        )
    )
    back = runs_from_json(runs_to_json(res.runs))
    for a, b in zip(res.runs, back):
        assert (a.seed, a.metrics, a.allocation, a.real_keys, a.synthetic_keys) == (
            b.seed,
            b.metrics,
            b.allocation,
            b.real_keys,
            b.synthetic_keys,
        )
        assert a.predictions.equals(b.predictions)
