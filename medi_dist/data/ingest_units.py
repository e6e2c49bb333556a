"""One unit of an ingest's work (data/ingest.py): read, check and spool its tiles (`check_unit`),
merge the units' records (`merge_units`), shard its tiles once the split is planned (`write_unit`);
`run_units` runs units in this process or as Ray tasks across the cluster.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from array import array
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..metadata import SchemaError, clean_category
from ..storage import Folder, temp_dir
from .records import SkipLog, TileRecord
from .shards import ShardWriter, check_record, duplicate_key_error, sha256


@dataclass
class _Spooled:
    """A checked tile whose bytes wait in its unit's spool file."""

    key: str
    image_format: str
    meta: dict[str, Any]
    origin: str
    offset: int
    length: int


def unit_names(i: int) -> tuple[str, str]:
    return f"unit-{i:06d}.bin", f"unit-{i:06d}.json"


def rows_name(i: int) -> str:
    """A unit's index rows, written by write_unit (never taken for a finished check_unit)."""
    return f"rows-{i:06d}.json"


def check_unit(unit, i: int, work_uri: str) -> None:
    """Read, check and encode one unit; its good tiles' bytes go to the work folder's spool file,
    then its record (tiles, skips, unparsed values) as JSON: a unit with a JSON is finished."""
    skips, seen = SkipLog(), {}
    kept, buf, offset = [], [], 0
    for rec in unit(skips):
        if not check_record(rec, seen, skips):
            continue
        kept.append(_Spooled(rec.key, rec.image_format, rec.meta, rec.origin, offset, len(rec.image_bytes)))
        buf.append(rec.image_bytes)
        offset += len(rec.image_bytes)
    work = Folder(work_uri)
    spool, record = unit_names(i)
    work.write_bytes(spool, b"".join(buf))
    work.write_bytes(
        record,
        json.dumps(
            {
                "tiles": [asdict(k) for k in kept],
                "skips": list(zip(skips.entries, skips.counts, skips.kinds)),
                "unparsed": [[c, v, n] for (c, v), n in skips.unparsed.items()],
            },
            default=lambda o: o.item() if hasattr(o, "item") else str(o),
        ).encode(),
    )  # numpy scalars in metadata


def write_unit(
    i: int,
    work_uri: str,
    split_of: dict[str, str],
    dest_uri: str,
    target_bytes: int,
    seed: int,
    source: str,
) -> list[dict]:
    """Shard one unit's checked tiles by split, in an order shuffled with the unit's own seed; its
    index rows go to the work folder (rows_name), its shard entries are returned. Only these small
    per-unit results travel back: the caller never holds every tile's metadata."""
    work = Folder(work_uri)
    data = work.read_bytes(unit_names(i)[0])
    tiles = json.loads(work.read_bytes(unit_names(i)[1]))["tiles"]
    random.Random(f"{seed}:{i}").shuffle(tiles)
    dest = Folder(dest_uri)
    local = dest.root if not dest.remote else temp_dir("medi-dist-unit-")
    writers: dict[str, ShardWriter] = {}
    try:
        for t in tiles:
            meta = dict(t["meta"])
            meta.setdefault("synthetic", False)
            meta.setdefault("source", source)
            site = clean_category(meta.get("tissue_source_site"))
            split = split_of.get(site)
            if split is None:
                raise SchemaError(
                    f"{t['origin']}: site {site!r} has no split assignment (internal error: split built "
                    "from other data)"
                )
            w = writers.setdefault(split, ShardWriter(Path(local), split, target_bytes, name=f"shard-{i:06d}"))
            image = data[t["offset"] : t["offset"] + t["length"]]
            w.add(TileRecord(t["key"], image, t["image_format"], meta, t["origin"]), sha256(image))
        for w in writers.values():
            w.flush()
        if dest.remote:  # each unit uploads its own shards
            for s in (s for w in writers.values() for s in w.shards):
                dest.write_bytes(s["path"], (Path(local) / s["path"]).read_bytes())
    finally:
        if dest.remote:
            shutil.rmtree(local, ignore_errors=True)
    work.write_bytes(rows_name(i), json.dumps([r for w in writers.values() for r in w.rows]).encode())
    return [s for w in writers.values() for s in w.shards]


def run_units(fn, calls: list[tuple], workers: int) -> list:
    """fn(*args) for each call, in order: here (workers=0) or as Ray tasks, `workers` at a time."""
    if workers <= 0:
        return [fn(*a) for a in calls]
    import ray

    from ..ray_setup import ensure_ray

    ensure_ray()
    task = ray.remote(num_cpus=1, max_retries=2)(fn)
    results: dict[int, Any] = {}
    pending: dict[Any, int] = {}
    todo = list(enumerate(calls))
    while todo or pending:
        while todo and len(pending) < workers:
            n, a = todo.pop(0)
            pending[task.remote(*a)] = n
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            try:
                results[pending.pop(ref)] = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the user's error as itself, not Ray's traceback
                raise (e.cause or e) from None
    return [results[n] for n in range(len(calls))]


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def merge_units(work: Folder, n_units: int, skips: SkipLog) -> tuple[list[int], Counter, int]:
    """Every unit's record read in unit order, skips merged into `skips`; duplicate keys across units
    are refused as within one. Returns (tiles per unit, tiles per (type, site), tiles). Only 8 bytes
    per tile are held (a hash of its key); a repeated hash has its units read again for the keys."""
    per_unit, groups, hashes = [], Counter(), array("Q")
    for i in range(n_units):
        rec = json.loads(work.read_bytes(unit_names(i)[1]))
        for (origin, reason), count, kind in rec["skips"]:
            skips.skip(origin, reason, count, kind)
        for c, v, n in rec["unparsed"]:
            skips.unparsed[(c, v)] += n
        for t in rec["tiles"]:
            hashes.append(_key_hash(t["key"]))
            groups[
                (clean_category(t["meta"].get("cancer_type")), clean_category(t["meta"].get("tissue_source_site")))
            ] += 1
        per_unit.append(len(rec["tiles"]))
    h = np.sort(np.frombuffer(hashes, dtype=np.uint64)) if hashes else np.zeros(0, np.uint64)
    repeated = set(h[1:][h[1:] == h[:-1]].tolist())
    if repeated:  # the first repeated key in unit order, named as before (or a hash collision: none)
        seen: dict[str, str] = {}
        for i in range(n_units):
            for t in json.loads(work.read_bytes(unit_names(i)[1]))["tiles"]:
                if _key_hash(t["key"]) not in repeated:
                    continue
                if t["key"] in seen:
                    raise duplicate_key_error(t["key"], t["origin"], seen[t["key"]])
                seen[t["key"]] = t["origin"]
    return per_unit, groups, len(hashes)
