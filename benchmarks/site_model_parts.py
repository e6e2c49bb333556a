"""Two parts of the site model checked against the renderer: the fixed pattern and the stain level.

`stain_ceiling.py` found the unseen-stain gap in the site model's estimates. This one measures two
candidate fixes on ground-truth donors moved to the unseen pairs (the product arm of stain_ceiling),
scored by each world's calibrated probes:

- the fixed pattern as the *fine* part of the per-pixel mean OD (the mean less its Gaussian blur of
  FRAC x tile size): a tile layout (GLAND / PAPIL tissue drawn off-centre less often) is coarse and
  belongs to the type, scanner lines are fine. Each estimate is fitted afresh with that pattern
  (directions and level use it too), then parts are swapped between today's and the fine estimate,
  and the renderer's true lines are put in for either pattern; and today's estimate with only the
  level read after the fine pattern;
- the level: within each type, the error of log(level s1 / level s2) against the renderer's
  log(intensity s1 / intensity s2) (all the data identify), for several statistics of the source
  tiles' concentrations, with the estimated and with the true directions.

    python benchmarks/site_model_parts.py --dataset W0/data W1/data W2/data --fine 0.0625 0.125
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
from scipy.ndimage import gaussian_filter
from stain_ceiling import render, unseen_moves, write_worlds

from medi_dist.data import procedural as P
from medi_dist.data import site_stains as S
from medi_dist.data import stain_estimation as E
from medi_dist.evaluate.encoders import get_encoder
from medi_dist.evaluate.fidelity_job import CalibratedProbes, read_tiles

LEVELS = {
    "q90 (today)": lambda c: np.percentile(c, 90, axis=0),
    "q75": lambda c: np.percentile(c, 75, axis=0),
    "q50": lambda c: np.percentile(c, 50, axis=0),
    "mean of positive": lambda c: np.clip(c, 0, None).mean(0),
}


def fine_pattern(frac: float):
    def fixed_pattern(od: np.ndarray) -> np.ndarray:
        m = od.mean(axis=(0, 3))
        m = m - gaussian_filter(m, frac * m.shape[0], mode="reflect")
        return m - np.percentile(m, 2)

    return fixed_pattern


def fine_level(frac: float):
    """`S.level` with the fine pattern subtracted (its coarse part is the type's layout, i.e. tissue)."""

    def level(od: np.ndarray, hed: np.ndarray, q: float = 90) -> np.ndarray:
        x = od - fine_pattern(frac)(od)[..., None]
        conc = ((x - S.faint_background(x)).reshape(-1, 3) @ np.linalg.pinv(hed)).astype(np.float64)
        return np.maximum(np.percentile(conc, q, axis=0), 1e-3)

    return level


def estimate(dataset: str, res: int, pattern=None, level=None) -> S.SiteStains:
    """The site model fitted afresh, with `pattern` for `S.fixed_pattern` and `level` for `S.level`
    (None: today's)."""
    today = S.fixed_pattern, E.level  # site_stains' functions call the first; the estimator the second
    S.fixed_pattern, E.level = pattern or today[0], level or today[1]
    E._estimate.cache_clear()
    try:
        return E.estimate_site_stains(dataset, res)
    finally:
        S.fixed_pattern, E.level = today
        E._estimate.cache_clear()


def source_od(t: str, s: str) -> np.ndarray:
    """The OD of the estimator's own source tiles of site s (holding type t), as `_fit_one` renders them."""
    seeds = [[0, P._crc(s), 9, i] for i in range(E.PER_SITE)]
    return S.optical_density(P.render_tiles([(t, s)] * E.PER_SITE, seeds, E.SOURCE_PX, True), np.float32)


def level_errors(owner: dict, est: S.SiteStains) -> dict:
    """Mean |log-ratio error| (h, e) over types of each level statistic, estimated and true directions."""
    conc = {}
    for s in sorted(owner):
        od = source_od(owner[s], s)
        x = od - S.fixed_pattern(od)[..., None]
        x = (x - S.faint_background(x)).reshape(-1, 3)
        st = P.site_stain(s)
        for label, hed in (("estimated", est.stains[s].hed), ("true", np.stack([S.unit(st.h), S.unit(st.e)]))):
            conc[label, s] = (x @ np.linalg.pinv(hed)).astype(np.float64)
    truth = {s: np.array([np.linalg.norm(P.site_stain(s).h), np.linalg.norm(P.site_stain(s).e)]) for s in owner}
    out = {}
    for label in ("estimated", "true"):
        for name, stat in LEVELS.items():
            errs = []
            for t in sorted(set(owner.values())):
                a, b = sorted(s for s in owner if owner[s] == t)
                errs.append(np.log(stat(conc[label, a]) / stat(conc[label, b])) - np.log(truth[a] / truth[b]))
            out[f"{label} directions, {name}"] = np.round(np.abs(errs).mean(0), 3).tolist()
    return out


def world(dataset: str, fracs: list[float], per_pair: int, seed: int) -> dict:
    real, r_idx = read_tiles(dataset, ["train"], None)
    res = real.shape[1]
    today = estimate(dataset, res)
    owner = today.owner
    lines = {s: P.line_pattern(P.site_stain(s), res) for s in owner}
    ut, us, ud = unseen_moves(owner, per_pair, seed)

    def swap(base: S.SiteStains, **parts) -> S.SiteStains:
        stains = {s: dataclasses.replace(base.stains[s], **{k: v[s] for k, v in parts.items()}) for s in owner}
        return S.SiteStains(stains, owner)

    def parts_of(est: S.SiteStains, name: str) -> dict:
        return {s: getattr(est.stains[s], name) for s in owner}

    arms = {"today (the product)": today, "today, true lines as pattern": swap(today, pattern=lines)}
    corr = {}
    for frac in fracs:
        fine = estimate(dataset, res, fine_pattern(frac))
        arms[f"fine {frac}"] = fine
        arms[f"today, level after the fine {frac} pattern"] = estimate(dataset, res, level=fine_level(frac))
        arms[f"fine {frac}, true lines as pattern"] = swap(fine, pattern=lines)
        for part in ("pattern", "top", "bg", "hed"):
            arms[f"today + fine {frac}'s {part}"] = swap(today, **{part: parts_of(fine, part)})
        corr[f"fine {frac}"] = [np.corrcoef(lines[s].ravel(), fine.stains[s].pattern.ravel())[0, 1] for s in owner]
    corr["today"] = [np.corrcoef(lines[s].ravel(), today.stains[s].pattern.ravel())[0, 1] for s in owner]
    probes = CalibratedProbes(get_encoder("random-conv"), dataset, r_idx, seed, res, sorted(owner))
    donors = render(list(zip(ut, ud)), res)
    out = {"dataset": dataset, "ceiling": probes.ceiling["unseen"], "tiles": len(ut)}
    out["pattern vs true lines, correlation min / median"] = {
        k: [round(float(min(v)), 3), round(float(np.median(v)), 3)] for k, v in corr.items()
    }
    for name, est in arms.items():
        moved = est.transfer(donors, ut, ud, us)
        r = probes.score(moved, np.array(ut), np.array(us), np.zeros(len(ut), bool))["unseen"]
        out[name] = {k: round(r[k], 3) for k in ("type_accuracy", "stain_accuracy", "leakage")}
        print(f"{dataset}: {name:45s} {out[name]}", flush=True)
    out["level |log-ratio error| h, e"] = level_errors(owner, today)
    print(dataset, json.dumps(out["level |log-ratio error| h, e"]), flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", nargs="+", required=True, help="demo worlds (ingested procedural datasets)")
    p.add_argument("--fine", nargs="+", type=float, default=[0.0625, 0.125], help="blur sigma / tile size")
    p.add_argument("--per-pair", type=int, default=30, help="moved tiles per unseen (type, site) pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/site_model_parts.json")
    args = p.parse_args()
    t0 = time.time()
    write_worlds([world(d, args.fine, args.per_pair, args.seed) for d in args.dataset], t0, args.per_pair, args.out)


if __name__ == "__main__":
    main()
