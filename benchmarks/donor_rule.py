"""The donor rule on a network's draws: each of a type's sites, moved to every unseen pair, scored.

`donor_choice.py` found, with ground-truth donors and the moves corrected, that the type's site
nearest the target in stain direction or fine detail makes a better donor than a random one in
three worlds. This asks the same of a demo's trained network: per type, `--per-pair` draws at each of
its training sites (the demo's sampling), each set moved to every unseen site of the pair's type
(`SiteStains.transfer`, as generation composes), unseen stain and type read on the world's
calibrated probes; the same draws calibrated (`--calibration N` draws per site, generation's
`calibration_tiles`) and ground-truth donors. Rules as in `donor_choice.PARTS`.

    medi-dist demo --out DEMO        # a world's model
    python benchmarks/donor_rule.py --demo DEMO
"""

from __future__ import annotations

import numpy as np
from donor_choice import PARTS, distances
from draw_calibration import demo_generator, run_demos
from stain_ceiling import render

from medi_dist.data import stain_estimation as E
from medi_dist.evaluate.encoders import get_encoder
from medi_dist.evaluate.fidelity_job import CalibratedProbes, read_tiles

SITE = "tissue_source_site"


def world(demo: str, per_pair: int, calibration: int, seed: int) -> dict:
    data = f"{demo}/data"
    real, r_idx = read_tiles(data, ["train"], None)
    res = real.shape[1]
    est = E.estimate_site_stains(data, res)
    owner = est.owner
    probes = CalibratedProbes(get_encoder("random-conv"), data, r_idx, seed, res, sorted(owner))
    gen = demo_generator(demo, calibration)
    own: dict = {}
    for s, t in sorted(owner.items()):
        own.setdefault(t, []).append(s)
    drawn = {
        donor: gen._sample(
            [{"conditions": {"cancer_type": t, SITE: donor}, "seed": 1000 * i + k} for k in range(per_pair)], {}
        )
        for i, (donor, t) in enumerate(sorted(owner.items()))
    }
    quantiles = gen._calibration({"own_sites": own, "plan_seed": seed}, est)
    out: dict = {"demo": demo, "ceiling": probes.ceiling}
    for source in ("network", f"network, calibrated ({calibration} per site)", "ground truth"):
        rows = []
        for donor, t in sorted(owner.items()):
            network = source != "ground truth"
            tiles = drawn[donor] if network else render([(t, donor)] * per_pair, res)
            q = quantiles if "calibrated" in source else None
            for s in sorted(x for x in owner if owner[x] != t):
                n = len(tiles)
                moved = est.transfer(tiles, [t] * n, [donor] * n, [s] * n, patterned=not network, drawn=q)
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
    run_demos(world, __doc__.split("\n")[0], "benchmarks/results/donor_rule.json")


if __name__ == "__main__":
    main()
