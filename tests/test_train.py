"""Distributed training on the local Ray cluster: sync, loss, resume, model directory, MLflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medi_dist.config_loader import ConfigError, load_config
from medi_dist.data.shards import load_manifest
from medi_dist.metadata import UnknownValueError
from medi_dist.model import encode_conditions, load_model_dir
from medi_dist.tracking import client, dataset_digest
from medi_dist.train.config import TrainConfig
from medi_dist.train.trainer import train

REPO = Path(__file__).resolve().parents[1]


def _cfg(dataset, tmp_path, name, **over):
    base = [
        f"data.dataset={dataset}",
        "model.preset=tiny",
        "model.resolution=16",
        "optim.batch_size=16",
        "optim.lr=0.002",
        f"run.name={name}",
        f"run.storage_path={tmp_path / 'runs'}",
        f"run.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "run.log_every=5",
        "run.cpus_per_worker=1",
    ]
    return load_config(TrainConfig, None, base + [f"{k}={v}" for k, v in over.items()])


def _loss_history(cfg, run_id):
    hist = client(cfg.run.tracking_uri).get_metric_history(run_id, "loss")
    return [m.value for m in sorted(hist, key=lambda m: m.step)]


@pytest.fixture(scope="module")
def two_worker_run(ray_cluster, proc_dataset, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train2")
    over = {"run.num_workers": 2, "run.checkpoint_every": 30, "run.sample_every": 30, "run.system_metrics": "true"}
    cfg = _cfg(proc_dataset, tmp, "two", steps=60, **over)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
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
    cond = encode_conditions(
        spec, [{"cancer_type": spec.vocab("cancer_type").values[0], "tissue_source_site": site}] * 4
    )
    with torch.no_grad():
        t = torch.tensor([10] * 4)
        torch.testing.assert_close(a(x, t, cond), b(x, t, cond), rtol=0, atol=0)
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
    # review: the dataset it read (digest from dataset.json), system metrics, the model as a registered pyfunc
    (ds,) = run.inputs.dataset_inputs
    assert ds.dataset.digest == dataset_digest(load_manifest(cfg.data.dataset)) and ds.dataset.name == "proc"
    assert {t.key: t.value for t in ds.tags}["mlflow.data.context"] == "training"
    assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
    (mv,) = c.search_model_versions("name = 'two'")
    assert mv.run_id == res.mlflow_run_id and run.data.tags["medi_dist.registered_model"] == f"two/{mv.version}"
    # an MLflow 3 logged model made by the run (its output), the version's source
    (model,) = c.search_logged_models([run.info.experiment_id], filter_string="name = 'medi_model'")
    assert model.source_run_id == res.mlflow_run_id and str(model.status) == "READY"
    assert {"MLmodel", "artifacts"} <= {a.path for a in c.list_logged_model_artifacts(model.model_id)}
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    assert mv.source == model.artifact_location and f'"version": "{mv.version}"' in model.tags["mlflow.modelVersions"]


ONE_WORKER = {"steps": 40, "seed": 3, "run.checkpoint_every": 20}  # crosses an epoch (~440 rows / 16)


@pytest.fixture(scope="module")
def one_worker_run(ray_cluster, proc_dataset, tmp_path_factory):
    """An uninterrupted one-worker run: the resume test's reference and the bit-identical test's first run."""
    cfg = _cfg(proc_dataset, tmp_path_factory.mktemp("train1"), "full", **ONE_WORKER)
    return cfg, train(cfg)


def test_stopped_run_resumes_and_follows_uninterrupted_loss(one_worker_run, proc_dataset, tmp_path):
    full_cfg, full = one_worker_run
    cut_cfg = _cfg(proc_dataset, tmp_path, "cut", **ONE_WORKER, **{"run.stop_after": 20})
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
    # Finished: a re-run returns at once, the model directory untouched.
    stamp = (second.model_dir / "config.json").stat().st_mtime_ns
    again = train(cut_cfg)
    assert again.finished_before and again.model_dir == second.model_dir.resolve() and again.metrics["step"] == 40
    assert (second.model_dir / "config.json").stat().st_mtime_ns == stamp
    # Raising steps continues from the final checkpoint; MLflow keeps the first `steps` param, the tag shows the raise.
    cut_cfg.steps = 45
    more = train(cut_cfg)
    assert more.metrics["step"] == 45 and more.model_dir is not None and not more.finished_before
    run = client(cut_cfg.run.tracking_uri).get_run(more.mlflow_run_id)
    assert run.data.params["steps"] == "40" and run.data.tags["medi_dist.steps_raised"] == "40 -> 45"
    assert run.info.status == "FINISHED"
    # The same run name with other conditions cannot resume those checkpoints: one line, before any work.
    other = _cfg(proc_dataset, tmp_path, "cut", **{**ONE_WORKER, "steps": 60, "model.conditions": "[cancer_type]"})
    with pytest.raises(
        ValueError,
        match=r"run.name='cut' was started with other training settings: model.conditions "
        r'\["cancer_type", "tissue_source_site"\] -> \["cancer_type"\]; '
        r"use a new run.name",
    ):
        train(other)


@pytest.mark.parametrize("workers", [1, 2])
def test_same_seed_trains_bit_identical_weights(one_worker_run, proc_dataset, tmp_path, workers):
    """Issue 12: the same command and seed give the same weights (data order through Ray Data and
    streaming_split, local shuffle, noise, init). ~440 balanced train rows / 16 per batch: the
    steps cross an epoch boundary, so the second epoch's (reseeded) order is compared too.
    One worker: the module's uninterrupted run is the first of the two."""
    over = ONE_WORKER if workers == 1 else {"steps": 18, "seed": 3, "run.num_workers": 2}
    runs = [one_worker_run] if workers == 1 else []
    while len(runs) < 2:
        cfg = _cfg(proc_dataset, tmp_path, f"rep{len(runs)}", **over)
        runs.append((cfg, train(cfg)))
    (ca, a), (cb, b) = runs
    for f in ("model.safetensors", "ema.safetensors"):
        assert (a.model_dir / f).read_bytes() == (b.model_dir / f).read_bytes(), f"{f} differs: two identical runs"
    assert _loss_history(ca, a.mlflow_run_id) == _loss_history(cb, b.mlflow_run_id)


def test_resources_a_local_cluster_lacks_are_refused_up_front(ray_cluster, proc_dataset, tmp_path):
    """Ray would wait forever for a GPU (or starve data decoding of CPUs); say so before starting."""
    with pytest.raises(ValueError, match=r"needs 1 GPU\(s\) but the Ray cluster has 0; set run.use_gpu=false"):
        train(_cfg(proc_dataset, tmp_path, "gpu", steps=5, **{"run.use_gpu": "true"}))
    with pytest.raises(ValueError, match=r"needs 8.5 CPU\(s\) but the Ray cluster has 4; lower run.cpus_per_worker"):
        train(_cfg(proc_dataset, tmp_path, "cpu", steps=5, **{"run.cpus_per_worker": 8}))
    assert not (tmp_path / "runs").exists()


# --- run folder: names, settings, finished runs, interrupted saves (no Ray) -------------------------


def _record(cfg, **extra):
    """A medi-dist-run.json as a first start of `cfg` writes it."""
    from medi_dist.train.run_folder import RUN_FILE, RunFolder, training_fields

    folder = RunFolder(str(Path(cfg.run.storage_path).resolve()), cfg.run.name)
    folder.write_json(RUN_FILE, {"config": training_fields(cfg), "steps_history": [cfg.steps], **extra})
    return folder


@pytest.mark.parametrize("name", ["", "../esc", ".hidden", "a/b", "x y"])
def test_bad_run_names_are_refused(tmp_path, name):
    with pytest.raises(ConfigError, match=r"run.name must be letters, digits, '.', '_' or '-', not start with '.'"):
        _cfg(tmp_path / "d", tmp_path, name)


def test_device_decode_without_gpus_is_refused_in_one_line(tmp_path):
    """data.decode=device decodes on the workers' GPUs: asked for on a CPU run it is refused up front
    (no silent fallback to a slower CPU decode on the training workers)."""
    with pytest.raises(
        ConfigError, match=r"data.decode=device .* needs run.use_gpu=true; without GPUs use data.decode=cpu"
    ) as e:
        _cfg(tmp_path / "d", tmp_path, "dev", **{"data.decode": "device"})
    assert "\n" not in str(e.value)
    cfg = _cfg(tmp_path / "d", tmp_path, "dev", **{"data.decode": "device", "run.use_gpu": "true"})
    assert cfg.data.decode == "device"
    with pytest.raises(ConfigError, match=r"data.stain=reference re-renders .* on the CPU .*; use data.decode=cpu"):
        gpu = {"data.decode": "device", "run.use_gpu": "true"}
        _cfg(tmp_path / "d", tmp_path, "dev", **gpu, **{"data.stain": "reference"})
    with pytest.raises(ConfigError, match=r"data.stain must be as-stored or reference, got 'macenko'"):
        _cfg(tmp_path / "d", tmp_path, "dev", **{"data.stain": "macenko"})
    with pytest.raises(ConfigError, match=r"optim.min_snr_gamma must be >= 0 \(0: off; 5 is usual\), got -1.0"):
        _cfg(tmp_path / "d", tmp_path, "dev", **{"optim.min_snr_gamma": "-1"})


def test_resume_with_other_training_settings_is_refused(tmp_path):
    cfg = _cfg(tmp_path / "A", tmp_path, "r", steps=20)
    _record(cfg)
    other = _cfg(
        tmp_path / "B",
        tmp_path,
        "r",
        steps=20,
        **{"optim.lr": 0.01, "optim.batch_size": 8, "run.num_workers": 2, "run.log_every": 3},
    )
    with pytest.raises(ValueError) as e:
        train(other)  # refused before the (missing) dataset is even read
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("run.name='r' was started with other training settings: ")
    assert f'data.dataset "{tmp_path / "A"}" -> "{tmp_path / "B"}"' in msg
    assert "optim.batch_size 16 -> 8" in msg and "optim.lr 0.002 -> 0.01" in msg
    assert "run." not in msg.split(": ", 1)[1].split("; use")[0]  # run-only settings may change
    assert msg.endswith(f"use a new run.name (or delete {tmp_path / 'runs' / 'r'} to start over)")
    with pytest.raises(ValueError, match=r"steps 20 -> 10 \(steps can only be raised\)"):
        train(_cfg(tmp_path / "A", tmp_path, "r", steps=10))


def test_finished_run_returns_without_training(tmp_path, capsys):
    from medi_dist.cli import main

    model = tmp_path / "runs" / "done" / "model"
    model.mkdir(parents=True)
    cfg = _cfg(tmp_path / "gone", tmp_path, "done", steps=200)
    _record(cfg, finished={"step": 200, "model_dir": str(model)}, mlflow_run_id="abc")
    res = train(_cfg(tmp_path / "gone", tmp_path, "done", steps=100, **{"run.num_workers": 2}))
    assert res.finished_before and res.model_dir == model and res.metrics["step"] == 200
    args = [
        f"{k}={v}"
        for k, v in {
            "data.dataset": tmp_path / "gone",
            "model.preset": "tiny",
            "model.resolution": 16,
            "optim.batch_size": 16,
            "optim.lr": 0.002,
            "run.name": "done",
            "steps": 200,
            "run.storage_path": tmp_path / "runs",
            "run.log_every": 5,
            "run.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        }.items()
    ]
    assert main(["train", *args]) == 0  # the dataset is gone: nothing but the record was read
    assert capsys.readouterr().out.strip() == (
        f"run done already finished at step 200; model directory: {model} (raise steps to train further)"
    )
    assert not (tmp_path / "mlflow.db").exists()


def test_unregistered_checkpoint_folders_are_removed(tmp_path, caplog):
    import json

    from medi_dist.train.run_folder import SNAPSHOT, RunFolder, registered_step, remove_unregistered

    run = tmp_path / "runs" / "x"
    for d in ("checkpoint_a", "checkpoint_b", "checkpoint_c"):
        (run / d).mkdir(parents=True)
    folder = RunFolder(str(tmp_path / "runs"), "x")
    assert remove_unregistered(folder) == []  # no snapshot: nothing is known, nothing is touched
    (run / SNAPSHOT).write_text('{"checkpoint_results": [')  # cut short
    assert remove_unregistered(folder) == []
    entry = {"checkpoint_dir_name": "checkpoint_b", "metrics": {"step": 20}}
    (run / SNAPSHOT).write_text(
        json.dumps(
            {
                "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_a"}, entry],
                "latest_checkpoint_result": entry,
                "pending_training_results": [],
            }
        )
    )
    assert remove_unregistered(folder) == ["checkpoint_c"]
    assert sorted(p.name for p in run.glob("checkpoint_*/")) == ["checkpoint_a", "checkpoint_b"]
    assert "removed 1 checkpoint folder(s) of run" in caplog.text and "never registered" in caplog.text
    assert registered_step(folder) == 20


# --- relative paths inside `ray job submit --working-dir` (no Ray) ----------------------------------


def _as_job(monkeypatch, working_dir="gcs://_ray_pkg_0123abcd.zip"):
    import json

    from medi_dist.ray_setup import JOB_CONFIG_ENV

    env = {"runtime_env": {"working_dir": working_dir} if working_dir else {}, "metadata": {}}
    monkeypatch.setenv(JOB_CONFIG_ENV, json.dumps(env))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_job_config_variable_is_rays():
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    from medi_dist.ray_setup import JOB_CONFIG_ENV

    assert JOB_CONFIG_ENV == RAY_JOB_CONFIG_JSON_ENV_VAR


def test_relative_paths_are_refused_in_a_job_with_working_dir(monkeypatch, tmp_path, capsys):
    from medi_dist.cli import main
    from medi_dist.ray_setup import JobPathError

    _as_job(monkeypatch)
    monkeypatch.chdir(tmp_path)
    cfg = load_config(TrainConfig, REPO / "jobs/train_small.yaml", [])
    with pytest.raises(JobPathError) as e:
        train(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "ray job submit --working-dir" in msg
    assert (
        "data.dataset=data/procedural, run.storage_path=medi-dist-runs, run.tracking_uri (default ./mlflow.db)" in msg
    )
    assert "pass absolute paths or URIs on shared storage (e.g. /mnt/shared/" in msg
    assert main(["tune", "--config", str(REPO / "jobs/tune_small.yaml")]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and (
            "real=data/procedural, storage_path=medi-dist-runs, cache_dir=medi-dist-cache, "
            "space.pools[0]=data/pools/medi-ddim25, tracking_uri (default ./mlflow.db)"
        )
        in err
    )
    assert (
        main(["generate", "--model", "runs/m/model", "--out", "/mnt/x", "--mode", "unseen-pairs", "--count", "1"]) == 2
    )
    assert "--model=runs/m/model, --tracking-uri (default ./mlflow.db);" in capsys.readouterr().err
    assert (
        main(
            ["evaluate", "fidelity", "--real", "/mnt/r", "--synthetic", "syn", "--tracking-uri", "sqlite:///mlflow.db"]
        )
        == 2
    )
    assert "--synthetic=syn, --tracking-uri=sqlite:///mlflow.db;" in capsys.readouterr().err
    assert main(["evaluate", "downstream", "--real", "/mnt/r", "--mlflow-run", "x"]) == 2
    assert "--cache-dir=medi-dist-cache, $MLFLOW_TRACKING_URI (default ./mlflow.db);" in capsys.readouterr().err
    # no working_dir: the entrypoint runs in a folder that stays, relative paths are fine
    _as_job(monkeypatch, working_dir=None)
    with pytest.raises(Exception) as e:
        train(cfg)
    assert not isinstance(e.value, JobPathError)


def test_readme_cluster_commands_pass_the_job_path_check(monkeypatch):
    """The README's `ray job submit ... --working-dir .` commands use shared paths only."""
    import re
    import shlex

    import medi_dist.train.trainer as trainer
    from medi_dist.cli import main

    _as_job(monkeypatch)
    text = (REPO / "README.md").read_text().split("## Run on a cluster", 1)[1].split("```bash", 1)[1].split("```")[0]
    cmds = [
        shlex.split(c)[shlex.split(c).index("--") + 2 :]
        for c in re.sub(r"\\\n\s*", "", text).splitlines()
        if c.startswith("ray job submit") and "--working-dir" in c
    ]
    assert [c[0] for c in cmds] == ["train", "generate", "tune"]

    class PastCheck(Exception):
        pass

    def stop(*a, **k):
        raise PastCheck

    monkeypatch.setattr(trainer, "RunFolder", stop)  # past the check train would reach object storage
    monkeypatch.setattr("medi_dist.generate.job.build_tasks", stop)
    monkeypatch.setattr("medi_dist.generate.job.Folder", stop)  # an s3:// --out is opened right after the check
    monkeypatch.setattr("medi_dist.tune.study.check_study", stop)
    for args in cmds:
        if args[0] in ("train", "tune"):
            args = [a.replace("jobs/", f"{REPO}/jobs/", 1) if a.startswith("jobs/") else a for a in args]
        with pytest.raises(PastCheck):
            main(args)


def test_ctrl_c_marks_the_run_killed_and_the_rerun_drops_unregistered_checkpoints(ray_cluster, proc_dataset, tmp_path):
    """SIGINT (Ctrl-C) after the first registered checkpoint: Interrupted names the step a re-run resumes
    from, the MLflow run is KILLED, and the re-run removes checkpoint folders the snapshot never listed."""
    import json
    import os
    import signal
    import threading
    import time

    from medi_dist.train.trainer import Interrupted

    cfg = _cfg(proc_dataset, tmp_path, "ctrl-c", steps=40, **{"run.checkpoint_every": 10})
    run_dir = tmp_path / "runs" / "ctrl-c"
    snap = run_dir / "checkpoint_manager_snapshot.json"

    def ctrl_c():
        deadline = time.time() + 300
        while time.time() < deadline and not snap.exists():
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)  # handled in the main thread, inside trainer.fit()

    handler = signal.getsignal(signal.SIGINT)
    threading.Thread(target=ctrl_c, daemon=True).start()
    with pytest.raises(Interrupted) as e:
        train(cfg)
    assert signal.getsignal(signal.SIGINT) is handler  # Ray Train's handler does not outlive fit
    step = json.loads(snap.read_text())["latest_checkpoint_result"]["metrics"]["step"]
    assert str(e.value) == (
        f"interrupted; re-run the same command to resume from the last registered checkpoint (step {step})"
    )
    c = client(cfg.run.tracking_uri)
    (run,) = c.search_runs([c.get_experiment_by_name("medi-dist").experiment_id])
    assert run.info.status == "KILLED"
    res = train(cfg)
    assert res.metrics["step"] == 40 and res.model_dir is not None
    assert c.get_run(res.mlflow_run_id).info.status == "FINISHED"
    from medi_dist.train.run_folder import registered

    listed = registered(json.loads(snap.read_text()))
    assert {p.name for p in run_dir.glob("checkpoint_*/")} <= listed


def test_cli_interrupted_prints_one_line_and_exits_130(monkeypatch, capsys):
    import medi_dist.train.trainer as trainer
    from medi_dist.cli import main

    def interrupted(cfg):
        raise trainer.Interrupted(20)

    monkeypatch.setattr(trainer, "train", interrupted)
    assert main(["train", "steps=5"]) == 130
    assert capsys.readouterr().err == (
        "medi-dist train: interrupted; re-run the same command to resume from the last "
        "registered checkpoint (step 20)\n"
    )
