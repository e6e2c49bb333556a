"""Which of a type's sites to move its tiles from: each donor against the target's estimated stain.

A tile of type t for the unseen pair (t, s) is drawn at one of t's training sites (the donor, chosen
by the tile's seed, `generate/writer._own_site`) and moved into s's stain. With each world's
calibrated stain probe, ground-truth tiles of t moved from each donor in turn to every unseen pair:
unseen stain with a random donor, with the best donor per pair (an oracle: it reads the probe), and
with the donor nearest the target by each part of the estimated site model (angle of h, of e, of
both; |log level ratio|; |log detail ratio|; L1 distance of the backgrounds), which a generator could
choose without the probe. Per-pair rows in the JSON.

    python benchmarks/donor_choice.py --dataset W0/data W1/data W2/data

W: a world as the demo ingests it (`medi_dist.demo._ingest(DemoConfig(seed=K), DIR)` writes K's to
DIR/data, seconds).
"""

from __future__ import annotations

import numpy as np
from stain_ceiling import render, run_worlds

from medi_dist.data import stain_estimation as E
from medi_dist.evaluate.encoders import get_encoder
from medi_dist.evaluate.fidelity_job import CalibratedProbes, read_tiles, stain_features

PARTS = ("h angle", "e angle", "h + e angle", "level", "detail", "background")


def distances(a, b) -> list[float]:
    """The parts of two sites' estimated stains, as distances (PARTS)."""
    ang = np.degrees(np.arccos(np.clip((a.hed * b.hed).sum(1), -1, 1)))
    level = np.abs(np.log(a.top / b.top)).sum()
    return [*ang, ang.sum(), level, abs(np.log(a.detail / b.detail)), np.abs(a.bg - b.bg).sum()]


def world(dataset: str, per_pair: int, seed: int) -> dict:
    real, r_idx = read_tiles(dataset, ["train"], None)
    res = real.shape[1]
    est = E.estimate_site_stains(dataset, res)
    owner = est.owner
    probes = CalibratedProbes(get_encoder("random-conv"), dataset, r_idx, seed, res, sorted(owner))
    rows = []
    for t in sorted(set(owner.values())):
        mine = sorted(s for s in owner if owner[s] == t)
        for s in sorted(x for x in owner if owner[x] != t):
            for d in mine:
                tiles = est.transfer(render([(t, d)] * per_pair, res), [t] * per_pair, [d] * per_pair, [s] * per_pair)
                hit = float((probes.stain_probe.predict(stain_features(tiles)) == s).mean())
                dist = (round(float(v), 3) for v in distances(est.stains[d], est.stains[s]))
                rows.append({"type": t, "site": s, "donor": d, "stain": round(hit, 3), **dict(zip(PARTS, dist))})
    pairs: dict = {}
    for r in rows:
        pairs.setdefault((r["type"], r["site"]), []).append(r)
    out = {
        "random donor": np.mean([r["stain"] for r in rows]),
        "best donor (oracle)": np.mean([max(r["stain"] for r in p) for p in pairs.values()]),
        **{f"nearest by {k}": np.mean([min(p, key=lambda r: r[k])["stain"] for p in pairs.values()]) for k in PARTS},
    }
    out = {k: round(float(v), 3) for k, v in out.items()}
    print(f"{dataset}: unseen stain, moved ground-truth donors: {out}", flush=True)
    return {"dataset": dataset, "unseen_stain": out, "moves": rows}


def main() -> None:
    run_worlds(world, __doc__.split("\n")[0], "benchmarks/results/donor_choice.json")


if __name__ == "__main__":
    main()
