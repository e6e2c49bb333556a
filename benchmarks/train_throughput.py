"""Training img/s: medi-dist (Ray Data -> Ray Train -> Accelerate) vs a plain single-process loop in
the reference's style (PyTorch DataLoader over JPEG files, same model and batch), and 1 vs 2 workers.

    python benchmarks/train_throughput.py [--preset small --resolution 32 --batch 32 --steps 60]
    python benchmarks/train_throughput.py --gpu --preset reference-deep --resolution 128 --size 256 \
        --mixed-precision bf16 --fast --batch 64 --steps 150 --warmup 60

--fast turns on channels_last, torch.compile and fused AdamW in medi-dist (the plain loop stays the
reference's eager loop). The medi-dist runs stop one step short of their schedule, so the timing
ends with a checkpoint but no final model directory.

img/s is taken over the steps after a warm-up (MLflow `img_per_s` for medi-dist, measured by rank 0;
wall time per step for the plain loop). On CPU every variant gets the same 2 cores.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def plain_loop(files, spec_rows, args) -> float:
    import torch
    from torch.utils.data import DataLoader

    from medi_dist.model import ConditionedUNet, ModelConfig, diffusion_loss

    sys_path = Path(__file__).parent
    import sys

    sys.path.insert(0, str(sys_path))
    from data_throughput import JpegFiles

    class WithCond(JpegFiles):
        def __getitem__(self, i):
            return super().__getitem__(i), spec_rows[i]

    spec = spec_rows.spec
    dev = "cuda" if args.gpu else "cpu"
    torch.backends.cudnn.benchmark = True  # as in medi-dist's loop
    torch.set_num_threads(1 if not args.gpu else torch.get_num_threads())
    model = ConditionedUNet(ModelConfig.from_preset(args.preset, sample_size=args.resolution), spec).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    dl = DataLoader(
        WithCond(files, args.resolution),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=1 if not args.gpu else 8,
        persistent_workers=True,
    )
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    step, t0 = 0, None
    while step < args.steps:
        for x, c in dl:
            x = x.to(dev)
            cond = {k: v.to(dev) for k, v in c.items()}
            with torch.autocast(dev, dtype=dtype, enabled=dtype is not None):
                loss = diffusion_loss(model, x, cond)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            step += 1
            if step == args.warmup:
                if args.gpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            if step >= args.steps:
                break
    if args.gpu:
        torch.cuda.synchronize()
    return (args.steps - args.warmup) * args.batch / (time.perf_counter() - t0)


class CondRows(list):
    spec = None


def medi_dist_run(ds, workers, args, tmp, batch) -> tuple[float, float]:
    from medi_dist.config_loader import load_config
    from medi_dist.tracking import client
    from medi_dist.train.config import TrainConfig
    from medi_dist.train.trainer import train

    cfg = load_config(
        TrainConfig,
        None,
        [
            f"data.dataset={ds}",
            "data.balance=none",
            f"model.preset={args.preset}",
            f"model.resolution={args.resolution}",
            f"optim.batch_size={batch}",
            f"steps={args.steps + 1}",
            f"run.stop_after={args.steps}",
            f"run.name=bench{workers}_{batch}",
            f"run.compile={args.fast}",
            f"run.channels_last={args.fast}",
            f"optim.fused={args.fast}",
            f"run.storage_path={tmp}/runs",
            f"run.tracking_uri=sqlite:///{tmp}/mlflow.db",
            f"run.num_workers={workers}",
            f"run.use_gpu={args.gpu}",
            f"run.mixed_precision={args.mixed_precision}",
            "run.log_every=10",
            f"run.checkpoint_every={args.steps}",
            f"run.cpus_per_worker={0.75 if not args.gpu else 4}",
            "run.threads_per_worker=1",
            "data.cpus_per_decode=0.5",
        ],
    )
    res = train(cfg)
    hist = client(cfg.run.tracking_uri).get_metric_history(res.mlflow_run_id, "img_per_s")
    late = [m.value for m in hist if m.step > args.warmup]
    wait = [
        m.value
        for m in client(cfg.run.tracking_uri).get_metric_history(res.mlflow_run_id, "data_wait_fraction")
        if m.step > args.warmup
    ]
    return float(np.median(late)), float(np.median(wait))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--tiles", type=int, default=2000)
    ap.add_argument("--size", type=int, default=64, help="JPEG tile size on disk")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--mixed-precision", default="no")
    ap.add_argument("--fast", action="store_true", help="medi-dist with channels_last + torch.compile + fused AdamW")
    ap.add_argument(
        "--workers",
        type=int,
        nargs="*",
        help="medi-dist worker counts (default: 1 2 on CPU, 1 on GPU; none given: plain loop only)",
    )
    ap.add_argument("--medi-batches", type=int, nargs="+", help="medi-dist batch sizes per worker (default: --batch)")
    ap.add_argument("--skip-plain", action="store_true")
    ap.add_argument("--work", default="benchmarks/.work")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import sys

    import ray

    sys.path.insert(0, str(Path(__file__).parent))
    import pandas as pd
    from data_throughput import ensure_dataset

    from medi_dist.metadata import ConditioningSpec

    root = Path(args.work)
    root.mkdir(parents=True, exist_ok=True)
    ds = ensure_dataset(root, args.tiles, args.size)
    files = sorted((root / f"files{args.size}_{args.tiles}").glob("*.jpg"))
    spec = ConditioningSpec.load(ds / "vocab.json").subset(["cancer_type", "tissue_source_site"])
    index = pd.read_parquet(ds / "index.parquet").set_index("key")
    import torch

    rows = CondRows({k: torch.tensor(v) for k, v in spec.encode_row(index.loc[f.stem]).items()} for f in files)
    rows.spec = spec
    plain = None if args.skip_plain else plain_loop(files, rows, args)
    if plain is not None:
        print(f"plain loop: {plain:.1f} img/s", flush=True)
    workers = args.workers if args.workers is not None else ((1, 2) if not args.gpu else (1,))
    if workers:
        ray.init(num_cpus=2 if not args.gpu else None, include_dashboard=False, log_to_driver=False)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in workers:
            for b in args.medi_batches or (args.batch,):
                results[w, b] = medi_dist_run(ds, w, args, tmp, b)
                print(f"medi-dist {w} worker(s), batch {b}: {results[w, b][0]:.1f} img/s", flush=True)
    opts = f"{args.mixed_precision} precision" + (", channels_last + compile + fused AdamW" if args.fast else "")
    print(
        f"preset {args.preset}, {args.resolution}px from {args.size}-px JPEG, {args.steps} steps "
        f"({args.warmup} warm-up), {'GPU' if args.gpu else '2 CPU cores'}; medi-dist: {opts}"
    )
    print("| variant | batch/worker | img/s | data wait |\n|---|---|---|---|")
    if plain is not None:
        print(f"| plain loop (DataLoader over JPEG files, 1 process) | {args.batch} | {plain:.1f} | |")
    for (w, b), (ips, wait) in results.items():
        print(f"| medi-dist, {w} worker(s) | {b} | {ips:.1f} | {wait:.1%} |")
    if plain is not None and (1, args.batch) in results:
        print(f"ratio medi-dist (1 worker) / plain: {results[1, args.batch][0] / plain:.2f}")


if __name__ == "__main__":
    main()
