"""Ray Train wiring: the dataset stream, a TorchTrainer around `loop.train_worker` (started through
entry.py), resume by run name, and the final model directory copied out of the last checkpoint."""

from __future__ import annotations

import json
import logging
import shutil
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ..data.shards import group_counts, verify_shards
from ..data.stream import StreamConfig, tile_stream
from ..model import ModelConfig
from ..paths import absolute
from ..ray_setup import check_job_paths, check_resource, ensure_ray
from ..storage import is_remote, upload_folder
from ..tracking import (
    SPILL_DIR,
    RunLogger,
    TrackingUnavailable,
    find_or_create_run,
    log_datasets,
    system_metrics_logged,
    tracking_uri,
    upload_spills,
)
from .config import TrainConfig
from .entry import run_worker
from .lease import RunLease
from .loop import WorkerConfig
from .run_folder import (
    RUN_FILE,
    RunFolder,
    check_same_training,
    finished_at,
    registered_step,
    remove_unregistered,
    training_fields,
)

log = logging.getLogger("medi_dist.train")


@dataclass
class TrainResult:
    model_dir: Path | None  # None when the run stopped early (stop_after); re-run to resume
    metrics: dict
    mlflow_run_id: str | None  # None: the server stayed down, calls left in <run folder>/mlflow-spill
    skipped_tiles: int
    finished_before: bool = False  # the run had already reached `steps`: nothing was trained


def model_config(cfg: TrainConfig) -> ModelConfig:
    m = cfg.model
    overrides = dict(
        fusion=m.fusion,
        default_cond_dropout=m.cond_dropout,
        cond_dropout=dict(m.column_dropout),
        prediction_type=m.prediction_type,
        late_columns=tuple(m.late_columns),
        late_up_blocks=m.late_up_blocks,
    )
    if m.resolution:
        overrides["sample_size"] = m.resolution
    return ModelConfig.from_preset(m.preset, **overrides)


def output_dir(cfg: TrainConfig) -> Path | str:
    """run.output, else <storage_path>/<run>/model: a local Path or an object-storage URI."""
    out = cfg.run.output or f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}/model"
    return out if is_remote(out) else Path(out)


def check_resume(folder: RunFolder, name: str, record: dict | None, mcfg: ModelConfig, spec, cfg: TrainConfig) -> dict:
    """A run name resumes its checkpoints, so the architecture and vocabularies must not change between
    starts (a dataset whose content changed under the same path would otherwise fail deep inside a
    worker with a tensor size mismatch). The first start records them, with the whole config, next
    to Ray's checkpoints (local folder or cloud URI); returns the record."""
    dataset = str(cfg.data.dataset)
    now = {"model_config": mcfg.to_dict(), "spec": spec.to_dict(), "dataset": dataset}
    if record is None:
        record = {**now, "config": training_fields(cfg), "steps_history": [cfg.steps]}
        folder.write_json(RUN_FILE, record)
        return record
    if "config" not in record:  # recorded before the config was: adopt this one from now on
        record.update(config=training_fields(cfg), steps_history=[cfg.steps])
        folder.write_json(RUN_FILE, record)
    changed = [
        k
        for k in ("model_config", "spec")
        if json.dumps(record[k], sort_keys=True) != json.dumps(now[k], sort_keys=True)
    ]
    if changed:
        what = " and ".join({"model_config": "architecture", "spec": "conditions/vocabularies"}[k] for k in changed)
        raise ValueError(
            f"run.name={name!r} already holds checkpoints of another model ({what} differ; it was "
            f"started on dataset {record['dataset']}, this is {dataset}): choose a new run.name, or "
            f"delete {folder.display} to start over"
        )
    return record


def note_steps_raised(folder: RunFolder, name: str, record: dict, steps: int, logger: RunLogger) -> None:
    """Raising steps continues training (the cosine LR schedule is stretched to the new end). MLflow
    params are immutable, so the `steps` param keeps the first value; the tag shows every raise."""
    config = record["config"]
    old = config["steps"]
    if steps <= old:
        return
    config["steps"] = steps
    record["steps_history"] = [*record.get("steps_history", [old]), steps]
    folder.write_json(RUN_FILE, record)
    history = " -> ".join(str(s) for s in record["steps_history"])
    print(
        f"run {name}: steps raised {old} -> {steps}; continuing from the last checkpoint "
        f"(the learning-rate schedule now ends at step {steps})",
        flush=True,
    )
    logger.tags({"medi_dist.steps_raised": history})


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says how to resume (cli prints it and exits 130)."""

    def __init__(self, step: int | None):
        super().__init__(
            f"interrupted; re-run the same command to resume from the last registered checkpoint (step {step})"
            if step is not None
            else "interrupted before a checkpoint was registered; re-run the same command to start again"
        )
        self.step = step


def fit(trainer: TorchTrainer):
    """trainer.fit() with Ctrl-C as one exception: Ray Train's own SIGINT handler aborts the run and
    then raises SystemExit(0) (a Ctrl-C before it is installed is a KeyboardInterrupt). The handler
    stays installed after fit, where it would swallow a later Ctrl-C: the previous one comes back."""
    main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main else None
    try:
        return trainer.fit()
    except (KeyboardInterrupt, SystemExit):
        raise Interrupted(None) from None
    finally:
        if main:
            signal.signal(signal.SIGINT, previous)


def already_finished(record: dict, steps: int) -> TrainResult | None:
    fin = finished_at(record, steps)
    if fin is None:
        return None
    model_dir = fin["model_dir"] if is_remote(fin["model_dir"]) else Path(fin["model_dir"])
    return TrainResult(
        model_dir,
        {"step": fin["step"], "final": True},
        record.get("mlflow_run_id", ""),
        0,
        finished_before=True,
    )


def train(cfg: TrainConfig) -> TrainResult:
    check_job_paths(
        {"data.dataset": cfg.data.dataset, "run.storage_path": cfg.run.storage_path, "run.output": cfg.run.output},
        {"run.tracking_uri": cfg.run.tracking_uri},
    )
    storage = absolute(cfg.run.storage_path)
    folder = RunFolder(storage, cfg.run.name)
    record = folder.read_json(RUN_FILE)
    if record is not None:  # a re-run: same training, and nothing to do once finished
        check_same_training(folder, cfg.run.name, record, cfg)
        done = already_finished(record, cfg.steps)
        if done:
            return done
    _preflight(cfg)  # a wrong path or resources the cluster lacks: refused before the run folder exists
    with RunLease(folder):  # one driver per run: the record, the cleanup and the checkpoints are ours
        return _train_leased(cfg, storage, folder)


def _log_model(cfg: TrainConfig, logger: RunLogger, model_dir: Path, out: Path | str) -> None:
    """The finished model as an MLflow model of the run, registered as run.registered_model (default
    run.name). The training is done and its model directory written: a tracking server that stays
    down (or refuses) costs the MLflow copy only, with a warning that says so."""
    from ..registry import log_model_dir

    name = cfg.run.name if cfg.run.registered_model is None else cfg.run.registered_model
    try:
        log_model_dir(logger, model_dir, name or None)
    except Exception as e:  # noqa: BLE001 - the model directory is the result; MLflow holds a copy
        log.warning(
            "training %r finished, but its model was not logged to MLflow (%s); the model directory "
            "is complete and usable as --model: %s",
            cfg.run.name,
            str(e).splitlines()[0][:300] if str(e) else type(e).__name__,
            out,
        )
        logger.tags({"medi_dist.model_logging_error": str(e)[:500]})


def _preflight(cfg: TrainConfig) -> None:
    verify_shards(cfg.data.dataset, cfg.data.splits)  # a wrong path fails before Ray starts
    if ensure_ray():  # a fixed local cluster: check CPUs and GPUs (an autoscaler would add nodes)
        workers = cfg.run.num_workers
        check_resource(
            "CPU",
            workers * cfg.run.cpus_per_worker + cfg.data.cpus_per_decode,
            f"training with {workers} worker(s) x {cfg.run.cpus_per_worker:g} CPU + data decoding",
            "lower run.cpus_per_worker (e.g. 0.5; run.threads_per_worker sets torch threads) or run.num_workers",
        )
        if cfg.run.use_gpu:
            check_resource(
                "GPU",
                workers,
                f"training with run.use_gpu=true and {workers} worker(s)",
                "set run.use_gpu=false (and run.mixed_precision=no) to train on CPU, or submit to a GPU cluster",
            )


def _train_leased(cfg: TrainConfig, storage: str, folder: RunFolder) -> TrainResult:
    record = folder.read_json(RUN_FILE)  # again, now that the run is ours
    mcfg = model_config(cfg)
    stream = tile_stream(
        cfg.data.dataset,
        cfg.data.splits,
        StreamConfig(
            resolution=mcfg.sample_size,
            balance=cfg.data.balance,
            seed=cfg.seed,
            max_bad_fraction=cfg.data.max_bad_fraction,
            num_cpus=cfg.data.cpus_per_decode,
            deterministic=cfg.data.deterministic,
            decode=cfg.data.decode,
        ),
    )
    spec = stream.spec.subset(cfg.model.conditions, cfg.model.continuous)
    record = check_resume(folder, cfg.run.name, record, mcfg, spec, cfg)
    uri = tracking_uri(cfg.run.tracking_uri)
    # One MLflow run per Ray run (storage path + name): re-running resumes both together.
    # A server that is down is waited for (tracking.run_wait_s); past that the training goes on and
    # every MLflow call goes to the run folder, delivered at its end or by the next run of this name.
    run_key, spill_dir = f"{storage}/{cfg.run.name}", f"{folder.display}/{SPILL_DIR}"
    run_id = _mlflow_run(uri, cfg, run_key, spill_dir)
    logger = RunLogger(uri, run_id, spill_dir)
    logger.params({**asdict(cfg), "model_config": mcfg.to_dict()})
    logger.status("RUNNING")  # again, after an interrupted (KILLED) start
    log_datasets(logger, {"training": cfg.data.dataset})
    if run_id and record.get("mlflow_run_id") != run_id:
        record["mlflow_run_id"] = run_id
        folder.write_json(RUN_FILE, record)
    note_steps_raised(folder, cfg.run.name, record, cfg.steps, logger)
    remove_unregistered(folder)
    pairs = sorted(group_counts(cfg.data.dataset, cfg.data.splits)[0])  # not the whole index (soak)
    worker = WorkerConfig(cfg, mcfg, spec, pairs, uri, run_id, spill_dir, stream.device_decoder)
    if cfg.data.stain == "reference":  # estimated once, here: every worker renders with the same stains
        from ..data.stain_estimation import estimate_site_stains

        worker.site_stains = estimate_site_stains(cfg.data.dataset, mcfg.sample_size, seed=cfg.seed).to_dict()
        worker.site_names = list(stream.spec.vocab("tissue_source_site").values)
    trainer = TorchTrainer(
        run_worker,
        train_loop_config={"worker": ray.put(worker)},  # the controller does not import the loop (entry.py)
        scaling_config=ScalingConfig(
            num_workers=cfg.run.num_workers,
            use_gpu=cfg.run.use_gpu,
            resources_per_worker={"CPU": cfg.run.cpus_per_worker},
        ),
        datasets={"train": stream.dataset},
        dataset_config=DataConfig(execution_options=stream.ingest_options()),
        run_config=RunConfig(
            name=cfg.run.name,
            # object storage: the filesystem medi-dist opens (RunFolder), as Ray's own GCS client
            # ignores STORAGE_EMULATOR_HOST; storage_path is then a path in it
            storage_path=folder.root if is_remote(storage) else storage,
            storage_filesystem=folder.fs if is_remote(storage) else None,
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        ),
    )
    try:
        with system_metrics_logged(logger, cfg.run.system_metrics):
            result = fit(trainer)
    except Interrupted:
        logger.finish("KILLED")
        _deliver_spills(uri, cfg, run_key, run_id, spill_dir, wait_s=0)
        raise Interrupted(registered_step(folder)) from None
    metrics = dict(result.metrics or {})
    skipped = stream.skipped()["skipped"]
    logger.metrics({"skipped_tiles": skipped}, metrics.get("step", 0))
    out = None
    if metrics.get("final") and result.checkpoint is not None:
        out = output_dir(cfg)
        with result.checkpoint.as_directory() as d:
            if is_remote(out):  # checksums.json last: verify_model_dir refuses a partial upload
                upload_folder(Path(d) / "model", out, last=("checksums.json",))
            else:
                tmp = out.with_name(out.name + ".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(Path(d) / "model", tmp)
                if out.exists():
                    shutil.rmtree(out)
                tmp.rename(out)
            out = out if is_remote(out) else out.resolve()
            logger.tags({"medi_dist.model_dir": str(out)})
            # from a local copy: the checkpoint's (object storage) or the output folder, which stays,
            # so without a run yet (server down at the start) it is logged once the run is made below
            if cfg.run.log_model and (logger.run_id or is_remote(out)):
                _log_model(cfg, logger, Path(d) / "model" if is_remote(out) else out, out)
        logger.finish()
        # a re-run with steps <= this step returns at once instead of restarting Ray Train
        record["finished"] = {"step": metrics["step"], "model_dir": str(out)}
        folder.write_json(RUN_FILE, record)
    else:
        logger.flush()
    run_id = _deliver_spills(uri, cfg, run_key, run_id, spill_dir)
    if run_id and record.get("mlflow_run_id") != run_id:
        record["mlflow_run_id"] = run_id
        folder.write_json(RUN_FILE, record)
    if out is not None and cfg.run.log_model and logger.run_id is None and not is_remote(out):
        late = RunLogger(uri, run_id, spill_dir)  # still None: _log_model warns that it was not logged
        _log_model(cfg, late, out, out)
        late.flush()
    return TrainResult(out, metrics, run_id, skipped)


def _mlflow_run(uri: str, cfg: TrainConfig, key: str, spill_dir: str, wait_s: float | None = None) -> str | None:
    """The training's MLflow run (one per storage path + name: re-running resumes both together),
    created or found with retries; None when the server stayed down (tracking.run_wait_s). Calls an
    earlier attempt could not deliver (in the run folder) are delivered now."""
    try:
        run_id = find_or_create_run(
            uri, cfg.run.name, cfg.run.experiment, tags={"medi_dist.kind": "train"}, key=key, wait_s=wait_s
        )
        upload_spills(uri, run_id, spill_dir, wait_s)
        return run_id
    except TrackingUnavailable as e:
        log.warning(
            "%s; training goes on without it: its metrics go to %s and are delivered at its end, or by "
            "the next run of %r, once the server is back",
            e,
            spill_dir,
            cfg.run.name,
        )
        return None


def _deliver_spills(
    uri: str, cfg: TrainConfig, key: str, run_id: str | None, spill_dir: str, wait_s: float | None = None
) -> str | None:
    """At the end of a training: the run (created now if the server was down at the start) receives
    what the workers and the driver spilled into the run folder; left there if the server is still down."""
    if run_id is None:
        return _mlflow_run(uri, cfg, key, spill_dir, wait_s)
    try:
        upload_spills(uri, run_id, spill_dir, wait_s)
    except TrackingUnavailable as e:
        log.warning("%s; the rest stays in %s for the next run of %r", e, spill_dir, cfg.run.name)
    return run_id
