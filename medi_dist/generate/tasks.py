"""A generation's shard tasks: its settings checked against the model, the plan resolved, the tile list
cut into shards and each shard given what it needs (no sampling, no Ray; job.py runs them)."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

from ..metadata import UNKNOWN, ConditioningSpec
from ..model.config import ModelConfig
from ..model.model_dir import WEIGHT_FILES, read_model_info, verify_model_dir
from ..model.sampling import SAMPLERS, check_interval
from ..paths import absolute
from ..storage import local_copy
from .plan import SITE as SITE_COLUMN
from .plan import GenerationPlan, PlanError, PlanRow, resolve, training_data
from .tile_list import plan_id, shard_spans
from .writer import COMPOSITIONS, SamplingSettings, shard_path


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


def _settings_check(cfg: GenerateConfig, info: dict) -> str:
    s = cfg.sampling
    if s.sampler not in SAMPLERS:
        raise PlanError(f"unknown sampler {s.sampler!r}; choose from {SAMPLERS}")
    if s.steps < 1 or s.batch_size < 1 or cfg.workers < 1 or s.guidance < 0 or s.calibration_tiles < 0:
        raise PlanError("steps, batch size and workers must be >= 1, guidance and calibration tiles >= 0")
    try:
        check_interval(s.guidance_interval)
    except ValueError as e:
        raise PlanError(f"--guidance-interval: {e}") from None
    if s.precision not in ("fp32", "fp16", "bf16"):
        raise PlanError(f"precision must be fp32, fp16 or bf16, got {s.precision!r}")
    mcfg = ModelConfig.from_dict(info["model"])
    if s.composition not in COMPOSITIONS:
        raise PlanError(f"composition must be one of {COMPOSITIONS}, got {s.composition!r}")
    if s.calibration_tiles and (s.composition != "stain" or info["info"].get("site_stains")):
        raise PlanError(
            "calibration tiles calibrate stain-composed tiles of a model that draws the sites' stains: use them "
            "with --composition stain and a model not trained in the reference stain"
        )
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
        if s.calibration_tiles:  # (not recorded when off: the plan ids of earlier pools stay as they were)
            meta["calibration_tiles"] = s.calibration_tiles
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
    sites involved, estimated from the training dataset (data/stain_estimation.py)."""
    from ..data.stain_estimation import estimate_site_stains

    if SITE_COLUMN not in spec.categorical_names:
        raise PlanError(f"stain composition draws each type at its own sites; {cfg.model} has no site condition")
    if not train.counts_known:
        raise PlanError(
            f"stain composition estimates each site's stain from the training tiles, and {train.source} "
            "cannot be read; pass --dataset DIR (the model's training dataset)"
        )
    types = {r.conditions["cancer_type"] for r in rows}
    own = {t: sites for t, sites in _own_sites(train).items() if t in types}  # the donors (and calibration)
    wanted = {r.conditions[SITE_COLUMN] for r in rows} | {s for sites in own.values() for s in sites}
    stains = estimate_site_stains(train.source, resolution, sorted(wanted), seed=cfg.plan.seed)
    return {"own_sites": own, "stains": stains.to_dict()}
