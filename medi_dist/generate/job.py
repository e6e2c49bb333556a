"""The generation job: plan -> shard tasks -> Ray Data actor pool -> synthetic dataset directory.

The driver validates the plan, partitions the tile list into shards (a function of the plan alone),
and skips shards that a previous run completed (each is verified). The remaining shard tasks become
a Ray Dataset with one row per shard; `map_batches` with an actor pool runs them, one model per
actor, so each shard is sampled whole by one worker in fixed micro-batches: the tiles do not depend
on the number of workers. index.parquet and dataset.json are written last, from all shards, so the
directory only reads as a dataset once every planned tile is there exactly once.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.shards import INDEX, MANIFEST, VOCAB, atomic_write_parquet, atomic_write_text, file_sha256
from ..data.shards import SPLIT as SPLIT_FILE
from ..metadata import ConditioningSpec
from ..model.model_dir import read_model_info
from ..paths import absolute
from ..storage import Folder, is_remote, local_copy, temp_dir, upload_folder
from .plan import PlanRow
from .tasks import GenerateConfig, build_tasks
from .tile_list import task_tiles
from .writer import SPLIT, ShardGenerator, read_shard, shard_complete

log = logging.getLogger("medi_dist.generate")
GENERATION_FILE = "generation.json"


@dataclass
class GenerateResult:
    out: Path
    complete: bool  # False when stopped early by max_shards; re-run to finish
    tiles: int  # planned
    shards: int
    generated: list[str]  # shards written by this run
    skipped: int  # shards already complete from an earlier run
    rows: list[PlanRow]
    seconds: float
    stats: dict  # per-worker throughput


def _prepare_out(out: Path, header: dict, overwrite: bool, name: str | None = None) -> None:
    """Refuse to mix plans in one directory; drop temp files an interrupted run left behind.
    `name`: the --out the user gave, when `out` is a local mirror of it."""
    name = name or str(out)
    gen = out / GENERATION_FILE
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not gen.exists():
            raise FileExistsError(f"{name} exists and is not a generation output; choose another --out or --overwrite")
        else:
            old = json.loads(gen.read_text())
            if (old.get("generation"), old.get("tiles_per_shard")) != (header["generation"], header["tiles_per_shard"]):
                raise FileExistsError(
                    f"{name} holds tiles of another plan or sharding (generation "
                    f"{old.get('generation')}, "
                    f"now {header['generation']}); choose another --out or pass --overwrite"
                )
    out.mkdir(parents=True, exist_ok=True)
    _remove_partial(out)
    atomic_write_text(gen, json.dumps(header, indent=2, default=str))


class _ShardActor:
    """Ray Data actor: one model per actor; each batch row is one whole shard task. A model or an
    output on object storage is reached from this node: the model copied here (checked against its
    checksums when loaded), each shard written to a local temp folder and uploaded whole."""

    def __init__(self, model_dir: str, out_dir: str, **kwargs):
        self.remote = Folder(out_dir) if is_remote(out_dir) else None
        local_out = temp_dir("medi-dist-shards-") if self.remote else out_dir
        self.gen = ShardGenerator(model_dir=str(local_copy(model_dir)), out_dir=str(local_out), **kwargs)

    def __call__(self, batch: dict) -> dict:
        res = []
        for t in map(json.loads, batch["task"]):
            res.append(self.gen.run(t))
            if self.remote:
                local = self.gen.out / t["path"]
                self.remote.write_bytes(t["path"], local.read_bytes())
                local.unlink()
        return {k: np.array([r[k] for r in res]) for k in res[0]}


def _run_ray(cfg: GenerateConfig, tasks: list[dict]) -> list[dict]:
    import ray

    from ..ray_setup import check_resource, ensure_ray

    workers = min(cfg.workers, len(tasks))
    if ensure_ray():  # a fixed local cluster: check up front (an autoscaler would add GPU nodes)
        what = f"generation with {workers} worker(s)"
        check_resource("CPU", workers * cfg.cpus_per_worker, what, "lower --workers or --cpus-per-worker")
        check_resource(
            "GPU", workers * cfg.gpus_per_worker, what, "lower --workers, or set --gpus-per-worker 0 to generate on CPU"
        )
    ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
    ds = ds.map_batches(
        _ShardActor,
        batch_size=1,
        batch_format="numpy",
        fn_constructor_kwargs=dict(
            model_dir=absolute(cfg.model),
            settings=cfg.sampling,
            out_dir=absolute(cfg.out),
            threads=max(1, int(cfg.cpus_per_worker)),
            device="cuda" if cfg.gpus_per_worker > 0 else "cpu",
        ),
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cfg.cpus_per_worker,
        num_gpus=cfg.gpus_per_worker or None,
    )
    return ds.take_all()


def _remove_partial(out: Path) -> None:
    """Temporary shard files of a worker that died mid-write (killed, or its node lost)."""
    for tmp in out.glob(f"shards/{SPLIT}/.*.tmp-*"):
        tmp.unlink(missing_ok=True)


def _finalize(out: Path, tasks: list[dict], header: dict, spec: ConditioningSpec) -> None:
    _remove_partial(out)  # every shard is complete: what is left of a lost worker's attempt goes
    rows, shards = [], []
    for t in tasks:
        p = out / t["path"]
        rows += read_shard(p, t, decode=False)  # decoded when written or when found on resume
        shards.append(
            {
                "path": t["path"],
                "split": SPLIT,
                "tiles": len(task_tiles(t)),
                "bytes": p.stat().st_size,
                "sha256": file_sha256(p),
            }
        )
    index = pd.DataFrame(rows)
    spec.save(out / VOCAB)  # the model's vocabularies, never rebuilt from the tiles
    atomic_write_parquet(index, out / INDEX)
    groups = index.groupby(["cancer_type", "tissue_source_site"]).size()
    split = {
        "seed": header["plan"]["seed"],
        "holdout_fraction": 0.0,
        "val_fraction": 0.0,
        "sites": {SPLIT: sorted(index["tissue_source_site"].unique().tolist())},
        "counts": {SPLIT: int(len(index))},
        "missing_types": {},
        "groups": [
            {"cancer_type": t, "tissue_source_site": s, "split": SPLIT, "count": int(n)} for (t, s), n in groups.items()
        ],
    }
    atomic_write_text(out / SPLIT_FILE, json.dumps(split, indent=2))
    manifest = {
        "format": "medi-dist-dataset/1",
        "source": header["model_id"],
        "synthetic": True,
        **({"reference": header["reference"]} if header.get("reference") else {}),
        "tiles": int(len(index)),
        "image_formats": ["png"],
        "categorical": spec.categorical_names,
        "continuous": spec.continuous_names,
        "shards": shards,
        "skipped": [],
        "generation": {k: v for k, v in header.items() if k != "rows"},
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2, default=str))


def _pull(remote: Folder, local: Path) -> None:
    """Copy what an object-storage output holds into a local folder (to resume and to finalize)."""
    for rel in remote.files():
        if not (local / rel).exists():
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            (local / rel).write_bytes(remote.read_bytes(rel))


def generate(cfg: GenerateConfig) -> GenerateResult:
    from ..ray_setup import check_job_paths

    check_job_paths(
        {"--model": cfg.model, "--out": cfg.out, "--dataset": cfg.dataset},
        {"--tracking-uri": cfg.tracking_uri} if cfg.log_mlflow else None,
    )
    t0 = time.perf_counter()
    # On object storage the output is mirrored in a local folder: actors upload their shards, the
    # driver checks and finalizes the local copy and uploads the dataset files, dataset.json last.
    remote = Folder(cfg.out) if is_remote(cfg.out) else None
    out = Path(cfg.out)
    if remote is not None:
        remote.check_bucket()
        out = temp_dir("medi-dist-generate-") / "out"
        _pull(remote, out)
    try:
        res = _generate(cfg, out, remote, t0)
    finally:
        if remote is not None:
            shutil.rmtree(out.parent, ignore_errors=True)
    return res


def _generate(cfg: GenerateConfig, out: Path, remote: Folder | None, t0: float) -> GenerateResult:
    tasks, rows, header, spec = build_tasks(cfg)  # every error surfaces here, before any work
    if remote is not None and cfg.overwrite and not remote.is_empty():
        remote.delete_all()
    _prepare_out(out, header, cfg.overwrite, remote.uri if remote else None)
    pending = [t for t in tasks if not shard_complete(out, t)]
    if pending and not cfg.reference:  # join Ray first: a cluster that cannot be joined is one line, no MLflow run
        from ..ray_setup import ensure_ray

        ensure_ray()
    if not cfg.log_mlflow:
        return _work(cfg, out, remote, tasks, pending, rows, header, spec, t0)
    from ..tracking import SPILL_DIR, log_datasets, stage, tracking_uri

    name = remote.uri.rstrip("/").rsplit("/", 1)[-1] if remote else out.resolve().name
    # A tracking server that is down does not stop the generation (as evaluate fidelity): its run is
    # made when the server answers, or its calls go to <out>/mlflow-spill/<run name> and are
    # uploaded at the end (tracking.close, waiting for the server again).
    spill = f"{remote.uri.rstrip('/') if remote else out.resolve()}/{SPILL_DIR}/generate-{name}"
    with stage(
        tracking_uri(cfg.tracking_uri),
        f"generate-{name}",
        "generate",
        system_metrics=cfg.system_metrics,
        spill_dir=spill,
    ) as log:
        _log_start(log, cfg, header)  # the run starts before the first tile: its duration is the generation's
        res = _work(cfg, out, remote, tasks, pending, rows, header, spec, t0)
        log.metrics(
            {
                "tiles_planned": res.tiles,
                "shards_generated": len(res.generated),
                "seconds": res.seconds,
                **{k: v for k, v in res.stats.items() if v == v},
            }
        )  # NaN when nothing was sampled
        if res.complete:
            log_datasets(log, {"generated": str(res.out)})
    return res


def _log_start(log, cfg: GenerateConfig, header: dict) -> None:
    """Params, the model (and the training run that made it, linked in the run's description), the
    training data the plan was read from."""
    from ..tracking import log_datasets

    info = read_model_info(local_copy(cfg.model))["info"] if cfg.model else {}  # a reference pool has no model
    source = cfg.model_uri or header["model"]
    log.params(
        {
            "model": source,
            "model_id": header["model_id"],
            "plan": header["plan"],
            "sampling": header["sampling"],
            "tiles": header["tiles"],
            "workers": cfg.workers,
            "reference": cfg.reference,
        }
    )
    note = (
        f"Tiles from model `{header['model_id']}` ({source})"
        if cfg.model
        else f"Reference pool `{header['model_id']}` ({cfg.reference}) from {source}"
    )
    train_run = info.get("mlflow_run_id")
    if train_run:
        from mlflow.exceptions import MlflowException

        from ..tracking import transient

        try:
            exp = log.c.get_run(train_run).info.experiment_id
            note += f", trained in run [{train_run}](#/experiments/{exp}/runs/{train_run})"
        except Exception as e:
            if transient(e):  # the server is down: the UI's direct run link, not checked against it
                note += f", trained in run [{train_run}](#/runs/{train_run})"
            elif isinstance(e, MlflowException):  # trained against another tracking server: the id alone
                note += f", trained in run {train_run} (another tracking server)"
            else:
                raise
        log.tags({"medi_dist.model_run_id": train_run})
    log.tags(
        {
            "medi_dist.model_id": header["model_id"],
            "medi_dist.generation": header["generation"],
            "mlflow.note.content": note,
        }
    )
    dataset = cfg.dataset or info.get("dataset")
    if dataset and Folder(dataset).exists(MANIFEST):
        log_datasets(log, {"training": dataset})


def _work(
    cfg: GenerateConfig,
    out: Path,
    remote: Folder | None,
    tasks: list[dict],
    pending: list[dict],
    rows: list[PlanRow],
    header: dict,
    spec: ConditioningSpec,
    t0: float,
) -> GenerateResult:
    todo = pending if cfg.max_shards is None else pending[: cfg.max_shards]
    if pending:  # an incomplete directory must not read as a dataset (e.g. a shard was deleted)
        (out / MANIFEST).unlink(missing_ok=True)
        if remote is not None and remote.exists(MANIFEST):
            remote.delete(MANIFEST)
    if remote is not None:
        remote.write_bytes(GENERATION_FILE, (out / GENERATION_FILE).read_bytes())  # claimed by this plan
    log.info("%d shards planned, %d complete, %d to generate", len(tasks), len(tasks) - len(pending), len(todo))
    if cfg.reference:  # rendering or noise costs milliseconds per tile: no Ray, no model
        from .reference import ReferenceGenerator

        gen = ReferenceGenerator(cfg.reference, cfg.dataset, out) if todo else None
        results = [gen.run(t) for t in todo]
    else:
        results = _run_ray(replace(cfg, out=remote.uri if remote else str(out)), todo) if todo else []
    complete = len(todo) == len(pending)
    if remote is not None:
        _pull(remote, out)
    if complete:
        _finalize(out, tasks, header, spec)
        if remote is not None:
            upload_folder(out, remote.uri, last=(VOCAB, SPLIT_FILE, INDEX, MANIFEST), skip_present=True)
    sample_s = sum(float(r["sample_s"]) for r in results)
    n = sum(int(r["tiles"]) for r in results)
    evals = sum(int(r["evaluations"]) for r in results)
    stats = {
        "tiles": n,
        "tiles_per_s_per_worker": n / sample_s if sample_s else float("nan"),
        "evaluations_per_s_per_worker": evals / sample_s if sample_s else float("nan"),
    }
    return GenerateResult(
        remote.uri if remote else out,
        complete,
        int(header["tiles"]),
        len(tasks),
        sorted(str(r["path"]) for r in results),
        len(tasks) - len(pending),
        rows,
        time.perf_counter() - t0,
        stats,
    )
