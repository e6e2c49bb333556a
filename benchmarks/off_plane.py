"""What the site model leaves off the stain plane: a line on the concentrations, a per-site OD map.

`site_fit.py` and `eosin_direction.py` (session 23) found the estimated off-plane background carrying
the direction errors: a few degrees off, the true stains leave the estimated plane in proportion to
their concentrations, and the median OD off the plane (the product's background)
holds that only at a site's typical density. `off_plane` fits the line instead (a background and a
lift per stain), and a rendered tile takes it back (`Lifted`). Or, whatever the rendering leaves
out at a site (off-plane OD, the scanner's blur acting on light, not OD), a per-site, per-channel map
of the OD of every tile rendered there, fitted so that the site's own training tiles rendered through
it match their real OD's mean (offset) or mean and spread (affine) (`Mapped`). Five site models per
world: today's (median), the lift, the lift on the eosin-axis directions (`eosin_direction.candidate`),
today's with the offset map, today's with the affine map. Unseen stain of ground-truth donors moved
to every unseen pair and seen stain of ground-truth tiles rendered through their own site's stain
(each world's calibrated stain probe), per target site:

    python benchmarks/off_plane.py --dataset W0/data W1/data W2/data

W: a world as the demo ingests it (`medi_dist.demo._ingest(DemoConfig(seed=K), DIR)` writes K's to
DIR/data, seconds).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from eosin_direction import candidate
from stain_ceiling import moved_and_rendered, run_worlds

from medi_dist.data import site_stains as S
from medi_dist.data import stain_estimation as E
from medi_dist.evaluate.encoders import get_encoder
from medi_dist.evaluate.fidelity_job import CalibratedProbes, read_tiles


@dataclass
class Lifted(S.Stain):
    lift: np.ndarray | None = None  # (2, 3): the OD off the stain plane each unit of h and e brings

    def mix(self, conc: np.ndarray, residual: np.ndarray) -> np.ndarray:
        return conc @ (self.hed + self.lift) + residual + self.bg + self.pattern[..., None]


def off_plane(od: np.ndarray, st: S.Stain) -> tuple[np.ndarray, np.ndarray]:
    """Background (3,) and lift (2, 3) of the OD off the stain plane: its least-squares line on the
    concentrations of a site's (N, H, W, 3) OD."""
    n = S.unit(np.cross(*st.hed))
    conc, res = replace(st, bg=np.zeros(3)).unmix(od)
    c = conc.reshape(-1, 2)
    coef = np.linalg.lstsq(np.column_stack([np.ones(len(c)), c]), res.reshape(-1, 3) @ n, rcond=None)[0]
    return coef[0] * n, np.outer(coef[1:], n)


def fit_lifted(od: np.ndarray, hed: np.ndarray, top: np.ndarray, quality: int | None = None) -> Lifted:
    st = S.fit_site(od, hed, top, quality)
    bg, lift = off_plane(od, st)
    return Lifted(**{**vars(st), "bg": bg}, lift=lift)


class Mapped(S.SiteStains):
    """Site stains whose rendered tiles' OD goes through a per-site map (a, b): OD -> a * OD + b."""

    def __init__(self, stains: S.SiteStains, real: np.ndarray, sites: np.ndarray, affine: bool):
        super().__init__(stains.stains, stains.owner)
        self.maps: dict = {}
        for s in sorted(self.owner):
            x = real[sites == s][:256]
            y = self.transfer(x, [self.owner[s]] * len(x), [s] * len(x), [s] * len(x), own="render")
            ox, oy = (S.optical_density(v).reshape(-1, 3) for v in (x, y))
            a = ox.std(0) / oy.std(0) if affine else np.ones(3)
            self.maps[s] = a, ox.mean(0) - a * oy.mean(0)

    def stored(self, rgb: np.ndarray, t: str, s: str) -> np.ndarray:
        if s in self.maps:
            a, b = self.maps[s]
            rgb = 256 * np.exp(-(a * S.optical_density(np.clip(rgb, 0, None)) + b)) - 1
        return super().stored(rgb, t, s)


def estimated(dataset: str, res: int, lift: bool, directions=S.directions) -> S.SiteStains:
    """The site model estimated afresh, with or without the lift, on `directions`."""
    today = E.directions, E.fit_site
    E.directions, E.fit_site = directions, fit_lifted if lift else S.fit_site
    E._estimate.cache_clear()
    try:
        return E.estimate_site_stains(dataset, res)
    finally:
        E.directions, E.fit_site = today
        E._estimate.cache_clear()


def world(dataset: str, per_pair: int, seed: int) -> dict:
    real, r_idx = read_tiles(dataset, ["train"], None)
    res = real.shape[1]
    sites = r_idx[S.SITE].astype(str).to_numpy()
    median = estimated(dataset, res, False)
    models = {
        "median": median,
        "lift": estimated(dataset, res, True),
        "lift, eosin axis": estimated(dataset, res, True, candidate),
        "median, offset map": Mapped(median, real, sites, affine=False),
        "median, affine map": Mapped(median, real, sites, affine=True),
    }
    owner = models["median"].owner
    for s in sorted(owner):
        st = models["lift"].stains[s]
        print(f"{dataset}: {s} ({owner[s]}) lift {np.round(st.lift @ S.unit(np.cross(*st.hed)), 3)}", flush=True)
    probes = CalibratedProbes(get_encoder("random-conv"), dataset, r_idx, seed, res, sorted(owner))
    return {"dataset": dataset, **moved_and_rendered(dataset, models, owner, probes, res, per_pair, seed)}


def main() -> None:
    run_worlds(world, __doc__.split("\n")[0], "benchmarks/results/off_plane.json")


if __name__ == "__main__":
    main()
