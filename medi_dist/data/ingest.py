"""Source -> site-disjoint split -> shards + index + vocabularies, written as one dataset directory.

The directory is built under a temporary name and renamed at the end, so an interrupted ingest
never leaves something that looks like a finished dataset.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from ..metadata import ConditioningSpec, SchemaError
from .records import SkipLog, TileRecord, log
from .shards import INDEX, MANIFEST, SPLIT, VOCAB, atomic_write_parquet, atomic_write_text, write_dataset
from .sources import Scan
from .split import SplitConfig, site_split, split_report


def shuffled(records: Iterator[TileRecord], buffer: int, seed: int) -> Iterator[TileRecord]:
    """Bounded shuffle so shards mix types and slides without holding the dataset in memory."""
    rng = random.Random(seed)
    buf: list[TileRecord] = []
    for rec in records:
        buf.append(rec)
        if len(buf) >= buffer:
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf


def ingest(scan: Scan, out: str | Path, split: SplitConfig, skips: SkipLog | None = None,
           shard_mb: float = 64, shuffle_buffer: int = 4096, overwrite: bool = False) -> dict:
    out = Path(out)
    skips = skips if skips is not None else SkipLog()
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    if not scan.groups:
        raise SchemaError(f"{scan.name}: no tiles found")
    assign = site_split(scan.groups, split)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        index, shards = write_dataset(shuffled(scan.records(), shuffle_buffer, split.seed), tmp, assign, skips,
                                      int(shard_mb * (1 << 20)), scan.name)
        if index.empty:
            raise SchemaError(f"{scan.name}: every input was skipped; nothing to write.\n{skips.summary()}")
        continuous = [c for c in scan.continuous if c in index.columns and index[c].notna().any()]
        for c in sorted(set(scan.continuous) - set(continuous)):
            log.warning("%s: continuous column %r has no value in any tile; not used as a condition", scan.name, c)
        spec = ConditioningSpec.build(index.to_dict("records"), scan.categorical, continuous)
        spec.save(tmp / VOCAB)
        atomic_write_parquet(index, tmp / INDEX)
        # Report what was actually written (skips can empty a group).
        written = index.groupby(["cancer_type", "tissue_source_site"]).size().to_dict()
        report = split_report(written, assign, split)
        atomic_write_text(tmp / SPLIT, json.dumps(report, indent=2))
        manifest = {
            "format": "medi-dist-dataset/1",
            "source": scan.name,
            "tiles": int(len(index)),
            "image_formats": sorted(index["image_format"].unique().tolist()),
            "categorical": scan.categorical,
            "continuous": continuous,
            "shards": shards,
            "skipped": [{"input": o, "reason": r} for o, r in skips.entries],
        }
        atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2))
        old = None
        if out.exists():  # move the old dataset aside; delete it only once the new one is in place
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
        try:
            tmp.rename(out)
        except BaseException:
            if old is not None:
                os.replace(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            kept = f"the existing {out} is untouched" if out.exists() else f"{out} was not created"
            at = f" (at {e.filename})" if e.filename else ""
            raise OSError(e.errno, f"{os.strerror(e.errno)} while writing dataset {out}{at}; nothing was kept "
                          f"({kept}). Free space or choose another --out, then re-run") from e
        raise
    if skips.entries:
        log.warning(skips.summary())
    return manifest
