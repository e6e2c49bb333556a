"""Source -> checked tiles -> site-disjoint split -> shards + index + vocabularies, written as one
dataset directory.

Every tile is read and checked first (its bytes go to a spool file in the temporary directory), so
the split is planned from the tiles that survive, and an ingest that skips too much stops before
anything is written. The directory is built under a temporary name and renamed at the end, so an
interrupted ingest never leaves something that looks like a finished dataset.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..metadata import ConditioningSpec, SchemaError, clean_category
from .records import SkipLog, TileRecord, log
from .shards import INDEX, MANIFEST, SPLIT, VOCAB, atomic_write_parquet, atomic_write_text, check_record, write_shards
from .sources import Scan
from .split import SplitConfig, site_split, split_report

# A few bad tiles are normal (a re-export gone wrong, a slide without metadata). Past a fifth of the
# inputs the cause is usually one systematic mistake (paths relative to the wrong folder, a wrong
# column, a wrong format), and the split would be planned on what happens to be left.
MAX_SKIPPED_FRACTION = 0.2


def shuffled(records: Iterator, buffer: int, seed: int) -> Iterator:
    """Bounded shuffle so shards mix types and slides without holding the dataset in memory."""
    rng = random.Random(seed)
    buf: list = []
    for rec in records:
        buf.append(rec)
        if len(buf) >= buffer:
            yield buf.pop(rng.randrange(len(buf)))
    rng.shuffle(buf)
    yield from buf


@dataclass
class _Spooled:
    """A checked tile whose bytes wait in the spool file."""

    key: str
    image_format: str
    meta: dict[str, Any]
    origin: str
    offset: int
    length: int


def _spool(records: Iterable[TileRecord], path: Path, skips: SkipLog) -> tuple[list[_Spooled], Counter]:
    """Check every tile; keep the good ones' bytes in `path`. Returns them and tiles per (type, site)."""
    seen: dict[str, str] = {}
    kept: list[_Spooled] = []
    groups: Counter = Counter()
    with open(path, "wb") as f:
        for rec in records:
            if not check_record(rec, seen, skips):
                continue
            kept.append(_Spooled(rec.key, rec.image_format, rec.meta, rec.origin, f.tell(), len(rec.image_bytes)))
            f.write(rec.image_bytes)
            pair = clean_category(rec.meta.get("cancer_type")), clean_category(rec.meta.get("tissue_source_site"))
            groups[pair] += 1
    return kept, groups


def _unspool(entries: Iterable[_Spooled], path: Path) -> Iterator[TileRecord]:
    with open(path, "rb") as f:
        for e in entries:
            f.seek(e.offset)
            yield TileRecord(e.key, f.read(e.length), e.image_format, e.meta, e.origin)


def check_skipped(scan: Scan, skips: SkipLog, kept: int, max_fraction: float) -> None:
    """Refuse, in one line, an ingest that skipped more than `max_fraction` of its inputs or everything."""
    total = max(scan.total_inputs, 1)
    frac = min(skips.skipped_inputs / total, 1.0)
    if not kept:  # nothing to ingest whatever the threshold: don't suggest raising it
        raise SchemaError(
            f"{scan.name}: every input was skipped; nothing was written. Most common: {skips.top_reasons(3)}"
        )
    if frac > max_fraction + 1e-9:  # the suggested value below must pass despite float rounding
        raise SchemaError(
            f"{scan.name}: {frac:.0%} of the inputs were skipped ({skips.skipped_inputs} of {scan.total_inputs}), "
            f"more than --max-skipped-fraction {max_fraction:g}; nothing was written. Most common: "
            f"{skips.top_reasons(3)}. Fix those, or pass --max-skipped-fraction {math.ceil(frac * 100) / 100:g} "
            "to ingest the rest"
        )


def case_variants(index: pd.DataFrame, columns: Iterable[str]) -> dict[str, list[list[str]]]:
    """Values of each categorical column that differ only by case ('MALE' / 'male'). They stay
    distinct conditions (a code's case can matter), so the user should see them."""
    out = {}
    for c in columns:
        if c not in index.columns:
            continue
        by_fold: dict[str, set[str]] = {}
        for v in index[c].dropna().unique():
            by_fold.setdefault(str(v).casefold(), set()).add(str(v))
        groups = sorted(sorted(g) for g in by_fold.values() if len(g) > 1)
        if groups:
            out[c] = groups
    return out


def ingest(
    scan: Scan,
    out: str | Path,
    split: SplitConfig,
    skips: SkipLog | None = None,
    shard_mb: float = 64,
    shuffle_buffer: int = 4096,
    overwrite: bool = False,
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
) -> dict:
    out = Path(out)
    skips = skips if skips is not None else SkipLog()
    if not 0 <= max_skipped_fraction <= 1:
        raise ValueError(f"--max-skipped-fraction must be in [0, 1], got {max_skipped_fraction}")
    split.targets()  # bad fractions fail before any tile is read
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
    if not scan.groups and not skips.entries:
        raise SchemaError(f"{scan.name}: no tiles found")
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        spool = tmp / ".spool"
        kept, groups = _spool(scan.records(), spool, skips)
        check_skipped(scan, skips, len(kept), max_skipped_fraction)
        assign = site_split(groups, split)  # from the tiles that survived, not from what was listed
        index, shards = write_shards(
            _unspool(shuffled(iter(kept), shuffle_buffer, split.seed), spool),
            tmp,
            assign,
            int(shard_mb * (1 << 20)),
            scan.name,
        )
        spool.unlink()
        continuous = [c for c in scan.continuous if c in index.columns and index[c].notna().any()]
        for c in sorted(set(scan.continuous) - set(continuous)):
            log.warning("%s: continuous column %r has no value in any tile; not used as a condition", scan.name, c)
        spec = ConditioningSpec.build(index.to_dict("records"), scan.categorical, continuous)
        spec.save(tmp / VOCAB)
        atomic_write_parquet(index, tmp / INDEX)
        # Report what was actually written (skips can empty a group).
        written = index.groupby(["cancer_type", "tissue_source_site"]).size().to_dict()
        report = split_report(written, assign, split)
        if report["share_note"]:
            log.info("%s: %s", scan.name, report["share_note"])  # the CLI prints it once, with the stats
        atomic_write_text(tmp / SPLIT, json.dumps(report, indent=2))
        manifest = {
            "format": "medi-dist-dataset/1",
            "source": scan.name,
            **({"renderer": scan.renderer} if scan.renderer else {}),
            "tiles": int(len(index)),
            "image_formats": sorted(index["image_format"].unique().tolist()),
            "categorical": scan.categorical,
            "continuous": continuous,
            "shards": shards,
            "skipped": [{"input": o, "reason": r} for o, r in skips.entries],
            "unparsed_values": skips.unparsed_rows(),  # read as missing; the tiles were kept
            "case_variants": case_variants(index, scan.categorical),
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
            raise OSError(
                e.errno,
                f"{os.strerror(e.errno)} while writing dataset {out}{at}; nothing was kept "
                f"({kept}). Free space or choose another --out, then re-run",
            ) from e
        raise
    if skips.entries:
        log.info(skips.summary())  # the CLI prints it once; every entry is in dataset.json
    return manifest
