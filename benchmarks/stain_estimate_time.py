"""Wall time of estimating a dataset's site stains: one site at a time vs a thread per site.

`estimate_site_stains` fits each training site independently (render or read its source tiles,
directions, level, the rest at the model's resolution); numpy, scipy and PIL release the GIL in their
loops, so sites run on threads (`stain_estimation.THREADS`). Side by side, alternating, `--repeats` times,
with the in-process cache cleared before each run; the two results must be identical.

    python benchmarks/stain_estimate_time.py --dataset D/data --out benchmarks/results/stain_estimate_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from medi_dist.data import stain_estimation as E


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/stain_estimate_time.json")
    args = p.parse_args()
    many = E.THREADS
    seconds: dict = {1: [], many: []}
    results = {}
    for r in range(args.repeats):
        for threads in (1, many) if r % 2 == 0 else (many, 1):
            E.THREADS = threads
            E._estimate.cache_clear()
            t0 = time.perf_counter()
            results[threads] = json.dumps(E.estimate_site_stains(args.dataset, args.resolution).to_dict())
            seconds[threads].append(time.perf_counter() - t0)
            print(f"repeat {r}: {threads} thread(s) {seconds[threads][-1]:.1f} s", flush=True)
    assert len(set(results.values())) == 1, "threaded and serial estimates differ"
    serial, threaded = np.array(seconds[1]), np.array(seconds[many])
    ratio = serial / threaded  # paired by repeat
    out = {
        "benchmark": "stain_estimate_time",
        "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(),
        "dataset": args.dataset,
        "threads": min(many, os.cpu_count() or 1),  # THREADS, at most one per core
        "seconds_serial": serial.round(1).tolist(),
        "seconds_threaded": threaded.round(1).tolist(),
        "speedup_min_median_max": [round(float(f(ratio)), 2) for f in (np.min, np.median, np.max)],
        "load_at_end": [round(x, 2) for x in os.getloadavg()],
        "identical": True,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
