"""WebDataset shard writing and the dataset directory it produces.

A dataset directory holds:
  shards/<split>/shard-000000.tar   members `<key>.<jpg|png>` + `<key>.json`, sorted and grouped by key
  index.parquet                     one row per tile: key, shard, image format, sha256, metadata
  vocab.json                        the conditioning spec (every vocabulary) built from the tiles
  split.json                        counts per (type, site, split) and the sites of each split
  dataset.json                      shard list with byte sizes and sha256, skipped inputs, provenance

Shards are written to a temporary name and renamed when complete, so a reader never sees half a
shard; their sizes and checksums let a reader refuse a truncated or altered shard by name.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

from ..metadata import ConditioningSpec, SchemaError, check_key
from ..storage import Folder, file_sha256, is_remote, local_copy, local_path
from .records import SkipLog, TileRecord

SHARD_DIR = "shards"
INDEX = "index.parquet"
VOCAB = "vocab.json"
SPLIT = "split.json"
MANIFEST = "dataset.json"
IMAGE_FORMATS = ("jpg", "png")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_image(data: bytes) -> tuple[int, int]:
    """Fully decode an encoded tile; raise SchemaError saying what is wrong with it (callers add where)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode, size = im.mode, im.size
    except Exception as e:  # PIL raises many types for broken files
        raise SchemaError(f"cannot decode image ({type(e).__name__}: {e}); re-export or remove it") from None
    if mode != "RGB":
        raise SchemaError(f"image mode {mode} (need 8-bit RGB H&E); convert it to RGB or remove it")
    if size[0] != size[1]:
        raise SchemaError(f"tile is {size[0]}x{size[1]}, not square; crop it to a square tile")
    return size


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


def write_tar_atomic(path: Path, members: list[tuple[str, bytes]]) -> None:
    """Write (name, bytes) members in the given order to a temp name, fsync, rename: a reader
    never sees half a shard."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                _tar_add(tar, name, data)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass
class ShardWriter:
    """Buffers tiles of one split and writes sorted, key-grouped tar shards of ~target_bytes."""

    out_dir: Path
    split: str
    target_bytes: int = 64 << 20
    max_tiles: int = 1000  # also cap tiles, so small datasets still give Ray Data several shards
    name: str = "shard"  # file names <name>-000000.tar, ...: each ingest unit writes its own
    rows: list[dict[str, Any]] = field(default_factory=list)
    shards: list[dict[str, Any]] = field(default_factory=list)
    _buf: list[tuple[TileRecord, str]] = field(default_factory=list)
    _buf_bytes: int = 0

    def add(self, rec: TileRecord, checksum: str) -> None:
        self._buf.append((rec, checksum))
        self._buf_bytes += len(rec.image_bytes) + 512
        if self._buf_bytes >= self.target_bytes or len(self._buf) >= self.max_tiles:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        rel = f"{SHARD_DIR}/{self.split}/{self.name}-{len(self.shards):06d}.tar"
        path = self.out_dir / rel
        members, rows = [], []
        for rec, checksum in sorted(self._buf, key=lambda x: x[0].key):
            # the tile's sha256 also rides in its json, so the stream can check each tile it decodes
            meta = {**rec.meta, "key": rec.key, "split": self.split, "sha256": checksum}
            members += [
                (f"{rec.key}.{rec.image_format}", rec.image_bytes),
                (f"{rec.key}.json", json.dumps(meta, sort_keys=True).encode()),
            ]
            rows.append({**meta, "shard": rel, "image_format": rec.image_format, "sha256": checksum})
        write_tar_atomic(path, members)
        self.rows += rows
        self.shards.append(
            {
                "path": rel,
                "split": self.split,
                "tiles": len(self._buf),
                "bytes": path.stat().st_size,
                "sha256": file_sha256(path),
            }
        )
        self._buf, self._buf_bytes = [], 0


def duplicate_key_error(key: str, origin: str, other: str) -> SchemaError:
    return SchemaError(
        f"duplicate tile key {key!r} from {origin} and {other}; keys must be unique "
        "(keys keep only letters, digits, '-' and '_', so 'a.b' and 'a_b' collide): give the rows distinct keys "
        "(in a manifest add a slide_id column, since the key is <slide_id>-<file name> and without one "
        "every folder's 0_0.png is '0_0-0_0', or a key column)"
    )


def check_record(rec: TileRecord, seen: dict[str, str], skips: SkipLog) -> bool:
    """Whether a tile can be written: a bad image is skipped and logged (False); an invalid or
    duplicate key or an unknown format is an error. Keys accepted so far go into `seen`."""
    origin = rec.origin or rec.key
    check_key(rec.key)
    if rec.key in seen:
        raise duplicate_key_error(rec.key, origin, seen[rec.key])
    if rec.image_format not in IMAGE_FORMATS:
        raise SchemaError(f"{origin}: image format {rec.image_format!r}, expected one of {IMAGE_FORMATS}")
    try:
        check_image(rec.image_bytes)
    except SchemaError as e:
        skips.skip(origin, str(e))
        return False
    seen[rec.key] = origin
    return True


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_write_parquet(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    df.to_parquet(tmp, index=False)
    os.replace(tmp, path)


def not_a_dataset(dataset_dir: str | Path, missing: str = MANIFEST) -> FileNotFoundError:
    """The one message for a folder that is not (yet) a dataset: real datasets come from ingest,
    synthetic pools from generate, and an unfinished generation is finished by running it again."""
    folder = Folder(dataset_dir)
    root = folder.uri if folder.remote else local_path(dataset_dir)
    if folder.exists("generation.json"):
        return FileNotFoundError(
            f"{root} is an unfinished `medi-dist generate` output (no {missing}); run the "
            "same generate command again to finish it"
        )
    if folder.remote:
        what = "is empty or does not exist" if folder.is_empty() else f"is not a medi-dist dataset (no {missing})"
    elif not root.exists():
        what = "does not exist"
    elif root.is_dir() and not any(root.iterdir()):
        what = "is empty"
    else:
        what = f"is not a medi-dist dataset (no {missing})"
    return FileNotFoundError(
        f"{root} {what}; create it with `medi-dist ingest` (real tiles) or "
        "`medi-dist generate --out` (a synthetic pool)"
    )


def load_manifest(dataset_dir: str | Path) -> dict:
    """dataset.json of a local folder or an object-storage URI."""
    folder = Folder(dataset_dir)
    folder.check_bucket()
    if not folder.exists(MANIFEST):
        raise not_a_dataset(dataset_dir)
    return json.loads(folder.read_bytes(MANIFEST))


def read_index(dataset_dir: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    """index.parquet of a local folder or an object-storage URI."""
    folder = Folder(dataset_dir)
    if not folder.exists(INDEX):
        raise not_a_dataset(dataset_dir, INDEX)
    return pd.read_parquet(io.BytesIO(folder.read_bytes(INDEX)), columns=columns)


def group_counts(dataset_dir: str | Path, splits: Iterable[str]) -> tuple[Counter, int]:
    """Tiles per (cancer_type, tissue_source_site) in `splits` (missing values left out, as a
    groupby does) and the tiles of those splits, read one row group at a time over three columns:
    what the stream and the training driver need, without the whole index in memory."""
    import pyarrow.parquet as pq

    folder = Folder(dataset_dir)
    if not folder.exists(INDEX):
        raise not_a_dataset(dataset_dir, INDEX)
    src = io.BytesIO(folder.read_bytes(INDEX)) if folder.remote else str(local_path(dataset_dir) / INDEX)
    wanted, counts, tiles = set(splits), Counter(), 0
    cols = ["split", "cancer_type", "tissue_source_site"]
    for batch in pq.ParquetFile(src).iter_batches(batch_size=8192, columns=cols):
        split, t, s = (batch.column(c).to_pylist() for c in cols)
        for sp, ty, si in zip(split, t, s):
            if sp in wanted:
                tiles += 1
                if ty is not None and si is not None:
                    counts[(ty, si)] += 1
    return counts, tiles


def local_dataset(dataset_dir: str | Path) -> Path:
    """The dataset as a local folder: itself, or for an object-storage URI a cached copy whose shards
    passed their size and sha256 checks (storage.local_copy)."""
    if not is_remote(dataset_dir):
        return local_path(dataset_dir)
    return local_copy(dataset_dir, load_manifest(dataset_dir)["shards"])


def read_vocab(dataset_dir: str | Path) -> ConditioningSpec:
    return ConditioningSpec.from_dict(json.loads(Folder(dataset_dir).read_bytes(VOCAB)))


def check_shard_members(path: Path, tiles: int | None = None) -> int:
    """Walk a shard's tar headers (nothing is extracted, nothing written) and refuse, naming the shard
    and member, what our writers never produce: a member that is not a regular file, a name with a
    folder, `..` or a leading '/', an invalid key, a key whose members are not adjacent (Ray Data
    stops mid-run on those), a key without exactly one image and one json. Returns the tile count."""
    fix = "re-run `medi-dist ingest` (writers must put each key's members next to each other, sorted by name)"
    keys: dict[str, set[str]] = {}
    last = None
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isfile():
                    raise SchemaError(
                        f"shard {path}: member {m.name!r} is not a regular file; refusing the shard; {fix}"
                    )
                if "/" in m.name or "\\" in m.name or ".." in m.name:
                    raise SchemaError(
                        f"shard {path}: member {m.name!r} is a path (folder, '..' or absolute), not a "
                        f"plain <key>.<ext> name; refusing the shard; {fix}"
                    )
                key, _, ext = m.name.partition(".")
                if key != last:
                    if key in keys:
                        raise SchemaError(f"shard {path}: the members of key {key!r} are not adjacent; {fix}")
                    try:
                        check_key(key)
                    except SchemaError as e:
                        raise SchemaError(f"shard {path}: {e}") from None
                    keys[key], last = set(), key
                if ext in keys[key]:
                    raise SchemaError(f"shard {path}: member {m.name!r} appears twice; {fix}")
                keys[key].add(ext)
    except tarfile.TarError as e:
        raise SchemaError(f"shard {path} is not a readable tar ({e}); {fix}") from None
    for key, exts in keys.items():
        if len(exts) != 2 or "json" not in exts or not exts & set(IMAGE_FORMATS):
            raise SchemaError(
                f"shard {path}: key {key!r} has members {sorted(exts)}, expected one image "
                f"({'/'.join(IMAGE_FORMATS)}) and one json; {fix}"
            )
    if not keys:
        raise SchemaError(f"shard {path} holds no tiles; {fix}")
    if tiles is not None and len(keys) != tiles:
        raise SchemaError(f"shard {path} holds {len(keys)} tiles but {MANIFEST} lists {tiles}; {fix}")
    return len(keys)


def verify_shards(dataset_dir: str | Path, splits: Iterable[str] | None = None, checksums: bool = False) -> list:
    """Paths of the dataset's shards, refusing any that is missing, empty or truncated; with
    `checksums=True` also any whose sha256 or tar members (check_shard_members) are wrong.
    On object storage: paths within its filesystem (strings), or with `checksums=True` the shards of
    a verified local copy (storage.local_copy)."""
    manifest = load_manifest(dataset_dir)
    if is_remote(dataset_dir):
        if checksums:
            return verify_shards(local_copy(dataset_dir, manifest["shards"]), splits, checksums)
        return _verify_remote(Folder(dataset_dir), manifest, splits)
    root = local_path(dataset_dir)
    wanted = set(splits) if splits is not None else None
    paths = []
    for s in manifest["shards"]:
        if wanted is not None and s["split"] not in wanted:
            continue
        p = root / s["path"]
        if not p.exists():
            raise SchemaError(f"shard {p} is missing; re-run `medi-dist ingest` for {root}")
        size = p.stat().st_size
        if size == 0:
            raise SchemaError(f"shard {p} is empty (0 bytes); copy it again or re-run `medi-dist ingest` for {root}")
        if size != s["bytes"]:
            raise SchemaError(
                f"shard {p} is {size} bytes but was written as {s['bytes']} (truncated or altered copy); "
                f"copy it again or re-run `medi-dist ingest`"
            )
        if checksums and file_sha256(p) != s["sha256"]:
            raise SchemaError(f"shard {p} fails its sha256 check; copy it again or re-run `medi-dist ingest`")
        if checksums:
            check_shard_members(p, s.get("tiles"))
        paths.append(p)
    return paths


def _verify_remote(folder: Folder, manifest: dict, splits: Iterable[str] | None) -> list[str]:
    """verify_shards on object storage: presence and size of each shard (its sha256 is checked per
    tile as the stream decodes it, and per shard by local_copy)."""
    wanted = set(splits) if splits is not None else None
    paths = []
    for s in manifest["shards"]:
        if wanted is not None and s["split"] not in wanted:
            continue
        size = folder.size(s["path"])
        uri = folder.uri_of(s["path"])
        if size is None:
            raise SchemaError(
                f"shard {uri} is missing from the bucket; copy it again or re-run `medi-dist ingest --out {folder.uri}`"
            )
        if size != s["bytes"]:
            raise SchemaError(
                f"shard {uri} is {size} bytes but was written as {s['bytes']} (truncated or altered "
                f"copy); copy it again or re-run `medi-dist ingest --out {folder.uri}`"
            )
        paths.append(folder.path(s["path"]))
    return paths
