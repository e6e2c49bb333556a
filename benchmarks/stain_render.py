"""How the stain composition renders tiles, scored by the calibrated probes (issue 13).

`--composition stain` draws every tile at a (type, site) pair the network was trained on and
renders it in the requested site's stain (`SiteStains.transfer`). This script scores, with the
demo's calibrated probes (fit on ground-truth renderings of every (type, training site) pair, as
`medi-dist evaluate fidelity` fits them), what each choice in that rendering buys:

- seen pairs: the network's tiles as drawn, and rendered in their own site's stain (`own="render"`:
  concentrations only, the off-plane OD dropped, stored at the site's JPEG quality);
- unseen pairs: donor tiles (ground truth, and the network's) moved to the requested site with the
  site's intensity read as the mean concentration at the model's resolution with the off-plane OD
  carried over (the rendering before 2026-12-01), and as the product does now (90th-percentile
  concentration at source resolution, off-plane OD dropped).

Donors: `--donors POOL`, a pool the model drew at its training pairs, e.g.

    medi-dist generate --model D/runs/demo-medi/model --out /tmp/donors --mode explicit --no-mlflow \\
        --row cancer_type=SHEET,tissue_source_site=A1,count=240 ...  # one row per training pair
    python benchmarks/stain_render.py --demo D --donors /tmp/donors --out benchmarks/results/stain_render.json

D is a `medi-dist demo` output folder (its `data` is the training dataset).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from medi_dist.data import procedural
from medi_dist.data import site_stains as S
from medi_dist.data import stain_estimation as E
from medi_dist.evaluate.encoders import get_encoder
from medi_dist.evaluate.fidelity_job import CalibratedProbes, read_tiles

TYPE, SITE = "cancer_type", "tissue_source_site"


class Before(S.SiteStains):
    """The rendering before 2026-12-01: mean concentration at the model's resolution as the level
    (arithmetic type means), the off-plane OD carried over, tiles at their own site untouched."""

    def __init__(self, now: S.SiteStains, small: dict[str, np.ndarray]):
        stains = {}
        for s, st in now.stains.items():
            mean = np.maximum(st.unmix(S.optical_density(small[s]))[0].reshape(-1, 2).mean(0), 1e-3)
            stains[s] = S.Stain(st.hed, st.bg, st.pattern, mean, st.quality)
        super().__init__(stains, now.owner)
        by_type: dict = {}
        for s, t in self.owner.items():
            by_type.setdefault(t, []).append(stains[s].top)
        self.type_top = {t: np.mean(v, 0) for t, v in by_type.items()}

    def transfer(self, images, types, donors, sites, own="keep"):
        out = np.empty_like(images)
        for i, (img, t, d, s) in enumerate(zip(images, types, donors, sites)):
            if d == s:
                out[i] = img
                continue
            conc, res = self.stains[d].unmix(S.optical_density(img))
            rgb = 256 * np.exp(-self.stains[s].mix(conc / self.stains[d].top * self.scale(t, s), res)) - 1
            out[i] = S.store(rgb, self.stains[s].quality)
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--demo", required=True, help="a `medi-dist demo` output folder")
    p.add_argument("--donors", required=True, help="a pool the demo's model drew at its training pairs")
    p.add_argument("--per-pair", type=int, default=30, help="moved tiles per unseen (type, site) pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/stain_render.json")
    args = p.parse_args()
    t0 = time.time()
    data = Path(args.demo) / "data"
    real, r_idx = read_tiles(data, ["train"], None)
    res = real.shape[1]
    now = E.estimate_site_stains(data, res)
    owner = now.owner
    small = {s: real[(r_idx[SITE] == s).to_numpy()] for s in owner}
    before = Before(now, small)
    probes = CalibratedProbes(get_encoder("random-conv"), data, r_idx, args.seed, res, sorted(owner))
    results: dict = {"ceiling": probes.ceiling}

    def score(name: str, img, want_t, want_s, seen: bool) -> None:
        r = probes.score(img, np.asarray(want_t), np.asarray(want_s), np.full(len(img), seen))
        part = r["seen" if seen else "unseen"]
        results[name] = {k: round(v, 3) for k, v in part.items() if k != "joint_accuracy"}
        print(f"{name:60s} {results[name]}", flush=True)

    d_img, d_idx = read_tiles(args.donors, None, None)
    dt, ds = d_idx[TYPE].astype(str).to_numpy(), d_idx[SITE].astype(str).to_numpy()
    assert all(owner.get(s) == t for t, s in zip(dt, ds)), "--donors must hold tiles at the training pairs only"
    score("seen: network tiles as drawn", d_img, dt, ds, True)
    score("seen: rendered in their own site's stain", now.transfer(d_img, dt, ds, ds, own="render"), dt, ds, True)

    rng = np.random.default_rng(args.seed)  # each unseen pair: donors of its type from the type's own sites
    ut, us, pick = [], [], []
    for t in sorted(set(dt)):
        for s in sorted(s for s in owner if owner[s] != t):
            pick += list(rng.choice(np.flatnonzero(dt == t), args.per_pair, replace=False))
            ut += [t] * args.per_pair
            us += [s] * args.per_pair
    ud = ds[pick]
    gt = procedural.render_tiles(list(zip(ut, ud)), [[args.seed, 7, i] for i in range(len(ut))], res, True)
    for name, donors in (("ground-truth donors", gt), ("network donors", d_img[pick])):
        score(f"unseen, {name}: not moved", donors, ut, us, False)
        score(f"unseen, {name}: moved as before", before.transfer(donors, ut, ud, us), ut, us, False)
        score(f"unseen, {name}: moved as now", now.transfer(donors, ut, ud, us, own="render"), ut, us, False)
    results["seconds"] = round(time.time() - t0, 1)
    results["command"] = f"python benchmarks/stain_render.py --demo {args.demo} --donors {args.donors}"
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("wrote", args.out, f"({results['seconds']} s)")


if __name__ == "__main__":
    main()
