"""Sampler steps versus quality and throughput of the generation job, on procedural data.

    python benchmarks/sample_throughput.py [--model DIR] [--train-steps 2000] [--preset tiny --resolution 16]
        [--count 8] [--workers 1] [--configs dpmsolver++:10,dpmsolver++:25,dpmsolver++:50,ddim:100,ddpm:1000]

Without --model it builds (once, cached under --work) a procedural dataset and trains a model on it
with `medi-dist train` machinery (v-prediction: a short-trained ε-model samples noise). Then, for
each sampler:steps config, it runs the real generation job (Ray Data actor pool) on the same
unseen-pairs plan and the same tile seeds, and the fidelity stage on the result: Fréchet distance to
the real tiles (overall and mean over seen subgroups) and conditional accuracy (type and site probes
trained on real tiles) for seen and unseen pairs. Tiles/s and denoiser evaluations/s are per worker,
measured inside the actors (sampling only; actor start-up and model load are excluded). A last row
gives the finite-sample FD floor: real tiles against other real tiles of the same subgroups, and the
probes' accuracy on held-out real tiles. Generated sets are cached under --work (--fresh redoes them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def ensure_dataset(work: Path, args) -> Path:
    from medi_dist.data import sources
    from medi_dist.data.ingest import ingest
    from medi_dist.data.procedural import ProceduralConfig
    from medi_dist.data.split import SplitConfig

    ds = work / f"proc{args.size}_{args.sites}s_{args.tiles}"
    if not (ds / "dataset.json").exists():
        ingest(
            sources.procedural(
                ProceduralConfig(n_types=4, n_sites=args.sites, n_tiles=args.tiles, size=args.size, seed=1)
            ),
            ds,
            SplitConfig(holdout_fraction=0.25, seed=1),
            shard_mb=1,
            overwrite=True,
        )
    return ds


def ensure_model(work: Path, ds: Path, args) -> Path:
    from medi_dist.config_loader import load_config
    from medi_dist.train.config import TrainConfig
    from medi_dist.train.trainer import train

    name = f"bench-{args.preset}{args.resolution}-{args.train_steps}"
    out = work / "runs" / name / "model"
    if (out / "config.json").exists():
        return out
    t0 = time.perf_counter()
    cfg = load_config(
        TrainConfig,
        None,
        [
            f"data.dataset={ds}",
            f"model.preset={args.preset}",
            f"model.resolution={args.resolution}",
            "model.prediction_type=v_prediction",
            "optim.batch_size=32",
            "optim.lr=0.002",
            f"steps={args.train_steps}",
            f"run.name={name}",
            f"run.storage_path={work / 'runs'}",
            f"run.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            f"run.checkpoint_every={args.train_steps}",
            f"run.cpus_per_worker={args.cpus}",
            "run.log_every=100",
        ],
    )
    res = train(cfg)
    print(
        f"trained {name}: {args.train_steps} steps in {time.perf_counter() - t0:.0f} s, "
        f"loss {res.metrics.get('loss'):.4f}"
    )
    return res.model_dir


def fd_floor(ds: Path, resolution: int, encoder: str, per_group: int, seed: int = 0) -> tuple[float, float]:
    """FD of real tiles against other real tiles at the synthetic side's sample sizes (FD is biased
    upwards at small n): per subgroup, `per_group` real tiles against the rest of that subgroup;
    overall, half of the real training tiles against the other half."""
    from medi_dist.evaluate.encoders import get_encoder
    from medi_dist.evaluate.fidelity import frechet_distance
    from medi_dist.evaluate.fidelity_job import read_tiles

    img, idx = read_tiles(ds, ["train"], resolution)
    f = get_encoder(encoder).encode(img)
    rng = np.random.default_rng(seed)
    half = rng.permutation(len(f)) < len(f) // 2
    fds = []
    for _, ix in idx.groupby(["cancer_type", "tissue_source_site"]).indices.items():
        if len(ix) >= per_group + 2:
            pick = np.isin(ix, rng.choice(ix, per_group, replace=False))
            fds.append(frechet_distance(f[ix[pick]], f[ix[~pick]]))
    return frechet_distance(f[half], f[~half]), float(np.mean(fds)) if fds else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model directory (default: train one on procedural data)")
    p.add_argument("--work", default="benchmarks/.work/sampling")
    p.add_argument("--preset", default="tiny")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--size", type=int, default=32, help="procedural tile size")
    p.add_argument("--sites", type=int, default=8)
    p.add_argument("--tiles", type=int, default=600)
    p.add_argument("--count", type=int, default=8, help="tiles per (type, site) pair of the unseen-pairs plan")
    p.add_argument("--configs", default="dpmsolver++:10,dpmsolver++:25,dpmsolver++:50,ddim:100,ddpm:1000")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--cpus", type=float, default=1.0, help="CPUs per worker (and per training worker)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--encoder", default="random-conv")
    p.add_argument("--min-per-group", type=int, default=8, help="FD per subgroup needs this many tiles per side")
    p.add_argument("--gpus-per-worker", type=float, default=0.0)
    p.add_argument("--precision", default="fp32", help="fp32 | fp16 | bf16 (autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile the denoiser (GPU)")
    p.add_argument("--fresh", action="store_true", help="regenerate even where cached results exist")
    args = p.parse_args()

    import ray

    from medi_dist.evaluate.fidelity_job import FidelityConfig, evaluate_fidelity
    from medi_dist.generate.job import GenerateConfig, generate
    from medi_dist.generate.plan import GenerationPlan
    from medi_dist.generate.writer import SamplingSettings
    from medi_dist.model.model_dir import read_model_info

    work = Path(args.work).resolve()  # absolute: Ray workers run in other directories (sqlite URI)
    work.mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=max(2, int(args.workers * args.cpus) + 1),
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(1, int(args.cpus)))}},
    )
    ds = ensure_dataset(work, args)
    model = Path(args.model) if args.model else ensure_model(work, ds, args)
    info = read_model_info(model)
    if args.model:
        ds = Path(info["info"]["dataset"])
    res = int(info["model"]["sample_size"])
    rows = []
    for spec in args.configs.split(","):
        sampler, steps = spec.split(":")
        out = (
            work
            / "synthetic"
            / (
                f"{info['model_id']}-{sampler}-{steps}-g{args.guidance}-n{args.count}"
                f"-{args.precision}{'-compiled' if args.compile else ''}"
            )
        )
        stats_file = out.with_suffix(".stats.json")
        if args.fresh or not stats_file.exists():
            r = generate(
                GenerateConfig(
                    model=str(model),
                    out=str(out),
                    plan=GenerationPlan(mode="unseen-pairs", count=args.count, seed=0),
                    sampling=SamplingSettings(
                        sampler=sampler,
                        steps=int(steps),
                        guidance=args.guidance,
                        batch_size=args.batch_size,
                        precision=args.precision,
                        compile=args.compile,
                    ),
                    workers=args.workers,
                    cpus_per_worker=args.cpus,
                    gpus_per_worker=args.gpus_per_worker,
                    tiles_per_shard=args.batch_size,
                    overwrite=True,
                )
            )
            stats_file.write_text(json.dumps({**r.stats, "tiles": r.tiles}))
        stats = json.loads(stats_file.read_text())  # cached: a re-run only re-evaluates
        fid = evaluate_fidelity(
            FidelityConfig(
                real=str(ds),
                synthetic=str(out),
                encoder=args.encoder,
                min_per_group=args.min_per_group,
                log_mlflow=False,
            )
        )
        ca = fid["conditional_accuracy"]
        rows.append(
            [
                sampler,
                steps,
                int(steps) * (2 if args.guidance != 1 else 1),
                stats["tiles_per_s_per_worker"],
                stats["evaluations_per_s_per_worker"],
                fid["fd"]["overall"],
                fid["fd"]["mean_group_fd"],
                ca["seen"]["type_accuracy"],
                ca["seen"]["site_accuracy"],
                ca["unseen"]["type_accuracy"],
                ca["unseen"]["site_accuracy"],
                ca["unseen"]["type_accuracy_morphology"],
                ca["unseen"]["site_accuracy_stain"],
            ]
        )
        print(json.dumps(rows[-1]), flush=True)
    floor = fd_floor(ds, res, args.encoder, args.count)
    chance = fid["chance"]
    print(
        f"\nmodel {info['model_id']} ({info['model']['preset']}, {res} px, {info['info'].get('steps')} training "
        "steps, "
        f"{info['model']['prediction_type']}); plan: unseen-pairs x {args.count} tiles = {stats['tiles']} tiles "
        f"({ca['seen']['n']} at seen pairs); {args.workers} worker(s) x {args.cpus} CPU, batch {args.batch_size}; "
        f"encoder {fid['encoder']}; chance: type {chance['type_accuracy']:.2f}, site {chance['site_accuracy']:.2f}\n"
    )
    head = [
        "sampler",
        "steps",
        "NFE/tile",
        "tiles/s/worker",
        "evals/s/worker",
        "FD all",
        "FD seen groups",
        "type acc seen",
        "site acc seen",
        "type acc unseen",
        "site acc unseen",
        "type acc unseen (grayscale probe)",
        "site acc unseen (stain probe)",
    ]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r_ in rows:
        print(
            f"| {r_[0]} | {r_[1]} | {r_[2]} | {r_[3]:.1f} | {r_[4]:.0f} | {r_[5]:.3f} | {r_[6]:.3f} | "
            + " | ".join(f"{x:.2f}" for x in r_[7:])
            + " |"
        )
    ref = fid["real_reference"]
    print(
        f"| real vs real (other slides) | | | | | {floor[0]:.3f} | {floor[1]:.3f} | {ref['type_accuracy']:.2f} | "
        f"{ref['site_accuracy']:.2f} | | | {ref['type_accuracy_morphology']:.2f} | "
        f"{ref['site_accuracy_stain']:.2f} |"
    )


if __name__ == "__main__":
    main()
