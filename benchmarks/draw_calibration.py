"""A network's draws calibrated onto its training sites' real concentrations, on the calibrated probes.

Stain composition draws each type at one of its own training sites d and moves the tile to the
requested site s (`SiteStains.transfer`). With ground-truth donors that reaches unseen stain 0.74 /
0.60 / 0.35 in three worlds (stain_ceiling.py); the demo's network reached 0.62 in the first. The
difference is the network's draws at d: a little too light, dark or flat in a stain. Calibration
(`SiteStains.calibrated`, generation's `calibration_tiles`) maps the draws' concentrations quantile by
quantile onto d's real tiles' (d is a trained pair: its real tiles are the ground truth), with the
quantiles measured on the network's own draws at d. This scores, on each world's calibrated probes,
the same draws of a demo's model composed as before and calibrated, and ground-truth donors moved
(what a perfect network would hand over):

    medi-dist demo --seed K --out DEMO_K      # each world's model (and its demo table)
    python benchmarks/draw_calibration.py --demo DEMO_0 DEMO_1 DEMO_2

Seen pairs: each type's tiles drawn at its own sites and rendered there; unseen: moved.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from stain_ceiling import render, unseen_moves, write_worlds

from medi_dist.data import stain_estimation as E
from medi_dist.demo import DemoConfig
from medi_dist.evaluate.encoders import get_encoder
from medi_dist.evaluate.fidelity_job import CalibratedProbes, read_tiles
from medi_dist.generate.writer import SamplingSettings, ShardGenerator

SITE = "tissue_source_site"


def demo_generator(demo: str, calibration: int) -> ShardGenerator:
    """The demo's MeDi model in `demo` with the demo's sampling, stain-composed, `calibration` draws per site."""
    d = DemoConfig()
    settings = SamplingSettings(
        sampler=d.sampler,
        steps=d.sampler_steps,
        guidance=d.guidance,
        guidance_interval=d.guidance_interval,
        composition="stain",
        calibration_tiles=calibration,
    )
    return ShardGenerator(f"{demo}/runs/demo-medi/model", settings, f"{demo}/unused", threads=2)


def world(demo: str, per_pair: int, calibration: int, seed: int) -> dict:
    data = f"{demo}/data"
    real, r_idx = read_tiles(data, ["train"], None)
    res = real.shape[1]
    est = E.estimate_site_stains(data, res)
    owner = est.owner
    probes = CalibratedProbes(get_encoder("random-conv"), data, r_idx, seed, res, sorted(owner))
    ut, us, ud = unseen_moves(owner, per_pair, seed)
    st = [t for _, t in sorted(owner.items()) for _ in range(per_pair)]
    ss = [s for s, _ in sorted(owner.items()) for _ in range(per_pair)]
    gen = demo_generator(demo, calibration)

    def draw(types, sites, first):
        rows = [
            {"conditions": {"cancer_type": t, SITE: s}, "seed": first + i} for i, (t, s) in enumerate(zip(types, sites))
        ]
        return gen._sample(rows, {})

    t0 = time.time()
    unseen, seen = draw(ut, ud, 10_000), draw(st, ss, 50_000)
    drawn_s = time.time() - t0
    own: dict = {}
    for s, t in sorted(owner.items()):
        own.setdefault(t, []).append(s)
    t0 = time.time()
    quantiles = gen._calibration({"own_sites": own, "plan_seed": seed}, est)
    out = {"demo": demo, "ceiling": probes.ceiling, "draw_seconds": round(drawn_s, 1)}
    out["calibration_seconds"] = round(time.time() - t0, 1)

    def score(name, u_img, s_img):
        ru = probes.score(u_img, np.array(ut), np.array(us), np.zeros(len(ut), bool))["unseen"]
        rs = probes.score(s_img, np.array(st), np.array(ss), np.ones(len(st), bool))["seen"]
        out[name] = {
            "seen type / stain": [round(rs[k], 3) for k in ("type_accuracy", "stain_accuracy")],
            "unseen type / stain / leakage": [round(ru[k], 3) for k in ("type_accuracy", "stain_accuracy", "leakage")],
        }
        print(f"{demo}: {name:40s} {out[name]}", flush=True)

    for name, q in (("composed (before)", None), (f"calibrated ({calibration} per site)", quantiles)):
        score(
            name,
            est.transfer(unseen, ut, ud, us, own="render", patterned=False, drawn=q),
            est.transfer(seen, st, ss, ss, own="render", patterned=False, drawn=q),
        )
    score(
        "ground-truth donors moved",
        est.transfer(render(list(zip(ut, ud)), res), ut, ud, us),
        render(list(zip(st, ss)), res),
    )
    return out


def run_demos(world_fn, description: str, out: str) -> None:
    """A demo benchmark's command line: `world_fn(demo, per_pair, calibration, seed)` for each demo, one JSON."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--demo", nargs="+", required=True, help="demo output folders (medi-dist demo --seed K --out DIR)")
    p.add_argument("--per-pair", type=int, default=30, help="tiles per (type, site) pair")
    p.add_argument("--calibration", type=int, default=32, help="the network's draws per training site")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out)
    args = p.parse_args()
    t0 = time.time()
    runs = [world_fn(d, args.per_pair, args.calibration, args.seed) for d in args.demo]
    write_worlds(runs, t0, args.per_pair, args.out)


def main() -> None:
    run_demos(world, __doc__.split("\n")[0], "benchmarks/results/draw_calibration.json")


if __name__ == "__main__":
    main()
