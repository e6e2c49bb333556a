"""`medi-dist demo`: the whole MeDi story on the built-in procedural dataset, on one machine.

1. ingest a procedural H&E dataset where every site belongs to one cancer type (site <-> type
   confound through stain colour), TCGA-like site imbalance, held-out sites for testing;
2. train a MeDi model (type + site) and a class-only baseline with Ray Train;
3. generate tiles: MeDi at every (type, training site) pair, including pairs never seen together;
   the class-only model the same number of tiles per type;
4. train classifiers on real, real + class-only, real + MeDi tiles and test them on held-out sites
   over several seeds; print the table, save a picture, log everything to MLflow.

Each stage reuses what an earlier (interrupted) demo run already finished in the output folder.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

log = logging.getLogger("medi_dist.demo")


@dataclass
class DemoConfig:
    out: str = "demo-output"
    types: int = 4
    sites: int = 12
    tiles: int = 3000
    size: int = 32
    train_steps: int = 700
    batch_size: int = 32
    per_pair: int = 40  # generated tiles per (type, site) pair
    sampler: str = "dpmsolver++"
    sampler_steps: int = 20
    guidance: float = 1.0
    ratio: float = 1.0  # synthetic tiles per real training tile
    classifier: str = "cnn"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed: int = 0
    threads: int = 2  # torch threads of the single training worker (the demo targets 2 cores)
    tracking_uri: str | None = None


def _ingest(cfg: DemoConfig, root: Path) -> Path:
    from .data import sources
    from .data.ingest import ingest
    from .data.procedural import ProceduralConfig
    from .data.split import SplitConfig

    ds = root / "data"
    if not (ds / "dataset.json").exists():
        scan = sources.procedural(ProceduralConfig(n_types=cfg.types, n_sites=cfg.sites, n_tiles=cfg.tiles,
                                                   size=cfg.size, seed=cfg.seed))
        ingest(scan, ds, SplitConfig(holdout_fraction=0.3, seed=cfg.seed), overwrite=True)
    return ds


def _train(cfg: DemoConfig, ds: Path, root: Path, name: str, conditions: list[str], uri: str) -> Path:
    from .config import load_config
    from .train.config import TrainConfig
    from .train.trainer import output_dir, train

    tcfg = load_config(TrainConfig, None, [
        f"data.dataset={ds}", "data.balance=type", "model.preset=small", f"model.resolution={cfg.size}",
        f"model.conditions={json.dumps(conditions)}", f"optim.batch_size={cfg.batch_size}", "optim.lr=0.0005",
        f"steps={cfg.train_steps}", f"seed={cfg.seed}", f"run.name={name}", f"run.storage_path={root / 'runs'}",
        f"run.tracking_uri={uri}", f"run.checkpoint_every={max(cfg.train_steps // 4, 1)}", "run.log_every=20",
        f"run.threads_per_worker={cfg.threads}"])
    out = output_dir(tcfg)
    if not (out / "config.json").exists():
        res = train(tcfg)
        if res.model_dir is None:
            raise RuntimeError(f"training {name} did not finish; run the demo again to resume it")
    return out


def _generate(cfg: DemoConfig, model: Path, out: Path, plan) -> Path:
    from .generate.job import GenerateConfig, generate
    from .generate.writer import SamplingSettings

    res = generate(GenerateConfig(model=str(model), out=str(out), plan=plan, tiles_per_shard=128,
                                  sampling=SamplingSettings(sampler=cfg.sampler, steps=cfg.sampler_steps,
                                                            guidance=cfg.guidance, batch_size=64)))
    return res.out


def _picture(ds: Path, pool: Path, path: Path) -> None:
    """Real (left) and MeDi-generated (right) tile per (type, site); blank where none exists."""
    from .evaluate.tiles import load_tiles
    from .visual import tile_grid

    cells: dict[tuple[str, str], list] = {}
    real_imgs, real_meta = load_tiles(ds, ("train", "holdout"))
    syn_imgs, syn_meta = load_tiles(pool, ("train",))
    types = sorted(real_meta["cancer_type"].unique())
    sites = sorted(real_meta["tissue_source_site"].unique())
    blank = np.full_like(real_imgs[0], 235)
    for t in types:
        for s in sites:
            r = np.flatnonzero((real_meta["cancer_type"] == t).to_numpy() & (real_meta["tissue_source_site"] == s).to_numpy())
            g = np.flatnonzero((syn_meta["cancer_type"] == t).to_numpy() & (syn_meta["tissue_source_site"] == s).to_numpy())
            if len(r) or len(g):
                cells[(t, s)] = [real_imgs[r[0]] if len(r) else blank, syn_imgs[g[0]] if len(g) else blank]
    tile_grid(cells, types, sites, tile_px=48, per_cell=2).save(path)


def run_demo(cfg: DemoConfig) -> dict:
    from .evaluate.downstream import DownstreamConfig, compare
    from .generate.plan import GenerationPlan
    from .tracking import RunLogger, find_or_create_run, tracking_uri
    from .ray_setup import ensure_ray

    t0 = time.time()
    root = Path(cfg.out).resolve()
    root.mkdir(parents=True, exist_ok=True)
    uri = tracking_uri(cfg.tracking_uri)
    stages = tqdm(total=6, desc="demo", unit="stage", bar_format="{desc}: {n}/{total} stages |{bar}| {elapsed}")

    def stage(text: str) -> None:
        stages.set_description(f"demo: {text}")

    stage("ingest procedural dataset")
    ds = _ingest(cfg, root)
    index = pd.read_parquet(ds / "index.parquet")
    stages.update()
    ensure_ray()
    stage("train MeDi model (type + site)")
    medi = _train(cfg, ds, root, "demo-medi", ["cancer_type", "tissue_source_site"], uri)
    stages.update()
    stage("train class-only baseline")
    class_only = _train(cfg, ds, root, "demo-class-only", ["cancer_type"], uri)
    stages.update()

    stage("generate tiles")
    train_rows = index[index["split"] == "train"]
    n_train_sites = train_rows["tissue_source_site"].nunique()
    medi_pool = _generate(cfg, medi, root / "synthetic-medi",
                          GenerationPlan(mode="unseen-pairs", count=cfg.per_pair, seed=cfg.seed))
    per_type = cfg.per_pair * n_train_sites  # same budget per type as MeDi
    class_pool = _generate(cfg, class_only, root / "synthetic-class-only", GenerationPlan(
        mode="explicit", seed=cfg.seed,
        rows=[{"cancer_type": t, "count": per_type} for t in sorted(train_rows["cancer_type"].unique())]))
    stages.update()

    stage(f"evaluate classifiers on held-out sites ({len(cfg.seeds)} seeds)")
    base = DownstreamConfig(real=str(ds), classifier=cfg.classifier, seeds=list(cfg.seeds), image_size=cfg.size,
                            allocation="uniform", cache_dir=str(root / "cache"))
    comp = compare(base, {"real only": {"ratio": 0.0},
                          "+ class-only synthetic": {"synthetic": [str(class_pool)], "ratio": cfg.ratio},
                          "+ MeDi synthetic": {"synthetic": [str(medi_pool)], "ratio": cfg.ratio}})
    stages.update()

    stage("picture and MLflow")
    picture = root / "real_vs_generated.png"
    _picture(ds, medi_pool, picture)
    table = comp.table()
    deltas = comp.deltas("real only")
    run_id = find_or_create_run(uri, f"demo-{int(t0)}", tags={"medi_dist.kind": "demo"})
    logger = RunLogger(uri, run_id)
    logger.params(asdict(cfg))
    for arm, res in comp.results.items():
        slug = arm.replace("+ ", "").replace(" ", "_").replace("-", "_")
        logger.metrics({f"{slug}.{k}": v[0] for k, v in res.mean_sem.items()})
    logger.artifact_bytes(table.encode(), "results.txt")
    logger.artifact_bytes(picture.read_bytes(), picture.name)
    minutes = (time.time() - t0) / 60
    logger.metrics({"wall_minutes": minutes})
    logger.finish()
    stages.update()
    stages.close()
    summary = {"table": table, "deltas": deltas, "picture": str(picture), "minutes": minutes, "mlflow_run_id": run_id,
               "tracking_uri": uri, "held_out_sites": sorted(index.loc[index["split"] == "holdout", "tissue_source_site"].unique())}
    (root / "results.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "deltas"}, indent=2))
    (root / "results.txt").write_text(table + "\n")
    return summary


def format_summary(s: dict) -> str:
    from .evaluate.downstream import verdict

    lines = ["", "Classifiers trained on real training-site tiles (+ synthetic), tested on held-out sites "
             f"{', '.join(s['held_out_sites'])}; mean ± SEM over seeds:", "", s["table"], ""]
    for arm, d in s["deltas"].items():
        ba, sba = d["balanced_accuracy"], d["site_balanced_accuracy"]
        lines.append(f"{arm} vs real only: balanced accuracy {ba[0]:+.3f} ± {ba[1]:.3f}, site-averaged "
                     f"{sba[0]:+.3f} ± {sba[1]:.3f} (paired over seeds) -> {verdict(*ba)}")
    lines += ["", f"real vs generated tiles per (type, site): {s['picture']}",
              f"wall time: {s['minutes']:.1f} min",
              f"MLflow: .venv/bin/mlflow ui --backend-store-uri {s['tracking_uri']} --host 127.0.0.1 "
              "then open http://127.0.0.1:5000 (experiment medi-dist)"]
    return "\n".join(lines)
