"""How far can moving a tile into another site's stain go? Ground-truth donors, oracle parts swapped in.

The stain composition (`SiteStains.transfer`) draws a tile of type t at one of t's own training
sites d and renders its concentrations in the requested site s's stain. This benchmark moves
*ground-truth* donors (the renderer's tiles of t at d), so the generator's own errors are out of the
picture, and scores the moved tiles with the demo's calibrated probes (fit on ground-truth renderings
of every (type, training site) pair) at the unseen pairs, swapping the renderer's true stain parts in
for the estimated ones one at a time:

- estimated: the product as it is (directions, background, pattern and level estimated);
- identifiable intensity: each site's true intensity, with each type's scale set by the geometric
  mean of its sites (all the data identify: a site's intensity is confounded with its type's);
- + true directions and background;
- + sharp donors and the target's exact blur (the donor rendered without blur, then blurred by the
  target site's true blur before its scanner stores it): a transfer cannot do this, as blur is not
  undone, so this bounds what blur transfer could buy;
- all true, intensity included (not identifiable), with and without the exact blur;
- not moved but rendered afresh at the requested site with the intensity the data identify: the
  ideal factorised generator (clean concentrations through the site's whole scanner chain once);
- clean donors (the same tissue without blur, lines, noise or JPEG: what a generator of clean
  concentrations would draw) moved by the estimated site model, then with parts of the target's
  scanner swapped in (true lines for the estimated pattern, true blur for the detail matching), and
  with the pattern estimated from the OD off the stain plane (`neutral_patterns`), which a type's
  mean layout does not enter.

    python benchmarks/stain_ceiling.py --dataset W0/data W1/data --out benchmarks/results/stain_ceiling.json

W: a world as the demo ingests it (`medi-dist demo --seed K` writes K's to DIR/data; so does
`medi_dist.demo._ingest`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.ndimage import gaussian_filter

from medi_dist.data import morphology as M
from medi_dist.data import procedural as P
from medi_dist.data import site_stains as S
from medi_dist.data import stain_estimation as E
from medi_dist.evaluate.encoders import get_encoder
from medi_dist.evaluate.fidelity_job import CalibratedProbes, read_tiles, stain_features


def render(pairs, res: int, blur: float | None = None) -> np.ndarray:
    """Ground truth with the demo's scanner lines; `blur` replaces every site's blur."""
    original = P.site_stain
    if blur is not None:
        P.site_stain = lambda c: dataclasses.replace(original(c), blur=blur)
    try:
        return P.render_tiles(pairs, [[0, 7, i] for i in range(len(pairs))], res, True)
    finally:
        P.site_stain = original


def render_identifiable(ut, us, owner: dict, res: int) -> np.ndarray:
    """Ground truth at (t, s) with s's intensity scaled as the data identify it: by the geometric mean
    intensity of t's sites over that of s's own type's sites."""
    original = P.site_stain

    def mean(t: str, part: str) -> float:
        norms = [np.linalg.norm(getattr(original(s), part)) for s in owner if owner[s] == t]
        return float(np.exp(np.mean(np.log(norms))))

    out = []
    for i, (t, s) in enumerate(zip(ut, us)):
        st = original(s)
        k = {part: mean(t, part) / mean(owner[s], part) for part in ("h", "e")}
        st = dataclasses.replace(st, h=st.h * k["h"], e=st.e * k["e"])
        P.site_stain = lambda c, _s=s, _st=st: _st if c == _s else original(c)
        try:
            out.append(P.render_tiles([(t, s)], [[0, 7, i]], res, True)[0])
        finally:
            P.site_stain = original
    return np.stack(out)


def move_and_blur(stains: S.SiteStains, img, ut, ud, us, res: int) -> np.ndarray:
    """`SiteStains.transfer`, blurring by the target site's true blur before its scanner stores the tile."""
    out = np.empty_like(img)
    for i, (x, t, d, s) in enumerate(zip(img, ut, ud, us)):
        conc, _ = stains.stains[d].unmix(S.optical_density(x))
        rgb = 256 * np.exp(-stains.stains[s].mix(conc * (stains.scale(t, s) / stains.stains[d].top), 0)) - 1
        if P.site_stain(s).blur > 0.05:
            sigma = P.site_stain(s).blur * res / 64
            rgb = gaussian_filter(rgb, (sigma, sigma, 0))
        out[i] = S.store(rgb, stains.stains[s].quality)
    return out


def clean(pairs, res: int) -> np.ndarray:
    """The same tissue as `render` (same seeds), drawn as a generator of clean concentrations would hand it
    to a site model: in its site's true stain with the mean density of the site's scanner lines (which a
    network draws with the tissue), but without blur, lines, sensor noise or JPEG. Float RGB."""
    out = np.empty((len(pairs), res, res, 3))
    for i, (t, s) in enumerate(pairs):
        h, e = M.concentrations(t, np.random.default_rng([0, 7, i]), res)
        st = P.site_stain(s)
        out[i] = 255 * np.exp(-(h[..., None] * st.h + e[..., None] * st.e + st.bg + st.lines[2] / 2))
    return out


def move_clean(
    stains: S.SiteStains, img, ut, ud, us, noise: float, seed: int, true_lines: bool = False, true_blur: bool = False
) -> np.ndarray:
    """`SiteStains.transfer(..., patterned=False)` of clean tiles, with the renderer's sensor noise (sigma,
    grey levels) added before the target's scanner stores them (`stored`: fine detail, JPEG).
    `true_lines`: the target's true scanner lines instead of its estimated pattern; `true_blur`: its true
    blur before the noise, and JPEG at its quality, instead of the detail matching."""
    rng = np.random.default_rng(seed)
    out = np.empty(img.shape, np.uint8)
    res = img.shape[1]
    for i, (x, t, d, s) in enumerate(zip(np.clip(img + 0.5, 0, 255).astype(np.uint8), ut, ud, us)):
        src, dst, true = stains.stains[d], stains.stains[s], P.site_stain(s)
        src = dataclasses.replace(src, pattern=np.full_like(src.pattern, src.pattern.mean()))
        if true_lines:
            dst = dataclasses.replace(dst, pattern=P.line_pattern(true, res))
        conc, _ = src.unmix(S.optical_density(x))
        rgb = 256 * np.exp(-dst.mix(conc * (stains.scale(t, s) / src.top), 0)) - 1
        if true_blur:
            if true.blur > 0.05:
                rgb = gaussian_filter(rgb, (true.blur * res / 64, true.blur * res / 64, 0))
            out[i] = S.store(rgb + rng.normal(0, noise, rgb.shape), dst.quality)
        else:
            out[i] = stains.stored(rgb + rng.normal(0, noise, rgb.shape), t, s)
    return out


def neutral_patterns(stains: S.SiteStains, dataset: str, res: int) -> dict:
    """Each site's fixed pattern without its type's mean layout: a scanner's pattern is neutral density
    (equal in R, G, B), tissue lies in the stain plane; so the per-pixel mean OD off that plane (along its
    normal) gives the pattern's shape, scaled onto the mean-OD pattern (`fixed_pattern`) by least squares
    and set to zero at its 2nd percentile as that one is."""
    idx = pd.read_parquet(Path(dataset) / "index.parquet")
    idx = idx[idx["split"] == "train"]
    out = {}
    for s, st in stains.stains.items():
        _, small, _ = E._site_sample(Path(dataset), idx[idx[S.SITE] == s], s, res, 0)
        n = S.unit(np.cross(st.hed[0], st.hed[1]))
        d = (S.optical_density(small) @ n).mean(0) / n.sum()
        A = np.stack([d.ravel(), np.ones(d.size)], 1)
        p = (A @ np.linalg.lstsq(A, st.pattern.ravel(), rcond=None)[0]).reshape(d.shape)
        out[s] = p - np.percentile(p, 2)
    return out


def unseen_moves(owner: dict, per_pair: int, seed: int) -> tuple[list, list, list]:
    """Types, target sites and donor sites (one of the type's own, at random) of `per_pair` moves to
    each unseen (type, site) pair."""
    rng = np.random.default_rng(seed)
    ut, us, ud = [], [], []
    for t in sorted(set(owner.values())):
        mine = sorted(s for s in owner if owner[s] == t)
        for s in sorted(s for s in owner if owner[s] != t):
            ut += [t] * per_pair
            us += [s] * per_pair
            ud += [mine[k] for k in rng.integers(len(mine), size=per_pair)]
    return ut, us, ud


def moved_and_rendered(dataset: str, models: dict, owner: dict, probes, res: int, per_pair: int, seed: int) -> dict:
    """Each site model's unseen stain of ground-truth donors moved to every unseen pair and seen stain of
    ground-truth tiles rendered through their own site's stain (`transfer(..., own="render")`), per
    target site, on the world's calibrated stain probe."""
    ut, us, ud = unseen_moves(owner, per_pair, seed)
    donors, us = render(list(zip(ut, ud)), res), np.array(us)
    own = np.array([s for s in sorted(owner) for _ in range(per_pair * 2)])
    tiles, types = render([(owner[s], s) for s in own], res), [owner[s] for s in own]
    out: dict = {"unseen_stain": {}, "seen_stain_rendered": {}}
    for name, stains in models.items():
        moved, rendered = stains.transfer(donors, ut, ud, us), stains.transfer(tiles, types, own, own, own="render")
        for part, label, want, got in (
            ("unseen_stain", "unseen stain, moved ground-truth donors", us, moved),
            ("seen_stain_rendered", "seen stain, ground truth rendered at its own site", own, rendered),
        ):
            hit = probes.stain_probe.predict(stain_features(got)) == want
            by_site = {s: round(float(hit[want == s].mean()), 2) for s in sorted(owner)}
            out[part][name] = {"all": round(float(hit.mean()), 3), "by_site": by_site}
            print(f"{dataset}: {label}, {name}: {hit.mean():.3f} {by_site}", flush=True)
    return out


def world(dataset: str, per_pair: int, seed: int) -> dict:
    real, r_idx = read_tiles(dataset, ["train"], None)
    res = real.shape[1]
    est = E.estimate_site_stains(dataset, res)
    owner = est.owner
    probes = CalibratedProbes(get_encoder("random-conv"), dataset, r_idx, seed, res, sorted(owner))
    ut, us, ud = unseen_moves(owner, per_pair, seed)
    true = {s: P.site_stain(s) for s in owner}
    intensity = {s: np.array([np.linalg.norm(true[s].h), np.linalg.norm(true[s].e)]) for s in owner}
    directions = {s: np.stack([S.unit(true[s].h), S.unit(true[s].e)]) for s in owner}

    def replaced(**parts) -> S.SiteStains:
        return S.SiteStains(
            {s: dataclasses.replace(est.stains[s], **{k: v[s] for k, v in parts.items()}) for s in owner}, owner
        )

    identifiable = replaced(top=intensity)
    parts = dict(top=intensity, hed=directions, bg={s: true[s].bg for s in owner})
    true_parts, all_true = replaced(**parts), replaced(**parts)
    all_true.type_top = {t: np.ones(2) for t in all_true.type_top}  # the true intensity itself
    donors, sharp = render(list(zip(ut, ud)), res), render(list(zip(ut, ud)), res, blur=0.0)
    clean_donors = clean(list(zip(ut, ud)), res)
    neutral_pattern = neutral_patterns(est, dataset, res)
    neutral = replaced(pattern=neutral_pattern)
    arms = {
        "ground truth at the unseen pairs": render(list(zip(ut, us)), res),
        "donors not moved": donors,
        "moved, estimated (the product)": est.transfer(donors, ut, ud, us),
        "moved, identifiable intensity": identifiable.transfer(donors, ut, ud, us),
        "moved, identifiable intensity + true directions and background": true_parts.transfer(donors, ut, ud, us),
        "moved, estimated, sharp donors + exact target blur": move_and_blur(est, sharp, ut, ud, us, res),
        "moved, identifiable + true directions and background, sharp donors + exact target blur": move_and_blur(
            true_parts, sharp, ut, ud, us, res
        ),
        "moved, all true (intensity not identifiable)": all_true.transfer(donors, ut, ud, us),
        "moved, all true, sharp donors + exact target blur": move_and_blur(all_true, sharp, ut, ud, us, res),
        "rendered at the requested site, identifiable intensity": render_identifiable(ut, us, owner, res),
        "clean donors moved, estimated, no sensor noise": move_clean(est, clean_donors, ut, ud, us, 0, seed),
        "clean donors moved, estimated, + sensor noise": move_clean(est, clean_donors, ut, ud, us, 2, seed),
        "clean donors moved, identifiable + true directions and background, + sensor noise": move_clean(
            true_parts, clean_donors, ut, ud, us, 2, seed
        ),
        "... + the target's true scanner lines": move_clean(true_parts, clean_donors, ut, ud, us, 2, seed, True),
        "... + the target's true blur (no detail matching)": move_clean(
            true_parts, clean_donors, ut, ud, us, 2, seed, False, True
        ),
        "... + true lines and true blur": move_clean(true_parts, clean_donors, ut, ud, us, 2, seed, True, True),
        "moved, estimated, neutral pattern": neutral.transfer(donors, ut, ud, us),
        "clean donors moved, estimated, neutral pattern, + sensor noise": move_clean(
            neutral, clean_donors, ut, ud, us, 2, seed
        ),
        "clean donors moved, identifiable + true directions and background, neutral pattern, + noise": move_clean(
            replaced(**parts, pattern=neutral_pattern), clean_donors, ut, ud, us, 2, seed
        ),
        "clean donors moved, estimated, + true lines and true blur": move_clean(
            est, clean_donors, ut, ud, us, 2, seed, True, True
        ),
    }
    out = {"dataset": dataset, "sites": owner, "ceiling": probes.ceiling["unseen"], "tiles": len(ut)}
    for name, img in arms.items():
        r = probes.score(img, np.array(ut), np.array(us), np.zeros(len(ut), bool))["unseen"]
        out[name] = {k: round(r[k], 3) for k in ("type_accuracy", "stain_accuracy", "leakage")}
        print(f"{dataset}: {name:90s} {out[name]}", flush=True)
    return out


def write_worlds(worlds, t0: float, per_pair: int, out: str) -> None:
    """The benchmarks' raw JSON: one entry per world, with the seconds they took and the date."""
    result = {"worlds": worlds, "seconds": round(time.time() - t0, 1), "date": time.strftime("%Y-%m-%d")}
    with open(out, "w") as f:
        json.dump({**result, "per_pair": per_pair}, f, indent=2)
    print("wrote", out)


def run_worlds(world_fn, description: str, out: str) -> None:
    """A benchmark's command line: `world_fn(dataset, per_pair, seed)` for each world, one JSON."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dataset", nargs="+", required=True, help="demo worlds (ingested procedural datasets)")
    p.add_argument("--per-pair", type=int, default=30, help="moved tiles per unseen (type, site) pair")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out)
    args = p.parse_args()
    t0 = time.time()
    write_worlds([world_fn(d, args.per_pair, args.seed) for d in args.dataset], t0, args.per_pair, args.out)


def main() -> None:
    run_worlds(world, __doc__.split("\n")[0], "benchmarks/results/stain_ceiling.json")


if __name__ == "__main__":
    main()
