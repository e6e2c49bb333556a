"""Soak: peak memory of ingest, the training stream and generation planning against the number of
tiles (issue 18). Each phase runs in its own process; its peak RSS (and, for the stream, the peak
summed RSS of the Ray processes it started) is recorded, so the sizes can be compared. Phases:
ingest (in one process), stream (the train split once through the Ray Data stream), plan (tasks of
an unseen-pairs generation plan of about the same number of tiles) and, on request, ingest-ray
(the distributed ingest, 2 Ray workers; its dataset is removed afterwards).

    nice -n 10 python benchmarks/soak.py --tiles 20000 200000 [--phases ingest stream plan ingest-ray]

Prints one table row per (phase, tiles) and writes soak.json under --work.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _kind(p) -> str:
    """A Ray process's kind: a worker's title (ray::IDLE, ray::ReadFiles->..., ray::_StatsActor), else
    the program (raylet, gcs_server) or the Python script (agent.py, dashboard.py, log_monitor.py)."""
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].split()[0]
    script = next((Path(a).name for a in cmd[1:] if a.endswith(".py")), None)
    return script or Path(cmd[0]).name if cmd else p.name()


class _RayProcesses:
    """Peak summed RSS of this process's descendants (ray.init here starts the raylet as our child:
    GCS, raylet and workers are our descendants), sampled every 0.5 s; at that peak, the count and
    summed RSS per kind of process (`breakdown`), and the most worker processes seen at once."""

    def __enter__(self):
        import psutil

        me, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.breakdown: dict[str, list] = {}
        self.max_workers = 0

        def watch() -> None:
            while not self._stop.wait(0.5):
                rss, kinds = 0, {}
                for p in me.children(recursive=True):
                    try:
                        r, k = p.memory_info().rss, _kind(p)
                    except psutil.Error:
                        continue
                    rss += r
                    n, mb = kinds.get(k, (0, 0.0))
                    kinds[k] = (n + 1, mb + r / 2**20)
                self.max_workers = max(self.max_workers, sum(n for k, (n, _) in kinds.items() if k.startswith("ray::")))
                if rss > self.peak:
                    self.peak, self.breakdown = rss, {k: [n, round(mb)] for k, (n, mb) in sorted(kinds.items())}

        self._t = threading.Thread(target=watch, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    @property
    def mb(self) -> int:
        return round(self.peak / 2**20)


def _ingest(work: Path, tiles: int, size: int, workers: int = 0) -> dict:
    from medi_dist.data import sources
    from medi_dist.data.ingest import ingest
    from medi_dist.data.procedural import ProceduralConfig
    from medi_dist.data.split import SplitConfig

    out = work / (f"ds-{tiles}" if not workers else f"ds-ray-{tiles}")
    # always ingested (overwritten): this phase's peak RSS is the ingest's; stream and plan reuse it
    ingest(
        sources.procedural(ProceduralConfig(n_types=4, n_sites=12, n_tiles=tiles, size=size, seed=0)),
        out,
        SplitConfig(0.3, 0.0, 0),
        shard_mb=8,
        overwrite=True,
        workers=workers,
    )
    return {"dataset": str(out)}


def _ingest_ray(work: Path, tiles: int, size: int) -> dict:
    """The distributed ingest (2 Ray workers): the driver's peak RSS and the Ray processes'."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with _RayProcesses() as rp:
        res = _ingest(work, tiles, size, workers=2)
    ray.shutdown()
    import shutil

    shutil.rmtree(res["dataset"], ignore_errors=True)  # only its memory is measured
    return {**res, "ray_processes_peak_rss_mb": rp.mb}


def _stream(work: Path, tiles: int, size: int) -> dict:
    import ray

    from medi_dist.data.stream import StreamConfig, tile_stream

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with _RayProcesses() as rp:
        s = tile_stream(work / f"ds-{tiles}", ("train",), StreamConfig(resolution=size, num_cpus=1.0))
        n = sum(len(b["image"]) for b in s.dataset.iter_batches(batch_size=256, batch_format="numpy"))
    ray.shutdown()
    return {
        "streamed": n,
        "ray_processes_peak_rss_mb": rp.mb,
        "ray_processes_at_peak": rp.breakdown,  # kind -> [processes, MiB]
        "ray_workers_max": rp.max_workers,
    }


def _plan(work: Path, tiles: int, size: int) -> dict:
    import torch

    from medi_dist.generate.job import GenerateConfig, build_tasks
    from medi_dist.generate.plan import GenerationPlan
    from medi_dist.metadata import ConditioningSpec
    from medi_dist.model import EMA, ConditionedUNet, ModelConfig, save_model_dir

    ds = work / f"ds-{tiles}"
    model = work / "model"
    if not model.exists():
        spec = ConditioningSpec.load(ds / "vocab.json").subset(["cancer_type", "tissue_source_site"], [])
        net = ConditionedUNet(ModelConfig.from_preset("tiny"), spec)
        save_model_dir(model, net, EMA(net), extra_info={"name": "soak", "dataset": str(ds)})
    torch.set_num_threads(1)
    pairs = 4 * 12 * 0.7  # about the trained (type, site) pairs of the unseen-pairs plan
    tasks, rows, header, _ = build_tasks(
        GenerateConfig(
            model=str(model),
            out=str(work / "unused"),
            dataset=str(ds),
            plan=GenerationPlan(mode="unseen-pairs", count=max(1, int(tiles / pairs))),
            tiles_per_shard=256,
        )
    )
    return {"planned_tiles": header["tiles"], "shards": len(tasks)}


PHASES = {"ingest": _ingest, "stream": _stream, "plan": _plan, "ingest-ray": _ingest_ray}


def child(phase: str, work: Path, tiles: int, size: int) -> None:
    t0 = time.perf_counter()
    res = PHASES[phase](work, tiles, size)
    res.update(
        phase=phase,
        tiles=tiles,
        seconds=round(time.perf_counter() - t0, 1),
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    )
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiles", type=int, nargs="+", default=[20_000, 200_000])
    ap.add_argument("--size", type=int, default=16, help="tile size in px (16: the smallest accepted)")
    ap.add_argument("--phases", nargs="+", default=["ingest", "stream", "plan"], choices=list(PHASES))
    ap.add_argument("--work", default="/tmp/medi-dist-soak")
    ap.add_argument("--child", nargs=2, metavar=("PHASE", "TILES"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    work = Path(a.work)
    if a.child:
        return child(a.child[0], work, int(a.child[1]), a.size)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    for tiles in a.tiles:
        for phase in a.phases:
            r = subprocess.run(
                [sys.executable, __file__, "--work", str(work), "--size", str(a.size), "--child", phase, str(tiles)],
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
            line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{phase} with {tiles} tiles failed:\n{r.stderr[-3000:]}")
            results.append(json.loads(line[len("RESULT ") :]))
            print(json.dumps(results[-1]), flush=True)
    (work / "soak.json").write_text(json.dumps(results, indent=2))
    print("\n| phase | tiles | peak RSS (MiB) | Ray processes (sum) peak RSS (MiB) | seconds |\n|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['phase']} | {r['tiles']:,} | {r['peak_rss_mb']} | {r.get('ray_processes_peak_rss_mb', '')} | "
            f"{r['seconds']} |"
        )


if __name__ == "__main__":
    main()
