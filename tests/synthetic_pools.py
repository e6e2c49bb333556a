"""Test helpers: small procedural datasets and 'synthetic pools' made without a diffusion model.

A pool is just a dataset directory whose rows are synthetic train tiles. Here the tiles come from
the procedural renderer at chosen (type, site) pairs (an ideal generator: the site's stain with the
type's morphology) and are then relabelled synthetic, split 'train', with generation metadata.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def ingest_procedural(
    out: Path, *, n_types=3, n_sites=9, n_tiles=360, size=32, seed=1, holdout=0.25, val=0.0, counts=None
) -> Path:
    from medi_dist.data import sources
    from medi_dist.data.ingest import ingest
    from medi_dist.data.procedural import ProceduralConfig
    from medi_dist.data.split import SplitConfig

    cfg = ProceduralConfig(
        n_types=n_types, n_sites=n_sites, n_tiles=n_tiles, size=size, seed=seed, counts=counts, extra_metadata=False
    )
    ingest(
        sources.procedural(cfg), out, SplitConfig(holdout_fraction=holdout, val_fraction=val, seed=seed), shard_mb=0.05
    )
    return out


def make_pool(
    real: Path,
    out: Path,
    *,
    per_pair=4,
    sites_split="train",
    only_unseen=False,
    seed=7,
    model="medi-test",
    steps=25,
    guidance=1.0,
    sampler="ddim",
) -> Path:
    """Pool at every (type, site) pair over the real dataset's `sites_split` sites (or only the pairs
    absent from the real data), marked synthetic like generated tiles."""
    idx = pd.read_parquet(real / "index.parquet")
    train = idx[idx["split"] == sites_split]
    types, sites = sorted(idx["cancer_type"].unique()), sorted(train["tissue_source_site"].unique())
    seen = set(zip(train["cancer_type"], train["tissue_source_site"]))
    counts = {(t, s): per_pair for t in types for s in sites if not (only_unseen and (t, s) in seen)}
    # a holdout share is required by the splitter; everything is relabelled 'train' below
    ingest_procedural(out, n_types=len(types), size=32, seed=seed, counts=counts, holdout=0.2)
    manifest = json.loads((out / "dataset.json").read_text())
    moved = {}
    for s in manifest["shards"]:  # every shard becomes a train shard, as generation writes them
        if s["split"] != "train":
            old = s["path"]
            s["path"] = f"shards/train/{s['split']}-{Path(old).name}"
            (out / "shards" / "train").mkdir(parents=True, exist_ok=True)
            (out / old).rename(out / s["path"])
            moved[old] = s["path"]
        s["split"] = "train"
    (out / "dataset.json").write_text(json.dumps(manifest))
    pool = pd.read_parquet(out / "index.parquet")
    pool["shard"] = pool["shard"].replace(moved)
    pool = pool.assign(
        split="train",
        synthetic=True,
        source=model,
        sampler=sampler,
        steps=steps,
        guidance=guidance,
        seen=[(t, s) in seen for t, s in zip(pool["cancer_type"], pool["tissue_source_site"])],
    )
    pool.to_parquet(out / "index.parquet", index=False)
    return out


def empty_pool(real: Path, out: Path) -> Path:
    """A dataset dir with no synthetic tiles (e.g. a real dataset passed as a pool by mistake)."""
    make_pool(real, out, per_pair=1)
    idx = pd.read_parquet(out / "index.parquet")
    idx.assign(synthetic=False).to_parquet(out / "index.parquet", index=False)
    return out
