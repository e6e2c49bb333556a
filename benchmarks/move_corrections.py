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
from stain_ceiling import moved_and_rendered, run_worlds

from medi_dist.data import site_stains as S
from medi_dist.data import stain_estimation as E
from medi_dist.evaluate.encoders import get_encoder
from medi_dist.evaluate.fidelity_job import CalibratedProbes, read_tiles


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
    probes = CalibratedProbes(get_encoder("random-conv"), dataset, r_idx, seed, res, sorted(owner))
    out = {"dataset": dataset, "corrections": {s: np.round(st.move, 4).tolist() for s, st in est.stains.items()}}
    return {**out, **moved_and_rendered(dataset, models, owner, probes, res, per_pair, seed)}


def main() -> None:
    run_worlds(world, __doc__.split("\n")[0], "benchmarks/results/move_corrections.json")


if __name__ == "__main__":
    main()
