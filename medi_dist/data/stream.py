"""Ray Data stream: dataset shards -> decoded uint8 tiles at model resolution + condition indices
(`to_model_range` turns them into the model's float32 [-1, 1] on the consumer).

With `StreamConfig.decode="device"` the read tasks do everything but the decode: they ship each
tile's encoded bytes (column `encoded`, with `shard`), and the consumer decodes and resizes a batch
on its accelerator with `DeviceDecoder` (torchvision's batched `decode_jpeg`: nvJPEG on a CUDA
device). Tiles that fail there are skipped and counted in the same ledger.

Read tasks read slices of our tar shards and do everything in place: checksum, decode, resize,
condition encoding, balancing (`TileShards`). A tile that fails to decode, or whose bytes fail the
sha256 written into its json at ingest, is skipped and recorded with its key and shard in a small
ledger actor; the stream aborts only when the skipped fraction passes `max_bad_fraction`, so one
corrupt file never stops an hours-long job.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import mmap
import os
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from PIL import Image
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from ..metadata import CONDITION_PREFIX, CONTINUOUS_PREFIX, ConditioningSpec, SchemaError
from ..storage import Folder, is_remote, local_path
from .bad_tiles import check_bad_fraction, ledger_on_this_node
from .device_decode import DeviceDecoder
from .ray_data_tuning import tune_ray_data
from .shards import MANIFEST, group_counts, load_manifest, read_vocab, verify_shards

log = logging.getLogger("medi_dist.data")
tune_ray_data()  # wherever the stream is imported: the driver, Ray Train's split coordinator


DECODE_MODES = ("cpu", "device")


@dataclass
class StreamConfig:
    resolution: int = 64
    balance: str = "none"  # none | type | type_site: expected-count balancing by repetition
    max_bad_fraction: float = 0.01
    min_rows_for_abort: int = 200  # don't judge the bad fraction on a handful of rows
    batch_rows: int = 256
    seed: int = 0
    num_cpus: float = 0.5  # per decode task; budgeted so Train workers don't starve Ray Data
    # Same seed -> same rows in the same order every run: seeded shard shuffle (a new order each
    # epoch, the same epochs every run) and blocks delivered in task order, not completion order.
    deterministic: bool = True
    # cpu: read tasks decode and resize (PIL). device: read tasks ship the encoded bytes and the
    # consumer decodes them on its accelerator (DeviceDecoder; nvJPEG on CUDA).
    decode: str = "cpu"


def decode_into(data: bytes, resolution: int, out: np.ndarray) -> None:
    """Encoded tile -> uint8 CHW at `resolution`, written into `out` (3, resolution, resolution)."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "RGB":
            raise ValueError(f"mode {im.mode}, expected RGB")
        if im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.BILINEAR)
        out[...] = np.asarray(im, dtype=np.uint8).transpose(2, 0, 1)


def to_model_range(images):
    """The stream's uint8 images (numpy or torch) -> float32 in [-1, 1], as the model takes them.
    The stream ships uint8 (4x less to pickle, store and batch than float32); the consumer converts."""
    if isinstance(images, np.ndarray):
        out = images.astype(np.float32)
        out /= 127.5
        out -= 1.0
        return out
    return images.float().div_(127.5).sub_(1.0)  # a torch tensor (on its device)


def decode_tile(data: bytes, resolution: int) -> np.ndarray:
    """Encoded tile -> float32 CHW in [-1, 1] at `resolution` (what the stream's consumer gets)."""
    out = np.empty((3, resolution, resolution), np.uint8)
    decode_into(data, resolution, out)
    return to_model_range(out)


def balance_weights(groups: Counter, mode: str, tiles: int) -> dict[str, float] | None:
    """Per-group repetition weights so each group's expected share is equal (mean weight 1), from the
    tiles per (cancer_type, tissue_source_site) and the tiles in all (shards.group_counts)."""
    if mode == "none":
        return None
    if mode not in ("type", "type_site"):
        raise ValueError(f"balance must be none, type or type_site, not {mode!r}")
    counts: Counter = Counter()
    for (t, s), n in groups.items():
        counts[(t, s) if mode == "type_site" else (t,)] += n
    return {"|".join(map(str, k)): float(tiles / (len(counts) * n)) for k, n in sorted(counts.items())}


def _repeats(keys: np.ndarray, weights: np.ndarray, seed: int) -> np.ndarray:
    """Stochastic rounding of weights, seeded by key so a rerun repeats the same rows."""
    u = np.array([zlib.crc32(f"{seed}:{k}".encode()) / 2**32 for k in keys])
    return (np.floor(weights) + (u < weights - np.floor(weights))).astype(np.int64)


def tar_members(data, path: str) -> list[tuple[str, int, int]]:
    """(name, offset, size) of each file in an uncompressed tar held in memory (bytes or mmap). Our
    writers use plain ustar headers; anything else (long-name or pax headers) goes through `tarfile`."""
    out, pos, end = [], 0, len(data) - 512
    while pos <= end:
        hdr = data[pos : pos + 512]
        if hdr[:1] == b"\0":  # end-of-archive block
            break
        if hdr[156:157] not in (b"0", b"\0") or hdr[257:262] != b"ustar":
            return _tarfile_members(data, path)
        name = hdr[:100].rstrip(b"\0").decode()
        prefix = hdr[345:500].rstrip(b"\0").decode()
        size = int(hdr[124:136].strip(b"\0 ") or b"0", 8)
        out.append((f"{prefix}/{name}" if prefix else name, pos + 512, size))
        pos += 512 + (size + 511) // 512 * 512
    return out


def _tarfile_members(data, path: str) -> list[tuple[str, int, int]]:
    import tarfile

    try:
        with tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r:") as tar:
            return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except tarfile.TarError as e:
        raise SchemaError(f"shard {path} is not a readable tar ({e}); re-run `medi-dist ingest`") from None


# A tile in a shard: key, image (offset, size), json (offset, size); -1 where the member is missing.
Tile = tuple[str, int, int, int, int]


def shard_tiles(data, path: str) -> list[Tile]:
    """The shard's tiles in shard order. Members of one key must be adjacent (as our writers put
    them); otherwise we stop naming the shard."""
    tiles: list[list] = []
    seen = set()
    for name, off, size in tar_members(data, path):
        key, _, ext = name.partition(".")
        if not tiles or tiles[-1][0] != key:
            if key in seen:
                raise SchemaError(
                    f"shard {path}: the members of key {key!r} are not adjacent; re-run `medi-dist "
                    f"ingest` (writers must put each key's members next to each other)"
                )
            seen.add(key)
            tiles.append([key, -1, -1, -1, -1])
        if ext in ("jpg", "png"):
            tiles[-1][1:3] = off, size
        elif ext == "json":
            tiles[-1][3:5] = off, size
    return [tuple(t) for t in tiles]


# Per worker process: each local shard's tile index, parsed once and reused by every later slice of
# it. Keyed by the file's identity (inode, size, mtime), so a rewritten shard is parsed again.
_SHARD_INDEX: dict[tuple, list[Tile]] = {}
# Per worker process: ledgers (actor ids) this process has seen past min_rows_for_abort and within
# max_bad_fraction (SliceDecoder.report).
_LEDGER_WITHIN_LIMIT: set[str] = set()


class _ShardBytes:
    """A shard's bytes for one read task: a local file is memory-mapped (the task touches only its
    slice's tiles, from the page cache) and its index cached; an object is fetched whole (one GET)
    and its headers parsed again (an object's identity would cost another request)."""

    def __init__(self, folder: Folder, rel: str):
        self.map, self.identity = None, None
        if folder.remote:
            self.data = folder.read_bytes(rel)
        else:
            with open(folder.path(rel), "rb") as f:
                st = os.fstat(f.fileno())
                self.identity = (folder.uri, rel, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                self.map = self.data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def close(self) -> None:
        if self.map is not None:
            self.map.close()


@dataclass
class SliceDecoder:
    """What a read task runs on one slice of a shard: read, check, decode, encode, balance.
    Kept apart from the shard list so each task pickles only this."""

    folder: Folder  # the driver's: its filesystem's options (endpoint, credentials mode) travel with it
    spec: ConditioningSpec
    cfg: StreamConfig
    weights: dict | None
    balance_cols: list[str]
    ledger: ray.actor.ActorHandle

    def tiles(self, folder: Folder, rel: str, n_tiles: int, shard: _ShardBytes) -> list[Tile]:
        key = shard.identity
        tiles = _SHARD_INDEX.get(key) if key else None
        if tiles is None:
            tiles = shard_tiles(shard.data, folder.uri_of(rel))
            if len(tiles) != n_tiles:
                raise SchemaError(
                    f"shard {folder.uri_of(rel)} holds {len(tiles)} tiles but {MANIFEST} lists {n_tiles}; "
                    f"copy it again or re-run `medi-dist ingest`"
                )
            if key:
                if len(_SHARD_INDEX) >= 4096:
                    _SHARD_INDEX.clear()
                _SHARD_INDEX[key] = tiles
        return tiles

    def __call__(self, rel: str, n_tiles: int, chunk: np.ndarray):
        folder = self.folder
        shard = _ShardBytes(folder, rel)
        try:
            images, rows, keys, bad = self.decode(folder, rel, n_tiles, chunk, shard)
        finally:
            shard.close()
        self.report(len(chunk), bad)
        if not rows:  # an empty block would carry no column types
            return
        out = {"key": np.array(keys, dtype=object)}
        if self.cfg.decode == "device":  # the consumer decodes; it names the shard of a tile that fails
            out["encoded"], out["shard"] = images, np.full(len(rows), folder.uri_of(rel), dtype=object)
        else:
            out["image"] = images
        enc = [self.spec.encode_row(r) for r in rows]
        for v in self.spec.categorical:
            out[CONDITION_PREFIX + v.name] = np.array([e[CONDITION_PREFIX + v.name] for e in enc], dtype=np.int64)
        for c in self.spec.continuous:
            out[CONTINUOUS_PREFIX + c.name] = np.array([e[CONTINUOUS_PREFIX + c.name] for e in enc], dtype=np.float32)
        if self.weights is not None:
            w = np.array([self.weights.get("|".join(str(r[c]) for c in self.balance_cols), 1.0) for r in rows])
            take = np.repeat(np.arange(len(rows)), _repeats(out["key"], w, self.cfg.seed))
            out = {k: v[take] for k, v in out.items()}
        yield BlockAccessor.batch_to_block(out)

    def report(self, n: int, bad: list) -> None:
        """Count the slice in the ledger; abort once the skipped fraction passes the limit. The task
        waits for the ledger's answer only while that answer can abort: when the slice had bad
        tiles, or while this worker process has not yet seen the ledger past `min_rows_for_abort`
        and within the limit (after that a clean slice only lowers the fraction). A slice with no
        bad tiles otherwise sends its count without waiting (no round trip at the end of its task)."""
        ledger_id = self.ledger._actor_id.hex()
        if not bad and ledger_id in _LEDGER_WITHIN_LIMIT:
            self.ledger.report.remote(n, bad)
            return
        seen, nbad = ray.get(self.ledger.report.remote(n, bad))
        if seen >= self.cfg.min_rows_for_abort:
            check_bad_fraction(seen, nbad, self.cfg.max_bad_fraction, bad)
            if len(_LEDGER_WITHIN_LIMIT) >= 4096:
                _LEDGER_WITHIN_LIMIT.clear()
            _LEDGER_WITHIN_LIMIT.add(ledger_id)

    def decode(self, folder: Folder, rel: str, n_tiles: int, chunk: np.ndarray, shard: _ShardBytes):
        tiles, data = self.tiles(folder, rel, n_tiles, shard), shard.data
        res, on_device = self.cfg.resolution, self.cfg.decode == "device"
        images = [] if on_device else np.empty((len(chunk), 3, res, res), np.uint8)
        rows, keys, bad = [], [], []
        for i in chunk:
            key, img_off, img_size, meta_off, meta_size = tiles[i]
            try:
                if img_off < 0 or meta_off < 0:
                    raise ValueError("has no image or no json member, expected one of each")
                img = data[img_off : img_off + img_size]
                m = json.loads(data[meta_off : meta_off + meta_size])
                if "sha256" in m and hashlib.sha256(img).hexdigest() != m["sha256"]:
                    raise ValueError(
                        "tile bytes fail the sha256 recorded at ingest (altered or corrupted shard); "
                        "check it with `medi-dist data stats --verify`"
                    )
                if on_device:
                    images.append(bytes(img))
                else:
                    decode_into(img, res, images[len(rows)])
                rows.append(m)
                keys.append(key)
            except Exception as e:  # corrupt bytes, bad json: skip and count
                uri = folder.uri_of(rel)
                log.warning("skipping tile %s in %s: %s", key, uri, e)
                bad.append({"key": key, "shard": uri, "error": f"{type(e).__name__}: {e}"})
        if on_device:
            encoded = np.empty(len(images), dtype=object)  # bytes objects, not a fixed-width bytes array
            encoded[:] = images
            return encoded, rows, keys, bad
        return images[: len(rows)], rows, keys, bad


class TileShards(Datasource):
    """Our tar shards, read and decoded inside Ray Data's read tasks.

    Each read task decodes a slice of one shard (`batch_rows` tiles) into a single block. Before,
    read_webdataset + map_batches made one Arrow row per tar member and moved the raw bytes through
    the object store to a second stage before decoding (benchmarks/RESULTS.md has the profile).
    Order: every shard's tiles and the list of slices are shuffled with (seed, execution index), so
    each epoch has its own order and every run the same epochs; preserve_order keeps that order.
    """

    def __init__(self, shards: list[tuple[str, int]], decoder: SliceDecoder):
        super().__init__()
        self.shards, self.decoder = shards, decoder

    def estimate_inmemory_data_size(self) -> int:
        return sum(n for _, n in self.shards) * 3 * self.decoder.cfg.resolution**2  # uint8

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context=None
    ) -> list[ReadTask]:
        cfg = self.decoder.cfg
        epoch = getattr(data_context, "_execution_idx", 0)  # Ray counts executions per dataset
        rng = np.random.default_rng([cfg.seed, epoch] if cfg.deterministic else None)
        parts = []
        for path, n in self.shards:
            parts += [(path, n, chunk) for chunk in np.array_split(rng.permutation(n), -(-n // cfg.batch_rows))]
        tile_bytes = 3 * cfg.resolution**2  # uint8
        return [
            ReadTask(
                functools.partial(self.decoder, path, n, chunk),
                BlockMetadata(num_rows=None, size_bytes=len(chunk) * tile_bytes, exec_stats=None, input_files=[path]),
                per_task_row_limit=per_task_row_limit,
            )
            for path, n, chunk in (parts[i] for i in rng.permutation(len(parts)))
        ]


@dataclass
class TileStream:
    dataset: ray.data.Dataset
    ledger: ray.actor.ActorHandle
    spec: ConditioningSpec
    tiles: int  # tiles in the selected splits (before balancing)
    deterministic: bool = True
    # decode="device": what the consumer decodes the `encoded` column with (None: the stream decodes)
    device_decoder: DeviceDecoder | None = None

    def skipped(self) -> dict:
        return ray.get(self.ledger.summary.remote())

    def ingest_options(self) -> ray.data.ExecutionOptions:
        """Ray Train's ingest options with this stream's order setting (Train otherwise takes
        preserve_order from the driver's global DataContext, not from the dataset)."""
        from ray.train import DataConfig

        opts = DataConfig.default_ingest_options()
        opts.preserve_order = self.deterministic
        return opts


def tile_stream(
    dataset_dir: str | Path, splits=("train",), cfg: StreamConfig | None = None, spec: ConditioningSpec | None = None
) -> TileStream:
    """A Ray Dataset over the dataset's shards of `splits`.

    `spec` is the model's conditioning spec when it already exists (generation, fine-tuning);
    it must cover every value in the data, or we stop with the mismatching values named.
    """
    cfg = cfg or StreamConfig()
    if cfg.decode not in DECODE_MODES:
        raise ValueError(f"decode must be one of {', '.join(DECODE_MODES)}, not {cfg.decode!r}")
    root = dataset_dir if is_remote(dataset_dir) else local_path(dataset_dir)  # object storage: read in place
    manifest = load_manifest(root)
    if not verify_shards(root, splits):  # presence and size of each shard, as main checks them
        raise ValueError(f"{root} has no shards for split(s) {list(splits)}")
    data_spec = read_vocab(root)
    if spec is None:
        spec = data_spec
    else:
        spec.check_compatible(data_spec, what=f"dataset {root}")
    counts, tiles = group_counts(root, splits)  # not the whole index: flat in the number of tiles (soak)
    weights = balance_weights(counts, cfg.balance, tiles)
    balance_cols = ["cancer_type"] + (["tissue_source_site"] if cfg.balance == "type_site" else [])
    ledger = ledger_on_this_node()
    # (relative path, tiles) in verify_shards' order; read tasks open them through the folder's filesystem
    shards = [(s["path"], s["tiles"]) for s in manifest["shards"] if s["split"] in set(splits)]
    decoder = SliceDecoder(Folder(root), spec, cfg, weights, balance_cols, ledger)
    # One block per read task: without override_num_blocks Ray Data splits each task's block into
    # ~200 / tasks pieces (SplitBlocks), which costs the driver and the raylet per piece.
    slices = sum(-(-n // cfg.batch_rows) for _, n in shards)
    ds = ray.data.read_datasource(TileShards(shards, decoder), num_cpus=cfg.num_cpus, override_num_blocks=slices)
    ds.context.execution_options.preserve_order = cfg.deterministic  # this dataset's own context copy
    device_decoder = (
        DeviceDecoder(cfg.resolution, ledger, cfg.max_bad_fraction, cfg.min_rows_for_abort)
        if cfg.decode == "device"
        else None
    )
    return TileStream(ds, ledger, spec, tiles, cfg.deterministic, device_decoder)
