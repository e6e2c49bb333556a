"""Learning curve of the demo's generator: calibrated type / stain accuracy and leakage vs training minutes.

The demo's model, loss, optimizer, schedule and EMA (medi_dist.model, as the Ray Train worker builds
them), trained in this process on the demo's procedural world so that the curve measures the recipe,
not Ray's start-up. At each evaluation point the EMA weights draw `--per-pair` tiles at every
(type, training site) pair and at the site-nulled branch, and `calibrated_probes` (probes trained on
ground-truth renderings of every pair) scores them. Also the per-subgroup Fréchet distance of the
generated tiles against ground truth of the same pair (random-conv features).

    python benchmarks/generator_curve.py --steps 3000 --eval-every 500 --out benchmarks/results/generator_curve.json

On a GPU (what a few device minutes buy; bf16 autocast, the `mid` preset at 64 px, a time budget
instead of a step count):

    python benchmarks/generator_curve.py --device cuda --preset mid --size 64 --tiles 12000 --scanner-lines \
        --batch 256 --lr 2e-4 --minutes 4 --eval-minutes 1 --out gpu_curve.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers.optimization import get_cosine_schedule_with_warmup
from PIL import Image

from medi_dist import cli
from medi_dist.data.procedural import render_tiles
from medi_dist.data.stain_estimation import estimate_site_stains
from medi_dist.evaluate.encoders import get_encoder
from medi_dist.evaluate.fidelity import frechet_distance
from medi_dist.evaluate.fidelity_job import CalibratedProbes, read_tiles
from medi_dist.metadata import UNKNOWN, ConditioningSpec
from medi_dist.model import EMA, ConditionedUNet, ModelConfig, diffusion_loss, encode_conditions, sample, save_model_dir

TYPE, SITE = "cancer_type", "tissue_source_site"


def world(args) -> Path:
    """The procedural dataset, ingested as a user would (`medi-dist ingest --source procedural`)."""
    ds = Path(args.dataset)
    if not (ds / "dataset.json").exists():
        argv = ["ingest", "--source", "procedural", "--out", str(ds), "--holdout-fraction", "0.3"]
        argv += [f"--{k}={getattr(args, k)}" for k in ("types", "sites", "tiles", "size", "seed")]
        cli.main(argv + ["--scanner-lines"] * args.scanner_lines)
    return ds


def draw(model, spec, rows, args, owners=None, scale=1.0, guidance=1.0) -> np.ndarray:
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
                    scale,
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
                guidance_scale=guidance,
                autocast_dtype=torch.bfloat16 if args.device != "cpu" else None,
            )
        )
    return np.concatenate(imgs)


class Scorer:
    """What every evaluation point shares: the calibrated probes (fit once on ground-truth renderings)
    and ground truth of the requested pairs for the per-pair Fréchet distance."""

    def __init__(self, index, ds, args):
        self.types, self.sites = sorted(index[TYPE].unique()), sorted(index[SITE].unique())
        self.trained = set(zip(index[TYPE], index[SITE]))
        self.enc = get_encoder("random-conv")
        self.probes = CalibratedProbes(self.enc, ds, index, 0, args.size)
        self.pairs = [(t, s) for t in self.types for s in self.sites for _ in range(args.per_pair)]
        lines = args.scanner_lines
        self.gt = self.enc.encode(render_tiles(self.pairs, [[9, i] for i in range(len(self.pairs))], args.size, lines))

    def __call__(self, model, spec, args, owners=None, scale=1.0, stains=None, normalised=False, guidance=1.0) -> dict:
        """`stains` (SiteStains): the stain composition of generate/writer.py instead of the joint draw:
        each tile drawn at one of its type's own training sites and rendered in the requested site's stain
        (`normalised`: the network draws in the reference stain, `SiteStains.from_reference`)."""
        rows = [{TYPE: t, SITE: s} for t, s in self.pairs]
        if stains is not None:
            own = {t: sorted(s for s, o in stains.owner.items() if o == t) for t in self.types}
            donors = [s if (t, s) in self.trained else own[t][i % len(own[t])] for i, (t, s) in enumerate(self.pairs)]
            rows = [{TYPE: t, SITE: d} for (t, _), d in zip(self.pairs, donors)]
        nulled = [{TYPE: t} for t in self.types for _ in range(args.per_pair * 2)]  # the site-nulled branch
        model.eval()
        imgs = draw(model, spec, rows, args, owners, scale, guidance)
        imgs_nulled = draw(model, spec, nulled, args, guidance=guidance)
        model.train()
        if stains is not None:
            types = [t for t, _ in self.pairs]
            targets = [s for _, s in self.pairs]
            if normalised:
                imgs = stains.from_reference(imgs, types, targets)
            else:
                imgs = stains.transfer(imgs, types, donors, targets, own="render", patterned=False)
        want_t, want_s = np.array([t for t, _ in self.pairs]), np.array([s for _, s in self.pairs])
        seen = np.array([p in self.trained for p in self.pairs])
        s = self.probes.score(imgs, want_t, want_s, seen)
        nt = np.array([r[TYPE] for r in nulled])
        site_nulled = self.probes.score(imgs_nulled, nt, np.full(len(nt), UNKNOWN), np.ones(len(nt), bool))
        gen, fd = self.enc.encode(imgs), {True: [], False: []}  # Fréchet distance per pair vs ground truth
        for pair in sorted(set(self.pairs)):
            m = np.array([p == pair for p in self.pairs])
            fd[pair in self.trained].append(frechet_distance(gen[m], self.gt[m]))
        top = self.probes.ceiling
        return {
            "seen_type": s["seen"]["type_accuracy"],
            "seen_stain": s["seen"]["stain_accuracy"],
            "unseen_type": s["unseen"]["type_accuracy"],
            "unseen_stain": s["unseen"]["stain_accuracy"],
            "leakage": s["unseen"]["leakage"],
            "site_nulled_type": site_nulled["seen"]["type_accuracy"],
            "fd_vs_ground_truth_seen": float(np.mean(fd[True])) if fd[True] else float("nan"),
            "fd_vs_ground_truth_unseen": float(np.mean(fd[False])) if fd[False] else float("nan"),
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
    p.add_argument("--scanner-lines", action="store_true", help="the demo's world (site line patterns besides stain)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", default="small", help="model preset (small: CPU at 32 px; mid: one GPU at 64 px)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda trains under bf16 autocast)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--minutes", type=float, help="train for this many minutes instead of --steps")
    p.add_argument("--eval-minutes", type=float, help="with --minutes: evaluate every this many training minutes")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--prediction-type", default="v_prediction")
    p.add_argument(
        "--min-snr", type=float, default=0.0, help="Min-SNR loss weighting gamma (optim.min_snr_gamma; 0: off)"
    )
    p.add_argument("--site-dropout", type=float, default=0.3)
    p.add_argument("--type-dropout", type=float, default=0.05)
    p.add_argument("--late-site", type=int, default=0, help="condition the site only in the last N up blocks (0: all)")
    p.add_argument("--per-pair", type=int, default=8)
    p.add_argument("--sampler", default="dpmsolver++")
    p.add_argument("--sampler-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--composition-scale",
        type=float,
        nargs="*",
        default=[1.0],
        help="also score owner-site composition at these direction weights (none: skip)",
    )
    p.add_argument("--stain-composition", action="store_true", help="also score the stain composition (the demo's)")
    p.add_argument(
        "--guidance", type=float, nargs="+", default=[1.0], help="guidance scales to draw the stain composition at"
    )
    p.add_argument(
        "--stain-normalised",
        action="store_true",
        help="train on tiles in the reference stain (SiteStains.to_reference) and score their rendering per site",
    )
    p.add_argument("--out", default="benchmarks/results/generator_curve.json")
    p.add_argument("--grid", help="also write a PNG of generated tiles (rows: unseen pairs) at the end")
    p.add_argument("--save", help="also write the final model directory here (for generate / fidelity / downstream)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    ds = world(args)
    tiles, index = read_tiles(ds, ["train"], args.size)
    spec = ConditioningSpec.load(ds / "vocab.json").subset([TYPE, SITE])
    stains = estimate_site_stains(ds, args.size) if args.stain_composition or args.stain_normalised else None
    if args.stain_normalised:
        tiles = stains.to_reference(tiles, index[SITE])  # as data.stain=reference trains
    x = (torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 127.5 - 1).to(dev)
    cond = {k: v.to(dev) for k, v in encode_conditions(spec, index[[TYPE, SITE]].to_dict("records")).items()}
    # type-balanced, as the trainer
    w = torch.tensor(1.0 / index.groupby(TYPE)["key"].transform("count").to_numpy(), device=dev)
    g = torch.Generator(dev).manual_seed(args.seed)
    torch.manual_seed(args.seed)
    mcfg = ModelConfig.from_preset(
        args.preset,
        sample_size=args.size,
        prediction_type=args.prediction_type,
        cond_dropout={TYPE: args.type_dropout, SITE: args.site_dropout},
        late_columns=(SITE,) if args.late_site else (),
        late_up_blocks=max(args.late_site, 1),
    )
    model = ConditionedUNet(mcfg, spec).to(dev)
    ema = EMA(model, 0.999)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.95, 0.999), weight_decay=1e-6)
    # with a time budget the step count is not known: a constant rate after warm-up
    total = args.steps if args.minutes is None else 10**9
    sched = get_cosine_schedule_with_warmup(opt, 100 if args.minutes else max(1, args.steps // 100), total)
    amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    t_scorer = time.perf_counter()
    scorer = Scorer(index, ds, args)
    owners = index.groupby(SITE)[TYPE].agg(lambda v: v.value_counts().index[0]).to_dict()
    print(f"probes fit in {time.perf_counter() - t_scorer:.1f} s; ceiling {scorer.probes.ceiling}", flush=True)
    curve, train_s, t0, step, next_eval = [], 0.0, time.perf_counter(), 0, args.eval_minutes
    while True:
        step += 1
        ts = time.perf_counter()
        i = torch.multinomial(w, args.batch, replacement=True, generator=g)
        with amp:
            loss = diffusion_loss(model, x[i], {k: v[i] for k, v in cond.items()}, g, min_snr_gamma=args.min_snr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.update(model)
        if dev.type == "cuda" and step % 50 == 0:
            torch.cuda.synchronize()  # honest step timing: the queue must drain before the clock is read
        train_s += time.perf_counter() - ts
        if args.minutes is None:
            last, due = step == args.steps, step % args.eval_every == 0
        else:
            last = train_s >= args.minutes * 60
            due = next_eval is not None and train_s >= next_eval * 60
        if due or last:
            if next_eval is not None and due:
                next_eval += args.eval_minutes
            if dev.type == "cuda":
                torch.cuda.synchronize()
            shadow = ConditionedUNet(mcfg, spec).to(dev)
            shadow.load_state_dict(model.state_dict())
            ema.copy_to(shadow)
            te = time.perf_counter()
            row = {
                "step": step,
                "images": step * args.batch,
                "train_minutes": train_s / 60,
                "images_per_s": step * args.batch / train_s,
                "loss": float(loss.detach()),
            }
            if args.stain_normalised:
                row["stain_normalised"] = scorer(shadow, spec, args, stains=stains, normalised=True)
            else:
                row.update(scorer(shadow, spec, args))
            for scale in [] if args.stain_normalised else args.composition_scale:
                key = "owner_site" if scale == 1 else f"owner_site_x{scale:g}"
                row[key] = scorer(shadow, spec, args, owners, scale)
            for g in args.guidance if args.stain_composition else []:
                key = "stain_composition" if g == 1 else f"stain_composition_guidance{g:g}"
                row[key] = scorer(shadow, spec, args, stains=stains, guidance=g)
            row["eval_s"] = time.perf_counter() - te
            curve.append(row)
            print(json.dumps(row, default=lambda v: round(v, 3)), flush=True)
        if last:
            break
    if args.grid:
        unseen = sorted({p for p in scorer.pairs if p not in scorer.trained})[:8]
        rows = [{TYPE: t, SITE: s} for t, s in unseen for _ in range(8)]
        grid = draw(shadow.eval(), spec, rows, args).reshape(len(unseen), 8, args.size, args.size, 3)
        Image.fromarray(np.concatenate(np.concatenate(grid, axis=1), axis=1)).save(args.grid)
    if args.save:
        save_model_dir(args.save, model, ema, extra_info={"name": "curve", "dataset": str(ds.resolve()), "steps": step})
    result = {
        "benchmark": "generator_curve",
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
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
