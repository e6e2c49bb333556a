"""Does matching each scanner's fine detail help the stain composition? With and without, side by side.

The stain composition (`SiteStains.transfer`) renders each tile in the requested site's stain; since
session 12 it also scales the tile's high frequencies to the detail that site's scanner leaves
(`SiteStains.stored`). Here the same tiles are rendered both ways and scored by the world's calibrated
probes (fit on ground-truth renderings of every (type, training site) pair): tiles a trained model
draws at each type's own training sites (as `generate --composition stain` does: seen pairs at their
own site, unseen pairs at one of the type's sites), and ground-truth donors from the renderer at the
same pairs, so the generator's own errors are out of the second picture.

    python benchmarks/stain_detail.py --dataset W/data --model RUN/model --out benchmarks/results/stain_detail.json

W: a world as the demo ingests it (`medi-dist demo --seed K` writes K's to DIR/data and its model to
DIR/runs/demo-medi/model; `benchmarks/generator_curve.py --save` trains one for any world).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from medi_dist.data import procedural as P
from medi_dist.data import stain_estimation as E
from medi_dist.evaluate.encoders import get_encoder
from medi_dist.evaluate.fidelity_job import CalibratedProbes, read_tiles
from medi_dist.model import encode_conditions, sample
from medi_dist.model.model_dir import load_model_dir

TYPE, SITE = "cancer_type", "tissue_source_site"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", required=True, help="a demo world (ingested procedural dataset)")
    p.add_argument("--model", required=True, help="a model directory trained on it")
    p.add_argument("--seen", type=int, default=48, help="tiles per seen (type, site) pair")
    p.add_argument("--unseen", type=int, default=24, help="tiles per unseen pair")
    p.add_argument("--sampler-steps", type=int, default=10, help="DPM-Solver++ steps (the demo's)")
    p.add_argument("--out", default="benchmarks/results/stain_detail.json")
    args = p.parse_args()
    torch.set_num_threads(2)
    t0 = time.time()
    real, idx = read_tiles(args.dataset, ["train"], None)
    res = real.shape[1]
    est = E.estimate_site_stains(args.dataset, res)
    flat = est.without_detail()  # the composition as it was
    owner = est.owner
    probes = CalibratedProbes(get_encoder("random-conv"), args.dataset, idx, 0, res, sorted(owner))
    model, _, spec = load_model_dir(args.model)
    rng = np.random.default_rng(0)
    ut, us, ud = [], [], []
    for t in sorted(set(owner.values())):
        mine = sorted(s for s in owner if owner[s] == t)
        for s in sorted(owner):
            n = args.seen if owner[s] == t else args.unseen
            ut += [t] * n
            us += [s] * n
            ud += [s if owner[s] == t else mine[k] for k in rng.integers(len(mine), size=n)]
    rows = [{TYPE: t, SITE: d} for t, d in zip(ut, ud)]
    drawn = np.concatenate(
        [
            sample(
                model,
                encode_conditions(spec, rows[i : i + 64]),
                seeds=list(range(i, i + len(rows[i : i + 64]))),
                sampler="dpmsolver++",
                steps=args.sampler_steps,
            )
            for i in range(0, len(rows), 64)
        ]
    )
    donors = P.render_tiles(list(zip(ut, ud)), [[0, 7, i] for i in range(len(ut))], res, True)
    seen = np.array([owner[s] == t for t, s in zip(ut, us)])
    ut, us = np.array(ut), np.array(us)
    out = {"dataset": args.dataset, "model": args.model, "sites": owner}
    out["detail"] = {s: round(st.detail, 1) for s, st in est.stains.items()}
    for name, tiles in (("generated", drawn), ("ground-truth donors", donors)):
        for label, stains in (("without detail", flat), ("with detail", est)):
            r = probes.score(stains.transfer(tiles, ut, ud, us, own="render"), ut, us, seen)
            row = {f"{part}_{k}": round(r[part][k], 3) for part in ("seen", "unseen") for k in r[part] if k != "n"}
            out[f"{name}, {label}"] = row
            print(f"{name:20s} {label:15s} {row}", flush=True)
    out.update(seconds=round(time.time() - t0, 1), date=time.strftime("%Y-%m-%d"))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
