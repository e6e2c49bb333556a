"""Source -> checked tiles -> site-disjoint split -> shards + index + vocabularies, written as one
dataset directory (a local folder or an object-storage URI).

The source comes in units of work (a slide for wsi, every n-th of a few hundred tiles otherwise).
Each unit is read, checked and encoded on its own (`workers` > 0: as Ray tasks across the cluster),
its good tiles kept in a spool file of a work folder next to the output, its skips and metadata in
a small JSON written last. Only then is the split planned, from the tiles that survived, so an
ingest that skips too much stops before anything is written. Each unit then writes its own shards
(shuffled with a seed of its own), and the index and manifest are written once at the end. The
result depends on the inputs and the seed only, not on how many workers ran.

An interrupted ingest leaves the work folder (`.<name>.ingest-<id>`, never mistaken for a dataset);
the same command run again reuses every finished unit. A local dataset is built under a temporary
name and renamed at the end; on object storage dataset.json is uploaded last. Either way an
interrupted ingest never leaves something that looks like a finished dataset.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..metadata import ConditioningSpec, ContinuousSpec, SchemaError, Vocab
from ..storage import Folder, is_remote, local_path, temp_dir
from .index_writer import IndexSummary, write_index
from .ingest_units import check_unit, merge_units, rows_name, run_units, unit_names, write_unit
from .records import SkipLog, log
from .shards import INDEX, MANIFEST, SHARD_DIR, SPLIT, VOCAB, atomic_write_text
from .sources import Scan
from .split import SplitConfig, site_split, split_report

# A few bad tiles are normal (a re-export gone wrong, a slide without metadata). Past a fifth of the
# inputs the cause is usually one systematic mistake (paths relative to the wrong folder, a wrong
# column, a wrong format), and the split would be planned on what happens to be left.
MAX_SKIPPED_FRACTION = 0.2


class Stopped(RuntimeError):
    """An ingest stopped on purpose after some units (tests, preemption drills); run it again."""


def _job_id(scan: Scan, split: SplitConfig, target_bytes: int, n_units: int) -> str:
    """Names the work folder: the same command on the same inputs finds it again to resume."""
    ident = [
        scan.name,
        scan.total_inputs,
        sorted(map(list, scan.groups.items())),
        scan.categorical,
        scan.continuous,
        asdict(split),
        target_bytes,
        n_units,
    ]
    return hashlib.sha256(json.dumps(ident, default=str).encode()).hexdigest()[:12]


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


def case_variants(values: Mapping[str, Iterable[Any]], columns: Iterable[str]) -> dict[str, list[list[str]]]:
    """Values of each categorical column (`values`: column -> its distinct non-missing values) that
    differ only by case ('MALE' / 'male'). They stay distinct conditions (a code's case can matter),
    so the user should see them."""
    out = {}
    for c in columns:
        if c not in values:
            continue
        by_fold: dict[str, set[str]] = {}
        for v in values[c]:
            by_fold.setdefault(str(v).casefold(), set()).add(str(v))
        groups = sorted(sorted(g) for g in by_fold.values() if len(g) > 1)
        if groups:
            out[c] = groups
    return out


def _sibling(out: str | Path, name: str) -> str:
    """`name` in the folder that holds `out` (a path or a URI)."""
    if is_remote(out):
        return f"{str(out).rstrip('/').rsplit('/', 1)[0]}/{name}"
    return str(local_path(out).resolve().parent / name)


def _check_out(out: str | Path, overwrite: bool) -> None:
    if not is_remote(out):
        out = local_path(out)
        if out.exists() and any(out.iterdir()) and not overwrite:
            raise FileExistsError(f"{out} already exists and is not empty; choose another --out or pass --overwrite")
        return
    dest = Folder(out)
    dest.check_bucket()  # wrong endpoint, credentials or bucket: before any tile is read
    files = dest.files()
    if dest.exists(MANIFEST) and not overwrite:
        raise FileExistsError(f"{dest.uri} already holds a dataset; choose another --out or pass --overwrite")
    if any(not f.startswith(SHARD_DIR + "/") for f in files if f != MANIFEST) and not overwrite:
        # only shards and no manifest: what an interrupted ingest left; anything else is someone's data
        raise FileExistsError(f"{dest.uri} already exists and is not empty; choose another --out or pass --overwrite")


def ingest(
    scan: Scan,
    out: str | Path,
    split: SplitConfig,
    skips: SkipLog | None = None,
    shard_mb: float = 64,
    overwrite: bool = False,
    max_skipped_fraction: float = MAX_SKIPPED_FRACTION,
    workers: int = 0,
    stop_after_units: int | None = None,
) -> dict:
    """Write the dataset to `out` (a local folder or an object-storage URI). `workers`: 0 runs every
    unit in this process, N > 0 runs them as Ray tasks, N at a time, across the cluster (same bytes)."""
    skips = skips if skips is not None else SkipLog()
    if not 0 <= max_skipped_fraction <= 1:
        raise ValueError(f"--max-skipped-fraction must be in [0, 1], got {max_skipped_fraction}")
    split.targets()  # bad fractions fail before any tile is read
    _check_out(out, overwrite)
    if not scan.groups and not skips.entries:
        raise SchemaError(f"{scan.name}: no tiles found")
    units = scan.units if scan.units is not None else [lambda s: scan.records()]
    if scan.units is None and workers:
        log.warning("%s: this source is one piece of work; reading it in this process", scan.name)
        workers = 0
    target = int(shard_mb * (1 << 20))
    out_name = str(out).rstrip("/").rsplit("/", 1)[-1]
    work_uri = _sibling(out, f".{out_name}.ingest-{_job_id(scan, split, target, len(units))}")
    work = Folder(work_uri)
    tmp = None
    try:
        done = set(work.files())
        todo = [(u, i, work_uri) for i, u in enumerate(units) if unit_names(i)[1] not in done]
        if done and todo:
            log.warning(
                "%s: resuming an interrupted ingest: %d of %d units already done",
                scan.name,
                len(units) - len(todo),
                len(units),
            )
        run_units(check_unit, todo[:stop_after_units], workers)
        if stop_after_units is not None and len(todo) > stop_after_units:
            raise Stopped(f"stopped after {stop_after_units} units of {len(units)}; run again to finish")
        per_unit, groups, n_kept = merge_units(work, len(units), skips)
        check_skipped(scan, skips, n_kept, max_skipped_fraction)
        assign = site_split(groups, split)  # from the tiles that survived, not from what was listed
        if is_remote(out):
            dest_uri = str(out)
            if Folder(out).exists(MANIFEST):  # the old manifest goes first: nothing reads as complete
                Folder(out).delete(MANIFEST)
        else:
            tmp = local_path(out).resolve().with_name(f".{out_name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir(parents=True)
            dest_uri = str(tmp)
        written = [i for i, n in enumerate(per_unit) if n]
        parts = run_units(
            write_unit, [(i, work_uri, assign, dest_uri, target, split.seed, scan.name) for i in written], workers
        )
        shards = [s for sh in parts for s in sh]
        rows = [lambda i=i: json.loads(work.read_bytes(rows_name(i))) for i in written]
        manifest = _finish(scan, out, tmp, rows, shards, assign, split, skips)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        if full or isinstance(e, (SchemaError, ValueError)):  # inputs must change: nothing to resume
            _remove(work)
        if full:
            out = local_path(out) if not is_remote(out) else out
            kept = f"the existing {out} is untouched" if Folder(out).exists(MANIFEST) else f"{out} was not created"
            at = f" (at {e.filename})" if e.filename else ""
            raise OSError(
                e.errno,
                f"{os.strerror(e.errno)} while writing dataset {out}{at}; nothing was kept "
                f"({kept}). Free space or choose another --out, then re-run",
            ) from e
        raise
    _remove(work)
    if skips.entries:
        log.info(skips.summary())  # the CLI prints it once; every entry is in dataset.json
    return manifest


def _remove(folder: Folder) -> None:
    if folder.remote:
        if not folder.is_empty():
            folder.delete_all()
        if folder.fs.get_file_info(folder.root).type != folder._pafs.FileType.NotFound:
            folder.fs.delete_dir(folder.root)  # a directory marker (S3); on GCS the prefix is gone with its objects
    else:
        shutil.rmtree(folder.root, ignore_errors=True)


def _finish(
    scan: Scan,
    out: str | Path,
    tmp: Path | None,
    rows: list[Callable[[], list[dict]]],
    shards: list[dict],
    assign: dict,
    split: SplitConfig,
    skips: SkipLog,
) -> dict:
    """Index (from each unit's rows, in row groups), vocabularies, split report and manifest (last);
    a local dataset then takes its name."""
    stage = tmp if tmp is not None else temp_dir("medi-dist-ingest-")
    try:
        return _finish_staged(scan, out, tmp, stage, rows, shards, assign, split, skips)
    finally:
        if tmp is None:
            shutil.rmtree(stage, ignore_errors=True)


def _finish_staged(scan, out, tmp, stage: Path, rows, shards, assign, split, skips) -> dict:
    summary = IndexSummary(scan.categorical, scan.continuous)
    index_tmp = stage / f".{INDEX}.tmp-{uuid.uuid4().hex[:8]}"
    write_index(index_tmp, rows, summary)  # never the whole index in memory (soak, benchmarks/RESULTS.md)
    # continuous statistics from the training sites only
    continuous = [c for c in scan.continuous if c in summary.columns and summary.train_any[c]]
    for c in sorted(set(scan.continuous) - set(continuous)):
        log.warning("%s: continuous column %r has no value in any training tile; not used as a condition", scan.name, c)
    spec = ConditioningSpec(
        [Vocab.build(name, summary.vocab[name]) for name in scan.categorical],
        [ContinuousSpec.build(name, summary.train_values[name]) for name in continuous],
    )
    spec.save(stage / VOCAB)
    os.replace(index_tmp, stage / INDEX)
    # Report what was actually written (skips can empty a group).
    report = split_report(summary.written_groups(), assign, split)
    if report["share_note"]:
        log.info("%s: %s", scan.name, report["share_note"])  # the CLI prints it once, with the stats
    atomic_write_text(stage / SPLIT, json.dumps(report, indent=2))
    manifest = {
        "format": "medi-dist-dataset/1",
        "source": scan.name,
        **({"renderer": scan.renderer} if scan.renderer else {}),
        "tiles": summary.tiles,
        "image_formats": sorted(summary.image_formats),
        "categorical": scan.categorical,
        "continuous": continuous,
        "shards": shards,
        "skipped": [{"input": o, "reason": r} for o, r in skips.entries],
        "unparsed_values": skips.unparsed_rows(),  # read as missing; the tiles were kept
        "case_variants": case_variants(summary.values, scan.categorical),
    }
    atomic_write_text(stage / MANIFEST, json.dumps(manifest, indent=2))
    if tmp is None:  # object storage: drop what an earlier ingest left, then the files, manifest last
        dest = Folder(out)
        keep = {s["path"] for s in shards}
        for f in dest.files():
            if f not in keep:
                dest.delete(f)
        for name in (VOCAB, SPLIT, INDEX, MANIFEST):
            dest.write_bytes(name, (stage / name).read_bytes())
        return manifest
    out = local_path(out)
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
    return manifest
