"""Tiles/s of the Ray Data stream vs a plain PyTorch DataLoader over the same JPEG tiles, same CPUs.

    python benchmarks/data_throughput.py [--tiles 3000] [--size 256] [--resolution 128] [--cpus 2] [--repeats 3]
    python benchmarks/data_throughput.py --decode device [--device cuda]

Builds (once) a procedural dataset of `--size` px JPEG tiles, extracts the same tiles as loose files
for the DataLoader, then times full passes of each reader (after one warm-up pass each), the two
readers alternating `--repeats` times so both see the same machine load, and prints min / median /
max tiles/s, the per-repeat ratio, single-core PIL decode speed, each reader's tiles per CPU-second
(all its processes: the DataLoader's workers; the driver, raylet, GCS and Ray workers) and the load
average (the machine may be shared: compare ratios from one run, not absolute numbers across runs).
Both readers deliver float32 [-1, 1]: the stream ships uint8 and the loop converts (`to_model_range`).
`--json PATH` appends every repeat's numbers to PATH. `--decode device [--device cuda]`: the stream
ships encoded tiles and the benchmark's process decodes each batch there (data.decode=device).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
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


def tree_cpu_s() -> float:
    """CPU seconds used so far by this process and all its children (Ray's raylet, GCS and workers,
    the DataLoader's workers): the readers' whole cost, not only their decode."""
    import psutil

    total = 0.0
    me = psutil.Process()
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:  # exited meanwhile
            pass
    return total


def timed(one_pass):
    """A pass's (tiles/s, tiles per CPU-second of the whole process tree)."""

    def run() -> tuple[float, float]:
        c = tree_cpu_s()
        n, dt = one_pass()
        return n / dt, n / max(tree_cpu_s() - c, 1e-9)

    return run


def dataloader_passes(files, resolution, workers, batch):
    """A function timing one full pass (the loader and its workers stay up between passes)."""
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

    def one_pass() -> tuple[int, float]:
        t, n = time.perf_counter(), 0
        for x in dl:
            n += x.shape[0]
        return n, time.perf_counter() - t

    return timed(one_pass)


def stream_passes(ds, resolution, batch, decode="cpu", device="cpu"):
    from medi_dist.data.stream import StreamConfig, tile_stream, to_model_range

    s = tile_stream(ds, ("train",), StreamConfig(resolution=resolution, balance="none", num_cpus=1.0, decode=decode))
    for _ in s.dataset.iter_batches(batch_size=batch, batch_format="numpy"):
        pass

    def one_pass() -> tuple[int, float]:
        t, n = time.perf_counter(), 0
        for b in s.dataset.iter_batches(batch_size=batch, batch_format="numpy"):
            if s.device_decoder is not None:  # --decode device: the consumer decodes on `device`
                n += len(to_model_range(s.device_decoder(b, device)[0]))
            else:
                n += len(to_model_range(b["image"]))  # uint8 -> float [-1, 1], as the DataLoader's tensors
        if device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        return n, time.perf_counter() - t

    return timed(one_pass)


def spread(xs: list[float]) -> str:
    return f"{min(xs):,.0f} / {statistics.median(xs):,.0f} / {max(xs):,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", type=int, default=3000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="benchmarks/.work")
    ap.add_argument("--json", help="append this run's numbers (every repeat) to this JSON file")
    ap.add_argument(
        "--decode",
        choices=["cpu", "device"],
        default="cpu",
        help="device: the stream ships encoded tiles and this process decodes them on --device (nvJPEG on CUDA)",
    )
    ap.add_argument("--device", default=None, help="for --decode device (default: cuda if available, else cpu)")
    args = ap.parse_args()
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    import ray

    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    ds = ensure_dataset(root, args.tiles, args.size)
    files = sorted((root / f"files{args.size}_{args.tiles}").glob("*.jpg"))
    load = [os.getloadavg()[0]]
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    dl_pass = dataloader_passes(files, args.resolution, args.cpus, args.batch)
    rs_pass = stream_passes(ds, args.resolution, args.batch, args.decode, args.device)
    pil, dl, rs, dl_cpu, rs_cpu = [], [], [], [], []
    for i in range(args.repeats):
        pil.append(decode_per_core(files))
        for speeds, cpus, run in ((dl, dl_cpu, dl_pass), (rs, rs_cpu, rs_pass)):
            speed, per_cpu_s = run()
            speeds.append(speed)
            cpus.append(per_cpu_s)
        load.append(os.getloadavg()[0])
        print(
            f"repeat {i + 1}: PIL {pil[-1]:,.0f}, DataLoader {dl[-1]:,.0f}, stream {rs[-1]:,.0f} tiles/s, "
            f"ratio {rs[-1] / dl[-1]:.2f}; tiles per CPU-second: DataLoader {dl_cpu[-1]:,.0f}, "
            f"stream {rs_cpu[-1]:,.0f}; load {load[-1]:.1f}",
            flush=True,
        )
    ratios = [r / d for r, d in zip(rs, dl)]
    print(
        f"\n{len(files)} train tiles, {args.size}px JPEG -> {args.resolution}px float, {args.cpus} CPUs, "
        f"batch {args.batch}, stream decode {args.decode}"
        f"{f' on {args.device}' if args.decode == 'device' else ''}, {args.repeats} repeats; "
        f"1-min load average {min(load):.1f}-{max(load):.1f} "
        f"on {os.cpu_count()} cores"
    )
    print(
        f"| reader | tiles/s min / median / max |\n|---|---|\n| PIL decode, 1 core | {spread(pil)} |"
        f"\n| PyTorch DataLoader ({args.cpus} workers) | {spread(dl)} |\n| medi-dist Ray Data stream | {spread(rs)} |"
        f"\n| DataLoader, tiles per CPU-second (all its processes) | {spread(dl_cpu)} |"
        f"\n| stream, tiles per CPU-second (driver + Ray processes) | {spread(rs_cpu)} |"
    )
    print(
        f"ratio stream / DataLoader per repeat: {', '.join(f'{r:.2f}' for r in ratios)} "
        f"(median {statistics.median(ratios):.2f}); stream per core: {statistics.median(rs) / args.cpus:,.0f} tiles/s"
    )
    if args.json:
        import json
        import subprocess

        path = Path(args.json)
        runs = json.loads(path.read_text()) if path.exists() else []
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        runs.append(
            {
                "commit": commit,
                "tiles": args.tiles,
                "train_tiles": len(files),
                "size": args.size,
                "resolution": args.resolution,
                "cpus": args.cpus,
                "batch": args.batch,
                "decode": args.decode if args.decode == "cpu" else f"device:{args.device}",
                "load_1min": load,
                "pil_1core": pil,
                "dataloader": dl,
                "stream": rs,
                "ratio": ratios,
                "dataloader_tiles_per_cpu_s": dl_cpu,
                "stream_tiles_per_cpu_s": rs_cpu,
            }
        )
        path.write_text(json.dumps(runs, indent=1) + "\n")


if __name__ == "__main__":
    main()
