"""Moves corrected by what moves between a type's own sites miss (`SiteStains.with_move_corrections`).

A tile moved from site d to site s misses the truth at s by what the site model gets wrong at both
(directions a few degrees off, the background carrying the leak, the level). Between two sites of
one type the truth is known (the target's real tiles), so each site's share of that miss is
measured there (least squares, a type's shares summing to zero) and every move d -> s is corrected
by s's share less d's. Three site models per world: without the corrections (the product before
session 24), with the mean OD corrected only, with mean and spread (the product). Unseen stain of
ground-truth donors moved to every unseen pair and seen stain of ground-truth tiles rendered at their
own site (each world's calibrated stain probe), per target site:

    python benchmarks/move_corrections.py --dataset W0/data W1/data W2/data

W: a world as the demo ingests it (`medi_dist.demo._ingest(DemoConfig(seed=K), DIR)` writes K's to
DIR/data, seconds).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from stain_ceiling import render, run_worlds, unseen_moves

from medi_dist.data import site_stains as S
from medi_dist.data import stain_estimation as E
from medi_dist.evaluate.encoders import get_encoder
from medi_dist.evaluate.fidelity_job import CalibratedProbes, read_tiles, stain_features


def world(dataset: str, per_pair: int, seed: int) -> dict:
    real, r_idx = read_tiles(dataset, ["train"], None)
    res = real.shape[1]
    est = E.estimate_site_stains(dataset, res)
    owner = est.owner

    def variant(move) -> S.SiteStains:
        return S.SiteStains({s: replace(st, move=move(st.move)) for s, st in est.stains.items()}, owner)

    models = {
        "without": variant(lambda m: None),
        "mean only": variant(lambda m: m * [[1], [0]]),
        "mean and spread (product)": est,
    }
    for s in sorted(owner):
        print(f"{dataset}: {s} ({owner[s]}) correction {np.round(est.stains[s].move, 3).tolist()}", flush=True)
    ut, us, ud = unseen_moves(owner, per_pair, seed)
    probes = CalibratedProbes(get_encoder("random-conv"), dataset, r_idx, seed, res, sorted(owner))
    donors, us = render(list(zip(ut, ud)), res), np.array(us)
    own = np.array([s for s in sorted(owner) for _ in range(per_pair * 2)])
    tiles = render([(owner[s], s) for s in own], res)
    types = [owner[s] for s in own]
    out = {"dataset": dataset, "unseen_stain": {}, "seen_stain_rendered": {}}
    out["corrections"] = {s: np.round(st.move, 4).tolist() for s, st in est.stains.items()}
    for name, stains in models.items():
        hit = probes.stain_probe.predict(stain_features(stains.transfer(donors, ut, ud, us))) == us
        by_site = {s: round(float(hit[us == s].mean()), 2) for s in sorted(owner)}
        out["unseen_stain"][name] = {"all": round(float(hit.mean()), 3), "by_site": by_site}
        print(f"{dataset}: unseen stain, moved ground-truth donors, {name}: {hit.mean():.3f} {by_site}", flush=True)
        hit = probes.stain_probe.predict(stain_features(stains.transfer(tiles, types, own, own, own="render"))) == own
        by_site = {s: round(float(hit[own == s].mean()), 2) for s in sorted(owner)}
        out["seen_stain_rendered"][name] = {"all": round(float(hit.mean()), 3), "by_site": by_site}
        print(f"{dataset}: seen stain, ground truth rendered at its own site, {name}: {hit.mean():.3f} {by_site}")
    return out


def main() -> None:
    run_worlds(world, __doc__.split("\n")[0], "benchmarks/results/move_corrections.json")


if __name__ == "__main__":
    main()
