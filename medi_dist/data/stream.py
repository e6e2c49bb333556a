"""Ray Data stream: dataset shards -> decoded float tiles at model resolution + condition indices.

Reading keeps raw bytes (per-row decoding in the reader is slow); decoding, resizing, condition
encoding and balancing happen in `map_batches`. A tile that fails to decode, or whose bytes fail the
sha256 written into its json at ingest, is skipped and recorded with its key and shard in a small
ledger actor; the stream aborts only when the skipped fraction passes `max_bad_fraction`, so one
corrupt file never stops an hours-long job.
"""

from __future__ import annotations

import hashlib
import io
import logging
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray
from PIL import Image
from ray.data.datasource import FileShuffleConfig

from ..metadata import CONDITION_PREFIX, CONTINUOUS_PREFIX, ConditioningSpec
from ..storage import Folder, is_remote, local_path
from .shards import group_counts, load_manifest, read_vocab, verify_shards

log = logging.getLogger("medi_dist.data")
IMAGE_COLUMN = "img"


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


class TooManyBadTiles(RuntimeError):
    pass


@ray.remote(num_cpus=0)
class BadTileLedger:
    """Counts rows seen and tiles skipped across all decode tasks."""

    def __init__(self):
        self.seen, self.bad = 0, []

    def report(self, n: int, bad: list) -> tuple[int, int]:
        self.seen += n
        self.bad += bad
        return self.seen, len(self.bad)

    def summary(self) -> dict:
        return {"seen": self.seen, "skipped": len(self.bad), "bad": list(self.bad)}


def _ledger_on_this_node():
    """The ledger lives on the driver's node. Placed anywhere (num_cpus=0), it could land on a worker
    node; losing that node would kill it, and every decode task after that would fail on it, also
    those of the restarted Train workers, until the training ran out of `max_failures`
    (tests/test_node_loss.py). The driver's node going away ends the job anyway."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return BadTileLedger.options(scheduling_strategy=here).remote()


def unify_image_member(name: str) -> str:
    """`key.jpg` / `key.png` -> `key.img`, so jpg and png shards share one column."""
    stem, _, ext = name.rpartition(".")
    return f"{stem}.{IMAGE_COLUMN}" if ext in ("jpg", "png") else name


def decode_tile(data: bytes, resolution: int) -> np.ndarray:
    """Encoded tile -> float32 CHW in [-1, 1] at `resolution`."""
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "RGB":
            raise ValueError(f"mode {im.mode}, expected RGB")
        if im.size != (resolution, resolution):
            im = im.resize((resolution, resolution), Image.BILINEAR)
        arr = np.asarray(im, dtype=np.uint8)
    return arr.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1.0


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


class DecodeBatch:
    """map_batches callable: bytes + json -> image tensor and condition columns."""

    def __init__(self, spec: ConditioningSpec, cfg: StreamConfig, weights: dict | None, ledger, balance_cols):
        self.spec, self.cfg, self.weights, self.ledger, self.balance_cols = spec, cfg, weights, ledger, balance_cols

    def __call__(self, batch: dict) -> dict:
        import json

        images, rows, keys, bad = [], [], [], []
        for key, url, data, meta in zip(batch["__key__"], batch["__url__"], batch[IMAGE_COLUMN], batch["json"]):
            try:
                m = json.loads(meta)
                if "sha256" in m and hashlib.sha256(data).hexdigest() != m["sha256"]:
                    raise ValueError(
                        "tile bytes fail the sha256 recorded at ingest (altered or corrupted shard); "
                        "check it with `medi-dist data stats --verify`"
                    )
                images.append(decode_tile(data, self.cfg.resolution))
                rows.append(m)
                keys.append(key)
            except Exception as e:  # corrupt bytes, bad json: skip and count
                log.warning("skipping tile %s in %s: %s", key, url, e)
                bad.append({"key": str(key), "shard": str(url), "error": f"{type(e).__name__}: {e}"})
        seen, nbad = ray.get(self.ledger.report.remote(len(batch["__key__"]), bad))
        if seen >= self.cfg.min_rows_for_abort and nbad / seen > self.cfg.max_bad_fraction:
            raise TooManyBadTiles(
                f"{nbad} of {seen} tiles failed to decode (> max_bad_fraction={self.cfg.max_bad_fraction}); "
                f"first: {bad[:1] or 'see logs'}. Check the shards with `medi-dist data stats --verify`."
            )
        out = {"key": np.array(keys, dtype=object)}
        res = self.cfg.resolution
        out["image"] = np.stack(images) if images else np.zeros((0, 3, res, res), np.float32)
        enc = [self.spec.encode_row(r) for r in rows]
        for v in self.spec.categorical:
            out[CONDITION_PREFIX + v.name] = np.array([e[CONDITION_PREFIX + v.name] for e in enc], dtype=np.int64)
        for c in self.spec.continuous:
            out[CONTINUOUS_PREFIX + c.name] = np.array([e[CONTINUOUS_PREFIX + c.name] for e in enc], dtype=np.float32)
        if self.weights is not None and rows:
            w = np.array([self.weights.get("|".join(str(r[c]) for c in self.balance_cols), 1.0) for r in rows])
            rep = _repeats(out["key"], w, self.cfg.seed)
            out = {k: np.repeat(v, rep, axis=0) for k, v in out.items()}
        return out


@dataclass
class TileStream:
    dataset: ray.data.Dataset
    ledger: ray.actor.ActorHandle
    spec: ConditioningSpec
    tiles: int  # tiles in the selected splits (before balancing)
    deterministic: bool = True

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
    root = dataset_dir if is_remote(dataset_dir) else local_path(dataset_dir)  # object storage: read in place
    load_manifest(root)
    paths = verify_shards(root, splits)
    if not paths:
        raise ValueError(f"{root} has no shards for split(s) {list(splits)}")
    data_spec = read_vocab(root)
    if spec is None:
        spec = data_spec
    else:
        spec.check_compatible(data_spec, what=f"dataset {root}")
    counts, tiles = group_counts(root, splits)  # not the whole index: flat in the number of tiles (soak)
    weights = balance_weights(counts, cfg.balance, tiles)
    balance_cols = ["cancer_type"] + (["tissue_source_site"] if cfg.balance == "type_site" else [])
    ledger = _ledger_on_this_node()
    ds = ray.data.read_webdataset(
        [str(p) for p in paths],
        filesystem=Folder(root).fs if is_remote(root) else None,
        decoder=None,
        filerename=unify_image_member,
        suffixes=[IMAGE_COLUMN, "json"],
        num_cpus=cfg.num_cpus,
        shuffle=FileShuffleConfig(seed=cfg.seed) if cfg.deterministic else "files",
    )
    # A plain function (not an actor pool) lets Ray Data fuse reading and decoding into one task.
    ds = ds.map_batches(
        DecodeBatch(spec, cfg, weights, ledger, balance_cols),
        batch_size=cfg.batch_rows,
        batch_format="numpy",
        num_cpus=cfg.num_cpus,
    )
    ds.context.execution_options.preserve_order = cfg.deterministic  # this dataset's own context copy
    return TileStream(ds, ledger, spec, tiles, cfg.deterministic)
