"""`medi-dist generate`: its parser and handler (cli.py adds it with `add_generate_parser(sub)`)."""

from __future__ import annotations

import argparse


def _kv(text: str) -> dict:
    """`cancer_type=GLAND,tissue_source_site=B1,count=10` -> dict (numbers parsed)."""
    import yaml

    out = {}
    for part in filter(None, text.split(",")):
        k, sep, v = part.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected key=value pairs separated by commas, got {part!r}")
        k, v = k.strip(), v.strip()
        out[k] = yaml.safe_load(v) if k == "count" else (v.split("|") if "|" in v else v)
    return out


def plan_from_args(args: argparse.Namespace):
    from .plan import GenerationPlan, PlanError

    if args.plan:
        if args.mode or args.row:
            raise PlanError("give either --plan FILE or --mode/--row, not both")
        plan = GenerationPlan.from_yaml(args.plan)
        if args.seed is not None:
            plan.seed = args.seed
        return plan
    mode = args.mode or ("explicit" if args.row else None)
    if mode is None:
        raise PlanError("say what to generate: --plan FILE, --mode unseen-pairs|balance, or --row ...")
    kw = {
        k: v
        for k, v in dict(
            types=args.types, sites=args.sites, count=args.count, target=args.target, seed=args.seed
        ).items()
        if v is not None
    }
    return GenerationPlan(
        mode=mode,
        rows=args.row or [],
        extra=_kv(args.extra or ""),
        include_unseen=args.include_unseen,
        null_site=args.null_site,
        **kw,
    )


def _generate(args: argparse.Namespace) -> None:
    from ..registry import is_model_uri, resolve_model
    from .job import GenerateConfig, build_tasks, generate
    from .plan import PlanError, describe
    from .writer import SamplingSettings

    if bool(args.model) == bool(args.reference):
        raise PlanError(
            "say what makes the tiles: --model DIR (a trained model) or --reference oracle|noise "
            "--dataset DIR (ground truth of a procedural dataset / a noise control)"
        )
    cfg = GenerateConfig(
        model=resolve_model(args.model, args.model_cache, args.tracking_uri) if args.model else None,
        reference=args.reference,
        out=args.out,
        plan=plan_from_args(args),
        dataset=args.dataset,
        sampling=SamplingSettings(
            sampler=args.sampler,
            steps=args.steps,
            guidance=args.guidance,
            guidance_interval=tuple(args.guidance_interval),
            weights=args.weights,
            batch_size=args.batch_size,
            precision=args.precision,
            compile=args.compile,
            composition=args.composition,
            composition_scale=args.composition_scale,
            calibration_tiles=args.calibration_tiles,
        ),
        workers=args.workers,
        cpus_per_worker=args.cpus_per_worker,
        gpus_per_worker=args.gpus_per_worker,
        tiles_per_shard=args.tiles_per_shard,
        max_shards=args.max_shards,
        overwrite=args.overwrite,
        log_mlflow=not args.no_mlflow,
        tracking_uri=args.tracking_uri,
        system_metrics=args.system_metrics,
        model_uri=args.model if is_model_uri(args.model) else None,
    )
    if args.dry_run:
        tasks, rows, header, _ = build_tasks(cfg)
        print(describe(rows))
        print(f"{len(tasks)} shards of up to {cfg.tiles_per_shard} tiles; generation id {header['generation']}")
        return
    res = generate(cfg)
    print(describe(res.rows, limit=10))
    speed = f"; {res.stats['tiles_per_s_per_worker']:.2f} tiles/s per worker" if res.generated else ""
    print(
        f"{res.out}: {len(res.generated)} shards generated, {res.skipped} already complete, of {res.shards}"
        f"{speed} ({res.seconds:.0f} s)"
    )
    if not res.complete:
        print("stopped early; run the same command again to finish")


def add_generate_parser(sub) -> argparse.ArgumentParser:
    g = sub.add_parser(
        "generate",
        help="generate synthetic tiles for (type, site, ...) subgroups with Ray Data",
        description="Sample a model directory's denoiser over a generation plan with a Ray Data actor pool and "
        "write a synthetic dataset directory (same layout as ingest output, split 'train'). A re-run with the same "
        "arguments skips completed shards.",
    )
    g.add_argument(
        "--model",
        help="model directory (from `medi-dist train`), or an MLflow model: "
        "models:/NAME/VERSION (or NAME/latest, NAME@ALIAS) or runs:/RUN_ID/medi_model",
    )
    g.add_argument(
        "--model-cache",
        default="medi-dist-cache/models",
        help="where models:/ and runs:/ models are downloaded (once; checked against their checksums)",
    )
    g.add_argument(
        "--reference",
        choices=["oracle", "noise"],
        help="instead of a model: ground-truth tiles rendered for the plan (procedural datasets only) "
        "or a noise control in each site's colours, from --dataset's train split",
    )
    g.add_argument("--out", required=True, help="synthetic dataset directory to create or resume")
    g.add_argument(
        "--dataset", help="training dataset (default: the one the model directory records; required with --reference)"
    )
    p = g.add_argument_group("plan (a YAML file, or the options below)")
    p.add_argument("--plan", help="YAML plan: mode, rows | types/sites/count/target, extra, seed")
    p.add_argument("--mode", choices=["explicit", "unseen-pairs", "balance"])
    p.add_argument(
        "--row",
        action="append",
        type=_kv,
        metavar="K=V,...",
        help="explicit row, e.g. cancer_type=GLAND,tissue_source_site=B1,count=10 (repeatable)",
    )
    p.add_argument("--types", nargs="+", help="cancer types (default: every trained type)")
    p.add_argument("--sites", nargs="+", help="sites (default: every trained site)")
    p.add_argument("--count", type=int, help="unseen-pairs: tiles per (type, site)")
    p.add_argument("--target", type=int, help="balance: top each (type, site) up to this many tiles")
    p.add_argument("--include-unseen", action="store_true", help="balance: also fill pairs absent from training")
    p.add_argument(
        "--null-site",
        action="store_true",
        help="explicit rows without a site on a type+site model: its site-nulled (class-only) branch",
    )
    p.add_argument("--extra", help="more conditions for every row, e.g. sex=female|male (one row per value)")
    p.add_argument("--seed", type=int, help="plan seed (tile seeds derive from it)")
    s = g.add_argument_group("sampling")
    s.add_argument("--sampler", default="dpmsolver++", choices=["ddpm", "ddim", "dpmsolver++"])
    s.add_argument("--steps", type=int, default=25)
    s.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    s.add_argument(
        "--guidance-interval",
        type=float,
        nargs=2,
        default=(0.0, 1.0),
        metavar=("LO", "HI"),
        help="guide only at diffusion times t/T in [LO, HI] (1: pure noise); the other steps cost one pass",
    )
    s.add_argument(
        "--composition",
        default="joint",
        choices=["joint", "owner-site", "stain"],  # writer.COMPOSITIONS (not imported: --help stays fast)
        help="joint: the model's (type, site) prediction; owner-site: (type, no site) plus the site's "
        "direction taken at the type that owns the site in training (needs site dropout); stain: the type "
        "drawn at one of its own training sites, moved to the requested site by the sites' stains "
        "(estimated from the training dataset at source resolution)",
    )
    s.add_argument("--composition-scale", type=float, default=1.0, help="weight of the owner-site direction")
    s.add_argument(
        "--calibration-tiles",
        type=int,
        default=0,  # writer.SamplingSettings.calibration_tiles
        help="stain composition: tiles the network draws per training site to map its stain concentrations "
        "onto the site's real ones before moving tiles (e.g. 32; default 0: no mapping)",
    )
    s.add_argument("--weights", default="ema", choices=["ema", "raw", "auto"])
    s.add_argument("--batch-size", type=int, default=32, help="tiles per denoiser call")
    s.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    s.add_argument("--compile", action="store_true", help="torch.compile the denoiser (GPU)")
    r = g.add_argument_group("resources")
    r.add_argument("--workers", type=int, default=1, help="actors, one model each")
    r.add_argument("--cpus-per-worker", type=float, default=1.0)
    r.add_argument("--gpus-per-worker", type=float, default=0.0, help="> 0 samples on CUDA")
    r.add_argument("--tiles-per-shard", type=int, default=256)
    r.add_argument("--max-shards", type=int, help="stop after this many new shards (re-run to finish)")
    g.add_argument("--overwrite", action="store_true", help="replace --out (even another plan's tiles)")
    g.add_argument("--dry-run", action="store_true", help="validate and print the plan; generate nothing")
    m = g.add_argument_group("MLflow (a generation run: the model, its training run, the training data and the pool)")
    m.add_argument("--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or ./mlflow.db)")
    m.add_argument("--system-metrics", action="store_true", help="also log CPU, memory and GPU use")
    m.add_argument("--no-mlflow", action="store_true")
    g.set_defaults(func=_generate)
    return g
