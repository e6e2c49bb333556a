"""Learning curve of the demo's generator: calibrated type / stain accuracy and leakage vs training minutes.

The demo's model, loss, optimizer, schedule and EMA (medi_dist.model, as the Ray Train worker builds
them), trained in this process on the demo's procedural world so that the curve measures the recipe,
not Ray's start-up. At each evaluation point the EMA weights draw `--per-pair` tiles at every
(type, training site) pair and at the site-nulled branch, and `calibrated_probes` (probes trained on
ground-truth renderings of every pair) scores them. Also the per-subgroup Fréchet distance of the
generated tiles against ground truth of the same pair (random-conv features).

    python benchmarks/generator_curve.py --steps 3000 --eval-every 500 --out benchmarks/results/generator_curve.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup

from medi_dist.data import sources
from medi_dist.data.ingest import ingest
from medi_dist.data.procedural import ProceduralConfig, render_tiles
from medi_dist.data.split import SplitConfig
from medi_dist.evaluate.encoders import get_encoder
from medi_dist.evaluate.fidelity import frechet_distance
from medi_dist.evaluate.fidelity_job import calibrated_probes, read_tiles
from medi_dist.metadata import UNKNOWN, ConditioningSpec
from medi_dist.model import EMA, ConditionedUNet, ModelConfig, diffusion_loss, encode_conditions, sample, save_model_dir

TYPE, SITE = "cancer_type", "tissue_source_site"


def world(args) -> Path:
    ds = Path(args.dataset)
    if not (ds / "dataset.json").exists():
        scan = sources.procedural(
            ProceduralConfig(n_types=args.types, n_sites=args.sites, n_tiles=args.tiles, size=args.size, seed=args.seed)
        )
        ingest(scan, ds, SplitConfig(holdout_fraction=0.3, seed=args.seed), overwrite=True)
    return ds


def draw(model, spec, rows, args, owners=None) -> np.ndarray:
    """Tiles for rows; with `owners`, the owner-site composition of generate/writer.py."""
    imgs = []
    for i in range(0, len(rows), 64):
        chunk = rows[i : i + 64]
        cond, directions = encode_conditions(spec, chunk), []
        if owners:
            at_owner = [{TYPE: owners[r[SITE]], SITE: r[SITE]} for r in chunk]
            cond = encode_conditions(spec, [{TYPE: r[TYPE]} for r in chunk])
            directions = [
                (
                    encode_conditions(spec, at_owner),
                    encode_conditions(spec, [{TYPE: r[TYPE]} for r in at_owner]),
                    args.composition_scale,
                )
            ]
        imgs.append(
            sample(
                model,
                cond,
                seeds=list(range(i, i + len(chunk))),
                sampler=args.sampler,
                steps=args.sampler_steps,
                directions=directions,
            )
        )
    return np.concatenate(imgs)


def evaluate(model, spec, index, ds, enc, args, owners=None) -> dict:
    types, sites = sorted(index[TYPE].unique()), sorted(index[SITE].unique())
    rows = [{TYPE: t, SITE: s} for t in types for s in sites for _ in range(args.per_pair)]
    n_sited = len(rows)
    rows += [{TYPE: t} for t in types for _ in range(args.per_pair * 2)]  # the site-nulled branch
    model.eval()
    imgs = np.concatenate([draw(model, spec, rows[:n_sited], args, owners), draw(model, spec, rows[n_sited:], args)])
    model.train()
    meta = pd.DataFrame([{TYPE: r[TYPE], SITE: r.get(SITE, UNKNOWN)} for r in rows])
    trained = set(zip(index[TYPE], index[SITE]))
    meta["seen"] = [(t, s) in trained or s == UNKNOWN for t, s in zip(meta[TYPE], meta[SITE])]
    sited = (meta[SITE] != UNKNOWN).to_numpy()
    cal = calibrated_probes(enc, imgs[sited], meta[sited].reset_index(drop=True), ds, index, 0)
    nulled = calibrated_probes(enc, imgs[~sited], meta[~sited].reset_index(drop=True), ds, index, 0)
    # Fréchet distance per pair against ground truth renderings of the same pair (same count)
    pairs = [(r[TYPE], r[SITE]) for r in rows if SITE in r]
    gt = enc.encode(render_tiles(pairs, [[9, i] for i in range(len(pairs))], args.size))
    gen = enc.encode(imgs[sited])
    fd = {}
    for seen in (True, False):
        vals = []
        for t in types:
            for s in sites:
                if ((t, s) in trained) == seen:
                    m = np.array([p == (t, s) for p in pairs])
                    vals.append(frechet_distance(gen[m], gt[m]))
        fd["seen" if seen else "unseen"] = float(np.mean(vals)) if vals else float("nan")
    s, top = cal["synthetic"], cal["ceiling"]
    return {
        "seen_type": s["seen"]["type_accuracy"],
        "seen_stain": s["seen"]["stain_accuracy"],
        "unseen_type": s["unseen"]["type_accuracy"],
        "unseen_stain": s["unseen"]["stain_accuracy"],
        "leakage": s["unseen"]["leakage"],
        "site_nulled_type": nulled["synthetic"]["seen"]["type_accuracy"],
        "fd_vs_ground_truth_seen": fd["seen"],
        "fd_vs_ground_truth_unseen": fd["unseen"],
        "ceiling_type": top["unseen"]["type_accuracy"],
        "ceiling_stain": top["unseen"]["stain_accuracy"],
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="/tmp/medi-curve-world")
    p.add_argument("--types", type=int, default=4)
    p.add_argument("--sites", type=int, default=12)
    p.add_argument("--tiles", type=int, default=3000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--prediction-type", default="v_prediction")
    p.add_argument("--site-dropout", type=float, default=0.3)
    p.add_argument("--type-dropout", type=float, default=0.05)
    p.add_argument("--per-pair", type=int, default=8)
    p.add_argument("--sampler", default="dpmsolver++")
    p.add_argument("--sampler-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--composition-scale", type=float, default=1.0, help="also score owner-site composition (0: skip)")
    p.add_argument("--out", default="benchmarks/results/generator_curve.json")
    p.add_argument("--save", help="also write the final model directory here (for generate / fidelity / downstream)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = world(args)
    tiles, index = read_tiles(ds, ["train"], args.size)
    spec = ConditioningSpec.load(ds / "vocab.json").subset([TYPE, SITE])
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1
    cond = encode_conditions(spec, index[[TYPE, SITE]].to_dict("records"))
    w = torch.tensor(1.0 / index.groupby(TYPE)["key"].transform("count").to_numpy())  # type-balanced, as the trainer
    g = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    mcfg = ModelConfig.from_preset(
        "small",
        sample_size=args.size,
        prediction_type=args.prediction_type,
        cond_dropout={TYPE: args.type_dropout, SITE: args.site_dropout},
    )
    model = ConditionedUNet(mcfg, spec)
    ema = EMA(model, 0.999)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.95, 0.999), weight_decay=1e-6)
    sched = get_cosine_schedule_with_warmup(opt, max(1, args.steps // 100), args.steps)
    enc = get_encoder("random-conv")
    owners = index.groupby(SITE)[TYPE].agg(lambda v: v.value_counts().index[0]).to_dict()
    curve, train_s, t0 = [], 0.0, time.perf_counter()
    for step in range(1, args.steps + 1):
        ts = time.perf_counter()
        i = torch.multinomial(w, args.batch, replacement=True, generator=g)
        loss = diffusion_loss(model, x[i], {k: v[i] for k, v in cond.items()}, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model)
        train_s += time.perf_counter() - ts
        if step % args.eval_every == 0 or step == args.steps:
            shadow = ConditionedUNet(mcfg, spec)
            shadow.load_state_dict(model.state_dict())
            ema.copy_to(shadow)
            row = {
                "step": step,
                "train_minutes": train_s / 60,
                "loss": float(loss.detach()),
                **evaluate(shadow, spec, index, ds, enc, args),
            }
            if args.composition_scale > 0:
                row["owner_site"] = evaluate(shadow, spec, index, ds, enc, args, owners)
            curve.append(row)
            print(json.dumps(row, default=lambda v: round(v, 3)), flush=True)
    if args.save:
        save_model_dir(
            args.save, model, ema, extra_info={"name": "curve", "dataset": str(ds.resolve()), "steps": args.steps}
        )
    result = {
        "benchmark": "generator_curve",
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads(),
        "load_at_end": list(np.round(np.array(__import__("os").getloadavg()), 2)),
        "settings": vars(args),
        "wall_minutes": (time.perf_counter() - t0) / 60,
        "curve": curve,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
