"""Estimating each training site's stain (data/site_stains.py) from a dataset's shards.

Directions and level need source resolution (site_stains.py): they are estimated on tiles as stored
(real datasets keep their source tiles; the stream resizes) or, for the built-in procedural world, on
tiles its renderer draws at SOURCE_PX (same sites, fresh seeds); pattern, background, fine detail and
the concentrations' quantiles are read at the model's resolution, where the generator's tiles live.
Sites are fitted on threads; a dataset's stains are estimated once per process.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tarfile
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from .site_stains import SITE, TYPE, SiteStains, Stain, directions, fit_site, jpeg_quality, level, optical_density

log = logging.getLogger(__name__)

SOURCE_PX = 256  # the built-in world's "scanner" resolution for stain directions
RELIABLE_PX = 128  # below this, estimated directions are far off (RESULTS.md)
PER_SITE = 128  # source tiles per site for the directions (2^23 pixels at 256 px, as measured) ...
SOURCE_PIXELS = 1 << 23  # ... and at most this many pixels of them (larger tiles: fewer, same memory)
THREADS = 4  # sites estimated at once
PER_SITE_MODEL = 512  # tiles per site for pattern, background and intensity at the model's resolution
MOVE_TILES = 256  # tiles per site kept for the move corrections (at most SOURCE_PIXELS pixels of them)


def _site_sample(
    root, index, site: str, resolution: int, seed: int, per_site: int = PER_SITE
) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """Up to PER_SITE_MODEL of a site's training tiles (seeded) at `resolution`, the first `per_site`
    of them (at most SOURCE_PIXELS pixels) as stored, and their files."""
    rows = index[index[SITE] == site]
    rows = rows.iloc[np.sort(np.random.default_rng([seed, len(rows)]).permutation(len(rows))[:PER_SITE_MODEL])]
    want = dict(zip(rows["key"], range(len(rows))))
    files: list = [None] * len(rows)
    for shard in sorted(set(rows["shard"])):
        with tarfile.open(root / shard) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.rpartition(".")
                if key in want and ext in ("jpg", "png"):
                    files[want[key]] = tar.extractfile(m).read()
    if any(f is None for f in files):
        raise ValueError(f"{root}: site {site}'s indexed tiles are missing from their shards; re-ingest the dataset")
    stored, small = [], []
    for data in files:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            size = stored[0].shape[1::-1] if stored else im.size
            if len(stored) < min(per_site, max(1, SOURCE_PIXELS // (size[0] * size[1]))):
                stored.append(np.asarray(im if im.size == size else im.resize(size, Image.BILINEAR)))
            if im.size[0] != resolution:
                im = im.resize((resolution, resolution), Image.BILINEAR)  # as the stream does
            small.append(np.asarray(im))
    return np.stack(stored), np.stack(small), files


def estimate_site_stains(dataset, resolution: int, sites: list[str] | None = None, seed: int = 0) -> SiteStains:
    """Stains of the dataset's training sites (or `sites`): directions at source resolution, the rest
    at `resolution` (the generator's). A procedural dataset's source tiles are drawn by its renderer
    at SOURCE_PX (same sites, fresh seeds); other datasets' are their stored tiles. Estimated once per
    process for a dataset's content (the demo's generation and its re-staining baseline share them)."""
    from .shards import MANIFEST, local_dataset

    root = local_dataset(dataset)
    manifest = (root / MANIFEST).read_text()
    every = _estimate(str(root), hashlib.sha256(manifest.encode()).hexdigest(), resolution, seed, PER_SITE)
    missing = sorted(set(sites or []) - set(every.owner))
    if missing:
        raise ValueError(f"{dataset}: no training tiles at site(s) {missing}; stains are estimated from training tiles")
    keep = sites or sorted(every.owner)
    return SiteStains({s: every.stains[s] for s in keep}, {s: every.owner[s] for s in keep})


@lru_cache(maxsize=4)
def _estimate(root: str, manifest_sha: str, resolution: int, seed: int, per_site: int) -> SiteStains:
    import json
    import os
    from concurrent.futures import ThreadPoolExecutor

    import pandas as pd

    from .shards import INDEX, MANIFEST

    renderer = json.loads((Path(root) / MANIFEST).read_text()).get("renderer")
    index = pd.read_parquet(Path(root) / INDEX, columns=["key", TYPE, SITE, "split", "shard"])
    index = index[index["split"] == "train"]
    counts = index.groupby([SITE, TYPE]).size()
    owner = {str(s): str(counts[s].idxmax()) for s in counts.index.get_level_values(0).unique()}
    jobs = [(root, index[index[SITE] == s], s, owner[s], resolution, seed, per_site, renderer) for s in sorted(owner)]
    # sites are independent, and numpy, scipy and PIL release the GIL in their loops: a thread each,
    # at most THREADS (a site's source tiles take ~0.5 GB while its directions are fitted)
    with ThreadPoolExecutor(min(len(jobs), os.cpu_count() or 1, THREADS)) as pool:
        fitted = list(pool.map(_fit_one, jobs))
    for s, _, px, _ in fitted:
        if not renderer and px < RELIABLE_PX:
            log.warning(
                "%s: site %s's tiles are %d px; stain directions estimated below %d px are far off (blur and "
                "JPEG mix the stains): ingest source-resolution tiles (the stream resizes them for training)",
                root,
                s,
                px,
                RELIABLE_PX,
            )
    stains = SiteStains({s: st for s, st, _, _ in fitted}, owner)
    return stains.with_move_corrections({s: small for s, _, _, small in fitted}, MOVE_TILES)


def _fit_one(job: tuple) -> tuple[str, Stain, int, np.ndarray]:
    """One site's stain, its source tiles' size and up to MOVE_TILES of its tiles at the model's
    resolution (a thread pool task): directions and level at source resolution, the rest at the
    model's resolution."""
    root, index, s, own, resolution, seed, per_site, renderer = job
    stored, small, files = _site_sample(Path(root), index, s, resolution, seed, per_site)
    if renderer:
        from . import procedural

        seeds = [[seed, procedural._crc(s), 9, i] for i in range(per_site)]
        stored = procedural.render_tiles([(own, s)] * per_site, seeds, SOURCE_PX, renderer["scanner_lines"])
    od = optical_density(stored, np.float32)  # float32: half the time
    hed = directions(od).astype(np.float64)
    stain = fit_site(optical_density(small), hed, level(od, hed), jpeg_quality(files))
    keep = max(1, min(MOVE_TILES, SOURCE_PIXELS // (resolution * resolution)))  # held until every site is fitted
    return s, stain, stored.shape[1], small[:keep].copy()
