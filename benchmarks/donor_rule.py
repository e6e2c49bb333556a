"""The donor rule on a network's draws: each of a type's sites, moved to every unseen pair, scored.

`donor_choice.py` found, with ground-truth donors and the moves corrected, that the type's site
nearest the target in stain direction or fine detail makes a better donor than a random one in
three worlds. This asks the same of a demo's trained network: per type, `--per-pair` draws at each of
its training sites (the demo's sampling), each set moved to every unseen site of the pair's type
(`SiteStains.transfer`, as generation composes), unseen stain and type read on the world's
calibrated probes; the same for ground-truth donors. Rules as in `donor_choice.PARTS`.

    medi-dist demo --out DEMO        # a world's model
    python benchmarks/donor_rule.py --demo DEMO
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from donor_choice import PARTS, distances
from stain_ceiling import render, write_worlds

from medi_dist.data import stain_estimation as E
from medi_dist.demo import DemoConfig
from medi_dist.evaluate.encoders import get_encoder
from medi_dist.evaluate.fidelity_job import CalibratedProbes, read_tiles
from medi_dist.generate.writer import SamplingSettings, ShardGenerator

SITE = "tissue_source_site"


def world(demo: str, per_pair: int, seed: int) -> dict:
    data = f"{demo}/data"
    real, r_idx = read_tiles(data, ["train"], None)
    res = real.shape[1]
    est = E.estimate_site_stains(data, res)
    owner = est.owner
    probes = CalibratedProbes(get_encoder("random-conv"), data, r_idx, seed, res, sorted(owner))
    d = DemoConfig()
    settings = SamplingSettings(
        sampler=d.sampler, steps=d.sampler_steps, guidance=d.guidance, guidance_interval=d.guidance_interval
    )
    gen = ShardGenerator(f"{demo}/runs/demo-medi/model", settings, f"{demo}/unused", threads=2)
    out: dict = {"demo": demo, "ceiling": probes.ceiling}
    for source in ("network", "ground truth"):
        rows = []
        for i, (donor, t) in enumerate(sorted(owner.items())):
            if source == "network":
                tiles = gen._sample(
                    [{"conditions": {"cancer_type": t, SITE: donor}, "seed": 1000 * i + k} for k in range(per_pair)], {}
                )
            else:
                tiles = render([(t, donor)] * per_pair, res)
            for s in sorted(x for x in owner if owner[x] != t):
                n = len(tiles)
                moved = est.transfer(tiles, [t] * n, [donor] * n, [s] * n, own="render", patterned=source != "network")
                r = probes.score(moved, np.array([t] * n), np.array([s] * n), np.zeros(n, bool))["unseen"]
                dist = (round(float(v), 3) for v in distances(est.stains[donor], est.stains[s]))
                rows.append(
                    {"type": t, "site": s, "donor": donor, "stain": r["stain_accuracy"], "type_acc": r["type_accuracy"]}
                    | dict(zip(PARTS, dist))
                )
        pairs: dict = {}
        for r in rows:
            pairs.setdefault((r["type"], r["site"]), []).append(r)
        summary = {"random donor": [np.mean([r[k] for r in rows]) for k in ("stain", "type_acc")]}
        summary["best donor (oracle)"] = [np.mean([max(r["stain"] for r in p) for p in pairs.values()]), np.nan]
        for k in PARTS:
            pick = [min(p, key=lambda r: r[k]) for p in pairs.values()]
            summary[f"nearest by {k}"] = [np.mean([r["stain"] for r in pick]), np.mean([r["type_acc"] for r in pick])]
        summary = {k: [round(float(x), 3) for x in v] for k, v in summary.items()}
        print(f"{demo}: {source}: unseen stain, type: {summary}", flush=True)
        out[source] = {"unseen stain, type": summary, "moves": rows}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", nargs="+", required=True, help="demo output folders (medi-dist demo --out DIR)")
    p.add_argument("--per-pair", type=int, default=30, help="draws per (type, training site)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/donor_rule.json")
    args = p.parse_args()
    t0 = time.time()
    write_worlds([world(d, args.per_pair, args.seed) for d in args.demo], t0, args.per_pair, args.out)


if __name__ == "__main__":
    main()
