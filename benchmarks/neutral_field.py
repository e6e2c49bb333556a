"""Unseen stain pair by pair: which parts of the site model a moved tile needs together.

`stain_ceiling.py` and `site_model_parts.py` swap one part of the site model for the renderer's truth
at a time and report the mean over the unseen pairs. This one reports each unseen (type, site) pair
(so a part that mends some pairs and breaks others shows as such), for joint swaps of the *neutral
field* (the background OD and the scanner's lines: what a site adds whatever the tissue) and the
intensity, and for estimates of the neutral field and the level from the data:

- fine: the fixed pattern less its Gaussian blur of 1/8 of the tile (the type's layout is coarse),
  zero at its 2nd percentile, or with that blur's mean added back (the density the background and
  level were fitted against);
- floored: concentrations moved with an additive floor as well as the level's scale (a low quantile
  of each stain's concentrations, site relative to its own type's sites plus the requested type's, as
  `SiteStains.scale` does for the level);
- blurred level: the level (`S.level`, a q90 of the source tiles' concentrations) read after an 8 px
  Gaussian blur of the source tiles' RGB, so that each scanner's own blur (up to 4 px at source
  resolution), which lowers a sharp stain's high percentiles, differs less between sites;
- off-plane: the pattern as the per-pixel mean OD along the stain plane's normal divided by that
  normal's sum (a neutral density's share off the plane; tissue lies in it), zero at its 2nd
  percentile, the background refitted against it.

Ground-truth donors moved to every unseen pair, scored by each world's calibrated stain probe; the
true lines are the renderer's at the dataset's tile size resized to the model's (blur not applied).

    python benchmarks/neutral_field.py --dataset W0/data W1/data W2/data

W: a world as the demo ingests it (`medi-dist demo --seed K` writes K's to DIR/data; so does
`medi_dist.demo._ingest(DemoConfig(seed=K), DIR)`, seconds).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy.ndimage import gaussian_filter
from site_model_parts import estimate
from stain_ceiling import render, run_worlds, unseen_moves

from medi_dist.data import procedural as P
from medi_dist.data import site_stains as S
from medi_dist.data import stain_estimation as E
from medi_dist.evaluate.encoders import get_encoder
from medi_dist.evaluate.fidelity_job import CalibratedProbes, read_tiles, stain_features, tile_size


class Floored(S.SiteStains):
    """`transfer` with each stain's concentration floor (quantile `q` of QUANTILES) moved additively."""

    q = 2

    def floor(self, s: str) -> np.ndarray:
        return self.stains[s].quantiles[self.q]

    def type_floor(self, t: str) -> np.ndarray:
        return np.mean([self.floor(s) for s in self.owner if self.owner[s] == t], 0)

    def transfer(self, images, types, donors, sites, **_) -> np.ndarray:
        out = np.empty_like(images)
        for i, (img, t, d, s) in enumerate(zip(images, types, donors, sites)):
            conc, _ = self.stains[d].unmix(S.optical_density(img))
            want = self.floor(s) - self.type_floor(self.owner[s]) + self.type_floor(t)
            conc = (conc - self.floor(d)) * (self.scale(t, s) / self.stains[d].top) + want
            out[i] = self.stored(256 * np.exp(-self.stains[s].mix(conc, 0)) - 1, t, s)
        return out


def off_plane(st: S.Stain, od: np.ndarray) -> S.Stain:
    """The site's pattern from the OD off its stain plane, background refitted against it."""
    n = S.unit(np.cross(st.hed[0], st.hed[1]))
    pattern = (od @ n).mean(0) / n.sum()
    pattern -= np.percentile(pattern, 2)
    _, res = S.Stain(st.hed, np.zeros(3), pattern, st.top).unmix(od)
    new = replace(st, pattern=pattern, bg=np.median(res.reshape(-1, 3), 0))
    return replace(new, quantiles=S.concentration_quantiles(new.unmix(od)[0]))


BLUR, LEVEL = 8.0, S.level  # px at source resolution; today's level, read after the blur


def blurred_level(od: np.ndarray, hed: np.ndarray, q: float = 90, blur: float = BLUR) -> np.ndarray:
    """`S.level` of the source tiles blurred by `blur` px in RGB (every site's blur is then near the same)."""
    rgb = 256 * np.exp(-od.astype(np.float64)) - 1
    return LEVEL(S.optical_density(gaussian_filter(rgb, (0, blur, blur, 0))), hed, q)


def world(dataset: str, per_pair: int, seed: int) -> dict:
    real, r_idx = read_tiles(dataset, ["train"], None)
    res, native = real.shape[1], tile_size(dataset)
    est = E.estimate_site_stains(dataset, res)
    owner = est.owner
    probes = CalibratedProbes(get_encoder("random-conv"), dataset, r_idx, seed, res, sorted(owner))
    ut, us, ud = unseen_moves(owner, per_pair, seed)
    true = {s: P.site_stain(s) for s in owner}
    idx = pd.read_parquet(Path(dataset) / "index.parquet")
    idx = idx[idx["split"] == "train"]

    def lines(s: str) -> np.ndarray:
        im = Image.fromarray(P.line_pattern(true[s], native).astype(np.float32), mode="F")
        return np.asarray(im.resize((res, res), Image.BILINEAR), np.float64)

    def fine_mean(p: np.ndarray) -> np.ndarray:
        g = gaussian_filter(p, res / 8, mode="wrap")
        return p - g + g.mean()

    def fine(p: np.ndarray) -> np.ndarray:  # session 20's fine pattern: zero at its 2nd percentile
        f = p - gaussian_filter(p, res / 8, mode="wrap")
        return f - np.percentile(f, 2)

    def swapped(base: S.SiteStains, cls=S.SiteStains, **parts) -> S.SiteStains:
        return cls({s: replace(base.stains[s], **{k: v[s] for k, v in parts.items()}) for s in owner}, owner)

    def od(s: str) -> np.ndarray:
        return S.optical_density(E._site_sample(Path(dataset), idx[idx[S.SITE] == s], s, res, 0)[1])

    top = {s: np.array([np.linalg.norm(true[s].h), np.linalg.norm(true[s].e)]) for s in owner}
    field = dict(bg={s: true[s].bg for s in owner}, pattern={s: lines(s) for s in owner})
    dirs = {s: np.stack([S.unit(true[s].h), S.unit(true[s].e)]) for s in owner}
    plane = S.SiteStains({s: off_plane(est.stains[s], od(s)) for s in owner}, owner)
    arms = {
        "estimated (the product)": est,
        "identifiable intensity": swapped(est, top=top),
        "true background": swapped(est, bg=field["bg"]),
        "true lines": swapped(est, pattern=field["pattern"]),
        "true background and lines": swapped(est, **field),
        "true background and lines, identifiable intensity": swapped(est, **field, top=top),
        "... and true directions": swapped(est, **field, top=top, hed=dirs),
        "estimated background, true lines, identifiable intensity": swapped(est, pattern=field["pattern"], top=top),
        "true background, estimated pattern, identifiable intensity": swapped(est, bg=field["bg"], top=top),
        "true background, fine pattern (1/8), identifiable intensity": swapped(
            est, bg=field["bg"], pattern={s: fine(est.stains[s].pattern) for s in owner}, top=top
        ),
        "fine pattern (1/8), mean kept": swapped(est, pattern={s: fine_mean(est.stains[s].pattern) for s in owner}),
        "floored (2.5 %)": swapped(est, Floored),
        "floored (2.5 %), identifiable intensity": swapped(est, Floored, top=top),
        "blurred level (8 px at source resolution)": estimate(dataset, res, level=blurred_level),
        "off-plane pattern, background refitted": plane,
        "off-plane pattern, identifiable intensity": swapped(plane, top=top),
    }
    ut, us = np.array(ut), np.array(us)
    gt = probes.stain_probe.predict(stain_features(render(list(zip(ut, us)), res)))
    donors = render(list(zip(ut, ud)), res)
    pairs = [(t, s) for t in sorted(set(ut)) for s in sorted(set(us[ut == t]))]
    out = {"dataset": dataset, "sites": owner, "tiles": len(ut), "arms": {}}
    hit = {"ground truth at the pair": gt == us}
    for name, stains in arms.items():
        hit[name] = probes.stain_probe.predict(stain_features(stains.transfer(donors, ut, ud, us))) == us
        print(f"{dataset}: {name:55s} {hit[name].mean():.3f}", flush=True)
    for name, h in hit.items():
        by_pair = {f"{t}->{s}": round(float(h[(ut == t) & (us == s)].mean()), 2) for t, s in pairs}
        out["arms"][name] = {"stain_accuracy": round(float(h.mean()), 3), "by_pair": by_pair}
    print("pair (owner of the site)   " + " ".join(f"{i:>5d}" for i in range(len(hit))))
    for t, s in pairs:
        row = " ".join(f"{out['arms'][n]['by_pair'][f'{t}->{s}']:5.2f}" for n in hit)
        print(f"{t:>6s} -> {s} ({owner[s]:6s})   {row}")
    print("columns: " + "; ".join(f"{i} {n}" for i, n in enumerate(hit)), flush=True)
    return out


def main() -> None:
    run_worlds(world, __doc__.split("\n")[0], "benchmarks/results/neutral_field.json")


if __name__ == "__main__":
    main()
