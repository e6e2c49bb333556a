"""`medi-dist demo`: the whole MeDi story on the built-in procedural dataset, on one machine.

1. ingest a procedural H&E dataset where every site belongs to one cancer type (site <-> type
   confound through stain colour), TCGA-like site imbalance, held-out sites for testing;
2. train one MeDi model (type + site) with Ray Train; its site is dropped more often than its type,
   so the same network also draws the class-only arm (site nulled): a controlled comparison;
3. generate tiles at every (type, training site) pair, including pairs never seen together: MeDi
   (by default stain-composed: each type drawn at its own sites, moved by the sites' stains),
   the site-nulled arm (same tiles per type), and two references made without a model, the ground
   truth (the renderer: what a perfect generator returns) and a noise control in each site's colours;
4. score the MeDi tiles with probes calibrated on ground truth (type, stain, leakage);
5. train classifiers on real tiles alone, + each pool, and with the stain baselines (HED jitter; the
   real tiles re-stained with the same site stains as MeDi's pool, its non-generative twin; Macenko
   normalisation, which fails in this world, is left to `evaluate downstream --baselines macenko`),
   test them on held-out sites over several seeds; print the table and the paired differences, save
   a picture, log everything to MLflow.

Each stage reuses what an earlier (interrupted) demo run already finished in the output folder, and
the same command gives the same numbers (seeded everything, deterministic data order).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from .demo_report import CONTRASTS, arms, save_picture

log = logging.getLogger("medi_dist.demo")


@dataclass
class DemoConfig:
    out: str = "demo-output"
    types: int = 4
    sites: int = 12
    tiles: int = 3000
    size: int = 32
    holdout_fraction: float = 0.3
    scanner_lines: bool = True  # a site shortcut besides stain, which stain augmentation cannot remove
    # within 15 minutes on 2 cores with every generator bar held: 600 steps and 4 seeds, 14.5 min (800 steps and 5
    # seeds took 18.0; 1,200 steps drew no better tiles with Min-SNR): benchmarks/RESULTS.md "The donor nearest in
    # stain direction", "The demo's budget", "Min-SNR"
    train_steps: int = 600
    batch_size: int = 32
    # Min-SNR loss weighting: at 800 steps unseen type 0.71 -> 0.81 and seen stain 0.68 -> 0.85 in the demo's
    # world (type up in two others too, stain not): benchmarks/RESULTS.md "Min-SNR"; 0: the plain loss
    min_snr_gamma: float = 5.0
    site_dropout: float = 0.3  # the site-nulled branch is the class-only arm: trained this often
    type_dropout: float = 0.05  # rarely: a step with the site but no type teaches site -> morphology
    separate_class_only: bool = False  # also train a class-only model, as in the MeDi paper
    # as-stored: the network draws the sites' stains; reference: it draws in one reference stain and each
    # tile is rendered in its site's (measured: seen-pair stain up, unseen pairs and classifiers down)
    stain: str = "as-stored"
    per_pair: int = 60  # generated tiles per (type, site) pair (every pool has this plan)
    # MeDi's pool: stain (each type drawn at its own training sites, moved to the requested site by the
    # sites' stains, estimated at source resolution) or joint (the network's (type, site) prediction,
    # which at unseen pairs draws the site's own type: benchmarks/RESULTS.md)
    composition: str = "stain"
    # the network's draws per training site that calibrate its stain concentrations onto the site's real ones; with
    # the donor nearest in stain direction, unseen stain 0.71 -> 0.83, seen 0.91 -> 0.97, unseen type 0.96 -> 0.93
    # (benchmarks/RESULTS.md "The donor nearest in stain direction"); 0: not calibrated
    calibration_tiles: int = 32
    sampler: str = "dpmsolver++"
    sampler_steps: int = 10
    # guidance 1.5 on the less noisy half of the steps (t/T <= 0.5; on the noisier half it bought nothing): seen
    # stain 0.86 -> 0.91, unseen type 0.83 -> 0.93, unseen stain 0.65 -> 0.62, at half of full guidance's
    # cost (benchmarks/RESULTS.md "guidance interval"); `--guidance 1` for the unguided tiles
    guidance: float = 1.5
    guidance_interval: tuple[float, float] = (0.0, 0.5)
    ratio: float = 1.0  # synthetic tiles per real training tile
    classifier: str = "cnn"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # 4: MeDi's deltas 8-500 SEM from 0 (RESULTS)
    seed: int = 0  # the world (procedural dataset, split) and the generator's training
    threads: int = 2  # torch threads of the single training worker (the demo targets 2 cores)
    tracking_uri: str | None = None
    system_metrics: bool = True  # MLflow system metrics on the training and generation runs


QUICK_DEMO = dict(
    out="demo-quick", tiles=800, train_steps=60, per_pair=8, sampler_steps=8, seeds=[0, 1], calibration_tiles=8
)
# what the ingested dataset depends on
WORLD = ("types", "sites", "tiles", "size", "holdout_fraction", "scanner_lines", "seed")


def _check_world(cfg: DemoConfig, root: Path) -> None:
    """An output folder holds one world: a re-run with other world settings would silently reuse it."""
    path = root / "demo.json"
    want = {k: getattr(cfg, k) for k in WORLD}
    if path.exists():
        had = {k: v for k, v in json.loads(path.read_text()).items() if k in WORLD}
        changed = [f"{k} {had[k]} -> {want[k]}" for k in WORLD if k in had and had[k] != want[k]]
        if changed:
            raise ValueError(
                f"{root} holds a demo of another world ({', '.join(changed)}); "
                "choose another --out, or delete the folder"
            )
    path.write_text(json.dumps(want, indent=2))


# What the demo writes under --out; an existing --out holding anything else is not a demo output.
OUTPUTS = {
    "demo.json",
    "data",
    "runs",
    "synthetic-medi",
    "synthetic-site-nulled",
    "synthetic-class-only",
    "reference-oracle",
    "reference-noise",
    "cache",
    "real_vs_generated.png",
    "results.json",
    "results.txt",
    "mlflow-spill",  # MLflow calls a tracking server that was down did not take (uploaded when it is back)
}


def check_out(root: Path) -> None:
    """Continue only a demo's own output: the demo writes data/, runs/, ... under --out, and pointed at
    a dataset (or any other folder) it would mix its files into it."""
    if not root.exists():
        return
    if not root.is_dir():
        raise NotADirectoryError(f"--out {root} is a file; choose a folder for the demo's output")
    if (root / "dataset.json").exists() or (root / "index.parquet").exists():
        raise FileExistsError(
            f"--out {root} is a dataset directory, not a demo output (the demo ingests its own "
            "dataset into <out>/data); choose a new folder"
        )
    # .data.tmp-* / .data.old-*: an interrupted ingest of <out>/data
    foreign = sorted(p.name for p in root.iterdir() if p.name not in OUTPUTS and not p.name.startswith(".data."))
    if foreign:
        raise FileExistsError(
            f"--out {root} holds files that are not the demo's ({', '.join(foreign[:5])}"
            f"{' ...' if len(foreign) > 5 else ''}); choose a new folder, or an earlier demo's "
            "output to continue it"
        )


def _ingest(cfg: DemoConfig, root: Path) -> Path:
    from .data import sources
    from .data.ingest import ingest
    from .data.procedural import ProceduralConfig
    from .data.split import SplitConfig

    ds = root / "data"
    if not (ds / "dataset.json").exists():
        scan = sources.procedural(
            ProceduralConfig(
                n_types=cfg.types,
                n_sites=cfg.sites,
                n_tiles=cfg.tiles,
                size=cfg.size,
                seed=cfg.seed,
                scanner_lines=cfg.scanner_lines,
            )
        )
        ingest(scan, ds, SplitConfig(holdout_fraction=cfg.holdout_fraction, seed=cfg.seed), overwrite=True)
    return ds


def _train(cfg: DemoConfig, ds: Path, root: Path, name: str, conditions: list[str], uri: str) -> Path:
    from .config_loader import load_config
    from .train.config import TrainConfig
    from .train.trainer import output_dir, train

    tcfg = load_config(
        TrainConfig,
        None,
        [
            f"data.dataset={ds}",
            "data.balance=type",
            f"data.stain={cfg.stain}",
            "model.preset=small",
            f"model.resolution={cfg.size}",
            f"model.conditions={json.dumps(conditions)}",
            f"optim.batch_size={cfg.batch_size}",
            "optim.lr=0.0005",
            f"optim.min_snr_gamma={cfg.min_snr_gamma}",
            "model.column_dropout="
            + json.dumps({"cancer_type": cfg.type_dropout, "tissue_source_site": cfg.site_dropout}),
            f"steps={cfg.train_steps}",
            f"seed={cfg.seed}",
            f"run.name={name}",
            f"run.storage_path={root / 'runs'}",
            f"run.tracking_uri={uri}",
            f"run.checkpoint_every={max(cfg.train_steps // 4, 1)}",
            "run.log_every=20",
            f"run.threads_per_worker={cfg.threads}",
            f"run.system_metrics={cfg.system_metrics}",
        ],
    )
    out = output_dir(tcfg)
    if not (out / "config.json").exists():
        res = train(tcfg)
        if res.model_dir is None:
            raise RuntimeError(f"training {name} did not finish; run the demo again to resume it")
    else:  # trained by an earlier run of this demo: its training run joins this demo's parent run
        from .paths import absolute
        from .registry import link_run_models
        from .tracking import adopt_run

        link_run_models(uri, adopt_run(uri, f"{absolute(tcfg.run.storage_path)}/{name}"))  # its model too
    return out


def _generate(
    cfg: DemoConfig,
    model: Path | None,
    out: Path,
    plan,
    reference: str | None = None,
    dataset: Path | None = None,
    **sampling,
) -> Path:
    import ray

    from .generate.job import GenerateConfig, generate
    from .generate.writer import SamplingSettings

    res = generate(
        GenerateConfig(
            model=str(model) if model else None,
            out=str(out),
            # one single-threaded actor per core: tile bytes depend on threads, not on workers
            workers=max(1, min(cfg.threads, int(ray.cluster_resources().get("CPU", 1)))),
            plan=plan,
            tiles_per_shard=128,
            reference=reference,
            dataset=str(dataset) if dataset else None,
            sampling=SamplingSettings(
                sampler=cfg.sampler,
                steps=cfg.sampler_steps,
                guidance=cfg.guidance,
                guidance_interval=tuple(cfg.guidance_interval),
                batch_size=64,
                **sampling,
            ),
            log_mlflow=True,
            tracking_uri=cfg.tracking_uri,
            system_metrics=cfg.system_metrics,
        )
    )
    return res.out


def run_demo(cfg: DemoConfig) -> dict:
    from .ray_setup import ensure_ray
    from .tracking import job, tracking_uri

    t0 = time.time()
    uri = tracking_uri(cfg.tracking_uri)
    root = Path(cfg.out).resolve()
    check_out(root)  # refusals first: a wrong --out or another world is one line, no FAILED parent run
    root.mkdir(parents=True, exist_ok=True)
    _check_world(cfg, root)
    ensure_ray()  # first: a cluster that cannot be joined is reported before any work, not under the progress bar
    # the parent run: every run below is its child; a tracking server that is down does not stop the
    # demo (tracking.open_run): the calls go to <out>/mlflow-spill/<run> and are uploaded when it is back
    name = f"demo-{int(t0)}"
    with job(uri, name, "demo", spill_dir=str(root / "mlflow-spill" / name)) as logger:
        return _run_demo(cfg, t0, uri, logger, root)


def _run_demo(cfg: DemoConfig, t0: float, uri: str, logger, root: Path) -> dict:
    from .evaluate.downstream import DownstreamConfig, compare
    from .evaluate.fidelity_job import FidelityConfig, evaluate_fidelity
    from .evaluate.ray_fits import run_parallel
    from .generate.plan import GenerationPlan
    from .tracking import log_datasets, ui_link
    from .tracking import stage as child_run

    stages = tqdm(total=6, desc="demo", unit="stage", bar_format="{desc}: {n}/{total} stages |{bar}| {elapsed}")

    def stage(text: str) -> None:
        stages.set_description(f"demo: {text}")

    stage("ingest procedural dataset")
    ds = _ingest(cfg, root)
    index = pd.read_parquet(ds / "index.parquet")
    stages.update()
    stage("train MeDi model (type + site)")
    medi = _train(cfg, ds, root, "demo-medi", ["cancer_type", "tissue_source_site"], uri)
    class_only = _train(cfg, ds, root, "demo-class-only", ["cancer_type"], uri) if cfg.separate_class_only else None
    stages.update()

    stage("generate tiles")
    train_rows = index[index["split"] == "train"]
    types = sorted(train_rows["cancer_type"].unique())
    per_type = cfg.per_pair * train_rows["tissue_source_site"].nunique()  # same budget per type as MeDi
    pairs = GenerationPlan(mode="unseen-pairs", count=cfg.per_pair, seed=cfg.seed)
    by_type = [{"cancer_type": t, "count": per_type} for t in types]
    pools = {
        "medi": _generate(
            cfg,
            medi,
            root / "synthetic-medi",
            pairs,
            composition=cfg.composition,
            calibration_tiles=cfg.calibration_tiles,
        ),
        "site-nulled": _generate(
            cfg,
            medi,
            root / "synthetic-site-nulled",
            GenerationPlan(mode="explicit", rows=by_type, null_site=True, seed=cfg.seed),
        ),
        "oracle": _generate(cfg, None, root / "reference-oracle", pairs, "oracle", ds),
        "noise": _generate(cfg, None, root / "reference-noise", pairs, "noise", ds),
    }
    if class_only is not None:
        pools["class-only"] = _generate(
            cfg, class_only, root / "synthetic-class-only", GenerationPlan(mode="explicit", rows=by_type, seed=cfg.seed)
        )
    fidelity = evaluate_fidelity(
        FidelityConfig(
            real=str(ds),
            synthetic=str(pools["medi"]),
            tracking_uri=uri,
            run_name="demo-fidelity-medi",
            # each demo its own run (from its work's start), also when the server is down (no run id yet)
            run_key=f"{root}/demo-fidelity-medi/{logger.run_id or logger.spec['key']}",
        )
    )
    stages.update()

    stage(f"evaluate classifiers on held-out sites ({len(cfg.seeds)} seeds)")
    base = DownstreamConfig(
        real=str(ds),
        classifier=cfg.classifier,
        seeds=list(cfg.seeds),
        image_size=cfg.size,
        allocation="uniform",
        cache_dir=str(root / "cache"),
    )
    with child_run(uri, "evaluate", "evaluate", spill_dir=str(root / "mlflow-spill" / "evaluate")) as ev:
        log_datasets(ev, {"real": str(ds), "synthetic": [str(p) for p in pools.values()]})
        comp = compare(base, arms(cfg.ratio, pools), run_parallel)  # fits as Ray tasks, one per core
        ev.artifact_bytes(comp.table().encode(), "results.txt")
    stages.update()

    stage("picture and MLflow")
    picture = root / "real_vs_generated.png"
    save_picture(ds, pools["medi"], picture)
    table = comp.table()
    contrasts = {f"{a} vs {b}": comp.deltas(b)[a] for a, b, _ in CONTRASTS if a in comp.results}
    logger.params(asdict(cfg))
    log_datasets(logger, {"real": str(ds), "synthetic": [str(p) for p in pools.values()]})  # the list's Dataset column
    for arm, res in comp.results.items():
        slug = arm.replace("+ ", "").replace(" ", "_").replace("-", "_")
        logger.metrics({f"{slug}.{k}": v[0] for k, v in res.mean_sem.items()})
    logger.artifact_bytes(table.encode(), "results.txt")
    logger.artifact_bytes(picture.read_bytes(), picture.name)
    minutes = (time.time() - t0) / 60
    logger.metrics({"wall_minutes": minutes})
    stages.update()
    stages.close()
    summary = {
        "table": table,
        "contrasts": contrasts,
        "picture": str(picture),
        "minutes": minutes,
        "mlflow_run_id": logger.run_id,
        "tracking_uri": uri,
        "ui": ui_link(uri, logger.run_id),
        "fidelity": fidelity.get("calibrated"),
        "held_out_sites": sorted(index.loc[index["split"] == "holdout", "tissue_source_site"].unique()),
    }
    (root / "results.json").write_text(json.dumps(summary, indent=2, default=float))
    (root / "results.txt").write_text(table + "\n")
    return summary
