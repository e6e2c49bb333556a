"""Reading the tiles of a dataset directory for evaluation, with a read audit and a feature cache.

Evaluation needs a few thousand tiles in memory, not a stream, so this reads shards with tarfile
directly. Metadata comes from index.parquet, pixels from the (verified) shards of the wanted splits
only: shards are written per split, so asking for train/val never opens a holdout shard.

Every shard whose pixels or cached features are loaded is recorded in ``AUDIT`` (shard path and the
keys it holds), so a study can prove that no test-site tile was read during selection.

Features are cached per (encoder, shard content): the cache file is named by the shard's sha256
from dataset.json, so a copied or re-ingested dataset with identical shards reuses it, and a changed
shard can never be served stale features.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..data.shards import INDEX, load_manifest, local_dataset, not_a_dataset, verify_shards

IMAGE_SUFFIXES = ("jpg", "png")


@dataclass
class ReadAudit:
    """Shards opened and tile keys loaded in this process (reset per trial)."""

    shards: set[str] = field(default_factory=set)
    keys: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # dataset dir -> keys

    def record(self, root: Path, shard: Path, keys: Iterable[str]) -> None:
        self.shards.add(str(shard.resolve()))
        self.keys[str(root.resolve())].update(map(str, keys))

    def reset(self) -> None:
        self.shards.clear()
        self.keys.clear()

    def to_dict(self) -> dict:
        return {"shards": sorted(self.shards), "keys": {d: sorted(k) for d, k in self.keys.items()}}


AUDIT = ReadAudit()


def read_index(dataset_dir: str | Path, splits: Iterable[str] | None = None) -> pd.DataFrame:
    """index.parquet restricted to `splits` (rows of other splits are dropped right away)."""
    root = local_dataset(dataset_dir)  # object storage: a verified local copy
    load_manifest(root)  # clear error if this is not a dataset directory
    path = root / INDEX
    if not path.is_file():
        raise not_a_dataset(root, INDEX)
    idx = pd.read_parquet(path)
    if splits is not None:
        idx = idx[idx["split"].isin(list(splits))]
    return idx.reset_index(drop=True)


def _shard_split(root: Path, splits: Iterable[str]) -> list[tuple[Path, str]]:
    """(verified shard path, content id) for the shards of `splits`."""
    manifest = load_manifest(root)
    paths = verify_shards(root, splits)
    sha = {str((root / s["path"]).resolve()): s.get("sha256") for s in manifest["shards"]}
    out = []
    for p in paths:
        cid = sha.get(str(p.resolve()))
        if not cid:  # older manifests: fall back to path + size (still changes when the shard does)
            cid = hashlib.sha256(f"{p.resolve()}:{p.stat().st_size}".encode()).hexdigest()
        out.append((p, cid))
    return out


def _decode(data: bytes, size: int | None) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im, dtype=np.uint8)


def read_shard(
    root: Path, shard: Path, size: int | None = None, keys: set[str] | None = None
) -> tuple[list[str], np.ndarray]:
    """Keys and uint8 (N, H, W, 3) tiles of one shard. With size=None tiles keep the shard's first
    tile size (others are resized to it), so a mixed shard still stacks."""
    out_keys, imgs = [], []
    with tarfile.open(shard) as tar:
        for m in tar:
            stem, _, ext = m.name.partition(".")
            if ext not in IMAGE_SUFFIXES or (keys is not None and stem not in keys):
                continue
            img = _decode(tar.extractfile(m).read(), size)
            if size is None:
                size = img.shape[0]
            out_keys.append(stem)
            imgs.append(img)
    AUDIT.record(root, shard, out_keys)
    arr = np.stack(imgs) if imgs else np.zeros((0, size or 1, size or 1, 3), np.uint8)
    return out_keys, arr


def load_tiles(
    dataset_dir: str | Path, splits: Iterable[str], keys: Iterable[str] | None = None, size: int | None = None
) -> tuple[np.ndarray, pd.DataFrame]:
    """uint8 tiles and their index rows (same order) for `splits`, optionally only `keys`."""
    root = local_dataset(dataset_dir)
    splits = list(splits)
    index = read_index(root, splits)
    want = None if keys is None else set(map(str, keys))
    all_keys, parts = [], []
    for shard, _ in _shard_split(root, splits):
        k, imgs = read_shard(root, shard, size, want)
        if k:  # the first tiles fix the size for every later shard, so all of them stack
            size = size or imgs.shape[1]
            all_keys += k
            parts.append(imgs)
    meta = index.set_index("key").loc[all_keys].reset_index() if all_keys else index.iloc[:0]
    images = np.concatenate(parts) if parts and all_keys else np.zeros((0, size or 1, size or 1, 3), np.uint8)
    return images, meta


def _atomic_save(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)  # parallel trials may race on one shard: identical content, last one wins


class FeatureCache:
    """Encoder features per tile, cached on disk per (encoder name, shard sha256)."""

    def __init__(self, cache_dir: str | Path, encoder):
        self.encoder = encoder
        tag = hashlib.sha256(encoder.name.encode()).hexdigest()[:12]
        self.dir = Path(cache_dir).resolve() / tag
        self._mem: dict[str, tuple[list[str], np.ndarray]] = {}

    def shard_features(self, root: Path, shard: Path, cid: str) -> tuple[list[str], np.ndarray]:
        if cid in self._mem:
            keys, feats = self._mem[cid]
            AUDIT.record(root, shard, keys)
            return keys, feats
        path = self.dir / f"{cid[:32]}.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                keys, feats = [str(k) for k in z["keys"]], z["feats"]
            AUDIT.record(root, shard, keys)
        else:
            keys, imgs = read_shard(root, shard)
            feats = self.encoder.encode(imgs) if len(imgs) else np.zeros((0, self.encoder.dim), np.float32)
            _atomic_save(path, keys=np.array(keys, dtype=str), feats=feats)
        self._mem[cid] = (keys, feats)
        return keys, feats

    def features(self, dataset_dir: str | Path, splits: Iterable[str]) -> tuple[np.ndarray, pd.DataFrame]:
        """Features and index rows (same order) of every tile in `splits`."""
        root = local_dataset(dataset_dir)
        splits = list(splits)
        index = read_index(root, splits)
        keys, parts = [], []
        for shard, cid in _shard_split(root, splits):
            k, f = self.shard_features(root, shard, cid)
            keys += k
            parts.append(f)
        meta = index.set_index("key").loc[keys].reset_index() if keys else index.iloc[:0]
        feats = np.concatenate(parts) if keys else np.zeros((0, self.encoder.dim), np.float32)
        return feats, meta


class LazyEncoder:
    """Stands in for an encoder whose name is known: built only if a feature is actually missing
    from the cache (parallel trials then skip loading a large model when the cache is warm)."""

    def __init__(self, spec: str, name: str):
        self.spec, self.name, self._enc = spec, name, None

    def _get(self):
        if self._enc is None:
            from .encoders import get_encoder

            self._enc = get_encoder(self.spec)
        return self._enc

    @property
    def dim(self) -> int:
        return self._get().dim

    def encode(self, images: np.ndarray) -> np.ndarray:
        return self._get().encode(images)


@dataclass
class Part:
    X: np.ndarray  # features (linear) or uint8 tiles (cnn)
    meta: pd.DataFrame


@dataclass
class Inputs:
    train: Part
    test: Part
    pool: Part  # all pools' synthetic tiles; meta column `pool` names the directory
    derived: dict = field(default_factory=dict)  # e.g. Macenko-normalised copies, shared by arms


def pool_index(pool: str | Path) -> pd.DataFrame:
    idx = read_index(pool, ["train"])
    if "synthetic" in idx:
        idx = idx[idx["synthetic"].astype(bool)]
    else:
        idx = idx.iloc[:0]
    return idx.assign(pool=str(pool)).reset_index(drop=True)


def foreign_values(real: pd.DataFrame, pool: pd.DataFrame, columns=("cancer_type", "tissue_source_site")) -> dict:
    """Per column, the pool's values that the real dataset never has (any split): a pool generated
    by a model of another dataset. ``Unknown`` (a class-only model's site) is not foreign."""
    out = {}
    for c in columns:
        extra = set(pool[c].astype(str)) - set(real[c].astype(str)) - {"Unknown"} if c in pool and c in real else set()
        if extra:
            out[c] = sorted(extra)
    return out


def load_inputs(cfg, encoder=None, pools: list[str] | None = None) -> Inputs:
    """Features (linear) or pixels (cnn) of a DownstreamConfig's real train/test splits and of the
    pools' synthetic tiles: what every seed of the protocol draws from."""
    pools = cfg.synthetic if pools is None else pools
    if cfg.classifier == "linear":
        cache = FeatureCache(cfg.cache_dir, encoder)
        get = lambda d, s: cache.features(d, s)  # noqa: E731
    else:
        get = lambda d, s: load_tiles(d, s, size=cfg.image_size)  # noqa: E731
    train, test = Part(*get(cfg.real, [cfg.train_split])), Part(*get(cfg.real, [cfg.test_split]))
    parts = []
    for p in pools:
        X, meta = get(p, ["train"])
        keep = meta["synthetic"].astype(bool).to_numpy() if "synthetic" in meta else np.zeros(len(meta), bool)
        parts.append(Part(X[keep], meta[keep].assign(pool=str(p)).reset_index(drop=True)))
    if parts:
        pool = Part(np.concatenate([q.X for q in parts]), pd.concat([q.meta for q in parts], ignore_index=True))
    else:
        pool = Part(train.X[:0], train.meta.iloc[:0].assign(pool=""))
    return Inputs(train, test, pool)
