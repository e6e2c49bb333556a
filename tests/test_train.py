"""Distributed training on the local Ray cluster: sync, loss, resume, model directory, MLflow."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medi_dist.config import load_config
from medi_dist.metadata import UnknownValueError
from medi_dist.model import encode_conditions, load_model_dir
from medi_dist.train.config import TrainConfig
from medi_dist.train.trainer import train
from medi_dist.tracking import client


def _cfg(dataset, tmp_path, name, **over):
    base = [f"data.dataset={dataset}", "model.preset=tiny", "model.resolution=16", "optim.batch_size=16",
            "optim.lr=0.002", f"run.name={name}", f"run.storage_path={tmp_path / 'runs'}",
            f"run.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "run.log_every=5", "run.cpus_per_worker=1"]
    return load_config(TrainConfig, None, base + [f"{k}={v}" for k, v in over.items()])


def _loss_history(cfg, run_id):
    hist = client(cfg.run.tracking_uri).get_metric_history(run_id, "loss")
    return [m.value for m in sorted(hist, key=lambda m: m.step)]


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, proc_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train2")
    cfg = _cfg(proc_dataset, tmp, "two", steps=60, **{"run.num_workers": 2, "run.checkpoint_every": 30,
                                                           "run.sample_every": 30})
    return cfg, train(cfg)


def test_two_workers_end_in_sync_and_loss_falls(two_worker_run):
    cfg, res = two_worker_run
    assert res.metrics["step"] == 60 and res.metrics["final"]
    assert res.metrics["ranks_in_sync"] == 1.0  # gradient sync really happened (Accelerator(cpu=True))
    loss = _loss_history(cfg, res.mlflow_run_id)
    assert len(loss) == 12
    assert np.mean(loss[-3:]) < 0.7 * np.mean(loss[:2]), loss


def test_model_dir_reloads_with_identical_outputs(two_worker_run):
    cfg, res = two_worker_run
    a, mcfg, spec = load_model_dir(res.model_dir)
    b, _, _ = load_model_dir(res.model_dir)
    assert spec.categorical_names == ["cancer_type", "tissue_source_site"]
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    site = spec.vocab("tissue_source_site").values[0]
    cond = encode_conditions(spec, [{"cancer_type": spec.vocab("cancer_type").values[0], "tissue_source_site": site}] * 4)
    with torch.no_grad():
        torch.testing.assert_close(a(x, torch.tensor([10] * 4), cond), b(x, torch.tensor([10] * 4), cond), rtol=0, atol=0)
    with pytest.raises(UnknownValueError, match="valid values"):
        encode_conditions(spec, [{"cancer_type": "NOPE", "tissue_source_site": site}])


def test_mlflow_run_holds_params_metrics_and_sample_grid(two_worker_run):
    cfg, res = two_worker_run
    c = client(cfg.run.tracking_uri)
    run = c.get_run(res.mlflow_run_id)
    assert run.data.params["run.num_workers"] == "2" and run.data.params["model.preset"] == "tiny"
    for m in ("loss", "lr", "img_per_s", "data_wait_fraction", "ranks_in_sync"):
        assert m in run.data.metrics, m
    arts = [a.path for a in c.list_artifacts(res.mlflow_run_id, "samples")]
    assert sum(p.endswith(".png") for p in arts) >= 2, arts  # step 30 (workers) and the final grid


def test_stopped_run_resumes_and_follows_uninterrupted_loss(ray_cluster, proc_dataset, tmp_path):
    full_cfg = _cfg(proc_dataset, tmp_path, "full", steps=40, **{"run.checkpoint_every": 20})
    full = train(full_cfg)
    cut_cfg = _cfg(proc_dataset, tmp_path, "cut", steps=40, **{"run.checkpoint_every": 20, "run.stop_after": 20})
    first = train(cut_cfg)
    assert first.model_dir is None and first.metrics["step"] == 20
    cut_cfg.run.stop_after = None
    second = train(cut_cfg)  # same run name: resumes from step 20
    assert second.metrics["step"] == 40 and second.model_dir is not None
    assert second.mlflow_run_id == first.mlflow_run_id
    a, b = _loss_history(full_cfg, full.mlflow_run_id), _loss_history(cut_cfg, second.mlflow_run_id)
    assert len(a) == len(b) == 8
    # data order differs between runs, so compare the late loss level, not step by step
    assert abs(np.mean(a[-3:]) - np.mean(b[-3:])) < 0.25 * np.mean(a[-3:]) + 0.02, (a, b)
    assert second.metrics["samples_seen"] == 40 * 16
    # The same run name with other conditions cannot resume those checkpoints: one line, before any work.
    other = _cfg(proc_dataset, tmp_path, "cut", steps=60, **{"model.conditions": "[cancer_type]"})
    with pytest.raises(ValueError, match=r"run.name='cut' already holds checkpoints of another model "
                                         r"\(conditions/vocabularies differ.*choose a new run.name"):
        train(other)


def test_resources_a_local_cluster_lacks_are_refused_up_front(ray_cluster, proc_dataset, tmp_path):
    """Ray would wait forever for a GPU (or starve data decoding of CPUs); say so before starting."""
    with pytest.raises(ValueError, match=r"needs 1 GPU\(s\) but the Ray cluster has 0; set run.use_gpu=false"):
        train(_cfg(proc_dataset, tmp_path, "gpu", steps=5, **{"run.use_gpu": "true"}))
    with pytest.raises(ValueError, match=r"needs 8.5 CPU\(s\) but the Ray cluster has 4; lower run.cpus_per_worker"):
        train(_cfg(proc_dataset, tmp_path, "cpu", steps=5, **{"run.cpus_per_worker": 8}))
    assert not (tmp_path / "runs").exists()
