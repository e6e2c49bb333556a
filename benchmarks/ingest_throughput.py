"""Ingest throughput: tiles/s for a tile source and slides/s for whole-slide tiling, with 1 and 2 Ray
workers (`medi-dist ingest --workers N`) on the same CPUs, and in one process (workers 0).

    python benchmarks/ingest_throughput.py [--tiles 3000] [--size 256] [--slides 8] [--repeats 3] [--cpus 2]
        [--workers 0,1,2] [--json benchmarks/results/ingest_throughput_DATE.json]

Tile source: `--tiles` procedural H&E-like JPEG tiles written once as loose files with a manifest
(what a TCGA-UT export looks like), then ingested: read, decoded and checked, sha256, sharded. WSI:
`--slides` copies of the CMU-1 small-region SVS (tests/.cache, fetched by tests/test_wsi.py) or,
without it, plain PNG "slides", tiled with OpenSlide at 0.5 mpp. Prints min / median / max over
`--repeats` runs, the 2-worker speed-up and the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

CMU = Path(__file__).resolve().parents[1] / "tests" / ".cache" / "cmu_small_region.svs"


def tile_files(root: Path, n: int, size: int) -> Path:
    from medi_dist.data.procedural import ProceduralConfig, generate

    rows = []
    (root / "tiles").mkdir(parents=True)
    for rec in generate(ProceduralConfig(n_types=4, n_sites=12, n_tiles=n, size=size, seed=0)):
        p = root / "tiles" / f"{rec.key}.jpg"
        p.write_bytes(rec.image_bytes)
        rows.append(
            {
                "path": f"tiles/{p.name}",
                "slide_id": rec.meta["slide_id"],
                "key": rec.key,
                "cancer_type": rec.meta["cancer_type"],
                "tissue_source_site": rec.meta["tissue_source_site"],
            }
        )
    pd.DataFrame(rows).to_csv(root / "tiles.csv", index=False)
    return root / "tiles.csv"


def slide_table(root: Path, n: int) -> tuple[Path, str]:
    from medi_dist.data.procedural import render_tile

    rows = []
    for i in range(n):
        if CMU.is_file():
            p, kind = root / f"s{i}.svs", "CMU-1 small region SVS, 2220 x 2967 px at 0.499 mpp"
            shutil.copy(CMU, p)
        else:
            p, kind = root / f"s{i}.png", "plain 2048 x 2048 PNG"
            arr = np.full((2048, 2048, 3), 245, np.uint8)
            for y in range(0, 2048, 256):
                for x in range(0, 1024, 256):
                    arr[y : y + 256, x : x + 256] = render_tile(
                        "GLAND", "A1", np.random.default_rng(i * 99 + y + x), 256
                    )
            Image.fromarray(arr).save(p)
        rows.append(
            {"path": p.name, "slide_id": f"s{i}", "cancer_type": "AB"[i % 2], "tissue_source_site": f"S{i % 4}"}
        )
    pd.DataFrame(rows).to_csv(root / "slides.csv", index=False)
    return root / "slides.csv", kind


def run(kind: str, table: Path, out: Path, workers: int) -> tuple[float, int]:
    from medi_dist.data import sources
    from medi_dist.data.ingest import ingest
    from medi_dist.data.records import SkipLog
    from medi_dist.data.split import SplitConfig
    from medi_dist.data.wsi import WSIConfig

    skips = SkipLog()
    scan = (
        sources.manifest(table, skips)
        if kind == "tiles"
        else sources.wsi_scan(table, WSIConfig(tile_px=256, mpp=0.5, assume_mpp=0.5), skips)
    )
    t0 = time.perf_counter()
    m = ingest(
        scan, out, SplitConfig(holdout_fraction=0.25, seed=0), skips, shard_mb=16, overwrite=True, workers=workers
    )
    return time.perf_counter() - t0, m["tiles"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiles", type=int, default=3000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--slides", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--json", default=None, help="also write every run's time here")
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    root = Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        manifest = tile_files(root / "src", args.tiles, args.size)
        slides, slide_kind = slide_table(root / "src", args.slides)
        print(
            f"load average before: {os.getloadavg()}; {args.cpus} Ray CPUs; {args.tiles} tiles of {args.size} px; "
            f"{args.slides} slides ({slide_kind})"
        )
        res, record = (
            {},
            {
                "benchmark": "ingest_throughput",
                "command": "python benchmarks/ingest_throughput.py "
                + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "json"),
                "cpus": os.cpu_count(),
                "ray_cpus": args.cpus,
                "tiles": args.tiles,
                "tile_px": args.size,
                "slides": args.slides,
                "slide_kind": slide_kind,
                "load_before": os.getloadavg(),
                "runs": [],
            },
        )
        for kind, table, n_in in (("tiles", manifest, args.tiles), ("wsi", slides, args.slides)):
            for w in map(int, args.workers.split(",")):
                run(kind, table, root / "out", w)  # warm-up: page cache, Ray worker start
                times, tiles = [], 0
                for _ in range(args.repeats):
                    dt, tiles = run(kind, table, root / "out", w)
                    times.append(dt)
                rate = [(n_in if kind == "wsi" else tiles) / t for t in times]
                record["runs"].append(
                    {
                        "source": kind,
                        "workers": w,
                        "seconds": times,
                        "tiles_written": tiles,
                        "rate_unit": "slides/s" if kind == "wsi" else "tiles/s",
                        "rate_min_median_max": [min(rate), statistics.median(rate), max(rate)],
                        "load_after": os.getloadavg(),
                    }
                )
                res[(kind, w)] = statistics.median(rate)
                unit = "slides/s" if kind == "wsi" else "tiles/s"
                extra = f" ({tiles} tiles, {tiles / statistics.median(times):.0f} tiles/s)" if kind == "wsi" else ""
                print(
                    f"{kind:5s} workers={w}: {unit} min {min(rate):.2f} median {statistics.median(rate):.2f} "
                    f"max {max(rate):.2f}{extra}; load {os.getloadavg()[0]:.1f}"
                )
            if (kind, 1) in res and (kind, 2) in res:
                print(f"{kind}: 2 workers / 1 worker = {res[(kind, 2)] / res[(kind, 1)]:.2f}x")
                record[f"{kind}_speedup_2_over_1"] = res[(kind, 2)] / res[(kind, 1)]
        record["load_after"] = os.getloadavg()
        if args.json:
            Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()


if __name__ == "__main__":
    main()
