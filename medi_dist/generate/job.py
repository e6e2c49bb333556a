"""The generation job: plan -> shard tasks -> Ray Data actor pool -> synthetic dataset directory.

The driver validates the plan, partitions the tile list into shards (a function of the plan alone),
and skips shards that a previous run completed (each is verified). The remaining shard tasks become
a Ray Dataset with one row per shard; `map_batches` with an actor pool runs them, one model per
actor, so each shard is sampled whole by one worker in fixed micro-batches: the tiles do not depend
on the number of workers. index.parquet and dataset.json are written last, from all shards, so the
directory only reads as a dataset once every planned tile is there exactly once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..data.shards import INDEX, MANIFEST, VOCAB, atomic_write_parquet, atomic_write_text, file_sha256
from ..data.shards import SPLIT as SPLIT_FILE
from ..metadata import UNKNOWN, ConditioningSpec
from ..model.config import ModelConfig
from ..model.model_dir import WEIGHT_FILES, read_model_info, verify_model_dir
from ..model.sampling import SAMPLERS, check_interval
from ..paths import absolute
from ..storage import Folder, is_remote, local_copy, temp_dir, upload_folder
from .plan import SITE as SITE_COLUMN
from .plan import GenerationPlan, PlanError, PlanRow, resolve, training_data
from .tile_list import plan_id, shard_spans, task_tiles
from .writer import COMPOSITIONS, SPLIT, SamplingSettings, ShardGenerator, read_shard, shard_complete, shard_path

log = logging.getLogger("medi_dist.generate")
GENERATION_FILE = "generation.json"


@dataclass
class GenerateConfig:
    model: str | None  # model directory; None with `reference`
    out: str
    plan: GenerationPlan = field(default_factory=GenerationPlan)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    dataset: str | None = None  # training dataset; default: the one recorded in the model directory
    workers: int = 1  # actors, one model each
    cpus_per_worker: float = 1.0  # explicit budget: on a few cores Ray Data must not oversubscribe
    gpus_per_worker: float = 0.0  # > 0: actors sample on CUDA
    tiles_per_shard: int = 256
    max_shards: int | None = None  # stop after this many new shards (tests, preemption drills)
    overwrite: bool = False
    reference: str | None = None  # oracle | noise: a pool without a model, from `dataset` (reference.py)
    log_mlflow: bool = False  # a generation run (a child of the current job, if any); the CLI turns it on
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI or ./mlflow.db
    system_metrics: bool = False
    model_uri: str | None = None  # what the user named (models:/..., runs:/...) when `model` is its download


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


def _settings_check(cfg: GenerateConfig, info: dict) -> str:
    s = cfg.sampling
    if s.sampler not in SAMPLERS:
        raise PlanError(f"unknown sampler {s.sampler!r}; choose from {SAMPLERS}")
    if s.steps < 1 or s.batch_size < 1 or cfg.workers < 1 or s.guidance < 0:
        raise PlanError("steps, batch size and workers must be >= 1 and guidance >= 0")
    try:
        check_interval(s.guidance_interval)
    except ValueError as e:
        raise PlanError(f"--guidance-interval: {e}") from None
    if s.precision not in ("fp32", "fp16", "bf16"):
        raise PlanError(f"precision must be fp32, fp16 or bf16, got {s.precision!r}")
    mcfg = ModelConfig.from_dict(info["model"])
    if s.composition not in COMPOSITIONS:
        raise PlanError(f"composition must be one of {COMPOSITIONS}, got {s.composition!r}")
    if s.composition == "stain" and cfg.plan.null_site:
        raise PlanError("stain composition moves tiles between sites: it needs rows with a site (not null_site)")
    if s.composition == "owner-site" and (cfg.plan.null_site or mcfg.dropout_for(SITE_COLUMN) <= 0):
        raise PlanError(
            "owner-site composition needs rows with a site and a model trained with site dropout (its no-site branch)"
        )
    if s.guidance != 1.0 and max([mcfg.default_cond_dropout, *mcfg.cond_dropout.values()]) <= 0:
        raise PlanError("classifier-free guidance needs a model trained with condition dropout; use --guidance 1")
    if cfg.plan.null_site and mcfg.dropout_for(SITE_COLUMN) <= 0:
        raise PlanError(
            "null_site needs a model trained with site dropout (model.cond_dropout "
            "tissue_source_site > 0): its null-site branch is untrained otherwise"
        )
    weights = s.weights if s.weights != "auto" else ("ema" if WEIGHT_FILES["ema"] in info["weights"] else "raw")
    if WEIGHT_FILES.get(weights) not in info["weights"]:
        raise PlanError(f"{cfg.model} has no {weights!r} weights; it has {info['weights']}")
    return weights


def _reference_source(cfg: GenerateConfig) -> tuple[dict, ConditioningSpec, str]:
    from .reference import check_reference, reference_spec

    if cfg.model or not cfg.dataset:
        raise PlanError(
            f"a {cfg.reference} pool is made from a dataset, not a model: pass --dataset DIR and no --model"
        )
    manifest = check_reference(cfg.reference, cfg.dataset)
    shards = "".join(sh.get("sha256", "") for sh in manifest["shards"])
    source = f"{cfg.reference}-{hashlib.sha256(shards.encode()).hexdigest()[:12]}"  # names the real tiles used
    meta = {
        "synthetic": True,
        "source": source,
        "reference": cfg.reference,
        "sampler": cfg.reference,
        "steps": 0,
        "guidance": 1.0,
        "weights": None,
        "precision": None,
    }
    return meta, reference_spec(cfg.dataset), source


def build_tasks(cfg: GenerateConfig) -> tuple[list[dict], list[PlanRow], dict, ConditioningSpec]:
    """Validate everything and return the shard tasks (no sampling, no Ray)."""
    s = cfg.sampling
    model = local_copy(cfg.model) if cfg.model else None  # object storage: a cached copy, checked below
    if cfg.reference:
        meta, spec, model_id = _reference_source(cfg)
    else:
        info = read_model_info(model)
        weights = _settings_check(cfg, info)
        verify_model_dir(model, WEIGHT_FILES[weights])  # what each actor's loader checks, before Ray or --out
        spec = ConditioningSpec.load(model / "conditioning.json")
        model_id = info["model_id"]
        meta = {
            "synthetic": True,
            "source": model_id,
            "sampler": s.sampler,
            "steps": s.steps,
            "guidance": s.guidance,
            "weights": weights,
            "precision": s.precision,
        }
        if s.composition != "joint":
            meta.update(composition=s.composition, composition_scale=s.composition_scale)
        if s.guidance != 1.0 and tuple(s.guidance_interval) != (0.0, 1.0):
            meta["guidance_interval"] = "{:g}-{:g}".format(*s.guidance_interval)
    train = training_data(model, cfg.dataset)
    rows = resolve(cfg.plan, spec, train)
    pid = plan_id(rows, cfg.plan.seed, meta)
    owners = {}  # site -> the type with the most training tiles there (owner-site composition)
    for (t, site), _n in sorted(train.pairs.items(), key=lambda kv: -kv[1]):
        owners.setdefault(site, t)
    # Tasks carry spans of plan rows, not per-tile records; tiles are expanded where they are made.
    extra = {"owners": owners} if meta.get("composition") else {}
    recorded = None if cfg.reference else info["info"].get("site_stains")
    if recorded:  # trained in the reference stain: every tile is rendered in its site's, recorded with the model
        extra = {**extra, **_reference_rendering(cfg, rows, train, recorded)}
    elif s.composition == "stain" and not cfg.reference:
        extra = _stain_composition(cfg, ModelConfig.from_dict(info["model"]).sample_size, rows, train, spec)
    tasks = [
        {
            "shard": i,
            "first": i * cfg.tiles_per_shard,
            "path": shard_path(i),
            "generation": pid,
            "meta": meta,
            "plan_seed": cfg.plan.seed,
            **extra,
            "spans": spans,
            "rows": {str(r): {"conditions": rows[r].conditions, "seen": rows[r].seen} for r, _, _ in spans},
        }
        for i, spans in enumerate(shard_spans([r.count for r in rows], cfg.tiles_per_shard))
    ]
    header = {
        "format": "medi-dist-generation/1",
        "generation": pid,
        "model": absolute(cfg.model or cfg.dataset),
        "model_id": model_id,
        "plan": asdict(cfg.plan),
        "sampling": asdict(s),
        **meta,
        "tiles_per_shard": cfg.tiles_per_shard,
        "tiles": sum(r.count for r in rows),
        "shards": len(tasks),
        "training_pairs_from": train.source,
        "rows": [asdict(r) for r in rows],
    }
    if "stains" in extra:  # what moved the tiles (the pool's own record, not every tile's)
        header["site_stains"] = {"from": train.source, "seed": cfg.plan.seed, **extra["stains"]}
    if recorded:
        header["site_stains"] = {"from": f"{absolute(cfg.model)}/config.json", **recorded}
    return tasks, rows, header, spec


def _own_sites(train) -> dict[str, list[str]]:
    own: dict[str, list[str]] = {}
    for t, site in sorted(train.pairs):
        own.setdefault(t, []).append(site)
    return own


def _reference_rendering(cfg: GenerateConfig, rows: list[PlanRow], train, recorded: dict) -> dict:
    """What a reference-stain model's shards need: each type's training sites (where a site-nulled
    tile is rendered, and a stain-composed one drawn); the stains come with the model."""
    own = _own_sites(train)
    asked = {r.conditions.get(SITE_COLUMN) for r in rows} - {None, UNKNOWN}
    missing = sorted(asked - set(recorded["stains"]))
    if missing:
        raise PlanError(
            f"{cfg.model} renders its tiles in the stains of its training sites, recorded when it was "
            f"trained; it has none for {missing}: ask for training sites only"
        )
    return {"own_sites": own}  # every row's type has training tiles (plan.resolve refuses others)


def _stain_composition(cfg: GenerateConfig, resolution: int, rows: list[PlanRow], train, spec) -> dict:
    """What a stain-composed shard needs: each type's training sites (donors) and the stains of the
    sites involved, estimated from the training dataset (data/site_stains.py)."""
    from ..data.site_stains import estimate_site_stains

    if SITE_COLUMN not in spec.categorical_names:
        raise PlanError(f"stain composition draws each type at its own sites; {cfg.model} has no site condition")
    if not train.counts_known:
        raise PlanError(
            f"stain composition estimates each site's stain from the training tiles, and {train.source} "
            "cannot be read; pass --dataset DIR (the model's training dataset)"
        )
    own = _own_sites(train)
    types = {r.conditions["cancer_type"] for r in rows}
    wanted = {r.conditions[SITE_COLUMN] for r in rows} | {s for t in types for s in own.get(t, [])}
    stains = estimate_site_stains(train.source, resolution, sorted(wanted), seed=cfg.plan.seed)
    return {"own_sites": own, "stains": stains.to_dict()}


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
