"""Ray Train wiring: the dataset stream, a TorchTrainer around `train_worker`, resume by run name,
and the final model directory copied out of the last checkpoint."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ..data.shards import verify_shards
from ..data.stream import StreamConfig, tile_stream
from ..model import ModelConfig
from ..ray_setup import check_resource, ensure_ray
from ..tracking import RunLogger, find_or_create_run, tracking_uri
from .config import TrainConfig
from .loop import train_worker

log = logging.getLogger("medi_dist.train")


@dataclass
class TrainResult:
    model_dir: Path | None  # None when the run stopped early (stop_after); re-run to resume
    metrics: dict
    mlflow_run_id: str
    skipped_tiles: int


def model_config(cfg: TrainConfig) -> ModelConfig:
    m = cfg.model
    overrides = dict(fusion=m.fusion, default_cond_dropout=m.cond_dropout, prediction_type=m.prediction_type)
    if m.resolution:
        overrides["sample_size"] = m.resolution
    return ModelConfig.from_preset(m.preset, **overrides)


def output_dir(cfg: TrainConfig) -> Path:
    return Path(cfg.run.output or Path(cfg.run.storage_path) / cfg.run.name / "model")


RUN_FILE = "medi-dist-run.json"


def check_resume(storage: str, name: str, mcfg: ModelConfig, spec, dataset: str) -> None:
    """A run name resumes its checkpoints, so the architecture and vocabularies must not change between
    starts (a new dataset would otherwise fail deep inside a worker with a tensor size mismatch).
    The first start records them next to Ray's checkpoints (local folder or cloud URI)."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(storage) if "://" in storage else (pafs.LocalFileSystem(), storage)
    path = f"{root.rstrip('/')}/{name}/{RUN_FILE}"
    now = {"model_config": mcfg.to_dict(), "spec": spec.to_dict(), "dataset": dataset}
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps(now, indent=1).encode())
        return
    with fs.open_input_stream(path) as f:
        before = json.loads(f.read())
    changed = [k for k in ("model_config", "spec") if json.dumps(before[k], sort_keys=True) != json.dumps(now[k], sort_keys=True)]
    if changed:
        what = " and ".join({"model_config": "architecture", "spec": "conditions/vocabularies"}[k] for k in changed)
        raise ValueError(f"run.name={name!r} already holds checkpoints of another model ({what} differ; it was "
                         f"started on dataset {before['dataset']}, this is {dataset}): choose a new run.name, or "
                         f"delete {storage}/{name} to start over")


def train(cfg: TrainConfig) -> TrainResult:
    verify_shards(cfg.data.dataset, cfg.data.splits)  # a wrong path fails before Ray starts
    mcfg = model_config(cfg)
    if ensure_ray():  # a fixed local cluster: check CPUs and GPUs (an autoscaler would add nodes)
        workers = cfg.run.num_workers
        check_resource("CPU", workers * cfg.run.cpus_per_worker + cfg.data.cpus_per_decode,
                       f"training with {workers} worker(s) x {cfg.run.cpus_per_worker:g} CPU + data decoding",
                       "lower run.cpus_per_worker (e.g. 0.5; run.threads_per_worker sets torch threads) or run.num_workers")
        if cfg.run.use_gpu:
            check_resource("GPU", workers, f"training with run.use_gpu=true and {workers} worker(s)",
                           "set run.use_gpu=false (and run.mixed_precision=no) to train on CPU, or submit to a GPU cluster")
    stream = tile_stream(cfg.data.dataset, cfg.data.splits,
                         StreamConfig(resolution=mcfg.sample_size, balance=cfg.data.balance, seed=cfg.seed,
                                      max_bad_fraction=cfg.data.max_bad_fraction, num_cpus=cfg.data.cpus_per_decode))
    spec = stream.spec.subset(cfg.model.conditions, cfg.model.continuous)
    storage = cfg.run.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    check_resume(storage, cfg.run.name, mcfg, spec, str(cfg.data.dataset))
    uri = tracking_uri(cfg.run.tracking_uri)
    # One MLflow run per Ray run (storage path + name): re-running resumes both together.
    run_id = find_or_create_run(uri, cfg.run.name, cfg.run.experiment, tags={"medi_dist.kind": "train"},
                                key=f"{storage}/{cfg.run.name}")
    logger = RunLogger(uri, run_id)
    logger.params({**asdict(cfg), "model_config": mcfg.to_dict()})
    index = pd.read_parquet(Path(cfg.data.dataset) / "index.parquet")
    train_rows = index[index["split"].isin(cfg.data.splits)]
    pairs = sorted(set(zip(train_rows["cancer_type"], train_rows["tissue_source_site"])))
    loop_cfg = {**asdict(cfg), "pairs": pairs, "model_config": mcfg.to_dict(), "spec": spec.to_dict(), "tracking_uri": uri,
                "mlflow_run_id": run_id, "steps": cfg.steps, "dataset": str(cfg.data.dataset)}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_cfg,
        scaling_config=ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                     resources_per_worker={"CPU": cfg.run.cpus_per_worker}),
        datasets={"train": stream.dataset},
        run_config=RunConfig(name=cfg.run.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints)),
    )
    result = trainer.fit()
    metrics = dict(result.metrics or {})
    skipped = stream.skipped()["skipped"]
    logger.metrics({"skipped_tiles": skipped}, metrics.get("step", 0))
    out = None
    if metrics.get("final") and result.checkpoint is not None:
        out = output_dir(cfg)
        with result.checkpoint.as_directory() as d:
            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(Path(d) / "model", tmp)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        logger.tags({"medi_dist.model_dir": str(out.resolve())})
        logger.finish()
    return TrainResult(out, metrics, run_id, skipped)

