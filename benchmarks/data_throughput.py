"""Tiles/s of the Ray Data stream vs a plain PyTorch DataLoader over the same JPEG tiles, same CPUs.

    python benchmarks/data_throughput.py [--tiles 3000] [--size 256] [--resolution 128] [--cpus 2]

Builds (once) a procedural dataset of `--size` px JPEG tiles, extracts the same tiles as loose files
for the DataLoader, then times full passes of each reader (after one warm-up pass) and prints the
ratio, plus single-core PIL decode speed.
"""

from __future__ import annotations

import argparse
import io
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def ensure_dataset(root: Path, tiles: int, size: int) -> Path:
    from medi_dist.data import sources
    from medi_dist.data.ingest import ingest
    from medi_dist.data.procedural import ProceduralConfig
    from medi_dist.data.split import SplitConfig

    ds = root / f"proc{size}_{tiles}"
    if not (ds / "dataset.json").exists():
        ingest(
            sources.procedural(ProceduralConfig(n_tiles=tiles, size=size, seed=0)),
            ds,
            SplitConfig(holdout_fraction=0.3),
            shard_mb=16,
            overwrite=True,
        )
    files = root / f"files{size}_{tiles}"
    if not files.exists():
        files.mkdir()
        for shard in sorted((ds / "shards" / "train").glob("*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".jpg"):
                        (files / Path(m.name).name).write_bytes(tar.extractfile(m).read())
    return ds


def decode_per_core(files: list[Path], n: int = 500) -> float:
    data = [f.read_bytes() for f in files[:n]]
    t = time.perf_counter()
    for d in data:
        np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))
    return len(data) / (time.perf_counter() - t)


class JpegFiles:
    def __init__(self, files, resolution):
        self.files, self.res = files, resolution

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import torch

        im = Image.open(self.files[i]).convert("RGB")
        if im.size != (self.res, self.res):
            im = im.resize((self.res, self.res), Image.BILINEAR)
        return torch.from_numpy(np.asarray(im).transpose(2, 0, 1).astype(np.float32) / 127.5 - 1)


def time_dataloader(files, resolution, workers, batch) -> float:
    from torch.utils.data import DataLoader

    dl = DataLoader(
        JpegFiles(files, resolution),
        batch_size=batch,
        num_workers=workers,
        shuffle=True,
        persistent_workers=workers > 0,
    )
    for _ in dl:  # warm-up pass (worker start, page cache)
        pass
    t, n = time.perf_counter(), 0
    for x in dl:
        n += x.shape[0]
    return n / (time.perf_counter() - t)


def time_stream(ds, resolution, cpus, batch) -> float:
    from medi_dist.data.stream import StreamConfig, tile_stream

    s = tile_stream(ds, ("train",), StreamConfig(resolution=resolution, balance="none", num_cpus=1.0))
    for _ in s.dataset.iter_batches(batch_size=batch, batch_format="numpy"):
        pass
    t, n = time.perf_counter(), 0
    for b in s.dataset.iter_batches(batch_size=batch, batch_format="numpy"):
        n += len(b["key"])
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", type=int, default=3000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--work", default="benchmarks/.work")
    args = ap.parse_args()
    import ray

    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    ds = ensure_dataset(root, args.tiles, args.size)
    files = sorted((root / f"files{args.size}_{args.tiles}").glob("*.jpg"))
    per_core = decode_per_core(files)
    dl = time_dataloader(files, args.resolution, args.cpus, args.batch)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    rs = time_stream(ds, args.resolution, args.cpus, args.batch)
    print(f"{len(files)} train tiles, {args.size}px JPEG -> {args.resolution}px float, {args.cpus} CPUs")
    print(
        f"| reader | tiles/s |\n|---|---|\n| PIL decode, 1 core | {per_core:.0f} |"
        f"\n| PyTorch DataLoader ({args.cpus} workers) | {dl:.0f} |\n| medi-dist Ray Data stream | {rs:.0f} |"
    )
    print(f"ratio stream / DataLoader: {rs / dl:.2f}")


if __name__ == "__main__":
    main()
